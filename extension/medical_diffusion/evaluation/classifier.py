"""Classifier experiments of paper section 3.2 / Table 2: ResNet-18 on mixes of real and synthetic data.

Per run: ImageNet ResNet-18 (torchvision weights from a local file) with a 1-logit head, Adam
(lr 1e-4), ``steps`` batches of ``batch_size`` (paper: 6250 x 32), inputs ``size`` x ``size``
(paper: 196) in [0, 1] without ImageNet normalisation, heavy augmentation; validation AUC once
per epoch; the best-validation weights give the reported test AUC. Each mix (a Table 2 row) runs
``runs`` times (paper: 10) and reports mean +- sd. Every finished run is saved at once as
``OUT/runs/<mix>/run_NN.json`` and skipped when the job is started again with the same settings.

Runs go on ``config.device``: on CUDA with fp16 autocast and a GradScaler (``amp``), channels-last
tensors, and a DataLoader whose ``workers`` augment the batches on the CPU into pinned memory. Each
batch's augmentation draws from its own generator seeded by (run seed, step), so a run is the same
for any number of workers and bit-for-bit reproducible on the CPU; on a GPU it is reproducible within
AMP tolerance. The device, layout, workers and AMP are not part of the run fingerprint: a job begun on
the CPU can be finished on a GPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from medical_diffusion.atomic_io import atomic_write_text
from medical_diffusion.errors import InputFileError, MedDiffError
from medical_diffusion.evaluation.augment import HeavyAugmentConfig, heavy_augment
from medical_diffusion.evaluation.classifier_data import ImageSet, balanced_subset, labelled_files, load_image_set
from medical_diffusion.evaluation.limits import MAX_LR, MAX_MIX_IMAGES, check_limit, default_workers
from medical_diffusion.evaluation.roc import roc_auc, roc_curve, save_roc_png

StageProgress = Callable[[str, int, int], None]
LogFn = Callable[[str], None]


@dataclass
class MixSpec:
    """One Table 2 row: how many real and synthetic training images (None = all real ones)."""

    name: str
    n_real: Optional[int]
    n_synthetic: int = 0
    synthetic_dir: Optional[str] = None


#: The prostate MRI rows of Table 2 that use one synthetic set (the * rows need a second set:
#: add them as ``NAME=0:2000:DIR``).
TABLE2_MIXES = ("200:0", "200:2000", "0:200", "0:2000", "200:200")


def parse_mix(text: str, default_synthetic: Optional[str] = None) -> MixSpec:
    """``[NAME=]REAL:SYNTH[:DIR]``; REAL may be ``all``. E.g. ``200:2000``, ``star=0:2000:/data/gen10``."""
    name = None
    body = text
    if "=" in text.split(":")[0]:
        name, body = text.split("=", 1)
    parts = body.split(":", 2)
    if len(parts) < 2:
        raise MedDiffError(f"bad mix {text!r}: expected [NAME=]REAL:SYNTH[:DIR], e.g. 200:2000")
    try:
        n_real = None if parts[0].strip().lower() == "all" else int(parts[0])
        n_syn = int(parts[1])
    except ValueError:
        raise MedDiffError(f"bad mix {text!r}: REAL and SYNTH must be whole numbers (REAL may be 'all')") from None
    if (n_real is not None and not 0 <= n_real <= MAX_MIX_IMAGES) or not 0 <= n_syn <= MAX_MIX_IMAGES:
        raise MedDiffError(f"bad mix {text!r}: counts must be between 0 and {MAX_MIX_IMAGES}")
    syn_dir = parts[2] if len(parts) == 3 else default_synthetic
    if n_syn > 0 and not syn_dir:
        raise MedDiffError(f"mix {text!r} uses synthetic images: give --synthetic DIR or REAL:SYNTH:DIR")
    if not name:
        name = f"real{'all' if n_real is None else n_real}_syn{n_syn}"
        if len(parts) == 3:
            name += "_" + re.sub(r"[^A-Za-z0-9]+", "_", Path(parts[2]).name).strip("_")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise MedDiffError(f"bad mix name {name!r}: use letters, digits, '_', '-', '.'")
    return MixSpec(name, n_real, n_syn, syn_dir if n_syn > 0 else None)


@dataclass
class ClassifierConfig:
    """Training settings (defaults: the paper's protocol)."""

    steps: int = 6250
    batch_size: int = 32
    lr: float = 1e-4
    size: int = 196
    runs: int = 10
    bf16: bool = False
    augment: bool = True
    seed: int = 0
    eval_batch_size: int = 64
    weights: Optional[str] = None  # resnet18-f37072fd.pth; None -> $TORCH_HOME
    device: str = "cpu"  # "auto": CUDA, then MPS, then the CPU
    workers: Optional[int] = 0  # batch-augmenting DataLoader processes (None: min(4, CPUs); 0: this process)
    amp: bool = True  # fp16 autocast + GradScaler on CUDA (no effect elsewhere; bf16 is the CPU's option)
    channels_last: bool = True

    #: how a run is executed, not what it computes (left out of the fingerprint)
    EXECUTION = ("runs", "eval_batch_size", "weights", "device", "workers", "amp", "channels_last")

    def fingerprint(self) -> str:
        """What makes two runs comparable (not the number of runs, batch size of evaluation, device, ...)."""
        d = asdict(self)
        for k in self.EXECUTION:
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RunResult:
    mix: str
    run: int
    seed: int
    test_auc: float
    best_val_auc: float
    best_step: int
    steps: int
    n_train: int
    n_val: int
    n_test: int
    seconds: float
    fpr: List[float] = field(repr=False, default_factory=list)
    tpr: List[float] = field(repr=False, default_factory=list)
    fingerprint: str = ""
    device: str = ""  # e.g. "cuda, fp16 autocast" (older results: empty)


# --- model -------------------------------------------------------------------------------------

def build_resnet18(weights: str | os.PathLike | None) -> nn.Module:
    """torchvision ResNet-18 with ImageNet weights from a local file and a fresh 1-logit head."""
    from torchvision.models import resnet18

    from medical_diffusion.evaluation.weights import find_resnet18_weights, read_state_dict

    path = find_resnet18_weights(weights)
    with torch.device("meta"):  # no random init: every tensor but the new head comes from the file
        model = resnet18(weights=None)
    state = read_state_dict(path, "ResNet-18")
    body = {k: v for k, v in state.items() if not k.startswith("fc.")} if isinstance(state, dict) else {}
    wanted = {k for k in model.state_dict() if not k.startswith("fc.")}
    for k in wanted:  # older files have no BatchNorm step counters
        if k.endswith("num_batches_tracked") and k not in body:
            body[k] = torch.tensor(0, dtype=torch.long)
    missing = sorted(wanted - set(body))
    if missing:
        raise InputFileError(path, f"not a torchvision ResNet-18 state dict (missing {missing[0]})")
    try:
        model.load_state_dict(body, strict=False, assign=True)
    except RuntimeError as exc:
        raise InputFileError(path, f"not a torchvision ResNet-18 state dict ({str(exc).splitlines()[0]})") from exc
    model.fc = nn.Linear(model.fc.in_features, 1)
    return model


def to_unit_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1] (no ImageNet normalisation, as the authors' code)."""
    return images_u8.float().div_(255.0)


def autocast_for(device: torch.device, config: ClassifierConfig):
    """The autocast context of a forward pass: fp16 on CUDA (``amp``), bf16 on the CPU (``bf16``), else none."""
    if device.type == "cuda" and config.amp:
        return torch.autocast("cuda", dtype=torch.float16)
    if device.type == "cpu" and config.bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision_label(device: torch.device, config: ClassifierConfig) -> str:
    """``cuda, fp16 autocast`` / ``cpu, bf16 autocast`` / ``cpu, fp32`` for logs and results."""
    if device.type == "cuda" and config.amp:
        return f"{device}, fp16 autocast"
    if device.type == "cpu" and config.bf16:
        return f"{device}, bf16 autocast"
    return f"{device}, fp32"


def grad_scaler_for(device: torch.device, config: ClassifierConfig):
    """A GradScaler for fp16 autocast on CUDA, else None."""
    if device.type == "cuda" and config.amp:
        return torch.amp.GradScaler("cuda")
    return None


def to_model_input(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A float batch on ``device`` (asynchronously from pinned memory), channels-last if asked."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def predict(model: nn.Module, images: ImageSet, batch_size: int, bf16: bool = False,
            config: ClassifierConfig | None = None) -> np.ndarray:
    """Sigmoid scores for every image (eval mode, no augmentation), on the model's device."""
    config = config or ClassifierConfig(bf16=bf16)
    device = next(model.parameters()).device
    model.eval()
    out = []
    with torch.inference_mode(), autocast_for(device, config):
        for start in range(0, len(images), batch_size):
            x = to_model_input(to_unit_float(images.images[start:start + batch_size]), device, config.channels_last)
            out.append(model(x).float().squeeze(1).cpu())
    return torch.sigmoid(torch.cat(out)).numpy() if out else np.zeros(0)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, bf16: bool = False,
               config: ClassifierConfig | None = None, scaler=None) -> torch.Tensor:
    """One optimiser step on batch ``x`` (already on the model's device); returns the loss (not synchronised)."""
    config = config or ClassifierConfig(bf16=bf16)
    device = x.device
    model.train()
    with autocast_for(device, config):
        logits = model(x).float().squeeze(1)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, y.to(device, non_blocking=True).float())
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    return loss.detach()


