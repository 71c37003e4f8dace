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
