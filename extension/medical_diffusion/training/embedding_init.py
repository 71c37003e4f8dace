"""Initial vectors of a new embedding (A1111 semantics for text initialisation)."""

from __future__ import annotations

import torch

from medical_diffusion.backend.base import ModelBackend
from medical_diffusion.errors import MedDiffError


def initial_vectors(
    backend: ModelBackend, n_vectors: int, mode: str = "text", init_text: str = "*", seed: int = 0,
    random_scale: float = 0.01,
) -> torch.Tensor:
    """``(n_vectors, width)`` float32 on CPU.

    - ``"text"``: A1111's ``create_embedding``: vector ``i`` is token ``i * k // n`` of the
      ``k`` tokens of ``init_text`` (so tokens are spread over, or repeated across, the vectors);
    - ``"zeros"``;
    - ``"random"``: Gaussian, each vector's expected norm ``random_scale`` x the vocabulary's
      mean token norm.
    """
    width = backend.text_width
    if mode == "zeros":
        return torch.zeros(n_vectors, width)
    if mode == "random":
        g = torch.Generator().manual_seed(seed)
        scale = random_scale * backend.token_embedding_norm() / width**0.5
        return torch.randn(n_vectors, width, generator=g) * scale
    if mode != "text":
        raise MedDiffError(f"unknown init mode {mode!r}")
    embedded = backend.text_to_vectors(init_text or "*").float().cpu()
    if embedded.shape[0] == 0:
        raise MedDiffError(f"init text {init_text!r} has no tokens")
    k = int(embedded.shape[0])
    index = torch.tensor([i * k // n_vectors for i in range(n_vectors)])
    return embedded[index].clone()
