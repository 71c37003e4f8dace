"""How a tab reports: results and errors in the tab's status line, one log line per user error.

:func:`reports_in_status` is the one wrapper for a tab's long handlers: a failure puts its message into
the tab's status Markdown (it stays, wraps, shows ``<...>`` as text), clears the handler's other outputs
(a failed FID run leaves no old FID value on the page) and logs one line. :func:`shows_errors` is the
older popup-only wrapper, for handlers with no status line.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import gradio as gr

from medical_diffusion.errors import Cancelled, InputFileError, MedDiffError

log = logging.getLogger(__name__)

USER_ERRORS = (MedDiffError, ValueError, FileNotFoundError, PermissionError)
#: the CSS class of status lines (``style.css``: long words and paths wrap)
STATUS_CLASS = "md-status"

_MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]{}#|~!])")


def escape_markdown(text: str) -> str:
    """``text`` shown as it is in a gradio Markdown: HTML (``<class 'x'>``) and Markdown marks escaped."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN_SPECIALS.sub(r"\\\1", text)


def saved_status(save: Callable[[], Any], what: str, beside: str = "") -> str:
    """Run ``save`` (returning a :class:`~medical_diffusion.generation.outputs.SavedResult`) and say in the
    status line where the result went, or why it was not saved (the picture is still shown)."""
    try:
        done = save()
    except (OSError, MedDiffError) as exc:
        log.warning("the %s was not saved: %s", what, exc)
        return f"**Not saved:** {escape_markdown(error_message(exc))}"
    extra = f"{beside}, " if beside else ""
    return f"Saved to {escape_markdown(done.picture)} ({extra}parameters in {escape_markdown(done.sidecar.name)})."


def error_message(exc: BaseException) -> str:
    """The message of ``exc`` alone (no class name, no quotes around it)."""
    return str(exc).strip() or exc.__class__.__name__


def status_error(exc: BaseException) -> str:
    """The status-line Markdown for a failure: ``**Error:** message`` (``**Stopped:**`` for a stop)."""
    if isinstance(exc, Cancelled):
        return f"**Stopped:** {escape_markdown(error_message(exc))}"
    if isinstance(exc, USER_ERRORS):
        return f"**Error:** {escape_markdown(error_message(exc))}"
    return (f"**Error** (unexpected; the server log has the details): "
            f"{escape_markdown(exc.__class__.__name__ + ': ' + error_message(exc))}")


def log_failure(exc: BaseException) -> None:
    """A user error or a stop is one log line (a ``ValueError``'s traceback follows at DEBUG level);
    anything else (a bug) keeps its traceback."""
    message = error_message(exc)
    if isinstance(exc, Cancelled):
        log.info("%s", message)
    elif isinstance(exc, MedDiffError):
        log.warning("%s", message)
    elif isinstance(exc, USER_ERRORS):  # most likely the user's input; the traceback only at DEBUG level
        log.warning("%s", message)
        log.debug("traceback of: %s", message, exc_info=exc)
    else:
        log.error("%s: %s", exc.__class__.__name__, message, exc_info=exc)


def _toast(exc: BaseException) -> None:
    """A popup as well, when the handler runs in gradio's queue (it closes by itself; the status stays)."""
    try:
        from gradio.context import thread_data
    except ImportError:  # pragma: no cover
        return
    if isinstance(exc, Cancelled) or getattr(thread_data, "blocks", None) is None:
        return
    try:
        gr.Warning(error_message(exc))
    except Exception:  # noqa: BLE001 - a popup is a courtesy
        pass


def failure_outputs(exc: BaseException, n_outputs: int, status: int, keep: Sequence[int] = (),
                    stale_note: str = "") -> Any:
    """The outputs of a failed handler: the message at ``status`` (then ``stale_note``, saying that
    what is still shown is not this run's), ``gr.update()`` (unchanged) at the positions in ``keep``,
    None (cleared) elsewhere; a bare value when the handler has one output."""
    values = [gr.update() if i in keep else None for i in range(n_outputs)]
    values[status] = status_error(exc) + (f"\n\n_{escape_markdown(stale_note)}_" if stale_note else "")
    return values[0] if n_outputs == 1 else tuple(values)


