"""Per-step time and peak memory of Textual Inversion training: this trainer vs the diffusers example.

Run by hand (not a test)::

    python benchmarks/bench_train_step.py                    # tiny config (many steps) + real SD2 (few steps)
    python benchmarks/bench_train_step.py --only tiny --tiny-steps 100
    python benchmarks/bench_train_step.py --sd2-resolution 512 --sd2-steps 5   # needs ~20 GB RAM on CPU

Both trainers use the same model (random weights from the shipped configs: the real SD2
architecture, or the tiny test model), the same images, 64 vectors, batch size 1, fp32, on the
same machine in one run, each in its own subprocess so peak memory is its own.

The reference re-implements the per-step work of diffusers' ``examples/textual_inversion/
textual_inversion.py`` (not vendored): load + resize + flip the image from disk, tokenize a
template prompt, VAE-encode (posterior sample) every step, run the text encoder with the whole
token-embedding matrix trainable (placeholder tokens added to the vocabulary), AdamW (weight decay
1e-2) over that matrix, then restore every row but the placeholders ("index masking"). Its
attention is the library default (PyTorch SDPA) like the script on torch 2; the row
"classic attention" uses diffusers' ``AttnProcessor`` (no SDPA) for comparison.

Memory is the peak resident set size sampled during the timed steps (CPU) or
``torch.cuda.max_memory_allocated`` (CUDA). Step time is the median of the steps after a warm-up.

With ``--diffusers-script PATH`` (a copy of diffusers' ``examples/textual_inversion/
textual_inversion.py``, e.g. from the diffusers release you have installed; it is not vendored)
the benchmark also runs that script itself, as a subprocess, on the same model (the random-weight
model saved as a diffusers folder), the same images, resolution, batch size 1, vector count,
learning rate 0.005, fp32 (``--mixed_precision no``), no validation and no checkpoints during the
run. Its per-step time is (wall time with N2 steps - wall time with N1 steps) / (N2 - N1), so the
start-up cost cancels; its memory is the peak RSS of the whole subprocess (``wait4`` max RSS). The
script needs ``accelerate`` (and ``tensorboard`` for its default ``--report_to``) in the
interpreter given by ``--diffusers-python``; it runs with ``HF_HUB_OFFLINE=1`` and downloads
nothing. When it is given, the speed-up and memory ratios are relative to that script, and every
row also shows its whole-process peak RSS so the memory ratio compares like with like.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "extension"))

N_VECTORS = 64
TEMPLATES = ["a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}"]


# -- memory --------------------------------------------------------------------------------------
class PeakRSS:
    """Highest resident set size seen while active (sampled every 2 ms from /proc)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __enter__(self):
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


# -- models --------------------------------------------------------------------------------------
def build_backend(kind: str, seed: int = 0):
    import torch

    if kind == "tiny":
        from medical_diffusion.backend.tiny import build_tiny_backend

        return build_tiny_backend(seed)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from medical_diffusion.backend.clip_tokenizer import load_sd2_tokenizer
    from medical_diffusion.backend.diffusers_backend import CONFIG_DIR, DiffusersBackend
    from medical_diffusion.backend.tiny import SD2_SCHEDULER

    cfg = CONFIG_DIR / "sd2"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae"))
    text = CLIPTextModel(CLIPTextConfig.from_json_file(cfg / "text_encoder" / "config.json"))
    return DiffusersBackend(unet=unet, vae=vae, text_encoder=text, tokenizer=load_sd2_tokenizer(),
                            scheduler_config=dict(SD2_SCHEDULER, prediction_type="epsilon"), label="random SD2")


def make_images(folder: Path, n: int, resolution: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i}.png")


