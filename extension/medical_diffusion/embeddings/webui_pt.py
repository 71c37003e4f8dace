"""Write ``.pt`` files that AUTOMATIC1111's safe-unpickle check accepts.

The webui (``modules/safe.py``) opens a ``.pt`` zip and refuses any entry other than
``<dir>/data.pkl``, ``<dir>/version``, ``<dir>/byteorder``, ``<dir>/.data/serialization_id`` and
``<dir>/data/<n>``. Newer torch releases also write ``.format_version`` and ``.storage_alignment``,
so a plain ``torch.save`` from a current torch is refused as "may be malicious". The archive is
rebuilt with just the accepted entries (uncompressed, as torch writes them); every torch version
loads it the same way.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from typing import Any

import torch

from medical_diffusion.atomic_io import atomic_write_bytes

#: the entry names A1111 v1.x accepts (``allowed_zip_names_re`` in its ``modules/safe.py``)
ACCEPTED = re.compile(r"^[^/]+/((data/\d+)|version|byteorder|\.data/serialization_id|data\.pkl)$")
ROOT = "archive"


def webui_pt_bytes(obj: Any) -> bytes:
    """``torch.save(obj)`` as bytes, holding only the zip entries the webui accepts."""
    raw = io.BytesIO()
    torch.save(obj, raw)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw.getvalue())) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if not ACCEPTED.match(info.filename):
                continue
            inner = info.filename.split("/", 1)[1]
            dst.writestr(zipfile.ZipInfo(f"{ROOT}/{inner}", date_time=(1980, 1, 1, 0, 0, 0)), src.read(info))
    return out.getvalue()


def save_webui_pt(obj: Any, path: str | os.PathLike) -> None:
    """Atomically write ``obj`` as a ``.pt`` the webui loads without ``--disable-safe-unpickle``."""
    atomic_write_bytes(path, webui_pt_bytes(obj))
