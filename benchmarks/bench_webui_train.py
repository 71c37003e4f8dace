"""Inside the webui: this extension's training vs the webui's own Textual Inversion training.

Run by hand (not a test), with an AUTOMATIC1111 v1.10 install you already have::

    python benchmarks/bench_webui_train.py --webui /path/to/stable-diffusion-webui \\
        --python /path/to/its/venv/bin/python [--steps 10 40] [--resolution 64] [--vectors 64]

Each trainer runs in a webui process of its own (offline, CPU unless the webui finds a GPU) with
the tiny random-weight SD2-v checkpoint from ``tests/a1111/``, through the webui's API, on the same
images, the same size, batch size 1, the same number of vectors, learning rate 0.005, latents
encoded once, no previews, the ``[name]``-only template, cross-attention optimisations off (the
webui's default for training). Per-step time is (wall time with N2 steps - wall time with N1 steps)
/ (N2 - N1), so start-up work (dataset, latents) cancels; each length runs ``--rounds`` times and the
fastest counts. Memory is the webui process's peak resident set during a trainer's runs minus its
resident set just before them (sampled every 20 ms from /proc).

A third row runs this extension again in its webui after one short run of the webui's own
training. On a CPU it is then slower, with the same CPU seconds but less of both cores in use. The
same happens after a single txt2img: whenever a long-lived webui request thread has already done
torch work, a training thread started afterwards runs its many small parallel regions slowly (likely
libgomp throttling its spin-waits while more threads that used OpenMP are alive than there are
cores; not proven). Training on one persistent thread of our own was tried: it then slowed the
webui's own generation the same way, so runs stay on a fresh thread that ends with the run and the
webui is as fast as before afterwards. GPU training does its work on the GPU and is not expected to
see this; it was not measured here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from a1111.harness import build_checkpoint, running_webui  # noqa: E402


NATIVE = "webui's own TI training"


class RssPeak:
    """Peak VmRSS (MB) of a process while the block runs, minus its VmRSS at the start."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.start = pid, 0.0, 0.0

    def _rss(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def added(self) -> float:
        return self.peak - self.start


def run_webui_native(ui, images: Path, logs: Path, steps: int, size: int, vectors: int, tag: str) -> float:
    """The webui's own TI training (``/sdapi/v1/train/embedding``); returns wall seconds."""
    name = f"native_{tag}"
    status, body = ui.api("POST", "/sdapi/v1/create/embedding",
                          {"name": name, "num_vectors_per_token": vectors, "overwrite_old": True, "init_text": "*"})
    assert status == 200, body
    args = dict(id_task=name, embedding_name=name, learn_rate="0.005", batch_size=1, gradient_step=1,
                data_root=str(images), log_directory=str(logs), training_width=size, training_height=size,
                varsize=False, steps=steps, clip_grad_mode="disabled", clip_grad_value="0.1", shuffle_tags=False,
                tag_drop_out=0, latent_sampling_method="once", use_weight=False, create_image_every=0,
                save_embedding_every=steps, template_filename="medical_name_only.txt",
                save_image_with_stored_embedding=False, preview_from_txt2img=False, preview_prompt="",
                preview_negative_prompt="", preview_steps=20, preview_sampler_name="Euler a", preview_cfg_scale=7,
                preview_seed=-1, preview_width=size, preview_height=size)
    t0 = time.perf_counter()
    status, body = ui.api("POST", "/sdapi/v1/train/embedding", args)
    seconds = time.perf_counter() - t0
    assert status == 200 and "error: None" in body["info"], body
    return seconds


def run_extension(ui, images: Path, runs: Path, steps: int, size: int, vectors: int, tag: str) -> float:
    """This extension's training (``/medical-diffusion/v1/train``); returns wall seconds."""
    config = {"name": f"ext_{tag}", "data_dir": str(images), "n_vectors": vectors, "steps": steps,
              "resolution": size, "learning_rate": "0.005", "save_every": 0, "preview_every": 0}
    t0 = time.time()
    status, state = ui.api("POST", "/medical-diffusion/v1/train", {"config": config, "run_dir": str(runs / tag)})
    assert status == 200, state
    while state["running"]:  # polled rarely (polls cost CPU); the run's own end time is exact
        time.sleep(0.5)
        _, state = ui.api("GET", "/medical-diffusion/v1/train/status")
    assert state["error"] is None and state["step"] == steps, state
    return state["finished_at"] - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--webui", required=True, type=Path, help="AUTOMATIC1111 v1.10 checkout")
    parser.add_argument("--python", required=True, help="the webui's Python (with its requirements)")
    parser.add_argument("--steps", nargs=2, type=int, default=(10, 40), metavar=("N1", "N2"))
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--vectors", type=int, default=64)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n1, n2 = args.steps

    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="bench-webui-") as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "data"
        checkpoint = build_checkpoint(args.webui, args.python, data / "models" / "Stable-diffusion" / "tiny-sd2-v.safetensors")
        images = tmp / "images"
        images.mkdir()
        for i in range(args.images):
            Image.radial_gradient("L").rotate(17 * i).resize((args.resolution,) * 2).convert("RGB").save(images / f"{i}.png")
        templates = tmp / "templates"
        templates.mkdir()
        (data / "embeddings").mkdir()
        webui_args = ["--ckpt", str(checkpoint), "--textual-inversion-templates-dir", str(templates)]

        def measure(ui, run, tag: str) -> tuple[float, float, dict]:
            run(2, f"warmup_{tag}")
            times, added = {}, 0.0
            for n in (n1, n2):
                for r in range(args.rounds):
                    with RssPeak(ui.pid) as rss:
                        seconds = run(n, f"{tag}_{n}_{r}")
                    times[n] = min(times.get(n, float("inf")), seconds)
                    added = max(added, rss.added)
            return (times[n2] - times[n1]) / (n2 - n1), added, times

        rows = {}
        # each trainer in a webui of its own (one kind of training per session, as people work)
        with running_webui(args.webui, args.python, tmp, data, webui_args, ready="Model loaded in") as ui:
            native = lambda n, tag: run_webui_native(ui, images, tmp / "ti_logs", n, args.resolution,  # noqa: E731
                                                     args.vectors, tag)
            rows[NATIVE] = measure(ui, native, "native")
        with running_webui(args.webui, args.python, tmp, data, webui_args, ready="Model loaded in") as ui:
            ours = lambda n, tag: run_extension(ui, images, tmp / "runs", n, args.resolution,  # noqa: E731
                                                args.vectors, tag)
            rows["this extension"] = measure(ui, ours, "ext")
            run_webui_native(ui, images, tmp / "ti_logs", 2, args.resolution, args.vectors, "between")
            rows["this extension, after the webui's own training"] = measure(ui, ours, "ext_after")

    ref_step, ref_mem, _ = rows[NATIVE]
    print(f"\ntiny SD2-v model, {args.resolution} px, {args.vectors} vectors, batch 1, steps {n1} vs {n2}, "
          f"best of {args.rounds}")
    print(f"{'trainer':<48} {'s/step':>8} {'speed-up':>9} {'+RSS MB':>8} {'mem ratio':>9}  wall s (N1, N2)")
    for label, (step, mem, times) in rows.items():
        print(f"{label:<48} {step:>8.4f} {ref_step / step:>8.2f}x {mem:>8.0f} {mem / max(ref_mem, 1):>8.2f}x  "
              f"{times[n1]:.1f}, {times[n2]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