def batch_seed(run_seed: int, step: int) -> int:
    """Seed of the augmentation of batch ``step`` of a run (independent of workers and device)."""
    return int(np.random.SeedSequence([int(run_seed), int(step)]).generate_state(1, np.uint64)[0])


def batch_order(n: int, batch_size: int, steps: int, generator: torch.Generator) -> List[torch.Tensor]:
    """Image indices of every training batch: a reshuffle per epoch, a batch never wraps round."""
    batches, order, pos = [], torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=generator), 0
        batches.append(order[pos:pos + batch_size])
        pos += batch_size
    return batches


class AugmentedBatches(torch.utils.data.Dataset):
    """Training batch ``k``: its images in [0, 1], augmented with a generator seeded by (run seed, k)."""

    def __init__(self, images: ImageSet, batches: Sequence[torch.Tensor], run_seed: int, augment: bool):
        self.images, self.labels = images.images, images.labels
        self.batches, self.run_seed, self.augment = list(batches), int(run_seed), bool(augment)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        idx = self.batches[k]
        x = to_unit_float(self.images[idx])
        if self.augment:
            x = heavy_augment(x, HeavyAugmentConfig(), torch.Generator().manual_seed(batch_seed(self.run_seed, k)))
        return x, self.labels[idx]


def training_batches(dataset: AugmentedBatches, device: torch.device, workers: int):
    """The batches in order, made by ``workers`` processes (0: here), pinned for a CUDA device."""
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                       pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)


