"""``meddiff demo`` end to end on the smallest settings: the report explains what a random model shows."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("SimpleITK")

from medical_diffusion.demo import pipeline  # noqa: E402
from medical_diffusion.evaluation import weights as w  # noqa: E402


def test_demo_defaults_use_the_papers_vector_count_and_a_short_classifier():
    opts = pipeline.DemoOptions(out="x")
    assert opts.vectors == 64
    # ResNet-18 work per demo, in (steps x images x pixels): the old 40 x 8 x 64^2 per run took ~73% of the demo
    assert opts.classifier_runs * opts.classifier_steps * opts.classifier_batch * opts.classifier_size ** 2 \
        <= 2 * 40 * 8 * 64 ** 2 / 10


@pytest.mark.slow
def test_demo_report_explains_the_random_model_and_shows_the_generated_images(tmp_path, monkeypatch):
    def no_inception(path=None):
        raise w.MissingWeightsError(w.INCEPTION_FILES[0], [tmp_path], "put it somewhere", kind="inception")

    monkeypatch.setattr(w, "find_inception_weights", no_inception)
    opts = pipeline.DemoOptions(out=tmp_path / "demo", cases_per_class=3, split_per_class=1, train_steps=2,
                                sample_steps=2, frames=2, images_per_class=2, classifier_steps=2, classifier_runs=1)
    report = pipeline.run_demo(opts)
    html = report.read_text()
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))
    assert "64 vectors per embedding, as in the paper" in text
    assert "The two loss curves look alike" in text and "same seed" in text
    frames = re.search(r"first and last frames differ by ([0-9.]+) grey levels", text)
    assert frames and float(frames.group(1)) >= 0
    assert "frames look identical because" in text
    assert "src='synthetic_sheet.png'" in html and (tmp_path / "demo" / "synthetic_sheet.png").is_file()
    assert "2 steps of 8 at 32 px, 1 runs per mix" in text
    assert "Skipped: pt_inception-2015-12-05-6726825d.pth: weights file not found" in text
    assert "--inception-weights" not in text
    for name in ("phantom_neg", "phantom_pos"):
        from medical_diffusion.embeddings import load_embedding

        assert load_embedding(tmp_path / "demo" / "embeddings" / f"{name}.pt", expected_width=32).n_vectors == 64


def test_frame_change_measures_pixel_difference():
    from PIL import Image

    a, b = Image.new("RGB", (4, 4), (10, 10, 10)), Image.new("RGB", (4, 4), (14, 10, 10))
    assert pipeline.frame_change(a, a) == 0.0
    assert pipeline.frame_change(a, b) == pytest.approx(4 / 3)
