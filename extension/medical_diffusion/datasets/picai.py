"""PI-CAI prostate MRI -> one 2D axial slice per case (the paper's preparation, plus an aligned mode).

Paper mode, per volume and independently for T2W, ADC and HBV: resample to (3, 0.5, 0.5) mm (B-spline,
same origin/direction, default 0, input pixel type), min-max normalise the whole resampled volume,
centre crop/pad to (30, 300, 300), pick the slice (negative: ``int(np.median(np.unique(z)))`` over the z
indices that hold gland voxels, each slice counted once; positive: argmax of the per-slice lesion-value sum), stack R=T2W G=ADC B=HBV, ``* 255`` truncated to uint8,
Lanczos to 512x512. Aligned mode resamples ADC/HBV (and the masks) onto the cropped T2W grid.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medical_diffusion.datasets import volume_ops as vo
from medical_diffusion.datasets.batch import (BatchOptions, BatchResult, ItemFailure, ProgressCallback,
                                            options_to_json, run_batch)
from medical_diffusion.datasets.layout import plan_outputs
from medical_diffusion.datasets.splits import Candidate, select_items
from medical_diffusion.datasets.volume_limits import DEFAULT_MAX_VOXELS
from medical_diffusion.errors import InputFileError, MedDiffError

MODES = ("paper", "aligned")
LABEL_SOURCES = ("combined", "human", "marksheet")
#: negative-case slice: "slices" = the authors' median of the distinct gland slices; "voxels" = median z of
#: all gland voxels (slices weighted by gland area)
NEGATIVE_SLICE_RULES = ("slices", "voxels")
CHANNELS = {"rgb": ("t2w", "adc", "hbv"), "t2w": ("t2w",), "adc": ("adc",), "hbv": ("hbv",)}
HUMAN_LESIONS = "csPCa_lesion_delineations/human_expert/resampled"
AI_LESIONS = "csPCa_lesion_delineations/AI/Bosma22a"
GLAND = "anatomical_delineations/whole_gland/AI/Bosma22b"
MARKSHEET = "clinical_information/marksheet.csv"
_T2W_NAME = re.compile(r"^(?P<pid>[^_]+)_(?P<sid>[^_]+)_t2w\.mha$")


#: options that change the pixels of an item (a change redoes finished items on a re-run)
PIXEL_OPTIONS = ("mode", "channels", "label_source", "spacing", "crop", "size", "negative_slice")

@dataclass
class PicaiOptions(BatchOptions):
    """Options for :func:`prepare_picai` (defaults = the paper)."""

    images: str
    labels: str
    mode: str = "paper"  # "paper" or "aligned"
    channels: str = "rgb"  # "rgb" (T2W/ADC/HBV) or one modality as grey: "t2w", "adc", "hbv"
    label_source: str = "combined"  # human with AI fallback, "human" only, or "marksheet" case_csPCa
    spacing: tuple[float, float, float] = (3.0, 0.5, 0.5)  # (z, y, x) mm
    crop: tuple[int, int, int] = (30, 300, 300)  # (z, y, x) voxels
    resampler: str = "fast"  # "fast": SimpleITK's exact values, computed only where needed; "sitk": whole volumes
    cases: tuple[str, ...] = ()  # restrict to these "<pid>_<sid>" ids
    negative_slice: str = "slices"  # see NEGATIVE_SLICE_RULES (the paper: "slices")

    def validate(self) -> None:
        if self.mode not in MODES:
            raise MedDiffError(f"unknown PI-CAI mode {self.mode!r} (choose from {', '.join(MODES)})")
        if self.label_source not in LABEL_SOURCES:
            raise MedDiffError(f"unknown label source {self.label_source!r} (choose from {', '.join(LABEL_SOURCES)})")
        if self.channels not in CHANNELS:
            raise MedDiffError(f"unknown channels {self.channels!r} (choose from {', '.join(CHANNELS)})")
        if self.negative_slice not in NEGATIVE_SLICE_RULES:
            raise MedDiffError(f"unknown negative-slice rule {self.negative_slice!r} "
                               f"(choose from {', '.join(NEGATIVE_SLICE_RULES)})")
        if self.resampler not in vo.RESAMPLERS:
            raise MedDiffError(f"unknown resampler {self.resampler!r} (choose from {', '.join(vo.RESAMPLERS)})")
        self.check_common()
        for p, what in ((self.images, "images folder"), (self.labels, "labels folder")):
            if not Path(p).is_dir():
                raise InputFileError(p, f"PI-CAI {what} not found")


@dataclass
class PicaiCase:
    """Paths of one PI-CAI study (``case_id`` = "<pid>_<sid>")."""

    patient_id: str
    study_id: str
    scans: dict[str, str]
    human_lesion: str
    ai_lesion: str
    gland: str

    @property
    def case_id(self) -> str:
        return f"{self.patient_id}_{self.study_id}"


@dataclass
class CaseJob:
    """A worker's input: one case with its label and the geometry/mode options."""

    case: PicaiCase
    positive: bool
    lesion: str  # lesion map used for the slice of a positive case ("" for negatives)
    mode: str
    modalities: tuple[str, ...]
    spacing: tuple[float, float, float]
    crop: tuple[int, int, int]
    size: int
    resampler: str
    negative_slice: str = "slices"
    max_voxels: int = DEFAULT_MAX_VOXELS

    def read(self, path: str) -> sitk.Image:
        """A 3D volume of this case (header checked first)."""
        return vo.read_volume(path, max_voxels=self.max_voxels, ndim=3)


