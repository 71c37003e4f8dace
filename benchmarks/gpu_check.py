"""One prepared check for a lent GPU machine: GPU tests, training speed and memory, FID and classifier throughput.

On the GPU machine (no network; its image lacks diffusers and open_clip_torch, so fetch their wheels
here first with ``bash benchmarks/fetch_gpu_wheels.sh``, which fills the ignored folder ``.whl/``)::

    bash benchmarks/gpu_check.sh                  # installs .whl/ into /tmp/site (only what is missing), then:
    PYTHONPATH=/tmp/site:extension python3 benchmarks/gpu_check.py --out "$OUT"

It writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` (default ``$OUT``, else
``./gpu-check-out``) and prints the markdown table last. Sections, each in its own subprocess (so a
crash, an out-of-memory error or a hang costs only that section, and peak memory is its own):

1. ``gpu_tests``: ``python -m pytest -q -m gpu tests/`` (pass/fail/skip counts);
2. ``train:*``: one Textual Inversion step on the SD2 architecture with random weights, 512 px,
   batch 1, 64 vectors: this trainer; the diffusers example's per-step work (re-implemented in
   ``bench_train_step.py``: VAE every step, whole embedding matrix in AdamW, fp16 mixed precision);
   A1111's (``modules/textual_inversion``: latents sampled once per image and cached, the text encoder
   run every step over the ``[name]`` prompt with the vectors spliced in, fp16 weights under autocast
   with a gradient scaler, AdamW on the vectors only, gradient checkpointing and plain attention as
   its trainer sets them); and this trainer capped at an 8 GiB card
   (``torch.cuda.set_per_process_memory_fraction``), retried with gradient checkpointing if it does not
   fit. s/step, it/s (the paper: 3.5 it/s on an RTX 2070), peak CUDA memory allocated and reserved;
   and this trainer on the SDXL architecture (random weights from the shipped ``configs/sdxl``, both text
   encoders, ``--sdxl-resolution`` px, default 1024; smoke: tiny-sdxl) with its peak memory;
3. ``fid``: images/s of the FID Inception-v3 network (random weights) at batch 64, fp32 and fp16;
4. ``classifier``: ResNet-18 training steps/s (random weights, batch 32, the classifier's image size),
   channels_last with fp16 autocast, and the project's own ``train_step`` as it is.

A global budget (``--budget``, default 420 s) is shared out: each section gets its share of what is
left, a section that no longer fits its minimum is recorded as skipped, and time a section does not
use goes to the ones after it. ``--smoke`` runs every section on the CPU with the tiny model and tiny
sizes in seconds (used by ``tests/test_benchmarks_gpu_check.py`` so the script cannot rot).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (ROOT / "extension", BENCH):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

SYNC_EVERY = 5  # this trainer's loss read-back interval during the GPU benchmark (its default is 10)
PAPER_IT_S = 3.5  # de Wilde et al. 2024: 512 px, batch 1, on an RTX 2070 (8 GB)
CARD_GIB = 8.0
JSON_NAME = "gpu_check.json"
MD_NAME = "gpu_check.md"


# -- the plan -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    name: str
    title: str
    share: float  # relative share of the budget
    min_s: float  # below this the job is skipped
    smoke_min_s: float = 1.0


JOBS = (
    Job("gpu_tests", "GPU tests (pytest -m gpu)", 90, 30),
    Job("train:meddiff", "train: this trainer", 60, 40),
    Job("train:diffusers", "train: diffusers example approach", 55, 40),
    Job("train:a1111", "train: A1111-style", 55, 40),
    Job("train:meddiff-8gib", f"train: this trainer on an {CARD_GIB:g} GiB card", 70, 40),
    Job("train:meddiff-sdxl", "train: this trainer on SDXL", 70, 50),
    Job("fid", "FID Inception-v3 features", 35, 15),
    Job("classifier", "classifier ResNet-18 training", 35, 15),
)
JOB_NAMES = tuple(j.name for j in JOBS)


def job_limit(remaining: float, share: float, shares_left: float) -> float:
    """Seconds for a job: its share of the time left among the jobs still to run."""
    if shares_left <= 0:
        return max(0.0, remaining)
    return max(0.0, remaining * share / shares_left)


# -- pytest summary -------------------------------------------------------------------------------
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?|warnings?)\b")


def parse_pytest_summary(text: str) -> dict[str, int]:
    """Counts from pytest's closing line (``3 passed, 1 skipped, 200 deselected in 2.1s``)."""
    counts = {k: 0 for k in ("passed", "failed", "skipped", "deselected", "xfailed", "xpassed", "errors")}
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        found = _COUNT.findall(line)
        if found and (" in " in line or line.startswith("=")):
            for n, kind in found:
                kind = "errors" if kind.startswith("error") else kind
                if kind in counts:
                    counts[kind] = int(n)
            break
    return counts


