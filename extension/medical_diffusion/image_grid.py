"""Labelled grids of images (interpolation strips, contact sheets, preview sheets)."""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont


@functools.lru_cache(maxsize=1)
def label_font_file() -> Path | None:
    """DejaVu Sans from matplotlib's bundled fonts (a dependency; found without importing it): it has
    the arrows and symbols of our titles, which Pillow's default font draws as missing-glyph boxes."""
    spec = importlib.util.find_spec("matplotlib")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return path
    return None


def _font(size: int) -> ImageFont.ImageFont:
    path = label_font_file()
    if path is not None:
        try:
            return ImageFont.truetype(str(path), size)
        except OSError:  # a FreeType-less Pillow
            pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def draw_label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill="black",
               font: ImageFont.ImageFont | None = None) -> None:
    """``draw.text`` that also works with the bitmap default font of Pillow < 10.1 (the webui's 9.5),
    which can draw only Latin-1: other characters become ASCII look-alikes or ``?``."""
    font = font or _font(11)
    draw.text(xy, drawable_text(text, font), fill=fill, font=font)


def drawable_text(text: str, font: ImageFont.ImageFont) -> str:
    """``text`` as ``font`` can draw it: a bitmap font gets ASCII look-alikes and Latin-1."""
    if not isinstance(font, ImageFont.FreeTypeFont):
        text = text.replace("\u2192", "->").replace("\u2190", "<-").replace("\u26a0", "!")
        text = text.encode("latin-1", "replace").decode("latin-1")
    return text


def make_grid(
    images: Sequence[Image.Image],
    labels: Sequence[str] | None = None,
    cols: int | None = None,
    cell: int | None = None,
    title: str | None = None,
    pad: int = 4,
) -> Image.Image:
    """Arrange ``images`` in a grid, each with an optional caption underneath.

    ``cell`` resizes every image to ``cell x cell`` (default: the first image's size).
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    if cols is None:
        cols = len(images) if len(images) <= 8 else math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = (cell, cell) if cell else images[0].size
    font_size = max(10, w // 16)
    font = _font(font_size)
    label_h = font_size + 2 * pad if labels else 0
    title_h = font_size + 2 * pad if title else 0
    width = cols * (w + pad) + pad
    if title:  # a narrow grid (one image) grows to show its whole title
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        width = max(width, int(math.ceil(measure.textlength(drawable_text(title, font), font=font))) + 2 * pad)
    sheet = Image.new("RGB", (width, title_h + rows * (h + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw_label(draw, (pad, pad), title, font=font)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        x = pad + c * (w + pad)
        y = title_h + pad + r * (h + label_h + pad)
        tile = image.convert("RGB")
        if tile.size != (w, h):
            tile = tile.resize((w, h), Image.LANCZOS)
        sheet.paste(tile, (x, y))
        if labels:
            draw_label(draw, (x + 2, y + h + pad // 2), str(labels[i]), font=font)
    return sheet