def reports_in_status(n_outputs: int, status: int = -1, keep: Sequence[int] = (),
                      stale_note: str = "") -> Callable[[Callable], Callable]:
    """Decorate a gradio handler (function or generator) with ``n_outputs`` outputs, one of them (index
    ``status``) the tab's status Markdown: any exception ends the handler normally with
    :func:`failure_outputs`, so the message stays in the tab, earlier results are cleared (except the
    outputs in ``keep``, which ``stale_note`` marks as an earlier run's), the event is not an error and
    the server log gets :func:`log_failure`'s line.
    """
    status = status % n_outputs

    def decorate(fn: Callable) -> Callable:
        def fail(exc: BaseException):
            log_failure(exc)
            _toast(exc)
            return failure_outputs(exc, n_outputs, status, keep, stale_note)

        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def gen_wrapper(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - every failure is reported in the tab
                    yield fail(exc)

            return gen_wrapper

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - every failure is reported in the tab
                return fail(exc)

        return wrapper

    return decorate


def status_line(**kwargs) -> gr.Markdown:
    """A tab's status Markdown (wrapping, persisting)."""
    return gr.Markdown(elem_classes=[STATUS_CLASS], **kwargs)


def quiet_http_request_logs() -> None:
    """No ``HTTP Request: POST .../api/predict`` INFO line per event (gradio 3.41's queue calls its own
    server through httpx, which logs every request)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)


def shows_errors(fn: Callable) -> Callable:
    """Wrap a gradio handler (function or generator): user errors become ``gr.Error`` popups."""
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


def upload_folders() -> list[Path]:
    """Where gradio 3.41 keeps this server's uploads and its components' copies of them (resolved):
    ``GRADIO_TEMP_DIR``, else ``<tempdir>/gradio`` (``routes.App.uploaded_file_dir`` and
    ``IOComponent.DEFAULT_TEMP_DIR`` are both read that way)."""
    return [Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()]


def _inside(path: str, folders: list[Path]) -> bool:
    try:
        resolved = Path(path).resolve()  # symlinks and ``..`` followed, relative to the working folder
    except (OSError, RuntimeError, ValueError):
        return False
    return any(resolved == f or f in resolved.parents for f in folders)


def uploaded_path(value) -> str | None:
    """The local path of a file the browser uploaded to this server, from a ``gr.File``/``gr.UploadButton``
    value (gradio's tempfile wrapper); None for no file.

    Only this server's uploads are accepted: gradio 3.41's ``File.preprocess`` copies any server file a
    request names (``{"is_file": true, "name": "/etc/passwd"}``) into its temp folder, so the copy must lie
    in :func:`upload_folders` and the name the request gave (``orig_name``) must too, or be a bare file name
    with no such file in the working folder (the page's fallback sends the bytes themselves). A plain
    string or dict, a copy of a client-named server file, or anything outside those folders is an
    :class:`~medical_diffusion.errors.InputFileError`."""
    if value is None:
        return None
    name, given = getattr(value, "name", None), getattr(value, "orig_name", None)
    if isinstance(value, (str, dict, os.PathLike)) or not isinstance(name, str) or not isinstance(given, str):
        shown = value.get("name") if isinstance(value, dict) else value
        raise InputFileError(str(shown)[:200], "not a file uploaded to this server: upload it through the page")
    folders = upload_folders()
    bare = os.path.basename(given) == given and given not in ("", ".", "..")
    sent_by_client = _inside(given, folders) or (bare and not os.path.lexists(given))
    if not (_inside(name, folders) and sent_by_client):
        raise InputFileError(given[:200], "not a file uploaded to this server: upload it through the page")
    return name