# -- small helpers used by the workers -------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def _cuda_memory(device) -> dict[str, float]:
    import torch

    if device.type != "cuda":
        return {}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
            "total_gib": torch.cuda.get_device_properties(device).total_memory / 2**30}


def _device(args):
    from medical_diffusion.devices import resolve_device

    return resolve_device("cpu" if args.smoke else args.device)


def _timed_loop(step: Callable[[], None], device, warmup: int, max_iters: int, deadline: float) -> list[float]:
    """Seconds of each call of ``step`` after ``warmup`` calls, until ``max_iters`` or the deadline."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    while len(times) < max_iters and (not times or time.monotonic() < deadline):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


# -- training workers -----------------------------------------------------------------------------
def build_modules(kind: str, device):
    """(unet, vae, text_encoder, tokenizer, scheduler_config) with random weights, on ``device``, fp32.

    ``kind`` "sd2" is the real SD2 architecture (the configs shipped with the package); on CUDA it is
    initialised there (seconds instead of a minute on the CPU). "tiny" is the test model.
    """
    import torch

    from medical_diffusion.backend.tiny import SD2_SCHEDULER

    if kind == "tiny":
        from medical_diffusion.backend.tiny import build_tiny_backend

        b = build_tiny_backend(0, device=device)
        return b.unet, b.vae, b.text_encoder, b.tokenizer, dict(b.scheduler_config)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from medical_diffusion.backend.clip_tokenizer import load_sd2_tokenizer
    from medical_diffusion.backend.diffusers_backend import CONFIG_DIR

    cfg = CONFIG_DIR / "sd2"
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_json_file(cfg / "text_encoder" / "config.json"))
    return (unet.to(device), vae.to(device), text.to(device), load_sd2_tokenizer(),
            dict(SD2_SCHEDULER, prediction_type="epsilon"))


def build_sdxl_backend(smoke: bool, device, dtype, attention: str = "auto"):
    """The SDXL architecture with random weights (shipped configs; built on ``device``), or tiny-sdxl."""
    import torch

    if smoke:
        from medical_diffusion.backend.tiny import build_tiny_backend

        return build_tiny_backend(0, family="SDXL", device=device, dtype=dtype, attention=attention)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from medical_diffusion.backend.clip_tokenizer import load_tokenizer_for
    from medical_diffusion.backend.diffusers_backend import CONFIG_DIR, DiffusersBackend, _read_json

    cfg = CONFIG_DIR / "sdxl"
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_json_file(cfg / "text_encoder" / "config.json"))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(cfg / "text_encoder_2" / "config.json"))
    backend = DiffusersBackend(unet=unet, vae=vae, text_encoder=text, text_encoder_2=text_2,
                               tokenizer=load_tokenizer_for("SDXL", False), tokenizer_2=load_tokenizer_for("SDXL", True),
                               scheduler_config=_read_json(cfg / "scheduler" / "scheduler_config.json"),
                               device=device, dtype=dtype, label="random SDXL", attention=attention, family="SDXL")
    _release(device)
    return backend


def make_backend(modules, device, dtype, label: str, attention: str = "auto"):
    from medical_diffusion.backend.diffusers_backend import DiffusersBackend

    unet, vae, text, tokenizer, sched = modules
    backend = DiffusersBackend(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler_config=sched,
                               device=device, dtype=dtype, label=label, attention=attention)
    _release(device)  # the fp32 copies the modules were built in
    return backend


def _release(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` TrainConfig fields (VALUE as JSON when it parses, else a string)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--train-option {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _step_summary(times: list[float], warmup: int) -> dict[str, Any]:
    timed = times[warmup:] if len(times) > warmup else times[-1:]
    if not timed:
        raise RuntimeError("no training step finished")
    s = _median(timed)
    return {"steps_timed": len(timed), "s_per_step": s, "it_per_s": 1.0 / s, "min_s_per_step": min(timed),
            "paper_it_per_s": PAPER_IT_S}


def _meddiff_run(backend, data: Path, args, device, warmup: int, deadline: float, overrides: dict) -> dict:
    from bench_train_step import run_meddiff

    with tempfile.TemporaryDirectory(prefix="gpu-check-run-") as work:
        res = run_meddiff(backend, data, warmup + args.train_steps, args.resolution, Path(work),
                          stop=lambda: time.monotonic() > deadline, **overrides)
    out = _step_summary(res["times"], warmup)
    out["setup_s"] = res["setup"]
    out["peak_rss_gib"] = res["peak"] / 2**30
    out["train_options"] = overrides
    return out


def worker_train(args) -> dict:
    import torch

    from bench_train_step import PeakRSS, make_images, run_diffusers_example
    from medical_diffusion.devices import describe, weight_dtype

    device = _device(args)
    deadline = time.monotonic() + args.limit - 10 if not args.smoke else time.monotonic() + args.limit
    variant = args.variant
    warmup = 1 if args.smoke else 3
    cuda = device.type == "cuda"
    wdtype = weight_dtype(device, args.precision)
    amp = wdtype if wdtype != torch.float32 else None
    overrides = _parse_overrides(args.train_option)
    if cuda:  # this trainer reads the loss back every N steps; time whole windows, the first one is warm-up
        overrides.setdefault("sync_every", SYNC_EVERY)
    t0 = time.perf_counter()
    if variant == "meddiff-sdxl":
        return _sdxl_train(args, device, wdtype, warmup, deadline, overrides)
    modules = build_modules("tiny" if args.smoke else "sd2", device)
    result: dict[str, Any] = {"model": "tiny (random)" if args.smoke else "SD2 architecture, random weights",
                              "resolution": args.resolution, "vectors": 64, "batch": 1,
                              "build_s": time.perf_counter() - t0}
    with tempfile.TemporaryDirectory(prefix="gpu-check-data-") as tmp:
        data = Path(tmp)
        make_images(data, 4, args.resolution)
        if variant == "diffusers":
            backend = make_backend(modules, device, torch.float32, "random SD2")
            result["precision"] = f"unet/vae {str(amp or torch.float32)[6:]}, text encoder fp32" + (
                ", autocast" if amp else "")
            result["attention"] = "sdpa (diffusers default)"
            _reset_peak(device)
            res = run_diffusers_example(backend, data, warmup + args.train_steps, args.resolution, False,
                                        amp_dtype=amp, stop=lambda: time.monotonic() > deadline)
            result.update(_step_summary(res["times"], warmup))
            result["peak_rss_gib"] = res["peak"] / 2**30
        elif variant == "a1111":
            backend = make_backend(modules, device, wdtype, "random SD2", attention="classic")
            result["precision"] = f"weights {str(wdtype)[6:]}, vectors fp32" + (", autocast + grad scaler"
                                                                               if amp else "")
            result["attention"] = "classic (A1111 undoes its optimisations while training)"
            result["gradient_checkpointing"] = True
            _reset_peak(device)
            with PeakRSS() as mem:
                times = run_a1111_style(backend, data, warmup + args.train_steps, args.resolution, amp,
                                        stop=lambda: time.monotonic() > deadline)
            result.update(_step_summary(times, warmup))
            result["peak_rss_gib"] = mem.peak / 2**30
        elif variant in ("meddiff", "meddiff-8gib"):
            backend = make_backend(modules, device, wdtype, "random SD2", attention=args.attention)
            result["precision"] = f"weights {str(wdtype)[6:]}, vectors fp32"
            result["attention"] = getattr(backend, "attention", args.attention)
            result["device"] = describe(device, wdtype)
            warmup = int(overrides.get("sync_every") or warmup)
            if variant == "meddiff-8gib":
                result.update(_cap_memory(device, CARD_GIB))
            _reset_peak(device)
            try:
                result.update(_meddiff_run(backend, data, args, device, warmup, deadline, overrides))
                result["fits"] = True
            except Exception as exc:
                if variant != "meddiff-8gib" or not _is_oom(exc):
                    raise
                result["fits"] = False
                result["oom"] = str(exc).splitlines()[0][:300]
                _release(device)
                _reset_peak(device)
                retry = dict(overrides, gradient_checkpointing=True)
                try:
                    result["with_gradient_checkpointing"] = _meddiff_run(backend, data, args, device, warmup,
                                                                         deadline, retry)
                    result["with_gradient_checkpointing"]["fits"] = True
                    result["with_gradient_checkpointing"].update(_cuda_memory(device))
                except Exception as exc2:
                    if not _is_oom(exc2):
                        raise
                    result["with_gradient_checkpointing"] = {"fits": False, "oom": str(exc2).splitlines()[0][:300]}
        else:
            raise SystemExit(f"unknown training variant {variant!r}")
    result.update(_cuda_memory(device))
    return result


def _sdxl_train(args, device, wdtype, warmup: int, deadline: float, overrides: dict) -> dict:
    """This trainer on the SDXL architecture: s/step and peak memory at ``--sdxl-resolution``."""
    import argparse as _argparse

    from bench_train_step import make_images
    from medical_diffusion.devices import describe

    t0 = time.perf_counter()
    resolution = args.resolution if args.smoke else args.sdxl_resolution
    backend = build_sdxl_backend(args.smoke, device, wdtype, attention=args.attention)
    result: dict[str, Any] = {"model": "tiny-sdxl (random)" if args.smoke else "SDXL architecture, random weights",
                              "resolution": resolution, "vectors": 64, "batch": 1, "build_s": time.perf_counter() - t0,
                              "precision": f"weights {str(wdtype)[6:]}, vectors fp32", "device": describe(device, wdtype),
                              "attention": getattr(backend, "attention", args.attention)}
    warmup = int(overrides.get("sync_every") or warmup)
    _reset_peak(device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-data-") as tmp:
        make_images(Path(tmp), 4, resolution)
        run_args = _argparse.Namespace(**dict(vars(args), resolution=resolution))
        result.update(_meddiff_run(backend, Path(tmp), run_args, device, warmup, deadline, overrides))
    result.update(_cuda_memory(device))
    return result


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _cap_memory(device, gib: float) -> dict[str, Any]:
    """Limit this process's CUDA allocations to ``gib`` (a smaller card); the model is already on the GPU."""
    import torch

    if device.type != "cuda":
        return {"memory_cap": "not applied (not CUDA)"}
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return {"memory_cap_gib": gib, "memory_fraction": fraction}


