"""Which images a ``--data`` value trains on.

A plain folder trains on the images directly inside it, never on a contact sheet or hidden files. A
``meddiff prepare`` output folder (``manifest.csv`` + ``embedding/``) is not itself a training folder: it
holds one training folder per class, ``OUT/embedding/<class>/``; it is refused with the exact folders to
pass, unless a class is named (``--class NAME``: ``OUT/embedding/NAME``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from medical_diffusion.datasets.layout import (
    CONTACT_SHEET_NAME,
    EMBEDDING_DIR,
    MANIFEST_NAME,
    check_plain_name,
    embedding_class_folders,
)
from medical_diffusion.errors import InputFileError, MedDiffError
from medical_diffusion.png_io import list_images

#: file names that are never training images, whatever folder they are in (``meddiff prepare``'s overview)
NOT_TRAINING_IMAGES = frozenset({CONTACT_SHEET_NAME})


@dataclass(frozen=True)
class ImageFolder:
    """The resolved folder and the images in it that are trained on (sorted by name)."""

    folder: Path
    paths: tuple[Path, ...]

    def describe(self) -> str:
        """``100 images from /abs/OUT/embedding/neg`` for messages."""
        return f"{len(self.paths)} image{'s' if len(self.paths) != 1 else ''} from {self.folder}"


def is_prepare_output(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a ``meddiff prepare`` output folder (its ``manifest.csv`` and ``embedding/``)."""
    folder = Path(folder)
    return (folder / MANIFEST_NAME).is_file() and (folder / EMBEDDING_DIR).is_dir()


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The training images directly in ``folder``: image files, minus hidden files and contact sheets."""
    return [p for p in list_images(folder) if p.name.lower() not in NOT_TRAINING_IMAGES]


def _class_choices(classes: dict[str, Path], flag: str) -> str:
    listed = "; ".join(f"{flag} {path}" for path in classes.values())
    return f"{listed}; or add --class {'|'.join(classes)}"


def resolve_data_folder(data: str | os.PathLike, class_name: str | None = None, what: str = "training",
                        flag: str = "--data") -> Path:
    """The folder of ``what`` images that ``data`` (and ``class_name``) mean, absolute.

    ``class_name`` picks ``DATA/embedding/<class>`` of a prepare output (or ``DATA/<class>`` when ``data``
    is its ``embedding/`` folder). Without it a prepare output folder, or its ``embedding/`` folder,
    raises :class:`MedDiffError` listing the exact folders to pass. ``flag`` names the option in messages.
    """
    if not str(data).strip():
        raise MedDiffError(f"no {what} images folder given")
    folder = Path(data).expanduser().resolve()
    if not folder.is_dir():
        missing = "" if folder.exists() else f": the {what} images folder not found"
        raise InputFileError(folder, f"not a folder{missing} ({flag})")
    prepared = is_prepare_output(folder)
    base = folder / EMBEDDING_DIR if prepared else folder if folder.name == EMBEDDING_DIR else None
    classes = embedding_class_folders(base.parent) if base is not None else {}
    name = str(class_name).strip() if class_name is not None else ""
    if name:
        check_plain_name(name, "class")
        if base is None:
            raise MedDiffError(f"--class {name}: {folder} is not a `meddiff prepare` output folder (with "
                               f"{MANIFEST_NAME} and {EMBEDDING_DIR}/); give {flag} the images folder itself")
        if name not in classes:
            raise InputFileError(base / name, f"no such class folder (classes: {', '.join(classes) or 'none'})")
        return classes[name]
    if prepared or (base is not None and classes and not image_files(folder)):
        kind = "a `meddiff prepare` output folder" if prepared else "a folder of class folders"
        choices = (_class_choices(classes, flag) if classes
                   else f"none of its {EMBEDDING_DIR}/ class folders is made yet")
        raise MedDiffError(f"{folder} is {kind}, not a folder of {what} images; train one class: {choices}")
    return folder


def training_images(data: str | os.PathLike, class_name: str | None = None, what: str = "training",
                    flag: str = "--data") -> ImageFolder:
    """The images that training on ``data`` (``class_name``) uses; an :class:`InputFileError` naming the
    folder when there are none."""
    folder = resolve_data_folder(data, class_name, what, flag)
    paths = image_files(folder)
    if not paths:
        raise InputFileError(folder, f"no {what} images found (expected .png/.jpg/... files directly inside; "
                                     f"{CONTACT_SHEET_NAME} and hidden files are not trained on)")
    return ImageFolder(folder, tuple(paths))
