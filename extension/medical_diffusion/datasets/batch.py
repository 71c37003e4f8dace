"""Run a preparation batch: parallel workers, per-item failures collected, resumable, progress reports."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np

from medical_diffusion.atomic_io import atomic_path, atomic_write_text
from medical_diffusion.datasets.layout import (CONTACT_SHEET_NAME, FAILURES_NAME, JOURNAL_NAME, MANIFEST_NAME,
                                             PlannedItem, provenance_folder)
from medical_diffusion.datasets.manifest import SHARED_COLUMNS, ManifestRow, read_manifest, write_manifest
from medical_diffusion.datasets.volume_limits import DEFAULT_MAX_VOXELS
from medical_diffusion.errors import InputFileError, MedDiffError
from medical_diffusion.file_digest import file_sha256
from medical_diffusion.png_io import save_png

#: ``progress(done, total, message)``; called in the main process after every item.
ProgressCallback = Callable[[int, int, str], None]


@dataclass(kw_only=True)
class BatchOptions:
    """What every dataset preparation shares: output folder, image size, sampling, splits, workers."""

    out: str
    size: int = 512
    #: exactly N random items per class (and per split); None or 0 = every eligible item. A class with
    #: fewer than N eligible items is an error that says how many there are.
    n_per_class: int | None = None
    splits: tuple[str, ...] = ()  # e.g. ("train", "val", "test"): patient-disjoint classifier sets
    seed: int = 0
    neutral_names: bool = True
    workers: int = 1
    contact_sheet: bool = True
    #: volumes/DICOM items whose header claims more voxels are refused before any allocation
    max_voxels: int = DEFAULT_MAX_VOXELS
    #: where case IDs and source paths go (full manifest, failures, resume journal); None = ``OUT.provenance``
    provenance: str | None = None

    def check_common(self) -> None:
        """Check the shared options (images per class, split names, workers); raise a clear error."""
        from medical_diffusion.datasets.layout import check_plain_name

        n = self.n_per_class
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise MedDiffError(f"images per class must be a whole number >= 0 (0 = all), got {n!r}")
        for name in self.splits:
            check_plain_name(name, "split")
        if len(set(self.splits)) != len(self.splits):
            raise MedDiffError(f"split names repeat: {', '.join(self.splits)}")
        if self.splits and not n:
            raise MedDiffError("patient-disjoint splits need a number of images per class (N > 0; "
                               "0 = all works only without splits)")
        if isinstance(self.max_voxels, bool) or not isinstance(self.max_voxels, int) or self.max_voxels < 1:
            raise MedDiffError(f"max_voxels must be a whole number >= 1, got {self.max_voxels!r}")
        if not 1 <= int(self.workers) <= 64:
            raise MedDiffError(f"workers must be between 1 and 64, got {self.workers}")


@dataclass
class ItemFailure:
    """A failed item: its key, source and a one-line reason."""

    key: str
    source: str
    error: str


@dataclass
class BatchResult:
    """What a batch did; ``rows`` are the manifest rows of this run's finished items (new and resumed),
    ``kept_rows`` those of earlier runs' outputs still in the folder unchanged (the manifests list both)."""

    out_dir: Path
    provenance_dir: Path | None = None  # None: OUT.provenance
    rows: list[ManifestRow] = field(default_factory=list)
    kept_rows: list[ManifestRow] = field(default_factory=list)
    failures: list[ItemFailure] = field(default_factory=list)  # rejected before processing + failed
    warnings: list[ItemFailure] = field(default_factory=list)  # made, but with a problem worth a look
    processed: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.provenance_dir is None:
            self.provenance_dir = provenance_folder(self.out_dir)

    @property
    def manifest_rows(self) -> list[ManifestRow]:
        """What the manifests list: this run's rows, then the kept rows of earlier runs."""
        return self.rows + self.kept_rows

    @property
    def manifest_path(self) -> Path:
        """The shareable manifest (no case IDs or source paths) in the output folder."""
        return self.out_dir / MANIFEST_NAME

    @property
    def provenance_manifest_path(self) -> Path:
        """The full manifest (case IDs, sources, options) in the provenance folder."""
        return self.provenance_dir / MANIFEST_NAME

    @property
    def failures_path(self) -> Path:
        return self.provenance_dir / FAILURES_NAME


@dataclass
class WorkUnit:
    """Everything a worker needs for one item (must be picklable)."""

    key: str
    source: str
    payload: Any
    outputs: list[str]


def options_fingerprint(options_json: str) -> str:
    """Short hash of the options, stored in the journal so changed options redo items."""
    return hashlib.sha256(options_json.encode()).hexdigest()[:16]


def _describe(exc: BaseException) -> str:
    """One line: a MedDiffError's own message; for anything else its type and last line (ITK's reason)."""
    if isinstance(exc, MedDiffError):
        return " ".join(str(exc).split())
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{exc.__class__.__name__}: {lines[-1] if lines else 'no message'}"


