"""Upper and lower bounds of every number the UI, the API and run configs accept.

One table so the CLI, the tabs and the HTTP API refuse the same things; a value outside its range is
an :class:`~medical_diffusion.errors.OutOfRangeError` (the API answers 422 naming the limit); the
evaluation jobs' own bounds are in :mod:`medical_diffusion.evaluation.limits`, which takes the shared
ones from here. The
bounds keep one request from holding the model for hours or allocating gigabytes.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Tuple

from medical_diffusion.errors import MedDiffError, OutOfRangeError

#: image width/height in pixels (multiples of 8, the VAE factor)
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 64, 2048
#: sampler steps of one image (A1111's UI allows 150)
MAX_SAMPLER_STEPS = 500
#: classifier-free guidance scale (A1111's UI allows 30)
MAX_CFG_SCALE = 50.0
#: an inpainting's mask blur and "only masked" padding, in pixels
MAX_MASK_BLUR = 256
MAX_INPAINT_PADDING = 2048
#: frames of one healthy -> diseased interpolation
MIN_INTERPOLATION_FRAMES, MAX_INTERPOLATION_FRAMES = 2, 32
#: seeds (-1: a random one where a route allows it)
MAX_SEED = 2**32 - 1
#: bootstrap repetitions of an FID confidence interval (paper: 1000; 0 = no interval; ~0.14 s each at 2048 features)
MAX_BOOTSTRAP_REPS = 10_000
#: prompt text length in characters
MAX_PROMPT_CHARS = 10_000
#: bytes of one JSON request body
MAX_BODY_BYTES = 1 << 20
#: training
MAX_VECTORS = 75  # one prompt chunk holds 75 tokens
MAX_TRAIN_STEPS = 1_000_000
MAX_BATCH_SIZE = 64
MAX_GRAD_ACCUMULATION = 1024
MIN_TRAIN_RESOLUTION, MAX_TRAIN_RESOLUTION = 8, 1024
MAX_PREVIEW_STEPS = 150
MAX_LEARNING_RATE = 10.0
MAX_MASK_WEIGHT = 1000.0
MAX_CLIP = 1e6
#: fixed timesteps per validation image (each evaluation runs images x this many denoiser passes)
MAX_VAL_TIMESTEPS = 32
#: min-SNR-gamma loss weighting (Hang et al. 2023 use 5)
MIN_SNR_GAMMA, MAX_SNR_GAMMA = 1e-3, 1e4
#: EMA decay of the trained vectors: strictly between 0 and 1
MIN_EMA_DECAY, MAX_EMA_DECAY = 1e-6, 1 - 1e-9

#: field name -> (low, high): the training config's numeric settings
TRAIN_BOUNDS: dict[str, Tuple[float, float]] = {
    "n_vectors": (1, MAX_VECTORS),
    "steps": (1, MAX_TRAIN_STEPS),
    "batch_size": (1, MAX_BATCH_SIZE),
    "grad_accumulation": (1, MAX_GRAD_ACCUMULATION),
    "seed": (0, MAX_SEED),
    "resolution": (MIN_TRAIN_RESOLUTION, MAX_TRAIN_RESOLUTION),
    "save_every": (0, MAX_TRAIN_STEPS),
    "preview_every": (0, MAX_TRAIN_STEPS),
    "preview_steps": (1, MAX_PREVIEW_STEPS),
    "preview_cfg": (0.0, MAX_CFG_SCALE),
    "preview_seed": (0, MAX_SEED),
    "init_random_scale": (0.0, 100.0),
    "mask_weight": (1e-6, MAX_MASK_WEIGHT),
    "clip_grad_norm": (1e-12, MAX_CLIP),
    "clip_grad_value": (1e-12, MAX_CLIP),
    "val_every": (0, MAX_TRAIN_STEPS),
    "val_timesteps": (1, MAX_VAL_TIMESTEPS),
    "min_snr_gamma": (MIN_SNR_GAMMA, MAX_SNR_GAMMA),
    "ema_decay": (MIN_EMA_DECAY, MAX_EMA_DECAY),
}

#: setting -> (low, high, whole number): what one sampled picture may ask for, in the tabs (sliders are
#: only the page's suggestion: a request can send any number) and behind the API's own checks
SAMPLING_BOUNDS: dict[str, Tuple[float, float, bool]] = {
    "steps": (1, MAX_SAMPLER_STEPS, True),
    "cfg_scale": (0.0, MAX_CFG_SCALE, False),
    "width": (MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, True),
    "height": (MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, True),
    "seed": (-1, MAX_SEED, True),
    "denoising_strength": (0.0, 1.0, False),
    "mask_blur": (0, MAX_MASK_BLUR, True),
    "padding": (0, MAX_INPAINT_PADDING, True),
}


#: why a limit is what it is, added to its error message
HINTS = {
    "n_vectors": " (one prompt chunk holds 75 tokens)",
    "ema_decay": " (strictly between 0 and 1, e.g. 0.999; leave it out for no EMA)",
    "min_snr_gamma": " (Hang et al. 2023 use 5; leave it out for the paper's unweighted loss)",
}


def check_range(name: str, value, low, high):
    """Return ``value`` if it is a finite number in ``[low, high]``; raise :class:`OutOfRangeError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MedDiffError(f"{name} must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value) or not low <= value <= high:
        raise OutOfRangeError(name, value, low, high, HINTS.get(name, ""))
    return value


def check_image_size(width: int, height: int, what: str = "image") -> None:
    """Width and height in range and multiples of 8."""
    for label, value in (("width", width), ("height", height)):
        check_range(f"{what} {label}", value, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        if value % 8:
            raise MedDiffError(f"{what} {label} must be a multiple of 8, got {value}")


def check_sampling(**settings: Any) -> dict[str, Any]:
    """``settings`` (``steps=``, ``cfg_scale=``, ``width=`` ...) checked against :data:`SAMPLING_BOUNDS` and
    converted (``int`` for whole numbers, else ``float``); a key the table lacks, or None, passes as it is.
    Width and height must be multiples of 8. Raises :class:`OutOfRangeError` / :class:`MedDiffError`."""
    checked = {}
    for key, value in settings.items():
        if key not in SAMPLING_BOUNDS or value is None:
            checked[key] = value
            continue
        low, high, whole = SAMPLING_BOUNDS[key]
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = int(value)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)
        check_range(key, value, low, high)
        if whole:
            if value != int(value):
                raise MedDiffError(f"{key} must be a whole number, got {value!r}")
            value = int(value)
            if key in ("width", "height") and value % 8:
                raise MedDiffError(f"{key} must be a multiple of 8, got {value}")
        checked[key] = value if whole else float(value)
    return checked
