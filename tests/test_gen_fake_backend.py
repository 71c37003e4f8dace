"""A tiny deterministic ``ModelBackend`` for generation tests (no diffusers needed), and checks
that it behaves like the real interface expects."""

from __future__ import annotations

import hashlib
import re
from typing import Mapping

import torch
import torch.nn.functional as F

from medical_diffusion.backend.base import ModelBackend


class FakeBackend(ModelBackend):
    """Word-hash text encoder, 2x2 average-pool "VAE", a small conv denoiser whose output
    depends on the text (mean of the conditioning) and on the timestep."""

    def __init__(self, seed: int = 0, width: int = 16, prediction_type: str = "epsilon"):
        g = torch.Generator().manual_seed(seed)
        self.text_width = width
        self.latent_channels = 4
        self.vae_scale_factor = 8
        self.prediction_type = prediction_type
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.conv1 = torch.randn(8, 4, 3, 3, generator=g) * 0.2
        self.conv2 = torch.randn(4, 8, 3, 3, generator=g) * 0.2
        self.text_proj = torch.randn(width, 4, generator=g) * 0.5
        self.calls = 0
        self.call_batches: list[int] = []

    def _word(self, word: str) -> torch.Tensor:
        digest = int(hashlib.sha256(word.encode()).hexdigest()[:8], 16)
        return torch.randn(self.text_width, generator=torch.Generator().manual_seed(digest))

    def text_to_vectors(self, text: str) -> torch.Tensor:
        words = re.findall(r"\w+|[^\w\s]", text)
        if not words:
            return torch.zeros(0, self.text_width)
        return torch.stack([self._word(w) for w in words])

    def token_embedding_norm(self) -> float:
        return float(self.text_width) ** 0.5

    def encode_prompt(self, prompt: str, embeddings: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        embeddings = embeddings or {}
        rows = [torch.full((1, self.text_width), 0.1)]
        for word in re.findall(r"[\w-]+|[^\w\s]", prompt):
            if word in embeddings:
                rows.append(embeddings[word].float())
            else:
                rows.append(self.text_to_vectors(word))
        vectors = torch.cat(rows)
        chunks = max(1, -(-(vectors.shape[0] - 1) // 75))
        total = 77 * chunks
        pad = torch.full((total - vectors.shape[0], self.text_width), -0.1)
        return torch.cat([vectors, pad])[None]

    def encode_images(self, pixels, *, sample=False, generator=None):
        lat = F.avg_pool2d(pixels.float(), 8)
        return torch.cat([lat, lat.mean(1, keepdim=True)], 1) * 0.5

    def decode_latents(self, latents):
        return torch.tanh(F.interpolate(latents[:, :3].float() * 2, scale_factor=8, mode="nearest"))

    def predict(self, latents, timesteps, cond):
        self.calls += 1
        self.call_batches.append(int(latents.shape[0]))
        h = F.conv2d(latents.float(), self.conv1, padding=1)
        h = torch.tanh(h + (timesteps.float() / 1000).view(-1, 1, 1, 1))
        out = F.conv2d(h, self.conv2, padding=1)
        text = cond.float().mean(1) @ self.text_proj  # (B, 4)
        return out + text.view(-1, 4, 1, 1) + 0.1 * latents.float()


def test_fake_backend_encodes_embeddings_and_words():
    fb = FakeBackend()
    vec = torch.ones(3, fb.text_width)
    a = fb.encode_prompt("hello emb", {"emb": vec})
    b = fb.encode_prompt("hello other")
    assert a.shape == (1, 77, fb.text_width) and not torch.equal(a, b)
    assert torch.equal(a[0, 2:5], vec)
    assert fb.encode_prompt(" ".join(["w"] * 80)).shape[1] == 154
