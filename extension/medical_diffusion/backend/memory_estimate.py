"""What a training step keeps on the GPU: frozen weights, trained state and saved activations.

CUDA memory cannot be measured without a GPU, but what dominates it can be counted anywhere:
parameter bytes per component in the weights' dtype, the fp32 vectors with their gradient and
AdamW's two moments, and the tensors autograd saves for the backward pass (counted with
``torch.autograd.graph.saved_tensors_hooks`` during one forward pass, on any device).

Counted on the CPU for the real SD2 architecture (random weights from the shipped configs),
512 px, batch 1, 64 vectors, SDPA attention, fp32 then scaled to 2 bytes per element for fp16:

- UNet 865.9 M parameters = 1.61 GiB in fp16; OpenCLIP ViT-H text encoder 340.4 M = 0.63 GiB;
  VAE 83.7 M = 0.31 GiB in fp32 (upcast), 0 on the GPU once offloaded after caching;
- vectors + gradient + AdamW moments: 64 x 1024 x 4 x 4 B = 1 MiB;
- activations saved for the backward pass: 1.36 GiB counted in fp32 (0.40 GiB at 256 px), so about
  0.7 GiB in fp16 (:func:`measure_training_step`);
- expected CUDA peak: about 3.5 GiB allocated (weights 2.2 + activations 0.7 + backward transients),
  well under the 6 GiB goal; ``tests/test_gpu.py`` measures the real one on a GPU.

The activations and the UNet's weights dominate; the CUDA context (~0.3-0.5 GiB) and allocator
fragmentation come on top and are not counted by ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GIB = 2**30


@dataclass
class MemoryEstimate:
    """Bytes a training step needs on the model's device, by part."""

    weights: dict[str, int] = field(default_factory=dict)
    trained_state: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        return sum(self.weights.values()) + self.trained_state + self.activations

    def summary(self) -> str:
        parts = [f"{name} {b / GIB:.2f}" for name, b in self.weights.items()]
        parts += [f"vectors+AdamW {self.trained_state / 2**20:.1f} MiB", f"activations {self.activations / GIB:.2f}"]
        return f"expected peak {self.total / GIB:.2f} GiB (" + ", ".join(parts) + " GiB)"


def parameter_bytes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of ``module``'s parameters and buffers, in ``dtype`` (default: as they are stored)."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        size = torch.empty((), dtype=dtype).element_size() if dtype is not None else t.element_size()
        total += t.numel() * size
    return total


def trained_state_bytes(n_vectors: int, width: int) -> int:
    """fp32 vectors, their gradient and AdamW's two moments."""
    return 4 * n_vectors * width * 4


class SavedTensorCounter:
    """Count the distinct storages autograd saves for backward (parameters excluded: they are weights)."""

    def __init__(self, exclude: list[torch.Tensor] = ()):
        self._skip = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[int, int] = {}
        self._hooks = None

    def _pack(self, tensor: torch.Tensor):
        try:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._skip:
                self._seen[ptr] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (views of meta, etc.)
            pass
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> "SavedTensorCounter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def measure_training_step(backend, resolution: int = 512, n_vectors: int = 64, batch_size: int = 1,
                          offload_vae: bool = True, prompt_name: str = "x") -> MemoryEstimate:
    """Count one training step of ``backend`` (a :class:`DiffusersBackend`) without running the backward.

    Weights are counted in the backend's own dtypes; the VAE only when not ``offload_vae``.
    Activations are the bytes autograd saves in the forward pass (in the backend's dtype).
    """
    device = backend.device
    param = torch.nn.Parameter(torch.randn(n_vectors, backend.text_width, device=device) * 0.01)
    h = resolution // backend.vae_scale_factor
    latents = torch.randn(batch_size, backend.latent_channels, h, h, device=device)
    noise = torch.randn_like(latents)
    t = torch.full((batch_size,), 500.0, device=device)
    encoders = getattr(backend, "text_encoders", [backend.text_encoder])
    weights = [p for m in (backend.unet, *encoders, backend.vae) for p in m.parameters()]
    with SavedTensorCounter(exclude=weights) as counter:
        cond = backend.encode_prompt(prompt_name, {prompt_name: param}).expand(batch_size, -1, -1)
        loss = backend.diffusion_loss(latents, cond, noise, t)
    del loss, cond
    parts = {"unet": parameter_bytes(backend.unet), "text_encoder": sum(parameter_bytes(m) for m in encoders)}
    if not offload_vae:
        parts["vae"] = parameter_bytes(backend.vae)
    return MemoryEstimate(weights=parts, trained_state=trained_state_bytes(n_vectors, backend.text_width),
                          activations=counter.bytes)