def _execute(process: Callable[[Any], tuple[np.ndarray, dict]], unit: WorkUnit, out_dir: str,
             init: Callable[[], None] | None = None) -> tuple[str, str | None, str, dict]:
    """Worker body: make the image, write it to every output; returns (key, error, sha256, info)."""
    try:
        if init is not None:
            init()
        image, info = process(unit.payload)
        first = Path(out_dir) / unit.outputs[0]
        sha = save_png(image, first)
        for extra in unit.outputs[1:]:
            with atomic_path(Path(out_dir) / extra) as tmp:
                shutil.copyfile(first, tmp)
        return unit.key, None, sha, info
    except Exception as exc:  # per-item failure: report and go on
        return unit.key, _describe(exc), "", {}


def _move_old_provenance(out_dir: Path, prov_dir: Path) -> None:
    """Folders made before provenance was kept apart: move the journal out (resume keeps working) and drop
    the old failure list; the old full manifest is overwritten by the shareable one."""
    old_journal, new_journal = out_dir / JOURNAL_NAME, prov_dir / JOURNAL_NAME
    if old_journal.is_file():
        if new_journal.is_file():
            old_journal.unlink()
        else:
            shutil.move(str(old_journal), str(new_journal))
    (out_dir / FAILURES_NAME).unlink(missing_ok=True)


def load_journal(path: Path) -> dict[str, dict]:
    """The resume journal's records by item key (a torn last line is skipped)."""
    done: dict[str, dict] = {}
    if path.is_file():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    done[rec["key"]] = rec
                except (ValueError, KeyError):
                    continue  # a torn last line from an interrupted run
    return done


def _still_valid(rec: dict, unit: WorkUnit, fingerprint: str, out_dir: Path) -> bool:
    if rec.get("fingerprint") != fingerprint or rec.get("outputs") != unit.outputs:
        return False
    for rel in unit.outputs:
        p = out_dir / rel
        if not p.is_file() or file_sha256(p) != rec.get("sha256"):
            return False
    return True


def _earlier_rows(out_dir: Path, prov_dir: Path, warnings: list[ItemFailure]) -> list[ManifestRow]:
    """The rows the manifests listed before this run, one per output: the full manifest's row where it has
    one for the same file, else the shareable manifest's (e.g. when the provenance folder was moved)."""
    rows: dict[str, ManifestRow] = {}
    for path in (out_dir / MANIFEST_NAME, prov_dir / MANIFEST_NAME):
        if not path.is_file():
            continue
        try:
            listed = read_manifest(path)
        except InputFileError as exc:
            warnings.append(ItemFailure("manifest", str(path), f"{exc}: the rows of earlier runs are not kept"))
            continue
        for row in listed:
            before = rows.get(row.output)
            if before is None or before.sha256 == row.sha256:
                rows[row.output] = row
    return list(rows.values())


def _still_in_folder(rows: list[ManifestRow], out_dir: Path, remade: set[str]) -> list[ManifestRow]:
    """The ``rows`` whose output is not in ``remade``, lies inside ``out_dir`` and still has the recorded sha256."""
    kept = []
    for row in rows:
        rel = PurePosixPath(row.output)
        if row.output in remade or not row.sha256 or rel.is_absolute() or ".." in rel.parts:
            continue
        path = out_dir / rel
        if path.is_file() and file_sha256(path) == row.sha256:
            kept.append(row)
    return kept


def _kept_warning(kept: list[ManifestRow], out_dir: Path) -> ItemFailure:
    """Say that the folder (and so training on a class folder) also holds images of earlier runs."""
    counts: dict[str, int] = {}
    for row in kept:
        name = f"{row.split}/{row.label}" if row.split else row.label
        counts[name] = counts.get(name, 0) + 1
    text = (f"{len(kept)} image(s) made by earlier runs are still in the folder and stay in the manifest "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))}); training on a class folder uses "
            "them too (delete them, or use another --out, to have only this run's images)")
    if any(row.split for row in kept):
        text += "; patient-disjoint splits hold within one run only"
    return ItemFailure("earlier runs", str(out_dir), text)


