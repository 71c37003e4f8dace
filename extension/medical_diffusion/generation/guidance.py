"""Composable classifier-free guidance (A1111 ``CFGDenoiser``): every ``AND`` part and one shared
unconditional/negative prompt go through the model together and are combined as

    out = out_uncond + cfg * sum_i w_i * (out_i - out_uncond)

which holds for noise predictions and for denoised images alike (they are affine in each other).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from medical_diffusion.backend.base import ModelBackend
from medical_diffusion.generation.prompts import get_multicond_prompt_list


@dataclass
class ComposableConditioning:
    """Encoded prompt parts: unique part texts, per-part ``(index, weight)``, and the negative prompt."""

    texts: list[str]
    parts: list[tuple[int, float]]  # (row of ``conds``, weight) for each AND part, in prompt order
    conds: torch.Tensor  # (n_unique_texts, tokens, width)
    uncond: torch.Tensor  # (1, tokens', width)

    @property
    def weights(self) -> list[float]:
        return [w for _, w in self.parts]


def stack_conds(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack ``(tokens, width)`` conditionings, padding shorter ones by repeating their last vector
    (A1111 ``prompt_parser.stack_conds``)."""
    length = max(t.shape[0] for t in tensors)
    padded = []
    for t in tensors:
        if t.shape[0] != length:
            t = torch.cat([t, t[-1:].repeat(length - t.shape[0], 1)])
        padded.append(t)
    return torch.stack(padded)


def encode_composable(
    backend: ModelBackend,
    prompt: str,
    negative_prompt: str = "",
    embeddings: Mapping[str, torch.Tensor] | None = None,
) -> ComposableConditioning:
    """Split ``prompt`` on ``AND`` (A1111 rules) and encode each distinct part once.

    An empty negative prompt is all zeros (text and pooled rows) for a backend with
    ``zero_empty_negative`` (SDXL, as A1111's ``force_zero_negative_prompt`` and diffusers'
    ``force_zeros_for_empty_prompt``).
    """
    (parts,), texts, _ = get_multicond_prompt_list([prompt])
    with torch.no_grad():
        conds = stack_conds([backend.encode_prompt(text, embeddings)[0] for text in texts])
        uncond = backend.encode_prompt(negative_prompt, embeddings)
        if negative_prompt == "" and getattr(backend, "zero_empty_negative", False):
            uncond = torch.zeros_like(uncond)
    return ComposableConditioning(texts=texts, parts=parts, conds=conds, uncond=uncond)


def combine_composable(
    out: torch.Tensor, conds_list: Sequence[Sequence[tuple[int, float]]], cfg_scale: float
) -> torch.Tensor:
    """A1111 ``combine_denoised``: ``out`` holds the rows of every cond part followed by one
    unconditional row per image; ``conds_list[i]`` lists ``(row, weight)`` of image ``i``."""
    n = len(conds_list)
    uncond = out[-n:]
    combined = uncond.clone()
    for i, conds in enumerate(conds_list):
        for row, weight in conds:
            combined[i] += (out[row] - uncond[i]) * (weight * cfg_scale)
    return combined


def batched_model_inputs(
    x: torch.Tensor, t: torch.Tensor, cond: ComposableConditioning
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[list[tuple[int, float]]]]:
    """Rows for one model call: each image repeated once per part, then the images again for the
    uncond. Returns ``x_in, t_in, cond rows, uncond rows, conds_list``."""
    batch = x.shape[0]
    n_parts = len(cond.parts)
    x_in = torch.cat([x.repeat_interleave(n_parts, dim=0), x])
    t_in = torch.cat([t.repeat_interleave(n_parts, dim=0), t])
    rows = torch.tensor([index for index, _ in cond.parts], dtype=torch.long)
    cond_rows = cond.conds[rows].repeat(batch, 1, 1)
    uncond_rows = cond.uncond.expand(batch, -1, -1)
    conds_list = [[(i * n_parts + j, w) for j, (_, w) in enumerate(cond.parts)] for i in range(batch)]
    return x_in, t_in, cond_rows, uncond_rows, conds_list


def run_model(
    backend: ModelBackend, x_in: torch.Tensor, t_in: torch.Tensor, cond_rows: torch.Tensor, uncond_rows: torch.Tensor
) -> torch.Tensor:
    """Raw model outputs for the cond rows then the uncond rows: one call when the token lengths
    agree, else two (A1111 does the same without its padding options)."""
    n_cond = cond_rows.shape[0]
    dtype = backend.dtype
    if cond_rows.shape[1] == uncond_rows.shape[1]:
        text = torch.cat([cond_rows, uncond_rows]).to(backend.device, dtype)
        return backend.predict(x_in.to(backend.device, dtype), t_in.to(backend.device), text).float()
    first = backend.predict(x_in[:n_cond].to(backend.device, dtype), t_in[:n_cond].to(backend.device),
                            cond_rows.to(backend.device, dtype))
    second = backend.predict(x_in[n_cond:].to(backend.device, dtype), t_in[n_cond:].to(backend.device),
                             uncond_rows.to(backend.device, dtype))
    return torch.cat([first, second]).float()
