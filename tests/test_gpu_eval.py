"""On a CUDA GPU: the classifier's AMP step, Inception features on the GPU against the CPU, batched
generation against single images in fp16.

Skipped without CUDA. Random-weight networks (no download): what is checked is numerical agreement
and finiteness, not quality. Each test prints what it measured (``pytest -s`` shows it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; skipped without one")]


def test_amp_classifier_steps_are_finite_and_learn_a_toy():
    """fp16 autocast + GradScaler, channels-last, on a toy whose positives carry a bright square."""
    from torchvision.models import resnet18

    from medical_diffusion.evaluation import classifier as clf

    device = torch.device("cuda")
    config = clf.ClassifierConfig(device="cuda")
    torch.manual_seed(0)
    model = resnet18(weights=None)
    model.fc = nn.Linear(model.fc.in_features, 1)
    model = clf.place_model(model, device, config.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = clf.grad_scaler_for(device, config)
    assert scaler is not None
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        y = torch.randint(0, 2, (32,), generator=g)
        x = torch.rand(32, 3, 64, 64, generator=g) * 0.3
        x[y == 1, :, 16:48, 16:48] += 0.6
        losses.append(float(clf.train_step(model, opt, clf.to_model_input(x, device, True), y, config=config,
                                           scaler=scaler)))
    print(f"AMP losses: first {np.mean(losses[:5]):.4f}, last {np.mean(losses[-5:]):.4f}")
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_inception_features_on_cuda_match_the_cpu(tmp_path):
    """Through the DataLoader path, with TF32 switched on beforehand (as the model commands do):
    the extractor's strict fp32 keeps the GPU's features within 1e-3 relative of the CPU's."""
    from medical_diffusion.devices import configure_for_speed
    from medical_diffusion.evaluation.features import FeatureExtractor, extract_features
    from medical_diffusion.evaluation.inception import INPUT_SIZE, FIDInceptionV3
    from medical_diffusion.png_io import save_png

    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        save_png(rng.integers(0, 255, (128, 128), dtype=np.uint8), paths[-1])
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    configure_for_speed(torch.device("cuda"))
    cpu = extract_features(paths, FeatureExtractor("inception", net, INPUT_SIZE, "r" * 64), batch_size=4,
                           device="cpu").features
    gpu = extract_features(paths, FeatureExtractor("inception", net, INPUT_SIZE, "r" * 64), batch_size=4,
                           device="cuda", workers=2).features
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # restored after
    rel = float(np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu))
    print(f"Inception features cuda vs cpu: relative difference {rel:.2e}")
    assert gpu.shape == cpu.shape == (6, 2048) and rel < 1e-3


def test_tiny_fp16_batch_of_four_equals_four_single_images():
    """The same per-seed noise on the GPU; fp16 kernels for batch 4 and batch 1 may round differently
    (fp16 keeps ~3 decimal digits), so the tolerance is 1e-2 of the latents' scale."""
    pytest.importorskip("diffusers")
    from medical_diffusion.backend.tiny import build_tiny_backend
    from medical_diffusion.generation.guidance import encode_composable
    from medical_diffusion.generation.sampling import sample_latents

    backend = build_tiny_backend(seed=0, device="cuda", dtype=torch.float16)
    g = torch.Generator().manual_seed(0)
    emb = {"healthy": torch.randn(4, 32, generator=g) * 0.3, "sick": torch.randn(4, 32, generator=g) * 0.3}
    cond = encode_composable(backend, "healthy :0.6 AND sick :0.4", "", emb)
    kw = dict(steps=4, cfg_scale=3.0, width=64, height=64)
    seeds = [5, 6, 7, 8]
    batch = sample_latents(backend, cond, seeds=seeds, **kw)
    singles = torch.cat([sample_latents(backend, cond, seeds=[s], **kw) for s in seeds])
    scale = float(singles.abs().max())
    diff = float((batch - singles).abs().max())
    print(f"fp16 batch vs singles: max difference {diff:.3e} of scale {scale:.2f}")
    assert torch.isfinite(batch).all() and diff <= 1e-2 * scale
    assert float((singles[0] - singles[1]).abs().max()) > 0.1 * scale