def run_a1111_style(backend, data: Path, steps: int, resolution: int, amp_dtype, stop=None) -> list[float]:
    """A1111 v1.10's Textual Inversion per-step work (``modules/textual_inversion``), in this project's terms.

    Setup: each image is VAE-encoded once and one latent sample cached on the CPU
    (``latent_sampling_method`` "once"); the vectors are fp32, trained by AdamW (no weight decay).
    Each step: the cached latent is moved to the device; under autocast the text encoder runs on the
    prompt (the embedding name alone: A1111's ``[name]`` template) with the vectors spliced in, then the
    denoiser loss at a random timestep; the loss is read (``loss.item()``), scaled, back-propagated,
    and the optimizer stepped through the gradient scaler. The UNet's blocks are checkpointed
    (``sd_hijack_checkpoint``) and attention is the plain kind (its training undoes the
    cross-attention optimisations unless a setting says otherwise).
    """
    import contextlib

    import numpy as np
    import torch
    from diffusers.models.attention_processor import AttnProcessor

    from medical_diffusion.png_io import list_images, load_image
    from medical_diffusion.training.embedding_init import initial_vectors

    device = backend.device
    backend.unet.set_attn_processor(AttnProcessor())
    backend.set_gradient_checkpointing(True)
    backend.unet.train()  # checkpointing is active in training mode only
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    latents = []
    with torch.no_grad(), autocast():
        for path in list_images(data):
            img = load_image(path).resize((resolution, resolution))
            pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
            latents.append(backend.encode_images(pixels, sample=True).float().cpu())
    name = "bench"
    vec = initial_vectors(backend, 64, "text", "*").to(device, torch.float32).requires_grad_(True)
    optimizer = torch.optim.AdamW([vec], lr=0.005, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16 and device.type == "cuda")
    times = []
    try:
        for step in range(steps):
            if stop is not None and stop():
                break
            t0 = time.perf_counter()
            with autocast():
                x = latents[step % len(latents)].to(device)
                cond = backend.encode_prompt(name, {name: vec})
                noise = torch.randn_like(x)
                t = torch.randint(0, backend.num_train_timesteps, (1,), device=device).float()
                loss = backend.diffusion_loss(x, cond, noise, t)
            loss.item()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    finally:
        backend.set_gradient_checkpointing(False)
        backend.unet.eval()
    return times