def run_workers(config: ClassifierConfig) -> int:
    return default_workers() if config.workers is None else int(config.workers)


def train_one_run(train: ImageSet, val: ImageSet, test: ImageSet, config: ClassifierConfig, seed: int,
                  mix: str = "", run: int = 0, progress: Optional[StageProgress] = None) -> RunResult:
    """One training run; returns the best-validation checkpoint's test AUC and ROC."""
    from medical_diffusion.devices import resolve_device

    t0 = time.time()
    device = resolve_device(config.device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = place_model(build_resnet18(config.weights), device, config.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, foreach=True)
    scaler = grad_scaler_for(device, config)
    n = len(train)
    epoch_steps = steps_per_epoch(n, config.batch_size)
    best_auc, best_step, best_state = -1.0, 0, None
    stage = f"{mix} run {run + 1}"
    batches = AugmentedBatches(train, batch_order(n, config.batch_size, config.steps, gen), seed, config.augment)
    for step, (x, y) in enumerate(training_batches(batches, device, run_workers(config)), start=1):
        train_step(model, opt, to_model_input(x, device, config.channels_last), y, config=config, scaler=scaler)
        if step % epoch_steps == 0 or step == config.steps:
            auc = roc_auc(val.labels.numpy(), predict(model, val, config.eval_batch_size, config=config))
            if auc > best_auc:
                best_auc, best_step = auc, step
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if progress:
            progress(stage, step, config.steps)
    model.load_state_dict(best_state)
    scores = predict(model, test, config.eval_batch_size, config=config)
    labels = test.labels.numpy()
    fpr, tpr = roc_curve(labels, scores)
    return RunResult(mix=mix, run=run, seed=seed, test_auc=roc_auc(labels, scores), best_val_auc=best_auc,
                     best_step=best_step, steps=config.steps, n_train=n, n_val=len(val), n_test=len(test),
                     seconds=round(time.time() - t0, 1), fpr=fpr.tolist(), tpr=tpr.tolist(),
                     fingerprint=config.fingerprint(), device=precision_label(device, config))


# --- time estimate -------------------------------------------------------------------------------

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step_seconds(config: ClassifierConfig, trials: int = 3) -> tuple[float, float]:
    """Measured seconds per training step and per evaluated image on ``config.device`` (random data).

    A step's augmentation (CPU) and its device work are timed apart: with ``w`` loader workers they
    overlap, so a step takes ``max(device, augmentation / w)``; without workers, their sum.
    """
    from medical_diffusion.devices import resolve_device

    device = resolve_device(config.device)
    model = place_model(build_resnet18(config.weights), device, config.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, foreach=True)
    scaler = grad_scaler_for(device, config)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(config.batch_size, 3, config.size, config.size, generator=gen)
    y = torch.randint(0, 2, (config.batch_size,), generator=gen)
    augment_s = 0.0
    if config.augment:
        heavy_augment(x, HeavyAugmentConfig(), gen)
        t = time.perf_counter()
        for _ in range(trials):
            heavy_augment(x, HeavyAugmentConfig(), gen)
        augment_s = (time.perf_counter() - t) / trials
    xd = to_model_input(x, device, config.channels_last)
    train_step(model, opt, xd, y, config=config, scaler=scaler)  # warm-up (cuDNN picks its kernels here)
    _synchronize(device)
    t = time.perf_counter()
    for _ in range(trials):
        train_step(model, opt, xd, y, config=config, scaler=scaler)
    _synchronize(device)
    device_s = (time.perf_counter() - t) / trials
    workers = run_workers(config)
    step_s = max(device_s, augment_s / workers) if workers else device_s + augment_s
    xs = ImageSet((x * 255).to(torch.uint8), y, [])
    predict(model, xs, config.eval_batch_size, config=config)  # warm-up
    _synchronize(device)
    t = time.perf_counter()
    predict(model, xs, config.eval_batch_size, config=config)
    return step_s, (time.perf_counter() - t) / len(xs)


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Full batches per pass over the training set (a batch never wraps into the next epoch)."""
    return max(1, n_train // batch_size)


def estimate_seconds(step_s: float, eval_s: float, config: ClassifierConfig, n_train: int, n_val: int,
                     n_test: int) -> float:
    """Seconds for one run: training steps + one validation pass per epoch + the test pass."""
    evals = math.ceil(config.steps / steps_per_epoch(n_train, config.batch_size))
    return config.steps * step_s + evals * n_val * eval_s + n_test * eval_s


def format_duration(seconds: float) -> str:
    """``h:mm:ss``, from a day on ``3 d 23 h 00 min``: the training progress's formatter."""
    from medical_diffusion.training.progress import format_duration as clock

    return clock(seconds)


def check_config(config: ClassifierConfig) -> None:
    """Every numeric setting within :mod:`limits` (one-line :class:`MedDiffError` otherwise)."""
    config.steps = check_limit("steps", config.steps)
    config.batch_size = check_limit("batch size", config.batch_size, "classifier_batch_size")
    config.eval_batch_size = check_limit("eval batch size", config.eval_batch_size, "classifier_batch_size")
    config.runs = check_limit("runs", config.runs)
    config.size = check_limit("size", config.size)
    config.seed = check_limit("seed", config.seed)
    if config.workers is not None:
        config.workers = check_limit("workers", config.workers)
    if not (isinstance(config.lr, (int, float)) and 0.0 < config.lr <= MAX_LR):
        raise MedDiffError(f"lr must be above 0 and at most {MAX_LR}, got {config.lr!r}")


# --- the experiment job ----------------------------------------------------------------------------

def run_path(out_dir: Path, mix: str, run: int) -> Path:
    return out_dir / "runs" / mix / f"run_{run:02d}.json"


def load_run(path: Path, fingerprint: str) -> Optional[RunResult]:
    """A finished run's result, or None; an error if it was made with other settings."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        result = RunResult(**data)
    except (ValueError, TypeError) as exc:
        raise InputFileError(path, f"unreadable run result ({exc}); delete it to redo the run") from exc
    if result.fingerprint != fingerprint:
        raise InputFileError(path, "was made with different training settings; use another output folder")
    return result


@dataclass
class MixSummary:
    mix: str
    n_real: Optional[int]
    n_synthetic: int
    synthetic_dir: Optional[str]
    runs: int
    mean_auc: float
    sd_auc: float
    aucs: List[float]


def summarise(mix: MixSpec, results: Sequence[RunResult]) -> MixSummary:
    aucs = [r.test_auc for r in results]
    sd = float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0
    return MixSummary(mix.name, mix.n_real, mix.n_synthetic, mix.synthetic_dir, len(aucs),
                      float(np.mean(aucs)) if aucs else float("nan"), sd, aucs)


def mix_seed(base: int, name: str) -> int:
    """Seed for a mix's file selection: fixed per (seed, mix name), the same for all its runs."""
    return (base * 1_000_003 + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)) % (2 ** 31)


