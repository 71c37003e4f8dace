"""Request bodies of the HTTP API (pydantic 1.10), every number bounded by :mod:`medical_diffusion.limits`.

:func:`parse_body` turns a validation failure into one readable line: 400 for missing fields, 422 for
values of the wrong type or outside their limit (the message names the limit). Flags are strict
booleans: ``"yes"``, ``1`` or ``"true"`` is a 422, never a silent yes.
"""

from __future__ import annotations

from typing import Any, Dict, Literal, Optional, Type, TypeVar

from pydantic import BaseModel, StrictBool, ValidationError, confloat, conint, constr

from medical_diffusion import limits

#: FID settings; the evaluation module's own bounds replace these once it exposes them
MAX_BOOTSTRAP_REPS = limits.MAX_BOOTSTRAP_REPS
FID_EXTRACTORS = ("inception", "radimagenet")
FID_MODES = ("paper", "clean")
FID_RESAMPLE = ("both", "generated")

PathText = constr(strict=True, min_length=1, max_length=4096)
PromptText = constr(strict=True, max_length=limits.MAX_PROMPT_CHARS)
Seed = conint(strict=True, ge=-1, le=limits.MAX_SEED)
ImageSize = conint(strict=True, ge=limits.MIN_IMAGE_SIZE, le=limits.MAX_IMAGE_SIZE, multiple_of=8)


class _Body(BaseModel):
    class Config:
        extra = "forbid"


class TrainRequest(_Body):
    """``POST /train``: the config's fields are checked by ``TrainConfig.validate`` (shared with CLI and tab):
    every number within :data:`medical_diffusion.limits.TRAIN_BOUNDS` (422 otherwise), including the
    training-quality options ``val_every``, ``val_timesteps``, ``min_snr_gamma`` and ``ema_decay``."""

    config: Dict[str, Any] = {}
    run_dir: Optional[PathText] = None
    resume: StrictBool = False
    #: the final embedding may replace a different one of its name in the embeddings folder
    replace_published: StrictBool = False


class InterpolateRequest(_Body):
    """``POST /interpolate``: ``healthy`` and ``diseased`` name embeddings (or are prompts that use one); a
    part that uses none is refused unless ``allow_plain_prompt``."""

    healthy: constr(strict=True, min_length=1, max_length=limits.MAX_PROMPT_CHARS)
    diseased: constr(strict=True, min_length=1, max_length=limits.MAX_PROMPT_CHARS)
    k: conint(strict=True, ge=limits.MIN_INTERPOLATION_FRAMES, le=limits.MAX_INTERPOLATION_FRAMES) = 5
    seed: Seed = 0
    steps: Optional[conint(strict=True, ge=1, le=limits.MAX_SAMPLER_STEPS)] = None
    cfg_scale: Optional[confloat(ge=0, le=limits.MAX_CFG_SCALE)] = None
    width: Optional[ImageSize] = None
    height: Optional[ImageSize] = None
    negative_prompt: Optional[PromptText] = None
    allow_plain_prompt: StrictBool = False

    def sample_kwargs(self) -> dict[str, Any]:
        keys = ("steps", "cfg_scale", "width", "height", "negative_prompt")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


class FidRequest(_Body):
    real: PathText
    generated: PathText
    extractor: Literal[FID_EXTRACTORS] = "inception"  # type: ignore[valid-type]
    weights: Optional[PathText] = None
    mode: Literal[FID_MODES] = "paper"  # type: ignore[valid-type]
    bootstrap_reps: conint(strict=True, ge=0, le=MAX_BOOTSTRAP_REPS) = 0
    resample: Literal[FID_RESAMPLE] = "both"  # type: ignore[valid-type]
    seed: conint(strict=True, ge=0, le=limits.MAX_SEED) = 0


Model = TypeVar("Model", bound=BaseModel)


class BodyError(Exception):
    """A body that does not fit its model: ``status`` (400 or 422) and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _where(loc) -> str:
    return ".".join(str(part) for part in loc if part != "__root__") or "body"


def parse_body(model: Type[Model], data: dict[str, Any]) -> Model:
    """``model(**data)``, or :class:`BodyError` naming every field that is missing or out of range."""
    try:
        return model.parse_obj(data)
    except ValidationError as exc:
        errors = exc.errors()
        missing = [_where(e["loc"]) for e in errors if e["type"] == "value_error.missing"]
        if missing and len(missing) == len(errors):
            raise BodyError(400, "missing field " + ", ".join(repr(m) for m in missing)) from None
        raise BodyError(422, "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in errors[:8])) from None
