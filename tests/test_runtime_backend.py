"""Backend runtime choices on the CPU: attention kernels, upcasts for fp16, causal text mask, memory counts."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from medical_diffusion.backend.numerics import vae_dtype_for  # noqa: E402
from medical_diffusion.errors import MedDiffError  # noqa: E402


def _processors(module):
    return {type(p).__name__ for p in module.attn_processors.values()}


def test_attention_modes_set_the_processors_and_agree():
    from medical_diffusion.backend.diffusers_backend import set_attention
    from medical_diffusion.backend.tiny import build_tiny_backend

    backend = build_tiny_backend(seed=0)
    assert backend.attention == "sdpa" and _processors(backend.unet) == {"AttnProcessor2_0"}
    assert _processors(backend.vae) == {"AttnProcessor2_0"}
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = backend.encode_prompt("a photo")
    t = torch.tensor([500.0])
    with torch.no_grad():
        sdpa = backend.predict(x, t, cond)
        assert set_attention(backend, "classic") == "classic" and _processors(backend.unet) == {"AttnProcessor"}
        classic = backend.predict(x, t, cond)
    torch.testing.assert_close(sdpa, classic, rtol=1e-4, atol=1e-5)


def test_xformers_missing_is_one_line():
    pytest.importorskip("diffusers")
    try:
        import xformers  # noqa: F401
        pytest.skip("xformers is installed here")
    except ImportError:
        pass
    from medical_diffusion.backend.tiny import build_tiny_backend

    with pytest.raises(MedDiffError, match="xformers is not installed") as info:
        build_tiny_backend(seed=0, attention="xformers")
    assert "\n" not in str(info.value)


def test_vae_upcast_policy_follows_force_upcast():
    class Cfg:
        force_upcast = False

    assert vae_dtype_for(torch.float16) is torch.float32  # SD2's VAE config: force_upcast absent = True
    assert vae_dtype_for(torch.float16, Cfg()) is torch.float16  # a fixed fp16 VAE says so itself
    assert vae_dtype_for(torch.bfloat16) is torch.bfloat16 and vae_dtype_for(torch.float32) is torch.float32


def test_fp16_backend_keeps_its_vae_in_fp32():
    from medical_diffusion.backend.tiny import build_tiny_backend

    backend = build_tiny_backend(seed=0, dtype=torch.float16)
    assert next(backend.unet.parameters()).dtype is torch.float16
    assert next(backend.text_encoder.parameters()).dtype is torch.float16
    assert backend.vae_dtype is torch.float32 and next(backend.vae.parameters()).dtype is torch.float32


def test_v_prediction_gets_upcast_attention(tmp_path):
    from diffusers.models.attention_processor import Attention

    from medical_diffusion.backend.diffusers_backend import load_backend
    from medical_diffusion.backend.tiny import build_tiny_backend, save_tiny_model

    backend = build_tiny_backend(seed=0)
    attn = [m for m in backend.unet.modules() if isinstance(m, Attention)]
    assert attn and not any(m.upcast_attention for m in attn)
    backend.set_prediction_type("v_prediction")
    assert all(m.upcast_attention for m in attn) and backend.unet.config.upcast_attention
    # a diffusers folder of a v-model whose UNet config lacks it (as the shipped 512-base config does)
    folder = save_tiny_model(tmp_path / "v", prediction_type="v_prediction")
    loaded = load_backend(str(folder))
    assert loaded.prediction_type == "v_prediction" and loaded.unet.config.upcast_attention
    assert all(m.upcast_attention for m in loaded.unet.modules() if isinstance(m, Attention))
    eps = load_backend(str(save_tiny_model(tmp_path / "e")))
    assert not eps.unet.config.upcast_attention


def test_text_encoder_is_causal(tiny_backend):
    """Position i must not see later tokens (transformers 5 ignores ``causal_attention_mask`` silently)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 77, 32, generator=g)
    b = a.clone()
    b[:, 40:] = torch.randn(1, 37, 32, generator=g)
    with torch.no_grad():
        za, zb = tiny_backend.encode_token_embeddings(a), tiny_backend.encode_token_embeddings(b)
    torch.testing.assert_close(za[:, :40], zb[:, :40])
    assert not torch.allclose(za[:, 40:], zb[:, 40:])


def test_memory_estimate_counts_weights_state_and_activations(tiny_backend):
    from medical_diffusion.backend.memory_estimate import measure_training_step, parameter_bytes

    est = measure_training_step(tiny_backend, resolution=64, n_vectors=8)
    unet = sum(p.numel() for p in tiny_backend.unet.parameters()) * 4
    assert est.weights["unet"] >= unet and "vae" not in est.weights
    assert est.trained_state == 4 * 8 * 32 * 4
    assert 0 < est.activations < 200 * 2**20
    assert parameter_bytes(tiny_backend.unet, torch.float16) * 2 == parameter_bytes(tiny_backend.unet)
    bigger = measure_training_step(tiny_backend, resolution=128, n_vectors=8, offload_vae=False)
    assert bigger.activations > 2 * est.activations and "vae" in bigger.weights  # activations grow with pixels
    assert "expected peak" in est.summary()