def write_report(out_dir: Path, summaries: Sequence[MixSummary], config: ClassifierConfig,
                 curves: Dict[str, List[tuple]], failures: List[dict], extra: dict) -> dict:
    """``report.json``, ``report.csv`` and ``roc.png`` in ``out_dir``."""
    report = {"protocol": "paper section 3.2 (ResNet-18, best-validation checkpoint, test AUC)",
              "config": asdict(config), "mixes": [asdict(s) for s in summaries], "failures": failures, **extra}
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2))
    lines = ["mix,n_real,n_synthetic,synthetic_dir,runs,mean_auc,sd_auc,aucs"]
    for s in summaries:
        lines.append(",".join([s.mix, "all" if s.n_real is None else str(s.n_real), str(s.n_synthetic),
                               f'"{s.synthetic_dir or ""}"', str(s.runs), f"{s.mean_auc:.4f}", f"{s.sd_auc:.4f}",
                               '"' + " ".join(f"{a:.4f}" for a in s.aucs) + '"']))
    atomic_write_text(out_dir / "report.csv", "\n".join(lines) + "\n")
    if any(curves.values()):
        save_roc_png(curves, out_dir / "roc.png")
    return report


def run_experiments(real_root: str | os.PathLike, mixes: Sequence[MixSpec], out_dir: str | os.PathLike,
                    config: ClassifierConfig | None = None, progress: Optional[StageProgress] = None,
                    log: LogFn = print, estimate_only: bool = False) -> dict:
    """Run every mix ``config.runs`` times (resuming finished runs) and write the report.

    ``real_root`` holds ``train/``, ``val/`` and ``test/``, each with ``neg/`` and ``pos/``.
    Returns the report dict (also written to ``OUT/report.json``).
    """
    config = config or ClassifierConfig()
    if not mixes:
        raise MedDiffError("no mixes given")
    names = [m.name for m in mixes]
    if len(set(names)) != len(names):
        raise MedDiffError(f"mix names must be unique: {names}")
    check_config(config)
    from medical_diffusion.devices import resolve_device

    device = resolve_device(config.device)  # an absent GPU fails before any image or weights file is read
    out = Path(out_dir)
    real_root = Path(real_root)
    from medical_diffusion.evaluation.weights import find_resnet18_weights

    find_resnet18_weights(config.weights)  # fail early with the named file
    log(f"loading real validation and test images from {real_root} at {config.size}x{config.size}")
    val = load_image_set(labelled_files(real_root / "val"), config.size)
    test = load_image_set(labelled_files(real_root / "test"), config.size)
    val.check_both_classes(str(real_root / "val"))
    test.check_both_classes(str(real_root / "test"))
    real_train_items = labelled_files(real_root / "train")
    failures = val.failures + test.failures
    fp = config.fingerprint()

    plans = []
    for mix in mixes:  # choose every mix's training files first, so bad counts fail before any work
        todo = [k for k in range(config.runs) if load_run(run_path(out, mix.name, k), fp) is None]
        seed = mix_seed(config.seed, mix.name)
        items = balanced_subset(real_train_items, mix.n_real, seed, str(real_root / "train"))
        if mix.n_synthetic:
            items += balanced_subset(labelled_files(mix.synthetic_dir), mix.n_synthetic, seed + 1,
                                     str(mix.synthetic_dir))
        plans.append((mix, todo, items, seed))
    step_s, eval_s = measure_step_seconds(config)
    total = sum(len(todo) * estimate_seconds(step_s, eval_s, config, max(len(items), 1), len(val), len(test))
                for _, todo, items, _ in plans)
    n_todo = sum(len(todo) for _, todo, _, _ in plans)
    log(f"time estimate: {n_todo} run(s) to do ({sum(config.runs - len(t) for _, t, _, _ in plans)} already finished), "
        f"{config.steps} steps of {config.batch_size} at {config.size}px on {precision_label(device, config)}, "
        f"{run_workers(config)} loader worker(s): {step_s:.3f} s/step measured here -> about "
        f"{format_duration(total)} in all")
    if estimate_only:
        return {"estimate_seconds": total, "step_seconds": step_s, "runs_to_do": n_todo}

    summaries, curves = [], {}
    done_runs = 0
    for mix, todo, items, seed in plans:
        train = None
        results: List[RunResult] = []
        for k in range(config.runs):
            path = run_path(out, mix.name, k)
            result = load_run(path, fp)
            if result is None:
                if train is None:
                    train = load_image_set(items, config.size)
                    failures += train.failures
                    train.check_both_classes(f"training set of mix {mix.name}")
                log(f"[{mix.name}] run {k + 1}/{config.runs}: {len(train)} training images")
                result = train_one_run(train, val, test, config, seed + 1000 * (k + 1), mix.name, k, progress)
                atomic_write_text(path, json.dumps(asdict(result)))
                done_runs += 1
                log(f"[{mix.name}] run {k + 1}: test AUC {result.test_auc:.4f} (best val AUC "
                    f"{result.best_val_auc:.4f} at step {result.best_step}, {format_duration(result.seconds)})")
            results.append(result)
        summary = summarise(mix, results)
        summaries.append(summary)
        curves[mix.name] = [(r.fpr, r.tpr, r.test_auc) for r in results]
        log(f"[{mix.name}] test AUC {summary.mean_auc:.3f} ± {summary.sd_auc:.3f} over {summary.runs} runs")
    return write_report(out, summaries, config, curves, failures,
                        {"real_root": str(real_root), "runs_done_now": done_runs})
