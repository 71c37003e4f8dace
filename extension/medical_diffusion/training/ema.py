"""Exponential moving average of the trained vectors (fp32, on the training device)."""

from __future__ import annotations

import torch

from medical_diffusion.errors import MedDiffError


class VectorEma:
    """``ema <- decay * ema + (1 - decay) * vectors`` after every optimizer step, starting at the initial vectors."""

    def __init__(self, vectors: torch.Tensor, decay: float):
        self.decay = float(decay)
        self.shadow = vectors.detach().to(torch.float32).clone()

    @torch.no_grad()
    def update(self, vectors: torch.Tensor) -> None:
        self.shadow.mul_(self.decay).add_(vectors.detach().to(self.shadow), alpha=1.0 - self.decay)

    def state_dict(self) -> dict:
        """What the ``.optim`` state file keeps (CPU tensors) to resume exactly."""
        return {"decay": self.decay, "shadow": self.shadow.detach().to("cpu").clone()}

    def load_state_dict(self, state: dict, source: str = "training state") -> None:
        shadow = state.get("shadow") if isinstance(state, dict) else None
        if not isinstance(shadow, torch.Tensor) or shadow.shape != self.shadow.shape:
            raise MedDiffError(f"{source}: the EMA state is missing or has another shape")
        self.shadow.copy_(shadow.to(self.shadow))

    def copy(self) -> torch.Tensor:
        return self.shadow.detach().clone()

    def restore(self, saved: torch.Tensor) -> None:
        self.shadow.copy_(saved)