def discover_cases(images: str | os.PathLike, labels: str | os.PathLike) -> list[PicaiCase]:
    """Every ``images/<pid>/<pid>_<sid>_t2w.mha`` with its expected sibling and label paths."""
    images, labels = Path(images), Path(labels)
    cases = []
    for t2w in sorted(images.glob("*/*_t2w.mha")):
        m = _T2W_NAME.match(t2w.name)
        if not m or m["pid"] != t2w.parent.name:
            continue
        pid, sid = m["pid"], m["sid"]
        stem = f"{pid}_{sid}"
        scans = {mod: str(t2w.parent / f"{stem}_{mod}.mha") for mod in ("t2w", "adc", "hbv")}
        cases.append(PicaiCase(pid, sid, scans, str(labels / HUMAN_LESIONS / f"{stem}.nii.gz"),
                               str(labels / AI_LESIONS / f"{stem}.nii.gz"), str(labels / GLAND / f"{stem}.nii.gz")))
    return cases


def read_marksheet(path: str | os.PathLike) -> dict[str, bool]:
    """``{"<pid>_<sid>": case_csPCa == "YES"}`` from the PI-CAI marksheet."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "marksheet not found")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        need = {"patient_id", "study_id", "case_csPCa"}
        if not need <= set(reader.fieldnames or []):
            raise InputFileError(path, f"not a PI-CAI marksheet (needs columns {sorted(need)})")
        out = {}
        for row in reader:
            value = row["case_csPCa"].strip().upper()
            if value not in ("YES", "NO"):
                continue
            out[f"{row['patient_id'].strip()}_{row['study_id'].strip()}"] = value == "YES"
        return out


def lesion_file(case: PicaiCase, label_source: str) -> str:
    """The lesion map for ``case``: human, or AI when the human file is missing ("combined")."""
    if os.path.isfile(case.human_lesion):
        return case.human_lesion
    if label_source in ("combined", "marksheet"):
        if os.path.isfile(case.ai_lesion):
            return case.ai_lesion
        raise InputFileError(case.human_lesion, "no lesion delineation (neither human nor AI Bosma22a file)")
    raise InputFileError(case.human_lesion, "no human lesion delineation")


def case_label(case: PicaiCase, label_source: str, marksheet: dict[str, bool] | None = None,
               max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[bool, str]:
    """(positive, lesion map path) for ``case``; raises a per-case error for missing label files."""
    if label_source == "marksheet":
        if marksheet is None or case.case_id not in marksheet:
            raise MedDiffError(f"{case.case_id}: no case_csPCa YES/NO in the marksheet")
        positive = marksheet[case.case_id]
        return positive, (lesion_file(case, label_source) if positive else "")
    path = lesion_file(case, label_source)
    image = vo.read_volume(path, max_voxels=max_voxels, ndim=3)
    return bool((sitk.GetArrayViewFromImage(image) > 0).any()), path


def _label_job(args: tuple) -> tuple[bool, str] | str:
    """(positive, lesion path), or the error message: for a process pool."""
    try:
        return case_label(*args)
    except MedDiffError as exc:
        return str(exc)


def _check_files(job: CaseJob) -> str:
    label_path = job.lesion if job.positive else job.case.gland
    if not os.path.isfile(label_path):
        raise InputFileError(label_path, "label file missing")
    for mod in job.modalities:
        if not os.path.isfile(job.case.scans[mod]):
            raise InputFileError(job.case.scans[mod], f"{mod.upper()} scan missing")
    return label_path


def _normalise(arr: np.ndarray, path: str, where: str = "") -> np.ndarray:
    try:
        return vo.minmax_normalise(arr)
    except ValueError as exc:
        raise InputFileError(path, f"{exc}{where}") from None


def paper_slices(job: CaseJob) -> tuple[dict[str, np.ndarray], int]:
    """Paper mode: the chosen cropped slice of every modality (each resampled on its own grid)."""
    label_path = _check_files(job)
    label = vo.center_crop_or_pad(vo.resample_array(job.read(label_path), job.spacing, is_label=True),
                                  job.crop)
    z = choose_slice(label, job.positive, job.negative_slice)
    slices = {}
    for mod in job.modalities:
        path = job.case.scans[mod]
        try:
            slices[mod] = vo.normalised_crop_slice(job.read(path), job.spacing, job.crop, z, job.resampler)
        except ValueError as exc:
            raise InputFileError(path, str(exc)) from None
    return slices, z


def aligned_volumes(job: CaseJob) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Aligned mode: T2W as in paper mode; ADC/HBV and the label resampled onto the cropped T2W grid."""
    label_path = _check_files(job)
    t2w_path = job.case.scans["t2w"]
    t2w_rs = vo.resample_sitk(job.read(t2w_path), job.spacing)
    ref = vo.cropped_reference(t2w_rs, job.crop)
    vols: dict[str, np.ndarray] = {}
    for mod in job.modalities:
        if mod == "t2w":
            vols[mod] = vo.center_crop_or_pad(_normalise(sitk.GetArrayFromImage(t2w_rs), t2w_path), job.crop)
        else:
            arr = vo.resample_onto(job.read(job.case.scans[mod]), ref)
            vols[mod] = _normalise(arr, job.case.scans[mod], " on the T2W grid")
    label = vo.resample_onto(job.read(label_path), ref, is_label=True)
    return vols, label