# -- evaluation workers ---------------------------------------------------------------------------
def worker_fid(args) -> dict:
    """Images/s of the FID Inception-v3 network (random weights: no file is needed) on the device."""
    import torch

    from medical_diffusion.evaluation.inception import INPUT_SIZE, build_inception

    device = _device(args)
    deadline = time.monotonic() + max(1.0, args.limit - 8)
    batch = 2 if args.smoke else args.fid_batch
    size = 96 if args.smoke else INPUT_SIZE
    torch.manual_seed(0)
    model = build_inception(None).to(device)
    x = torch.rand(batch, 3, size, size, device=device) * 255
    out: dict[str, Any] = {"batch": batch, "size": size, "weights": "random (architecture only)",
                           "input": "on the device already (no decoding or resizing)"}
    cuda = device.type == "cuda"
    # (label, autocast dtype, TF32 allowed): strict fp32 is what FID numbers should be computed with
    modes = [("fp32", None, False)] + ([("tf32", None, True), ("fp16 autocast", torch.float16, True)] if cuda else [])
    _reset_peak(device)
    for label, dtype, tf32 in modes:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32

        def step():
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                        enabled=dtype is not None):
                model(x)

        times = _timed_loop(step, device, 0 if args.smoke else 2, 1 if args.smoke else 30, deadline)
        out[label] = {"iters": len(times), "s_per_batch": _median(times), "images_per_s": batch / _median(times)}
    out.update(_cuda_memory(device))
    return out


