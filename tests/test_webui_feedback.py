"""User errors reach the UI as popups and the server log as one line; other errors keep a traceback."""

from __future__ import annotations

import logging

import gradio as gr
import pytest

from medical_diffusion.errors import InputFileError
from medical_diffusion.ui.feedback import quiet_user_error_tracebacks, shows_errors


def _route_output(fn, capsys) -> str:
    """What gradio's route prints when a handler fails (it calls traceback.print_exc)."""
    from gradio import routes

    quiet_user_error_tracebacks()
    try:
        fn()
    except Exception:
        routes.traceback.print_exc()
    return capsys.readouterr().err


def test_a_user_error_is_one_log_line_and_no_traceback(caplog, capsys):
    @shows_errors
    def handler():
        raise InputFileError("/data/x.png", "no such file")

    with pytest.raises(gr.Error, match="no such file"):
        handler()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        printed = _route_output(handler, capsys)
    assert printed == ""
    records = [r for r in caplog.records if "no such file" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is None
    assert records[0].getMessage() == "/data/x.png: no such file"


def test_an_unexpected_error_keeps_its_traceback(caplog, capsys):
    @shows_errors
    def handler():
        raise ValueError("odd")

    def buggy():
        raise KeyError("bug")

    with caplog.at_level(logging.WARNING):
        printed = _route_output(handler, capsys)
    assert "Traceback" in printed and "ValueError: odd" in printed
    assert any(r.exc_info for r in caplog.records if "odd" in r.getMessage())
    assert "Traceback" in _route_output(buggy, capsys)