# -- the two trainers ----------------------------------------------------------------------------
def run_meddiff(backend, data: Path, steps: int, resolution: int, workdir: Path, *,
                stop=None, **overrides) -> dict:
    """This trainer (``training.loop.train``) for ``steps`` steps; ``overrides`` are further TrainConfig fields.

    ``stop`` (a callable) ends the run early, as the UI's stop button does; the steps done are timed.
    A step's time is the trainer's own (``ProgressEvent.it_per_s``: the steps between two reads of the
    loss share their mean, which on a GPU is the only honest clock), else the time between events.
    """
    from medical_diffusion.training.config import TrainConfig
    from medical_diffusion.training.loop import train

    config = TrainConfig(name="bench", data_dir=str(data), n_vectors=N_VECTORS, steps=steps, resolution=resolution,
                         save_every=0, preview_every=0, learning_rate="0.005", **overrides)
    times: list[float] = []
    last = [None]
    t_setup = time.perf_counter()

    def on_step(event):
        now = time.perf_counter()
        if getattr(event, "it_per_s", None):  # the trainer's own clock, between two reads of the loss (syncs)
            times.append(1.0 / event.it_per_s)
        elif last[0] is None:
            times.append(now - first_step_start[0])
        else:
            times.append(now - last[0])
        last[0] = now

    first_step_start = [0.0]

    # time the setup (latent cache) separately: the first progress event marks the end of step 1
    import medical_diffusion.training.loop as loop_mod

    original_cache = loop_mod.LatentCache

    def timed_cache(*a, **kw):
        cache = original_cache(*a, **kw)
        first_step_start[0] = time.perf_counter()
        return cache

    loop_mod.LatentCache = timed_cache
    try:
        with PeakRSS() as mem:
            train(config, backend, workdir / "run", progress=on_step, stop=stop)
    finally:
        loop_mod.LatentCache = original_cache
    setup = first_step_start[0] - t_setup
    return {"times": times, "peak": mem.peak, "setup": setup}


