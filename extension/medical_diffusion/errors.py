"""User-facing errors: the CLI prints these as one line, without a traceback."""

from __future__ import annotations

import os


class MedDiffError(Exception):
    """A problem the user can fix (bad file, bad option). The message says what and where."""


class InputFileError(MedDiffError):
    """A named input file is missing, unreadable or holds something unexpected."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class OutOfRangeError(MedDiffError):
    """A numeric setting outside its documented limit (see :mod:`medical_diffusion.limits`)."""

    def __init__(self, name: str, value: object, low: object, high: object, hint: str = ""):
        self.name, self.value, self.low, self.high = name, value, low, high
        super().__init__(f"{name} must be between {low} and {high}{hint}, got {value!r}")


class Cancelled(MedDiffError):
    """Work stopped on request (Stop button, or the client that asked for it has gone)."""