def run_batch(
    planned: list[PlannedItem],
    payloads: dict[str, tuple[str, Any]],
    process: Callable[[Any], tuple[np.ndarray, dict]],
    out_dir: str | os.PathLike,
    options_json: str,
    workers: int = 1,
    progress: ProgressCallback | None = None,
    worker_init: Callable[[], None] | None = None,
    rejected: list[ItemFailure] | None = None,
    contact_sheet_title: str | None = None,
    pixel_options_json: str | None = None,
    provenance: str | os.PathLike | None = None,
) -> BatchResult:
    """Make every planned item with ``process(payload) -> (uint8 image, info)``.

    ``payloads[key] = (source description, payload)``. Items already finished by an earlier run with
    the same pixel-affecting options (``pixel_options_json``, default all options; journal entry, output
    files present with the recorded sha256) are skipped.
    Failures (plus ``rejected`` items, refused before processing) are collected in ``failures.csv``;
    the manifests are rewritten at the end: this run's rows, then the rows of earlier runs whose output
    was not made again and is still in the folder with its recorded sha256 (a row whose file is gone or
    changed is dropped); with ``contact_sheet_title`` a contact sheet of what the manifest lists is written.
    The output folder gets only the images, the shareable manifest and the contact sheet; the full
    manifest, ``failures.csv`` and the journal go to ``provenance`` (default ``OUT.provenance``).
    ``process`` and ``worker_init`` must be module-level functions when ``workers > 1``.
    """
    out_dir = Path(out_dir)
    prov_dir = provenance_folder(out_dir, provenance)
    out_dir.mkdir(parents=True, exist_ok=True)
    prov_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = options_fingerprint(pixel_options_json if pixel_options_json is not None else options_json)
    journal_path = prov_dir / JOURNAL_NAME
    _move_old_provenance(out_dir, prov_dir)
    journal = load_journal(journal_path)
    result = BatchResult(out_dir, prov_dir, failures=list(rejected or []))
    earlier = _earlier_rows(out_dir, prov_dir, result.warnings)
    by_key = {p.candidate.key: p for p in planned}
    todo: list[WorkUnit] = []
    finished: dict[str, tuple[str, dict]] = {}
    for item in planned:
        key = item.candidate.key
        source, payload = payloads[key]
        unit = WorkUnit(key, source, payload, item.outputs)
        rec = journal.get(key)
        if rec is not None and _still_valid(rec, unit, fingerprint, out_dir):
            finished[key] = (rec["sha256"], rec.get("info", {}))
            result.skipped += 1
        else:
            todo.append(unit)
    total = len(planned)
    done = result.skipped
    if progress:
        progress(done, total, f"{result.skipped} already done")
    sources = {u.key: u.source for u in todo}

    def record(key: str, error: str | None, sha: str, info: dict, jfh) -> None:
        nonlocal done
        done += 1
        if error is not None:
            result.failures.append(ItemFailure(key, sources[key], error))
            msg = f"FAILED {key}: {error}"
        else:
            finished[key] = (sha, info)
            result.processed += 1
            jfh.write(json.dumps({"key": key, "fingerprint": fingerprint, "outputs": by_key[key].outputs,
                                  "sha256": sha, "info": info}) + "\n")
            jfh.flush()
            msg = key
        if progress:
            progress(done, total, msg)

    with open(journal_path, "a", encoding="utf-8") as jfh:
        if workers <= 1 or len(todo) <= 1:
            for unit in todo:
                record(*_execute(process, unit, str(out_dir), worker_init), jfh)
        else:
            from medical_diffusion.datasets.worker_lifetime import worker_pool

            with worker_pool(workers) as pool:
                futures = [pool.submit(_execute, process, u, str(out_dir), worker_init) for u in todo]
                for fut in as_completed(futures):
                    record(*fut.result(), jfh)

    for item in planned:
        key = item.candidate.key
        if key not in finished:
            continue
        sha, info = finished[key]
        for text in info.get("warnings", []):
            result.warnings.append(ItemFailure(key, payloads[key][0], text))
        geometry = {k: str(v) for k, v in info.get("geometry", {}).items()}
        for output in item.outputs:
            result.rows.append(ManifestRow(
                output=output, split=item.split, label=item.candidate.label, case_id=key,
                source=payloads[key][0], slice=str(info.get("slice", "")), options=options_json, sha256=sha,
                **geometry))
    result.kept_rows = _still_in_folder(earlier, out_dir, {row.output for row in result.rows})
    if result.kept_rows:
        result.warnings.append(_kept_warning(result.kept_rows, out_dir))
    write_manifest(result.provenance_manifest_path, result.manifest_rows)
    write_manifest(result.manifest_path, result.manifest_rows, SHARED_COLUMNS)
    lines = ["key,source,error"] + [
        ",".join('"' + str(v).replace('"', '""') + '"' for v in (f.key, f.source, f.error)) for f in result.failures]
    atomic_write_text(result.failures_path, "\n".join(lines) + "\n")
    if contact_sheet_title is not None:
        from medical_diffusion.datasets.contact_sheet import write_contact_sheet

        if not write_contact_sheet(out_dir, result.manifest_rows, out_dir / CONTACT_SHEET_NAME,
                                   title=contact_sheet_title):
            (out_dir / CONTACT_SHEET_NAME).unlink(missing_ok=True)  # an empty folder shows no earlier sheet
    return result


def options_to_json(options: Any, only: tuple[str, ...] | None = None) -> str:
    """Stable JSON of an options dataclass (the output folder and workers left out; ``only`` these fields)."""
    from dataclasses import asdict

    d = asdict(options)
    for k in ("out", "workers", "progress", "provenance"):
        d.pop(k, None)
    if only is not None:
        d = {k: v for k, v in d.items() if k in only}
    return json.dumps(d, sort_keys=True, default=str)
