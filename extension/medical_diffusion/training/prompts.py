"""Training prompts: the embedding name alone (the paper), or A1111-style template lines."""

from __future__ import annotations

import random
from pathlib import Path

from medical_diffusion.allowed_roots import check_allowed
from medical_diffusion.errors import InputFileError, MedDiffError


def read_template(path: str | Path) -> list[str]:
    """Non-empty lines of an A1111 template file (``[name]``, ``[filewords]`` placeholders)."""
    path = Path(path)
    try:
        check_allowed(path)
    except MedDiffError:
        raise InputFileError(path, "template file lies outside the folders this extension may use") from None
    try:
        lines = [line.strip() for line in path.read_text("utf-8").splitlines()]
    except FileNotFoundError:
        raise InputFileError(path, "template file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(path, f"unreadable template: {exc}") from None
    lines = [line for line in lines if line]
    if not lines:
        raise InputFileError(path, "template file has no lines")
    if not any("[name]" in line for line in lines):
        raise InputFileError(path, "no template line contains [name], so the embedding would never be trained")
    return lines


def fill_template(line: str, name: str, filewords: str) -> str:
    return line.replace("[name]", name).replace("[filewords]", filewords)


class PromptSource:
    """Prompt for each training sample; constant (template-free) unless a template is given."""

    def __init__(self, name: str, template_file: str | Path | None = None):
        self.name = name
        self.lines = read_template(template_file) if template_file else None

    @property
    def constant(self) -> bool:
        return self.lines is None

    def prompts(self, captions: list[str], rng: random.Random) -> list[str]:
        if self.lines is None:
            return [self.name] * len(captions)
        return [fill_template(rng.choice(self.lines), self.name, c) for c in captions]
