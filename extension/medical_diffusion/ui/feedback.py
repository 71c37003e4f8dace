"""Turn the core's user errors into gradio messages instead of a generic 'Error'."""

from __future__ import annotations

import functools
import logging
from typing import Callable

import gradio as gr

from medical_diffusion.errors import MedDiffError

log = logging.getLogger(__name__)

USER_ERRORS = (MedDiffError, ValueError, FileNotFoundError, PermissionError)


def shows_errors(fn: Callable) -> Callable:
    """Wrap a gradio handler (function or generator): user errors become ``gr.Error`` popups."""
    import inspect

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except USER_ERRORS as exc:
                raise _as_gradio_error(exc) from exc

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            raise _as_gradio_error(exc) from exc

    return wrapper


def _as_gradio_error(exc: Exception) -> gr.Error:
    # a MedDiffError's message is complete; anything else may be a bug: keep its traceback in the log
    log.warning("%s", exc, exc_info=not isinstance(exc, MedDiffError))
    return gr.Error(str(exc) or exc.__class__.__name__)


def uploaded_path(value) -> str | None:
    """The local path of a ``gr.File``/``gr.UploadButton`` value (tempfile wrapper, dict or str)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("name")
    return getattr(value, "name", None)
