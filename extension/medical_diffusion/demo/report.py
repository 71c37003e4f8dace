"""A self-contained HTML report of a demo run: sections of text, tables and pictures."""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path

from medical_diffusion.atomic_io import atomic_write_text


@dataclass
class Section:
    title: str
    text: str = ""
    images: list[tuple[str, Path]] = field(default_factory=list)  # (caption, file)
    table: list[list[str]] | None = None  # first row = header


def render_report(path: str | os.PathLike, title: str, intro: str, sections: list[Section]) -> Path:
    """Write ``path`` (pictures referenced relative to it, so the folder can be moved whole)."""
    path = Path(path)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "figure{display:inline-block;margin:.5em;vertical-align:top}img{max-width:100%;border:1px solid #ccc}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
             ".note{background:#fff4d6;padding:.6em;border-left:4px solid #e0a800}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", f"<p class='note'>{html.escape(intro)}</p>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        if s.table:
            head, *rows = s.table
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in head) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
        for caption, file in s.images:
            rel = os.path.relpath(file, path.parent)
            parts.append(f"<figure><img src='{html.escape(rel)}' alt='{html.escape(caption)}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return atomic_write_text(path, "\n".join(parts))