def run_diffusers_example(backend, data: Path, steps: int, resolution: int, classic_attention: bool, *,
                          amp_dtype=None, stop=None) -> dict:
    """The per-step work of diffusers' examples/textual_inversion/textual_inversion.py.

    Runs on ``backend.device``. ``amp_dtype`` (e.g. ``torch.float16``) is the script's
    ``--mixed_precision``: the UNet and VAE are cast to it, the text encoder stays fp32 (its
    embedding matrix is trained), the step runs under autocast and, for fp16, with a gradient
    scaler, as accelerate does. ``stop`` (a callable) ends the loop early.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from PIL import Image

    device = backend.device
    tokenizer = backend.tokenizer
    text_encoder, vae, unet = backend.text_encoder, backend.vae, backend.unet
    text_encoder.float()
    if amp_dtype is not None:
        unet.to(dtype=amp_dtype)
        vae.to(dtype=amp_dtype)
    if classic_attention:
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    placeholder = ["<bench>"] + [f"<bench>_{i}" for i in range(1, N_VECTORS)]
    tokenizer.add_tokens(placeholder)
    ids = tokenizer.convert_tokens_to_ids(placeholder)
    init_id = tokenizer.encode("*", add_special_tokens=False)[0]
    text_encoder.resize_token_embeddings(len(tokenizer))
    embeds = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        embeds[ids] = embeds[init_id].clone()
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 has no .text_model
    text_model.encoder.requires_grad_(False)
    text_model.final_layer_norm.requires_grad_(False)
    text_model.embeddings.position_embedding.requires_grad_(False)
    text_encoder.get_input_embeddings().requires_grad_(True)
    unet.train()
    text_encoder.train()
    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=0.005,
                                  betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16 and device.type == "cuda")
    scheduler = DDPMScheduler.from_config(backend.scheduler_config)
    orig = text_encoder.get_input_embeddings().weight.data.clone()
    keep = torch.ones(len(tokenizer), dtype=torch.bool, device=device)
    keep[min(ids) : max(ids) + 1] = False
    files = sorted(data.glob("*.png"))
    placeholder_string = " ".join(placeholder)
    rng = random.Random(0)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    times = []
    with PeakRSS() as mem:
        for step in range(steps):
            if stop is not None and stop():
                break
            t0 = time.perf_counter()
            # dataset __getitem__ (dataloader_num_workers defaults to 0: in the training process)
            img = Image.open(files[step % len(files)]).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            pixels = torch.from_numpy((np.array(img).astype(np.float32) / 127.5 - 1.0)).permute(2, 0, 1)[None]
            text = rng.choice(TEMPLATES).format(placeholder_string)
            input_ids = tokenizer(text, padding="max_length", truncation=True, max_length=77,
                                  return_tensors="pt").input_ids
            # training step
            with autocast:
                latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.sample().detach()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (1,), device=device).long()
                noisy = scheduler.add_noise(latents, noise, timesteps)
                hidden = text_encoder(input_ids.to(device))[0]
                pred = unet(noisy.to(unet.dtype), timesteps, hidden.to(unet.dtype)).sample
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            with torch.no_grad():
                text_encoder.get_input_embeddings().weight[keep] = orig[keep]
            float(loss.detach())  # the script logs the loss every step (a device sync)
            times.append(time.perf_counter() - t0)
    return {"times": times, "peak": mem.peak, "setup": 0.0}


def worker(args) -> None:
    import torch

    torch.manual_seed(0)
    backend = build_backend(args.config)
    if args.variant == "save-model":  # the same random-weight model, as a diffusers folder for the script
        backend.save_pretrained(args.json_out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        data.mkdir()
        make_images(data, 4, args.resolution)
        if args.variant == "meddiff":
            res = run_meddiff(backend, data, args.steps, args.resolution, tmp)
        else:
            res = run_diffusers_example(backend, data, args.steps, args.resolution, args.variant == "diffusers-classic")
    Path(args.json_out).write_text(json.dumps(res))


# -- driver --------------------------------------------------------------------------------------
LABELS = {
    "meddiff": "this trainer",
    "diffusers": "diffusers example approach",
    "diffusers-classic": "diffusers example, classic attention (no SDPA)",
}


def run_child(cmd: list[str], env: dict | None = None, log: Path | None = None) -> tuple[float, int]:
    """Run ``cmd``; return (wall seconds, peak RSS in bytes of that process). Raises on failure."""
    out = open(log, "w") if log else None
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child only (ru_maxrss in KiB on Linux)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if out:
            out.close()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(Path(log).read_text(errors="replace").splitlines()[-25:]) if log else ""
        raise RuntimeError(f"command failed with exit code {proc.returncode}: {shlex.join(cmd)}\n{tail}")
    return wall, usage.ru_maxrss * 1024


def run_variant(config: str, variant: str, steps: int, resolution: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    cmd = [sys.executable, __file__, "--worker", "--config", config, "--variant", variant, "--steps", str(steps),
           "--resolution", str(resolution), "--json-out", out]
    wall, process_peak = run_child(cmd)
    res = json.loads(Path(out).read_text())
    os.unlink(out)
    res["wall"] = wall
    res["process_peak"] = process_peak
    return res


class DiffusersScript:
    """Runs a copy of diffusers' examples/textual_inversion/textual_inversion.py on the benchmark's model."""

    def __init__(self, script: Path, python: str, extra_args: list[str], workdir: Path):
        self.script, self.python, self.extra_args, self.workdir = script, python, extra_args, workdir
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                        DIFFUSERS_OFFLINE="1", WANDB_MODE="disabled", HF_HUB_DISABLE_TELEMETRY="1")
        self.count = 0

    def prepare(self, config: str, resolution: int) -> tuple[Path, Path]:
        """Save the model (in a subprocess, so this process stays small) and the images."""
        model = self.workdir / f"model-{config}"
        if not model.exists():
            print(f"[{config}] saving the random-weight model for the diffusers script ...", file=sys.stderr,
                  flush=True)
            run_child([sys.executable, __file__, "--worker", "--config", config, "--variant", "save-model",
                       "--json-out", str(model)])
        data = self.workdir / f"data-{config}-{resolution}"
        if not data.exists():
            data.mkdir()
            make_images(data, 4, resolution)
        return model, data

    def run(self, model: Path, data: Path, steps: int, resolution: int) -> dict:
        self.count += 1
        out = self.workdir / f"run-{self.count}"
        never = str(10**9)
        cmd = [self.python, str(self.script),
               "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
               "--placeholder_token", "<bench>", "--initializer_token", "*", "--num_vectors", str(N_VECTORS),
               "--resolution", str(resolution), "--train_batch_size", "1", "--max_train_steps", str(steps),
               "--learning_rate", "0.005", "--save_steps", never, "--checkpointing_steps", never,
               "--validation_steps", never, "--mixed_precision", "no", "--dataloader_num_workers", "0",
               "--seed", "0", "--output_dir", str(out), *self.extra_args]
        log = self.workdir / f"run-{self.count}.log"
        wall, peak = run_child(cmd, env=self.env, log=log)
        if not (out / "learned_embeds.safetensors").exists() and not (out / "learned_embeds.bin").exists():
            raise RuntimeError(f"the diffusers script wrote no learned_embeds file in {out}; log: {log}")
        return {"wall": wall, "process_peak": peak, "steps": steps}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["tiny", "sd2"], help="run one configuration")
    p.add_argument("--tiny-steps", type=int, default=60)
    p.add_argument("--tiny-resolution", type=int, default=64)
    p.add_argument("--sd2-steps", type=int, default=4)
    p.add_argument("--sd2-resolution", type=int, default=256, help="512 is the paper's; needs ~20 GB on CPU")
    p.add_argument("--rounds", type=int, default=2, help="alternating repetitions of every trainer")
    p.add_argument("--no-classic", action="store_true", help="skip the classic-attention reference row")
    p.add_argument("--diffusers-script", type=Path, metavar="PATH",
                   help="a copy of diffusers' examples/textual_inversion/textual_inversion.py (not vendored): "
                        "also run that script itself on the same model, images and settings and compare with it "
                        "(per-step time from two runs of different length, memory = its peak RSS)")
    p.add_argument("--diffusers-python", default=sys.executable, metavar="PYTHON",
                   help="interpreter for --diffusers-script; needs diffusers, accelerate, torchvision and "
                        "tensorboard (default: this interpreter)")
    p.add_argument("--diffusers-script-steps", metavar="N1,N2",
                   help="step counts of the two script runs (default: max(1, steps/4) and the steps of the "
                        "configuration)")
    p.add_argument("--diffusers-script-args", default="", metavar="ARGS",
                   help="extra arguments for the script, one shell-quoted string (e.g. \"--report_to all\")")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.diffusers_script is not None and not args.diffusers_script.is_file():
        p.error(f"--diffusers-script: {args.diffusers_script}: no such file")
    if args.diffusers_script_steps:
        try:
            n1, n2 = (int(v) for v in args.diffusers_script_steps.split(","))
        except ValueError:
            p.error(f"--diffusers-script-steps: expected N1,N2 (two integers), got {args.diffusers_script_steps!r}")
        if not 1 <= n1 < n2:
            p.error("--diffusers-script-steps: need 1 <= N1 < N2")
    import torch

    runs = []
    if args.only in (None, "tiny"):
        runs.append(("tiny", args.tiny_steps, args.tiny_resolution))
    if args.only in (None, "sd2"):
        runs.append(("sd2", args.sd2_steps, args.sd2_resolution))
    variants = ["meddiff", "diffusers"] + ([] if args.no_classic else ["diffusers-classic"])
    script = None
    scratch = None
    if args.diffusers_script is not None:
        scratch = tempfile.TemporaryDirectory(prefix="bench-ti-script-")
        script = DiffusersScript(args.diffusers_script.resolve(), args.diffusers_python,
                                 shlex.split(args.diffusers_script_args), Path(scratch.name))
        variants.append("script")
    labels = dict(LABELS, script=f"diffusers script ({args.diffusers_script})")
    rows = []
    script_steps: dict[str, tuple[int, int]] = {}
    try:
        for config, steps, res in runs:
            results: dict[str, list[dict]] = {v: [] for v in variants}
            if script is not None:
                model, data = script.prepare(config, res)
                if args.diffusers_script_steps:
                    n1, n2 = (int(v) for v in args.diffusers_script_steps.split(","))
                else:
                    n1, n2 = max(1, steps // 4), steps
                    if n2 <= n1:
                        p.error(f"{config}: the diffusers script needs at least 2 steps to time a step")
                script_steps[config] = (n1, n2)
            for rnd in range(args.rounds):  # alternate the trainers so a busy machine hurts both alike
                for variant in variants:
                    if variant == "script":
                        pair = []
                        for n in (n1, n2):
                            print(f"[{config}] round {rnd + 1}/{args.rounds} {labels[variant]}: {n} steps at "
                                  f"{res}px ...", file=sys.stderr, flush=True)
                            pair.append(script.run(model, data, n, res))
                        per_step = (pair[1]["wall"] - pair[0]["wall"]) / (n2 - n1)
                        results[variant].append({
                            "times": [per_step], "n": n2 - n1, "peak": max(r["process_peak"] for r in pair),
                            "process_peak": max(r["process_peak"] for r in pair),
                            "setup": pair[0]["wall"] - n1 * per_step})
                        continue
                    print(f"[{config}] round {rnd + 1}/{args.rounds} {labels[variant]}: {steps} steps at "
                          f"{res}px ...", file=sys.stderr, flush=True)
                    results[variant].append(run_variant(config, variant, steps, res))

            def summary(variant):
                if variant == "script":
                    timed = [r["times"][0] for r in results[variant]]
                    n = sum(r["n"] for r in results[variant])
                    means = timed
                else:
                    steps_of = [r["times"][1:] if len(r["times"]) > 1 else r["times"] for r in results[variant]]
                    timed = [t for ts in steps_of for t in ts]
                    n = len(timed)
                    means = [statistics.fmean(ts) for ts in steps_of]
                peak = max(r["peak"] for r in results[variant])
                process_peak = max(r["process_peak"] for r in results[variant])
                setup = statistics.median(r["setup"] for r in results[variant])
                return (n, statistics.median(timed), min(timed), statistics.median(means), peak, process_peak,
                        setup)

            base_variant = "script" if script is not None else "diffusers"
            base = summary(base_variant)
            for variant in variants:
                n, med, best, mean, peak, process_peak, setup = summary(variant)
                mem_ratio = process_peak / base[5] if script is not None else peak / base[4]
                rows.append((config, res, labels[variant], n, mean, base[3] / mean, med, base[1] / med, best,
                             base[2] / best, "-" if variant == "script" else f"{peak / 2**30:.2f}",
                             process_peak / 2**30, mem_ratio, setup))
    finally:
        if scratch is not None:
            scratch.cleanup()
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, fp32, batch 1, "
          f"{N_VECTORS} vectors, {args.rounds} alternating rounds\n")
    head = ("model", "px", "trainer", "steps", "mean s/step", "speed-up (mean)", "median s/step", "speed-up",
            "min s/step", "speed-up (min)", "peak GB (steps)", "process peak GB", "mem ratio", "setup s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for c, res, label, n, mean, speed_mean, med, speed, best, speed_min, peak, process_peak, mem_ratio, setup in rows:
        print(f"| {c} | {res} | {label} | {n} | {mean:.3f} | {speed_mean:.2f}x | {med:.3f} | {speed:.2f}x | "
              f"{best:.3f} | {speed_min:.2f}x | {peak} | {process_peak:.2f} | {mem_ratio:.2f} | {setup:.1f} |")
    if script is not None:
        print("\nspeed-up and mem ratio are relative to the diffusers script itself (higher speed-up is better, "
              "lower mem ratio is better); mem ratio compares whole-process peak RSS. The script's s/step is "
              "(wall time of an N2-step run - wall time of an N1-step run) / (N2 - N1) per round "
              f"({', '.join(f'{c}: N1={a}, N2={b}' for c, (a, b) in script_steps.items())}), a mean "
              "over steps: compare it with the mean s/step of the other rows (speed-up (mean)); its median and "
              "min are over rounds, not single steps; its setup s is its start-up (model loading etc.). "
              "peak GB (steps) is sampled during the training steps (in-script rows only); setup of this "
              "trainer = one-time latent caching of the 4 images.")
    else:
        print("\nspeed-up and mem ratio are relative to the diffusers example approach (higher speed-up is "
              "better, lower mem ratio is better; mem ratio compares peak GB during the steps); min s/step is "
              "the least disturbed step on a shared machine; setup = one-time latent caching of the 4 images "
              "(this trainer only). Pass --diffusers-script PATH to also run the real diffusers script.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
