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