def worker_classifier(args) -> dict:
    """ResNet-18 training steps/s with ``classifier.build_resnet18`` (a random-weight file written here)."""
    import torch
    from torchvision.models import resnet18

    from medical_diffusion.evaluation.classifier import ClassifierConfig, build_resnet18, train_step

    device = _device(args)
    deadline = time.monotonic() + max(1.0, args.limit - 8)
    batch = 2 if args.smoke else 32
    size = 32 if args.smoke else (args.classifier_size or ClassifierConfig().size)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="gpu-check-resnet-") as tmp:
        path = Path(tmp) / "resnet18-random.pth"
        torch.save(resnet18(weights=None).state_dict(), path)
        model = build_resnet18(path)
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)
    x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), device=device)
    amp = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    model.train()

    def amp_step():
        with torch.autocast(device.type, dtype=amp):
            logits = model(x).float().squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def project_step():
        train_step(model, opt, x, y, bf16=False)

    iters = 1 if args.smoke else 50
    out: dict[str, Any] = {"batch": batch, "size": size, "weights": "random (through build_resnet18)",
                           "memory_format": "channels_last"}
    _reset_peak(device)
    for label, fn in ((f"{str(amp)[6:]} autocast", amp_step), ("project train_step (as is)", project_step)):
        times = _timed_loop(fn, device, 0 if args.smoke else 3, iters, deadline)
        out[label] = {"iters": len(times), "s_per_step": _median(times), "steps_per_s": 1 / _median(times)}
    out.update(_cuda_memory(device))
    return out


WORKERS = {"train": worker_train, "fid": worker_fid, "classifier": worker_classifier}


