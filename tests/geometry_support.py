"""Shared by the millimetre-geometry tests: the real ADC series and a disc's measured size."""

from __future__ import annotations

import numpy as np
import pytest

from medical_diffusion.datasets.generic_import import ImportOptions, prepare_images

#: the real DICOM ADC series under the sample data (84 x 128 pixels of 2 x 2 mm, 19 slices)
ADC = ("dicom_series", "ProstateX-0000_adc")


def diameters_px(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Diameters (x, y) of a filled disk from its second moments (4 sigma), and its centroid."""
    ys, xs = np.nonzero(mask > 127)
    return 4 * xs.std(), 4 * ys.std(), xs.mean(), ys.mean()


@pytest.fixture
def prepared_adc(testdata, tmp_path):
    """The ADC series through ``prepare images`` (middle slice): ``(series, OUT, result)``."""
    series = testdata.joinpath(*ADC)
    result = prepare_images(ImportOptions(inputs=(str(series),), out=str(tmp_path / "out")))
    assert not result.failures
    return series, tmp_path / "out", result
