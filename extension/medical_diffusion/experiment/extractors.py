"""Weight-free feature extractors for smoke tests of the FID stages (not FID: no network, no weights).

``pixels``: the image (as the FID preprocessing loads it, 32 x 32) average-pooled to 2 x 2 per channel,
12 numbers. Deterministic on any CPU; use it to exercise the pipeline where Inception is absent.
"""

from __future__ import annotations

from torch import nn

from medical_diffusion.evaluation.features import FeatureExtractor, load_extractor

SIMPLE_EXTRACTORS = ("pixels",)


def build_extractor(name: str, weights: str | None = None) -> FeatureExtractor:
    """``pixels`` here; ``inception`` / ``radimagenet`` from :func:`evaluation.features.load_extractor`."""
    if name == "pixels":
        model = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())
        return FeatureExtractor("pixels", model, 32, "avgpool2x2-no-weights", "")
    return load_extractor(name, weights)
