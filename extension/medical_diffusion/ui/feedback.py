"""Turn the core's user errors into gradio messages instead of a generic 'Error'."""

from __future__ import annotations

import functools
import logging
import sys
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
                raise _as_gradio_error(exc) from (None if isinstance(exc, MedDiffError) else exc)

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            raise _as_gradio_error(exc) from (None if isinstance(exc, MedDiffError) else exc)

    return wrapper


class UserError(gr.Error):
    """The popup for a :class:`MedDiffError`, whose one-line message is already in the log."""


def _as_gradio_error(exc: Exception) -> gr.Error:
    # a MedDiffError's message is complete: one log line; anything else may be a bug: keep its traceback
    message = str(exc) or exc.__class__.__name__
    if isinstance(exc, MedDiffError):
        log.warning("%s", message)
        return UserError(message)
    log.warning("%s", message, exc_info=True)
    return gr.Error(message)


class _QuietTraceback:
    """``traceback`` for gradio's routes: no traceback for a :class:`UserError` (logged in one line)."""

    def __init__(self, module):
        self._module = module

    def print_exc(self, *args, **kwargs):
        if isinstance(sys.exc_info()[1], UserError):
            return None
        return self._module.print_exc(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)


def quiet_user_error_tracebacks() -> None:
    """Stop gradio 3.x printing a traceback for each user error (it prints one for every error a
    handler raises); other errors keep theirs. Does nothing on a gradio without that call."""
    try:
        from gradio import routes
    except ImportError:  # pragma: no cover
        return
    current = getattr(routes, "traceback", None)
    if current is not None and not isinstance(current, _QuietTraceback) and hasattr(current, "print_exc"):
        routes.traceback = _QuietTraceback(current)


def uploaded_path(value) -> str | None:
    """The local path of a ``gr.File``/``gr.UploadButton`` value (tempfile wrapper, dict or str)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("name")
    return getattr(value, "name", None)