def choose_slice(label: np.ndarray, positive: bool, negative_rule: str = "slices") -> int:
    """Positive: argmax over z of the per-slice lesion-value sum. Negative, ``negative_rule`` "slices" (the
    authors): ``int(median)`` of the distinct z indices holding gland voxels; "voxels": ``int(median)`` of
    the z of every gland voxel (slices weighted by their gland area)."""
    if positive:
        sums = label.reshape(label.shape[0], -1).astype(np.int64).sum(axis=1)
        if sums.max() <= 0:
            raise MedDiffError("no lesion voxels inside the cropped region")
        return int(np.argmax(sums))
    z = np.nonzero(label == 1)[0]
    if z.size == 0:
        raise MedDiffError("gland mask is empty inside the cropped region")
    if negative_rule == "slices":
        return int(np.median(np.unique(z)))
    if negative_rule == "voxels":
        return int(np.median(z))
    raise ValueError(f"unknown negative-slice rule {negative_rule!r} (choose from {', '.join(NEGATIVE_SLICE_RULES)})")


def process_case(job: CaseJob) -> tuple[np.ndarray, dict]:
    """One case -> (uint8 ``size x size`` grey or RGB image, {"slice": z, "geometry": mm per pixel, padding})."""
    try:
        if job.mode == "paper":
            slices, z = paper_slices(job)
        else:
            vols, label = aligned_volumes(job)
            z = choose_slice(label, job.positive, job.negative_slice)
            slices = {m: v[z] for m, v in vols.items()}
    except MedDiffError as exc:
        if isinstance(exc, InputFileError):
            raise
        raise MedDiffError(f"{job.case.case_id}: {exc}") from None
    u8 = vo.to_uint8_truncating([slices[m] for m in job.modalities])
    from medical_diffusion.datasets.slice_geometry import square

    # the crop (y, x voxels at the resampled spacing) is stretched to size x size: record its mm per pixel
    geometry = square((u8.shape[1], u8.shape[0]), job.size, (job.spacing[2], job.spacing[1]), "stretch")
    return vo.resize_lanczos(u8, job.size), {"slice": z, "geometry": geometry.record()}


