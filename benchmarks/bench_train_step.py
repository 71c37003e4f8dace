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
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
def run_meddiff(backend, data: Path, steps: int, resolution: int, workdir: Path) -> dict:
    from medical_diffusion.training.config import TrainConfig
    from medical_diffusion.training.loop import train

    config = TrainConfig(name="bench", data_dir=str(data), n_vectors=N_VECTORS, steps=steps, resolution=resolution,
                         save_every=0, preview_every=0, learning_rate="0.005")
    times: list[float] = []
    last = [None]
    t_setup = time.perf_counter()

    def on_step(event):
        now = time.perf_counter()
        if last[0] is None:
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
            train(config, backend, workdir / "run", progress=on_step)
    finally:
        loop_mod.LatentCache = original_cache
    setup = first_step_start[0] - t_setup
    return {"times": times, "peak": mem.peak, "setup": setup}


def run_diffusers_example(backend, data: Path, steps: int, resolution: int, classic_attention: bool) -> dict:
    """The per-step work of diffusers' examples/textual_inversion/textual_inversion.py."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from PIL import Image

    tokenizer = backend.tokenizer
    text_encoder, vae, unet = backend.text_encoder, backend.vae, backend.unet
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
    text_encoder.text_model.encoder.requires_grad_(False)
    text_encoder.text_model.final_layer_norm.requires_grad_(False)
    text_encoder.text_model.embeddings.position_embedding.requires_grad_(False)
    text_encoder.get_input_embeddings().requires_grad_(True)
    unet.train()
    text_encoder.train()
    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=0.005,
                                  betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scheduler = DDPMScheduler.from_config(backend.scheduler_config)
    orig = text_encoder.get_input_embeddings().weight.data.clone()
    files = sorted(data.glob("*.png"))
    placeholder_string = " ".join(placeholder)
    rng = random.Random(0)
    times = []
    with PeakRSS() as mem:
        for step in range(steps):
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
            latents = vae.encode(pixels).latent_dist.sample().detach() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (1,)).long()
            noisy = scheduler.add_noise(latents, noise, timesteps)
            hidden = text_encoder(input_ids)[0]
            pred = unet(noisy, timesteps, hidden).sample
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            keep = torch.ones(len(tokenizer), dtype=torch.bool)
            keep[min(ids) : max(ids) + 1] = False
            with torch.no_grad():
                text_encoder.get_input_embeddings().weight[keep] = orig[keep]
            times.append(time.perf_counter() - t0)
    return {"times": times, "peak": mem.peak, "setup": 0.0}


def worker(args) -> None:
    import torch

    torch.manual_seed(0)
    backend = build_backend(args.config)
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


def run_variant(config: str, variant: str, steps: int, resolution: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    cmd = [sys.executable, __file__, "--worker", "--config", config, "--variant", variant, "--steps", str(steps),
           "--resolution", str(resolution), "--json-out", out]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    res = json.loads(Path(out).read_text())
    os.unlink(out)
    res["wall"] = time.perf_counter() - t0
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["tiny", "sd2"], help="run one configuration")
    p.add_argument("--tiny-steps", type=int, default=60)
    p.add_argument("--tiny-resolution", type=int, default=64)
    p.add_argument("--sd2-steps", type=int, default=4)
    p.add_argument("--sd2-resolution", type=int, default=256, help="512 is the paper's; needs ~20 GB on CPU")
    p.add_argument("--rounds", type=int, default=2, help="alternating repetitions of every trainer")
    p.add_argument("--no-classic", action="store_true", help="skip the classic-attention reference row")
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
    import torch

    runs = []
    if args.only in (None, "tiny"):
        runs.append(("tiny", args.tiny_steps, args.tiny_resolution))
    if args.only in (None, "sd2"):
        runs.append(("sd2", args.sd2_steps, args.sd2_resolution))
    variants = ["meddiff", "diffusers"] + ([] if args.no_classic else ["diffusers-classic"])
    rows = []
    for config, steps, res in runs:
        results: dict[str, list[dict]] = {v: [] for v in variants}
        for rnd in range(args.rounds):  # alternate the trainers so a busy machine hurts both alike
            for variant in variants:
                print(f"[{config}] round {rnd + 1}/{args.rounds} {LABELS[variant]}: {steps} steps at {res}px ...",
                      file=sys.stderr, flush=True)
                results[variant].append(run_variant(config, variant, steps, res))

        def summary(variant):
            timed = [t for r in results[variant] for t in (r["times"][1:] if len(r["times"]) > 1 else r["times"])]
            peak = max(r["peak"] for r in results[variant])
            setup = statistics.median(r["setup"] for r in results[variant])
            return len(timed), statistics.median(timed), min(timed), peak, setup

        base = summary("diffusers")
        for variant in variants:
            n, med, best, peak, setup = summary(variant)
            rows.append((config, res, LABELS[variant], n, med, base[1] / med, best, base[2] / best,
                         peak / 2**30, peak / base[3], setup))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, fp32, batch 1, "
          f"{N_VECTORS} vectors, {args.rounds} alternating rounds\n")
    head = ("model", "px", "trainer", "steps", "median s/step", "speed-up", "min s/step", "speed-up (min)",
            "peak GB", "mem ratio", "setup s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for c, res, label, n, med, speed, best, speed_min, peak, mem_ratio, setup in rows:
        print(f"| {c} | {res} | {label} | {n} | {med:.3f} | {speed:.2f}x | {best:.3f} | {speed_min:.2f}x | "
              f"{peak:.2f} | {mem_ratio:.2f} | {setup:.1f} |")
    print("\nspeed-up and mem ratio are relative to the diffusers example approach (higher speed-up is better, "
          "lower mem ratio is better); min s/step is the least disturbed step on a shared machine; "
          "setup = one-time latent caching of the 4 images (this trainer only).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