# -- the driver -----------------------------------------------------------------------------------
def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def judge_pytest(stdout: str, returncode: int) -> dict[str, Any]:
    """Counts and verdict of a ``pytest -q -m gpu --continue-on-collection-errors`` run.

    Test modules that cannot be imported because a package is missing on this machine (the GPU
    image has no SimpleITK, pydicom or gradio) are listed, not counted as failures: they hold no GPU
    test. Any other collection error, a failed test or an erroring test fails the section.
    """
    counts = parse_pytest_summary(stdout)
    missing = sorted(set(re.findall(r"^E\s+ModuleNotFoundError: No module named '([^'.]+)", stdout, re.M)))
    n_missing = len(re.findall(r"^E\s+ModuleNotFoundError: No module named", stdout, re.M))
    collection = sorted(set(re.findall(r"^ERROR (tests/[^\s:]+\.py)(?:\s|$)", stdout, re.M)))
    test_errors = [ln for ln in stdout.splitlines() if ln.startswith("ERROR ") and "::" in ln]
    failed = [ln for ln in stdout.splitlines() if ln.startswith("FAILED ")]
    verdict: dict[str, Any] = {**counts, "exit_code": returncode, "collection_errors": collection,
                               "missing_packages": missing}
    unexplained = len(collection) > n_missing
    verdict["ok"] = (returncode in (0, 1, 5) and counts["failed"] == 0 and not test_errors and not unexplained
                     and not (returncode == 1 and not collection))
    if returncode == 5 or (counts["passed"] + counts["failed"] + counts["skipped"] == 0 and verdict["ok"]):
        verdict["note"] = "no test is marked gpu there"
    if failed or test_errors:
        verdict["failures"] = (failed + test_errors)[:20]
    return verdict


def run_gpu_tests(args, limit: float) -> dict:
    smoke_target = "tests/test_gpu.py" if (ROOT / "tests" / "test_gpu.py").is_file() else "tests/test_devices.py"
    targets = args.pytest_target or ([smoke_target] if args.smoke else ["tests/"])
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
           "--continue-on-collection-errors", *targets]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "extension"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
    result = judge_pytest(proc.stdout, proc.returncode)
    result["command"] = shlex.join(["python", *cmd[1:]])
    if not result.pop("ok"):
        result["output_tail"] = _tail(proc.stdout + proc.stderr, 30)
        raise _SectionFailed(f"pytest exit code {proc.returncode}: {result['failed']} failed, "
                             f"{result['errors']} errors", result)
    return result


class _SectionFailed(Exception):
    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def run_worker(job: Job, args, limit: float) -> dict:
    """Run one section's worker: in a subprocess with ``limit`` as its timeout, or here (``--in-process``)."""
    section, _, variant = job.name.partition(":")
    if args.in_process:
        worker_args = argparse.Namespace(**vars(args))
        worker_args.worker, worker_args.variant, worker_args.limit = section, variant or None, limit
        prepare_worker(worker_args)
        return WORKERS[section](worker_args)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = Path(fh.name)
    cmd = [sys.executable, __file__, "--worker", section, "--json-out", str(out), "--limit", f"{limit:.1f}",
           "--device", args.device, "--precision", args.precision, "--attention", args.attention,
           "--resolution", str(args.resolution),
           "--train-steps", str(args.train_steps), "--fid-batch", str(args.fid_batch)]
    if variant:
        cmd += ["--variant", variant]
    if args.classifier_size:
        cmd += ["--classifier-size", str(args.classifier_size)]
    for item in args.train_option:
        cmd += ["--train-option", item]
    if args.smoke:
        cmd.append("--smoke")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        if proc.returncode != 0 or not out.stat().st_size:
            raise _SectionFailed(f"worker exit code {proc.returncode}: {_last_error(proc.stderr)}",
                                 {"output_tail": _tail(proc.stderr)})
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def prepare_worker(args) -> None:
    """Threads for the smoke run; TF32 and cuDNN autotuning on CUDA (as the trainer's runtime sets them)."""
    import torch

    if args.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    elif torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def _last_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Exit)\b", line) or "Error:" in line:
            return line[:400]
    return lines[-1][:400] if lines else "no output"


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda}
    for name in ("diffusers", "transformers", "huggingface_hub", "numpy", "torchvision", "safetensors"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.1f} GiB"
    return info


