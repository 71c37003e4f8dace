import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "extension"))

#: Real sample data (``../shared/testdata`` beside the repository, or $MEDDIFF_TESTDATA).
TESTDATA = Path(os.environ.get("MEDDIFF_TESTDATA", ROOT.parent / "shared" / "testdata"))


@pytest.fixture
def testdata() -> Path:
    """The real sample data folder; the test is skipped when it is absent."""
    if not TESTDATA.is_dir():
        pytest.skip(f"real sample data not found at {TESTDATA} (set MEDDIFF_TESTDATA)")
    return TESTDATA


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tests use tiny models: one thread is fastest, and extra threads only spin on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_backend():
    """The tiny random-weight SD2-shaped model (seed 0), built once per test module."""
    pytest.importorskip("diffusers")
    from medical_diffusion.backend.tiny import build_tiny_backend

    return build_tiny_backend(seed=0)
