"""What each stage does: the library functions the single ``meddiff`` commands call.

:func:`run_stage` takes a JSON-able spec (so a worker process or a Ray task can run it), works in
the stage's ``.partial`` folder, writes the stage log, and returns a status dict; it never raises
for a stage's own failure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from medical_diffusion.errors import MedDiffError
from medical_diffusion.experiment.store import DONE, StageStore

log = logging.getLogger(__name__)

#: ``progress(done, total)`` for one stage
Progress = Callable[[int, int], None]


class StageContext:
    """What a stage runner gets besides its settings."""

    def __init__(self, spec: dict, out: Path, progress: Progress):
        self.spec = spec
        self.out = out
        self.progress = progress
        self.workdir = Path(spec["workdir"])
        self.deps = {k: Path(v) for k, v in spec["deps"].items()}
        self.device = spec.get("device") or "auto"

    def dep_record(self, stage_id: str) -> dict:
        return json.loads((self.deps[stage_id] / DONE).read_text("utf-8"))

    def dep_output(self, stage_id: str, name: str) -> Path:
        value = Path(self.dep_record(stage_id)["outputs"][name])
        return value if value.is_absolute() else self.deps[stage_id] / value

    def ref(self, ref: dict) -> Path:
        """``{"stage": id, "sub": "set/neg"}`` -> that folder inside the finished stage."""
        return self.deps[ref["stage"]] / ref["sub"]

    def prepared_root(self) -> Path:
        return self.dep_output("prepare", "prepared")

    def torch_device(self) -> str:
        from medical_diffusion.devices import resolve_device

        return str(resolve_device(self.device))


def _class_seed(seed: int, cls: str) -> int:
    return (seed * 1_000_003 + int(hashlib.sha256(cls.encode()).hexdigest()[:8], 16)) % (2 ** 31)


def training_order(root: Path, cls: str, seed: int) -> list[Path]:
    """The images of ``embedding/<cls>`` in one seeded order; a training set of N cases is the first N."""
    import numpy as np

    from medical_diffusion.png_io import list_images

    folder = root / "embedding" / cls
    if not folder.is_dir():
        raise MedDiffError(f"{folder}: folder not found (the prepared data has no '{cls}' embedding images)")
    files = sorted(list_images(folder))
    perm = np.random.default_rng(_class_seed(seed, cls)).permutation(len(files))
    return [files[i] for i in perm]


def _copy_files(files: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        target = dest / f.name
        if not target.is_file() or target.stat().st_size != f.stat().st_size:
            shutil.copy2(f, target)


# --- stage kinds ---------------------------------------------------------------------------------

def stage_prepare(s: dict, ctx: StageContext) -> dict:
    from medical_diffusion.datasets.picai import PicaiOptions, prepare_picai

    data = s["data"]
    if data["kind"] == "prepared":
        root = Path(data["path"])
        if not (root / "embedding").is_dir():
            raise MedDiffError(f"{root}: not a `meddiff prepare` output folder (no embedding/ inside)")
        return {"prepared": str(root), "source": "prepared folder"}
    opts = dict(data.get("prepare", {}))
    for key in ("splits", "spacing", "crop", "cases"):
        if key in opts and opts[key] is not None:
            opts[key] = tuple(opts[key])
    if data["kind"] == "phantoms":
        from medical_diffusion.demo.phantoms import write_phantom_cohort

        phantoms = ctx.out / "phantoms"
        if not (phantoms / "labels" / "clinical_information" / "marksheet.csv").is_file():
            write_phantom_cohort(phantoms, int(data["cases_per_class"]), seed=int(s["seed"]))
        images, labels = phantoms / "images", phantoms / "labels"
    else:
        images, labels = Path(data["images"]), Path(data["labels"])
    opts.setdefault("seed", int(s["seed"]))
    result = prepare_picai(PicaiOptions(images=str(images), labels=str(labels), out=str(ctx.out / "prepared"),
                                        provenance=str(ctx.out / "provenance"), **opts),
                           progress=lambda d, t, _m: ctx.progress(d, t))
    for f in result.failures:
        log.warning("prepare: %s: %s", getattr(f, "key", f), getattr(f, "error", ""))
    if not result.rows:
        raise MedDiffError("prepare produced no images (see the log for per-case failures)")
    return {"prepared": "prepared", "images": len(result.rows), "failures": len(result.failures)}


def stage_train(s: dict, ctx: StageContext) -> dict:
    from medical_diffusion.training.config import TrainConfig
    from medical_diffusion.training.loop import run_training

    t = dict(s["train"])
    cases = int(t.pop("cases"))
    order = training_order(ctx.prepared_root(), s["class"], int(s["selection_seed"]))
    if cases > len(order):
        raise MedDiffError(f"{s['class']}: {cases} training cases asked for, the prepared data has {len(order)}")
    data = ctx.out / "data"
    _copy_files(order[:cases], data)
    config = TrainConfig(name=s["name"], data_dir=str(data), model=s["model"], **t)
    run_dir = ctx.out / "run"
    resume = (run_dir / "run_config.json").is_file()
    result = run_training(config, run_dir, resume=resume, force=run_dir.exists() and not resume,
                          device=ctx.torch_device(), progress=lambda e: ctx.progress(e.step, e.total))
    if result.interrupted:
        raise MedDiffError(f"training stopped at step {result.steps_done}")
    return {"embedding": str(Path(result.embedding_path).relative_to(ctx.out)), "steps": result.steps_done,
            "last_loss": result.last_loss, "cases": cases}


def stage_generate(s: dict, ctx: StageContext) -> dict:
    from medical_diffusion.generation.loading import load_embedding_table, load_model, vectors_of
    from medical_diffusion.generation.prompts import check_prompt_embeddings
    from medical_diffusion.generation.synthetic_set import SetParams, embedding_fingerprint, generate_set

    backend = load_model(s["model"], ctx.torch_device())
    files = [str(ctx.dep_output(dep, "embedding")) for dep in ctx.spec["dep_order"] if dep.startswith("train/")]
    table = load_embedding_table(backend, None, files, where=f"the train stages' embeddings ({', '.join(files) or 'none'})")
    check_prompt_embeddings(list(s["classes"].values()), list(table), table.where,
                            plain_hint="name a trained embedding in 'classes'")
    sm = s["sampling"]
    params = SetParams(classes=dict(s["classes"]), seed=int(sm["seed"]), steps=int(sm["steps"]),
                       cfg_scale=float(sm["cfg"]), negative_prompt=sm["negative_prompt"], width=int(sm["width"]),
                       height=int(sm["height"]), sampler=sm["sampler"], model=str(s["model"]),
                       embeddings={n: embedding_fingerprint(e) for n, e in sorted(table.items())})
    result = generate_set(backend, params, ctx.out / "set", int(s["n"]), embeddings=vectors_of(table),
                          batch_size=int(s["batch_size"]), progress=ctx.progress)
    if result.failures:
        raise MedDiffError(f"{len(result.failures)} image(s) failed, first: {result.failures[0][0]}: "
                           f"{result.failures[0][1]}")
    _sample_grid(ctx.out / "set", list(s["classes"]), ctx.out / "grid.png")
    return {"set": "set", "grid": "grid.png", "generated": result.generated, "reused": result.skipped}


def _sample_grid(folder: Path, classes: list[str], path: Path, per_class: int = 8) -> None:
    from medical_diffusion.image_grid import make_grid
    from medical_diffusion.png_io import list_images, load_image, save_png

    images, labels = [], []
    for cls in classes:
        for f in sorted(list_images(folder / cls))[:per_class]:
            images.append(load_image(f, "RGB"))
            labels.append(f"{cls} {f.stem}")
    if images:
        save_png(make_grid(images, labels, cols=min(per_class, len(images)), cell=128), path)


def stage_reference(s: dict, ctx: StageContext) -> dict:
    import numpy as np

    from medical_diffusion.png_io import list_images

    root = ctx.prepared_root()
    folder = root / s["from"] / s["class"]
    if not folder.is_dir():
        raise MedDiffError(f"{folder}: folder not found (table1.real.from must name a folder of the prepared data)")
    files = sorted(list_images(folder))
    if s["disjoint"]:
        used = {f.name for f in training_order(root, s["class"], int(s["selection_seed"]))[:int(s["training_pool"])]}
        files = [f for f in files if f.name not in used] if s["from"] == "embedding" else files
    n = int(s["n"])
    if n > len(files):
        raise MedDiffError(f"{folder}: {n} real images asked for, {len(files)} available"
                           + (" outside the training cases" if s["disjoint"] else ""))
    rng = np.random.default_rng(_class_seed(int(s["selection_seed"]) + 7, s["class"]))
    chosen = [files[i] for i in sorted(rng.choice(len(files), size=n, replace=False))]
    _copy_files(chosen, ctx.out / "images" / s["class"])
    return {"images": f"images/{s['class']}", "n": n}


def stage_features(s: dict, ctx: StageContext) -> dict:
    from medical_diffusion.evaluation.feature_cache import FeatureCache
    from medical_diffusion.evaluation.features import collect_images, extract_features
    from medical_diffusion.experiment.extractors import build_extractor

    ext = build_extractor(s["extractor"], s["weights"])
    fs = extract_features(collect_images(ctx.ref(s["set"])), ext, s["preprocessing"], int(s["batch_size"]),
                          FeatureCache(ctx.workdir / "feature_cache"), lambda _st, d, t: ctx.progress(d, t),
                          device=ctx.torch_device())
    for f in fs.failures:
        log.warning("features: skipped %s: %s", f["path"], f["problem"])
    return {"n": int(fs.features.shape[0]), "failures": len(fs.failures), "extractor_key": ext.key(s["preprocessing"])}


def stage_fid(s: dict, ctx: StageContext) -> dict:
    from medical_diffusion.atomic_io import atomic_write_text
    from medical_diffusion.evaluation.fid import compute_fid
    from medical_diffusion.experiment.extractors import build_extractor

    b = s["bootstrap"]
    ext = build_extractor(s["extractor"], s["weights"])
    result = compute_fid(ctx.ref(s["real"]), ctx.ref(s["generated"]), ext, None, s["preprocessing"], int(b["reps"]),
                         b["resample"], float(b["confidence"]), int(s["seed"]), int(s["batch_size"]),
                         ctx.workdir / "feature_cache", lambda _st, d, t: ctx.progress(d, t),
                         device=ctx.torch_device())
    log.info("%s", result.summary())
    atomic_write_text(ctx.out / "fid.json", json.dumps(result.to_dict(), indent=1))
    return {"fid": "fid.json", "metric": result.metric, "value": result.value, "bootstrap": result.bootstrap,
            "n_real": result.n_real, "n_generated": result.n_generated}


def _random_resnet18(path: Path, seed: int) -> Path:
    import torch
    from torchvision.models import resnet18

    if not path.is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = resnet18(weights=None).state_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    return path


def stage_classify(s: dict, ctx: StageContext) -> dict:
    from dataclasses import asdict

    from medical_diffusion.atomic_io import atomic_write_text
    from medical_diffusion.evaluation.classifier import ClassifierConfig, check_config, mix_seed, train_one_run
    from medical_diffusion.evaluation.classifier_data import balanced_subset, labelled_files, load_image_set

    c = s["classifier"]
    weights = s["weights"]
    if weights == "random-init":
        weights = str(_random_resnet18(ctx.out / "resnet18-random-init.pth", int(s["seed"])))
    config = ClassifierConfig(steps=int(c["steps"]), batch_size=int(c["batch_size"]), lr=float(c["lr"]),
                              size=int(c["size"]), runs=1, bf16=bool(c["bf16"]), augment=bool(c["augment"]),
                              seed=int(s["seed"]), weights=weights, device=ctx.torch_device())
    check_config(config)  # the limits `meddiff classify` applies
    mix = s["mix"]
    real_root = ctx.prepared_root() / "classifier"
    val = load_image_set(labelled_files(real_root / "val"), config.size)
    test = load_image_set(labelled_files(real_root / "test"), config.size)
    val.check_both_classes(str(real_root / "val"))
    test.check_both_classes(str(real_root / "test"))
    seed = mix_seed(config.seed, mix["name"])  # the same choice of files and seeds as `meddiff classify`
    items = balanced_subset(labelled_files(real_root / "train"), int(mix["n_real"]), seed, str(real_root / "train"))
    if int(mix["n_synthetic"]):
        syn = ctx.ref(s["synthetic"])
        items += balanced_subset(labelled_files(syn), int(mix["n_synthetic"]), seed + 1, str(syn))
    train = load_image_set(items, config.size)
    train.check_both_classes(f"training set of mix {mix['name']}")
    k = int(s["run"])
    result = train_one_run(train, val, test, config, seed + 1000 * (k + 1), mix["name"], k,
                           lambda _st, d, t: ctx.progress(d, t))
    log.info("%s run %d: test AUC %.4f (best val AUC %.4f at step %d)", mix["name"], k + 1, result.test_auc,
             result.best_val_auc, result.best_step)
    atomic_write_text(ctx.out / "run.json", json.dumps(asdict(result)))
    return {"run": "run.json", "test_auc": result.test_auc, "best_val_auc": result.best_val_auc}


RUNNERS: dict[str, Callable[[dict, StageContext], dict]] = {
    "prepare": stage_prepare, "train": stage_train, "generate": stage_generate, "reference": stage_reference,
    "features": stage_features, "fid": stage_fid, "classify": stage_classify,
}
#: kinds whose partial folder is kept so that the library resumes inside it after a kill
RESUMING_KINDS = ("prepare", "train", "generate")


# --- running one stage ---------------------------------------------------------------------------

class _LogProgress:
    """Progress for workers without a terminal: a log line every 10%."""

    def __init__(self, stage_id: str):
        self.stage_id, self.last = stage_id, -1

    def __call__(self, done: int, total: int) -> None:
        tenth = int(10 * done / total) if total else 10
        if tenth != self.last:
            self.last = tenth
            log.info("%s: %d/%d", self.stage_id, done, total)


def run_stage(spec: dict[str, Any], progress: Progress | None = None) -> dict:
    """Run one stage (or notice it is done); returns ``{"id", "status": ok|cached|failed, "error", ...}``."""
    import torch

    stage_id, key = spec["id"], spec["key"]
    store = StageStore(spec["workdir"])
    if store.is_done(stage_id, key) or store.recover(stage_id, key):
        return {"id": stage_id, "status": "cached"}
    out = store.partial(stage_id, key)
    if spec["kind"] not in RESUMING_KINDS and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = store.log(stage_id, key)
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    quiet = [(h, h.level) for h in root.handlers if not isinstance(h, logging.FileHandler)] if progress else []
    for h, _ in quiet:  # the terminal shows the bars; the log file gets everything
        h.setLevel(max(h.level, logging.WARNING))
    root.addHandler(handler)
    root.setLevel(min(old_level, logging.INFO) if old_level else logging.INFO)
    old_threads = torch.get_num_threads()
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    t0 = time.time()
    try:
        log.info("stage %s (key %s): %s", stage_id, key, json.dumps(spec["settings"], sort_keys=True, default=str))
        outputs = RUNNERS[spec["kind"]](spec["settings"], StageContext(spec, out, progress or _LogProgress(stage_id)))
        seconds = round(time.time() - t0, 2)
        store.finish(stage_id, key, {"id": stage_id, "kind": spec["kind"], "settings": spec["settings"],
                                     "outputs": outputs, "seconds": seconds,
                                     "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        log.info("stage %s done in %.1f s", stage_id, seconds)
        return {"id": stage_id, "status": "ok", "seconds": seconds}
    except BaseException as exc:  # noqa: BLE001 - a stage's failure is reported, the run goes on
        if isinstance(exc, KeyboardInterrupt):
            raise
        error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, MedDiffError) else str(exc)
        log.error("stage %s failed: %s\n%s", stage_id, error, traceback.format_exc())
        store.mark_failed(stage_id, key, error.splitlines()[0] if error else type(exc).__name__)
        return {"id": stage_id, "status": "failed", "error": error.splitlines()[0] if error else "",
                "log": str(log_path), "seconds": round(time.time() - t0, 2)}
    finally:
        torch.set_num_threads(old_threads)
        root.removeHandler(handler)
        root.setLevel(old_level)
        for h, level in quiet:
            h.setLevel(level)
        handler.close()
