from __future__ import annotations

import numpy as np
import pytest
import torch

from medical_diffusion.errors import MedDiffError
from medical_diffusion.generation.guidance import combine_composable, encode_composable
from medical_diffusion.generation.sampling import (
    ImageRNG,
    get_sigmas,
    sample_euler_ancestral,
    sample_images,
    sample_latents,
    to_denoised,
)
from test_gen_fake_backend import FakeBackend

EMB = {"healthy": torch.randn(3, 16, generator=torch.Generator().manual_seed(1)),
       "sick": torch.randn(3, 16, generator=torch.Generator().manual_seed(2))}
KW = dict(steps=6, cfg_scale=2.0, width=32, height=32)


def _latents(backend, prompt, seeds=(7,), negative="", **kw):
    cond = encode_composable(backend, prompt, negative, EMB)
    return sample_latents(backend, cond, seeds=list(seeds), **{**KW, **kw})


def test_deterministic_per_seed_and_independent_of_batch():
    fb = FakeBackend()
    a = _latents(fb, "healthy", seeds=[7, 8])
    b = _latents(fb, "healthy", seeds=[7, 8])
    assert torch.equal(a, b)
    alone = _latents(fb, "healthy", seeds=[8])
    torch.testing.assert_close(alone[0], a[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[0], a[1])
    imgs = sample_images(fb, "healthy", embeddings=EMB, seed=3, batch_size=2, **KW)
    imgs2 = sample_images(fb, "healthy", embeddings=EMB, seed=3, batch_size=2, **KW)
    assert [np.asarray(i).tobytes() for i in imgs] == [np.asarray(i).tobytes() for i in imgs2]
    assert imgs[0].size == (32, 32)


def test_single_part_weight_one_equals_plain_cfg():
    fb = FakeBackend()
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    cond = encode_composable(fb, "healthy :1", "", EMB)
    eps_c = fb.predict(x, t, fb.encode_prompt("healthy", EMB))
    eps_u = fb.predict(x, t, fb.encode_prompt("", EMB))
    plain = eps_u + 2.0 * (eps_c - eps_u)
    out = combine_composable(torch.cat([eps_c, eps_u]), [[(0, 1.0)]], 2.0)
    torch.testing.assert_close(out, plain)
    # and through the whole sampler: "healthy :1" == "healthy" with a hand-written plain CFG loop
    sigmas, ts = get_sigmas(fb.alphas_cumprod, 5)
    rng = ImageRNG([4], (4, 4, 4))
    x0 = rng.next() * sigmas[0]

    def plain_cfg(x, sigma, t):
        c_in = 1 / (sigma**2 + 1) ** 0.5
        ec = fb.predict(x * c_in, t.reshape(1), fb.encode_prompt("healthy", EMB))
        eu = fb.predict(x * c_in, t.reshape(1), fb.encode_prompt("", EMB))
        return x - sigma * (eu + 2.0 * (ec - eu))

    ref = sample_euler_ancestral(plain_cfg, x0, sigmas, ts, rng.next)
    got = _latents(fb, "healthy :1", seeds=[4], steps=5)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert cond.weights == [1.0]


def test_zero_weight_parts_reduce_to_single_prompts():
    fb = FakeBackend()
    only_h = _latents(fb, "healthy")
    only_s = _latents(fb, "sick")
    torch.testing.assert_close(_latents(fb, "healthy :1 AND sick :0"), only_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_latents(fb, "healthy :0 AND sick :1"), only_s, atol=1e-5, rtol=1e-5)
    mid = _latents(fb, "healthy :0.5 AND sick :0.5")
    assert not torch.allclose(mid, only_h) and not torch.allclose(mid, only_s)


def test_all_parts_and_uncond_go_through_the_model_in_one_call():
    fb = FakeBackend()
    _latents(fb, "healthy :0.2 AND sick :0.3 AND healthy sick :0.5", seeds=[1, 2], steps=3)
    assert fb.call_batches == [2 * 3 + 2] * 3


def test_composable_weights_follow_the_formula():
    out = torch.arange(8.0).view(4, 2)  # rows: part0, part1 (image 0), uncond img0, ... (1 image)
    out = torch.tensor([[1.0, 2.0], [3.0, 5.0], [0.5, 0.5]])
    got = combine_composable(out, [[(0, 0.25), (1, -0.5)]], 3.0)
    expect = out[2] + 3.0 * (0.25 * (out[0] - out[2]) - 0.5 * (out[1] - out[2]))
    torch.testing.assert_close(got[0], expect)


def test_negative_prompt_changes_result_and_bad_sizes_are_rejected():
    fb = FakeBackend()
    assert not torch.allclose(_latents(fb, "healthy"), _latents(fb, "healthy", negative="sick"))
    with pytest.raises(MedDiffError, match="multiples of 8"):
        _latents(fb, "healthy", width=30)


def test_sigmas_log_schedule_matches_k_diffusion_definition():
    acp = FakeBackend().alphas_cumprod
    sigmas, ts = get_sigmas(acp, 10)
    train = ((1 - acp) / acp) ** 0.5
    assert sigmas.shape == (11,) and sigmas[-1] == 0 and ts.shape == (10,)
    torch.testing.assert_close(sigmas[0], train[-1])
    torch.testing.assert_close(sigmas[-2], train[0])
    # t = 999 * k / 9 -> log-linear between neighbours
    t = ts[3]
    lo, hi, w = int(t.floor()), int(t.ceil()), float(t - t.floor())
    expect = torch.exp((1 - w) * train[lo].log() + w * train[hi].log())
    torch.testing.assert_close(sigmas[3], expect)
    lin, _ = get_sigmas(acp, 10, "linear")
    torch.testing.assert_close(lin, sigmas, rtol=2e-3, atol=1e-6)  # both interpolations agree closely


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_ancestral_matches_diffusers_scheduler(prediction_type):
    diffusers = pytest.importorskip("diffusers")
    fb = FakeBackend(prediction_type=prediction_type)
    sched = diffusers.EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        timestep_spacing="linspace", prediction_type=prediction_type,
    )
    torch.testing.assert_close(sched.alphas_cumprod, fb.alphas_cumprod)
    steps = 8
    sched.set_timesteps(steps)
    cond = fb.encode_prompt("healthy", EMB)

    # diffusers loop on the raw model output
    g = torch.Generator().manual_seed(11)
    latents = torch.randn((1, 4, 4, 4), generator=g) * sched.init_noise_sigma
    for t in sched.timesteps:
        model_in = sched.scale_model_input(latents, t)
        out = fb.predict(model_in, t.reshape(1), cond)
        latents = sched.step(out, t, latents, generator=g).prev_sample

    # ours, with the same sigma interpolation and the same noise stream
    sigmas, ts = get_sigmas(fb.alphas_cumprod, steps, "linear")
    torch.testing.assert_close(sigmas, sched.sigmas)
    torch.testing.assert_close(ts, sched.timesteps)
    rng = ImageRNG([11], (4, 4, 4))
    x = rng.next() * sigmas[0]

    def denoise(x, sigma, t):
        c_in = 1 / (sigma**2 + 1) ** 0.5
        return to_denoised(fb.predict(x * c_in, t.reshape(1), cond), x, sigma.reshape(1), prediction_type)

    ours = sample_euler_ancestral(denoise, x, sigmas, ts, rng.next)
    torch.testing.assert_close(ours, latents, atol=1e-5, rtol=1e-5)
