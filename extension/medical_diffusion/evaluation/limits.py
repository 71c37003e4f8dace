"""Bounds on the numeric inputs of the evaluation jobs, defined once.

The core functions (:func:`fid.compute_fid`, :func:`bootstrap.bootstrap_frechet`,
:func:`classifier.run_experiments`, :func:`quick_probe.quick_probe`), the CLI and the API/UI layers
all check against these constants, so a limit is changed in one place.
"""

from __future__ import annotations

from medical_diffusion.errors import MedDiffError
from medical_diffusion.limits import MAX_BOOTSTRAP_REPS, MAX_SEED  # shared with the API: one value each

MAX_FEATURE_BATCH = 1024  # images per feature-network batch
MAX_CLASSIFIER_STEPS = 1_000_000  # paper: 6250
MAX_CLASSIFIER_BATCH = 1024  # paper: 32
MAX_CLASSIFIER_RUNS = 1000  # paper: 10
MIN_CLASSIFIER_SIZE, MAX_CLASSIFIER_SIZE = 32, 1024  # paper: 196
MAX_MIX_IMAGES = 10_000_000  # real or synthetic images drawn for one mix (Table 2: up to 2000)
MAX_LR = 1.0

#: name -> (low, high), inclusive; the API can build its request models from this table.
INT_LIMITS = {
    "bootstrap_reps": (0, MAX_BOOTSTRAP_REPS),
    "batch_size": (1, MAX_FEATURE_BATCH),
    "seed": (0, MAX_SEED),
    "steps": (1, MAX_CLASSIFIER_STEPS),
    "classifier_batch_size": (1, MAX_CLASSIFIER_BATCH),
    "runs": (1, MAX_CLASSIFIER_RUNS),
    "size": (MIN_CLASSIFIER_SIZE, MAX_CLASSIFIER_SIZE),
    "mix_images": (0, MAX_MIX_IMAGES),
}


def check_int(name: str, value, low: int, high: int) -> int:
    """``value`` as an int within ``[low, high]``, else a one-line :class:`MedDiffError` naming ``name``."""
    try:
        whole = int(value)
    except (TypeError, ValueError, OverflowError):
        whole = None
    if whole is None or isinstance(value, (bool, str)) or whole != value:
        raise MedDiffError(f"{name} must be a whole number, got {value!r}")
    value = whole
    if not low <= value <= high:
        raise MedDiffError(f"{name} must be between {low} and {high}, got {value}")
    return value


def check_limit(name: str, value, key: str | None = None) -> int:
    """:func:`check_int` against :data:`INT_LIMITS` ``[key or name]``."""
    low, high = INT_LIMITS[key or name]
    return check_int(name, value, low, high)


def check_confidence(value: float) -> float:
    """A confidence level strictly between 0 and 1."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise MedDiffError(f"confidence must be a number between 0 and 1, got {value!r}") from None
    if not 0.0 < value < 1.0:
        raise MedDiffError(f"confidence must be between 0 and 1 (exclusive), got {value}")
    return value
