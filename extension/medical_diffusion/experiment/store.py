"""Where stages keep their outputs: ``WORKDIR/stages/<stage id>/<key>/`` with ``done.json`` written last.

A stage works in ``<key>.partial/`` (libraries resume inside it after a kill), writes ``done.json``
there, then renames the folder to ``<key>/``. A failure leaves ``<key>.failed.json`` (one-line error)
next to ``<key>.log`` (the stage's log and traceback).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from medical_diffusion.atomic_io import atomic_write_text

DONE = "done.json"


class StageStore:
    """Paths and markers of the stages under one experiment folder."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = Path(workdir)
        self.root = self.workdir / "stages"

    def base(self, stage_id: str) -> Path:
        return self.root.joinpath(*stage_id.split("/"))

    def final(self, stage_id: str, key: str) -> Path:
        return self.base(stage_id) / key

    def partial(self, stage_id: str, key: str) -> Path:
        return self.base(stage_id) / f"{key}.partial"

    def log(self, stage_id: str, key: str) -> Path:
        return self.base(stage_id) / f"{key}.log"

    def failed_marker(self, stage_id: str, key: str) -> Path:
        return self.base(stage_id) / f"{key}.failed.json"

    def done_record(self, stage_id: str, key: str) -> dict | None:
        """The ``done.json`` of a finished stage with this key, else None."""
        path = self.final(stage_id, key) / DONE
        try:
            record = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            return None
        return record if record.get("key") == key else None

    def is_done(self, stage_id: str, key: str) -> bool:
        return self.done_record(stage_id, key) is not None

    def failure(self, stage_id: str, key: str) -> dict | None:
        try:
            return json.loads(self.failed_marker(stage_id, key).read_text("utf-8"))
        except (OSError, ValueError):
            return None

    def state(self, stage_id: str, key: str) -> str:
        """``done``, ``failed`` (last attempt), ``partial`` (started, not finished) or ``todo``."""
        if self.is_done(stage_id, key):
            return "done"
        if self.failed_marker(stage_id, key).is_file():
            return "failed"
        if self.partial(stage_id, key).is_dir():
            return "partial"
        return "todo"

    def finish(self, stage_id: str, key: str, record: dict) -> Path:
        """Write ``done.json`` into the partial folder, then rename it into place."""
        partial, final = self.partial(stage_id, key), self.final(stage_id, key)
        atomic_write_text(partial / DONE, json.dumps({**record, "key": key}, indent=1, sort_keys=True))
        if final.exists():  # a leftover without a valid marker
            shutil.rmtree(final)
        os.replace(partial, final)
        self.failed_marker(stage_id, key).unlink(missing_ok=True)
        return final

    def recover(self, stage_id: str, key: str) -> bool:
        """A run killed between ``done.json`` and the rename: finish the rename. True if now done."""
        partial = self.partial(stage_id, key)
        try:
            record = json.loads((partial / DONE).read_text("utf-8"))
        except (OSError, ValueError):
            return False
        if record.get("key") != key:
            return False
        final = self.final(stage_id, key)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        return True

    def mark_failed(self, stage_id: str, key: str, error: str) -> None:
        self.base(stage_id).mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.failed_marker(stage_id, key),
                          json.dumps({"error": error, "log": str(self.log(stage_id, key))}))