def run_all(args) -> dict:
    start = time.monotonic()
    jobs = [j for j in JOBS if not args.only or j.name in args.only or j.name.split(":")[0] in args.only]
    report: dict[str, Any] = {"smoke": args.smoke, "budget_s": args.budget, "environment": environment(),
                              "sections": []}
    shares_left = sum(j.share for j in jobs)
    for job in jobs:
        remaining = args.budget - (time.monotonic() - start)
        limit = job_limit(remaining, job.share, shares_left)
        shares_left -= job.share
        entry: dict[str, Any] = {"name": job.name, "title": job.title, "limit_s": round(limit, 1)}
        minimum = job.smoke_min_s if args.smoke else job.min_s
        if limit < minimum:
            entry.update(status="skipped", error=f"{limit:.0f} s left for it, needs at least {minimum:.0f} s")
        else:
            print(f"[gpu-check] {job.title}: up to {limit:.0f} s ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                result = run_gpu_tests(args, limit) if job.name == "gpu_tests" else run_worker(job, args, limit)
                entry.update(status="ok", result=result)
            except subprocess.TimeoutExpired as exc:
                entry.update(status="timeout", error=f"did not finish in {limit:.0f} s")
                partial = exc.stdout or b""
                partial = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
                if partial.strip():
                    entry["result"] = {"output_tail": _tail(partial, 20)}
            except _SectionFailed as exc:
                entry.update(status="error", error=str(exc), result=exc.result)
            except Exception as exc:  # a broken section must not stop the others
                entry.update(status="error", error=f"{type(exc).__name__}: {exc}")
            entry["seconds"] = round(time.monotonic() - t0, 1)
        report["sections"].append(entry)
    report["elapsed_s"] = round(time.monotonic() - start, 1)
    return report


# -- the report -----------------------------------------------------------------------------------
def _gib(result: dict) -> str:
    if "peak_allocated_gib" in result:
        return f"peak {result['peak_allocated_gib']:.2f} GiB allocated / {result['peak_reserved_gib']:.2f} GiB reserved"
    if "peak_rss_gib" in result:
        return f"peak RSS {result['peak_rss_gib']:.2f} GiB"
    return ""


def _train_text(r: dict) -> str:
    parts = [f"{r['s_per_step']:.3f} s/step, **{r['it_per_s']:.2f} it/s** (paper: {PAPER_IT_S} it/s on an RTX 2070)",
             _gib(r), r.get("precision", "")]
    return "; ".join(p for p in parts if p)


def summarise(entry: dict) -> str:
    """The result cell of one section."""
    r = entry.get("result") or {}
    if entry["status"] != "ok":
        return entry.get("error", "")
    name = entry["name"]
    if name == "gpu_tests":
        text = f"{r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped"
        if r.get("collection_errors"):
            text += (f"; {len(r['collection_errors'])} test modules not importable here (no "
                     f"{', '.join(r['missing_packages'])}; no GPU tests in them)")
        return text + (f" ({r['note']})" if r.get("note") else "")
    if name == "train:meddiff-8gib":
        cap = (f"cap {r['memory_cap_gib']:g} GiB (fraction {r['memory_fraction']:.3f})" if "memory_fraction" in r
               else r.get("memory_cap", ""))
        if r.get("fits"):
            return f"fits ({cap}): {_train_text(r)}"
        ck = r.get("with_gradient_checkpointing", {})
        if ck.get("fits"):
            return f"does not fit ({cap}); with gradient checkpointing it fits: {_train_text(ck)}"
        return f"does not fit ({cap}), not even with gradient checkpointing: {ck.get('oom', r.get('oom', ''))}"
    if name == "train:meddiff-sdxl":
        return f"{r.get('resolution')} px: {_train_text(r)}"
    if name.startswith("train:"):
        return _train_text(r)
    if name == "fid":
        modes = "; ".join(f"{k} **{v['images_per_s']:.1f} images/s**" for k, v in r.items()
                          if isinstance(v, dict) and "images_per_s" in v)
        return f"batch {r['batch']} at {r['size']} px: {modes}; {_gib(r)}".rstrip("; ")
    if name == "classifier":
        modes = "; ".join(f"{k} **{v['steps_per_s']:.1f} steps/s**" for k, v in r.items()
                          if isinstance(v, dict) and "steps_per_s" in v)
        return f"batch {r['batch']} at {r['size']} px, channels_last: {modes}; {_gib(r)}".rstrip("; ")
    return json.dumps(r)[:200]


def render_markdown(report: dict) -> str:
    env = report["environment"]
    where = env.get("gpu") or "CPU (no CUDA)"
    lines = [f"GPU check{' (smoke, CPU, tiny sizes)' if report['smoke'] else ''}: {where}; torch {env['torch']}, "
             f"diffusers {env.get('diffusers')}, transformers {env.get('transformers')}; "
             f"{report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget", "",
             "| section | status | s | result |", "|---|---|---|---|"]
    for e in report["sections"]:
        cell = summarise(e).replace("|", "/").replace("\n", " ")
        lines.append(f"| {e['title']} | {e['status']} | {e.get('seconds', '-')} | {cell} |")
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, out_dir: Path) -> tuple[Path, Path]:
    from medical_diffusion.atomic_io import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    js = atomic_write_text(out_dir / JSON_NAME, json.dumps(report, indent=2, sort_keys=True) + "\n")
    md = atomic_write_text(out_dir / MD_NAME, render_markdown(report))
    return js, md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json/.md (default $OUT, else "
                                                          "./gpu-check-out)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all sections together (default 420)")
    p.add_argument("--smoke", action="store_true", help="every section on the CPU, tiny model and sizes (seconds)")
    p.add_argument("--only", nargs="+", metavar="SECTION", choices=JOB_NAMES + ("train",),
                   help=f"run only these sections ({', '.join(JOB_NAMES)}, or train for all five)")
    p.add_argument("--device", default="auto", help="torch device (default auto); --smoke uses the CPU")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="frozen weights for training (auto: fp16 on CUDA, fp32 on the CPU)")
    p.add_argument("--attention", default="auto", choices=("auto", "sdpa", "xformers", "classic"),
                   help="this trainer's attention kernel (default auto = sdpa)")
    p.add_argument("--resolution", type=int, default=None, help="training resolution (default 512; smoke 64)")
    p.add_argument("--sdxl-resolution", type=int, default=1024, help="the SDXL section's resolution (default 1024)")
    p.add_argument("--train-steps", type=int, default=None, help="timed training steps after the warm-up (3 steps; "
                        f"this trainer on CUDA: one loss read-back window of {SYNC_EVERY}) (default 20; smoke 2)")
    p.add_argument("--train-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra TrainConfig field for this trainer's runs (JSON value), e.g. "
                        "gradient_checkpointing=true; repeatable")
    p.add_argument("--fid-batch", type=int, default=64)
    p.add_argument("--classifier-size", type=int, default=None, help="image size (default: the classifier's)")
    p.add_argument("--pytest-target", action="append", default=[], metavar="PATH",
                   help="what pytest -m gpu runs (default tests/; smoke tests/test_gpu.py)")
    p.add_argument("--in-process", action="store_true",
                   help="with --smoke: run the sections in this process (faster; no per-section timeout)")
    p.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=float, default=60.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.resolution is None:
        args.resolution = 64 if args.smoke else 512
    if args.train_steps is None:
        args.train_steps = 2 if args.smoke else 20
    if args.in_process and not args.smoke:
        p.error("--in-process is for --smoke only (a GPU section needs its own process for its memory and timeout)")
    if args.worker:
        prepare_worker(args)
        result = WORKERS[args.worker](args)
        Path(args.json_out).write_text(json.dumps(result))
        return 0
    out_dir = args.out or Path(os.environ.get("OUT") or "gpu-check-out")
    report = run_all(args)
    js, md = write_outputs(report, out_dir)
    print(f"\nwrote {js} and {md}\n", file=sys.stderr)
    sys.stdout.write(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