def single_itk_thread() -> None:
    """Worker initialiser: one ITK thread per process when running several processes."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def prepare_picai(options: PicaiOptions, progress: ProgressCallback | None = None) -> BatchResult:
    """Discover, label, select/split and slice PI-CAI cases into ``options.out`` (resumable)."""
    options.validate()
    cases = discover_cases(options.images, options.labels)
    if options.cases:
        wanted = set(options.cases)
        cases = [c for c in cases if c.case_id in wanted]
    if not cases:
        raise InputFileError(options.images, "no PI-CAI cases found (expected <pid>/<pid>_<sid>_t2w.mha)")
    marksheet = read_marksheet(Path(options.labels) / MARKSHEET) if options.label_source == "marksheet" else None
    rejected: list[ItemFailure] = []
    candidates: list[Candidate] = []
    labelled: dict[str, tuple[PicaiCase, bool, str]] = {}
    jobs = [(case, options.label_source, marksheet, options.max_voxels) for case in cases]
    if options.workers > 1 and len(cases) > 1 and options.label_source != "marksheet":
        from medical_diffusion.datasets.worker_lifetime import worker_pool

        with worker_pool(options.workers) as pool:
            outcomes = pool.map(_label_job, jobs, chunksize=8)
            results = list(outcomes)
    else:
        results = [_label_job(j) for j in jobs]
    for i, (case, outcome) in enumerate(zip(cases, results)):
        if isinstance(outcome, str):
            rejected.append(ItemFailure(case.case_id, case.scans["t2w"], outcome))
            continue
        positive, lesion = outcome
        candidates.append(Candidate(case.case_id, "pos" if positive else "neg", case.patient_id))
        labelled[case.case_id] = (case, positive, lesion)
        if progress:
            progress(i + 1, len(cases), f"labelling {case.case_id}")
    selected = select_items(candidates, options.n_per_class, tuple(options.splits), options.seed, ("neg", "pos"))
    planned = plan_outputs(selected, options.neutral_names)
    modalities = CHANNELS[options.channels]
    payloads = {}
    for item in planned:
        case, positive, lesion = labelled[item.candidate.key]
        job = CaseJob(case, positive, lesion, options.mode, modalities, tuple(options.spacing),
                      tuple(options.crop), options.size, options.resampler, options.negative_slice,
                      options.max_voxels)
        sources = [case.scans[m] for m in modalities] + [lesion if positive else case.gland]
        payloads[item.candidate.key] = (";".join(sources), job)
    return run_batch(planned, payloads, process_case, options.out, options_to_json(options),
                     workers=options.workers, progress=progress,
                     worker_init=single_itk_thread if options.workers > 1 else None, rejected=rejected,
                     contact_sheet_title="PI-CAI" if options.contact_sheet else None,
                     pixel_options_json=options_to_json(options, only=PIXEL_OPTIONS),
                     provenance=options.provenance)
