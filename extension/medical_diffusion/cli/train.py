"""``meddiff train``: learn a Textual Inversion embedding for a folder of images."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a Textual Inversion embedding (model frozen)",
        description="Train an embedding on a folder of images. Defaults follow de Wilde et al. 2024: "
        "prompt = the embedding name alone, 64 vectors, AdamW lr 0.005, 50000 steps, batch size 1.",
    )
    p.add_argument("--model", help="diffusers folder, SD1/SD2/SDXL .ckpt/.safetensors file, or 'tiny' / 'tiny-sd1' / "
                                   "'tiny-sdxl' (random-weight demos)")
    p.add_argument("--data", help="folder of training images (a `meddiff prepare` output: with --class)")
    p.add_argument("--class", dest="data_class", metavar="NAME",
                   help="with --data OUT of `meddiff prepare`: train on its class folder OUT/embedding/NAME")
    p.add_argument("--name", help="embedding name (lowercase; the word you type in prompts)")
    p.add_argument("--out", help="run folder (default: runs/<name>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--force", action="store_true", help="start over in an existing run folder")
    p.add_argument("--embeddings-dir", metavar="DIR",
                   help="the embeddings home the final embedding is published into, where `meddiff generate` and "
                        "the UI find it (default: $MEDDIFF_EMBEDDINGS_DIR, else ./embeddings)")
    p.add_argument("--no-publish", action="store_true", help="keep the embedding in the run folder only")
    p.add_argument("--force-publish", action="store_true",
                   help="replace a different embedding of the same name in the embeddings home")
    from medical_diffusion.devices import add_device_arguments

    add_device_arguments(p, attention=True)
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], help="override the model's")
    g = p.add_argument_group("embedding")
    g.add_argument("--vectors", type=int, help="vectors per token, 1-75 (default 64)")
    g.add_argument("--init", choices=["text", "zeros", "random"], help="initialisation (default text)")
    g.add_argument("--init-text", help="text whose tokens initialise the vectors (default '*')")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", dest="learning_rate", help='learning rate or A1111 schedule "0.05:10, 0.005:200, 0.001"')
    g.add_argument("--steps", type=int, help="optimizer steps (default 50000, tiny models 200; with --resume: new total)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--grad-accumulation", type=int)
    g.add_argument("--clip-grad-norm", type=float)
    g.add_argument("--clip-grad-value", type=float)
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("data")
    g.add_argument("--resolution", type=int, help="training image size in pixels (default 512, tiny models 64)")
    g.add_argument("--latents", choices=["mean", "sample"], help="cache the VAE posterior mean or one sample")
    g.add_argument("--hflip", action="store_true", default=None, help="random horizontal flips (off by default)")
    g.add_argument("--bucketing", action="store_true", default=None,
                   help="keep each image's aspect ratio: train on size buckets of about resolution^2 pixels (sides "
                        "multiples of 64, 1:2 to 2:1, e.g. 448x576 for portrait X-rays) instead of resizing every "
                        "image to a square (off: the paper's square resize)")
    g.add_argument("--mask", help="'alpha' (PNG alpha channel) or a folder of masks named like the images")
    g.add_argument("--mask-weight", type=float, help="loss weight inside the mask (outside 1)")
    g.add_argument("--template", dest="template_file", help="A1111 template file with [name]/[filewords] lines")
    g = p.add_argument_group("validation and training quality (all off by default: the paper's run)")
    g.add_argument("--val-data", help="folder of held-out images for a validation loss on fixed noise and "
                   "timesteps (keeps best.pt); 'auto': the val split beside a `meddiff prepare --splits` folder")
    g.add_argument("--val-every", type=int,
                   help="validate every N steps (default 500, tiny models 50; 0 = at the start and end)")
    g.add_argument("--val-timesteps", type=int, help="fixed timesteps per validation image, 1-32 (default 8)")
    g.add_argument("--min-snr-gamma", type=float, help="min-SNR-gamma loss weighting (Hang et al. 2023; e.g. 5)")
    g.add_argument("--ema-decay", type=float, help="keep an EMA of the vectors as <name>-ema.pt (e.g. 0.999)")
    g.add_argument("--log-with", choices=["none", "tensorboard"],
                   help="also log loss, val loss, lr, vector norm and previews (tensorboard: RUN/tensorboard)")
    g = p.add_argument_group("outputs")
    g.add_argument("--save-every", type=int,
                   help="checkpoint every N steps (default 500, tiny models 50; 0 = only at the end)")
    g.add_argument("--preview-every", type=int, help="preview image every N steps (default 500, tiny models 50; 0 = off)")
    g.add_argument("--preview-steps", type=int, help="sampler steps for previews (default 20)")
    g.add_argument("--preview-seed", type=int)
    g = p.add_argument_group("speed and memory")
    g.add_argument("--autocast", choices=["bf16", "fp16"], help="mixed precision for the model's forward pass")
    g.add_argument("--gradient-checkpointing", action="store_true", default=None, help="less memory, slower")
    g.add_argument("--offload-vae", action=argparse.BooleanOptionalAction, default=None,
                   help="park the VAE on the CPU once latents are cached, back only for previews "
                        "(default: on for CUDA)")
    g.add_argument("--sync-every", type=int,
                   help="read the loss back from the GPU every N steps (default: 10 on CUDA, 1 elsewhere)")
    p.set_defaults(func=handle)


_OVERRIDABLE = (
    "prediction_type", "learning_rate", "steps", "batch_size", "grad_accumulation", "clip_grad_norm",
    "clip_grad_value", "save_every", "preview_every", "preview_steps", "preview_seed", "autocast",
    "gradient_checkpointing", "offload_vae", "sync_every", "val_every", "log_with",
)
_NEW_RUN = (
    "vectors", "init", "init_text", "seed", "resolution", "latents", "hflip", "bucketing", "mask", "mask_weight",
    "template_file", "val_data", "val_timesteps", "min_snr_gamma", "ema_decay",
) + _OVERRIDABLE


def handle(args: argparse.Namespace) -> int:
    from medical_diffusion.backend.families import is_tiny_model, tiny_family
    from medical_diffusion.devices import runtime_from_args
    from medical_diffusion.embeddings.home import describe_home, embeddings_home
    from medical_diffusion.errors import MedDiffError
    from medical_diffusion.training.config import TrainConfig
    from medical_diffusion.training.data_folder import resolve_data_folder, training_images
    from medical_diffusion.training.loop import run_training
    from medical_diffusion.training.progress import TqdmProgress
    from medical_diffusion.training.publish import check_publishable, publish_embedding
    from medical_diffusion.training.run_folder import load_run_config

    runtime = runtime_from_args(args)  # first: --device cuda without CUDA is one line, before anything loads
    if args.resume:
        run_dir = Path(args.resume)
        config = load_run_config(run_dir)
        fixed = [k for k in _NEW_RUN if k not in _OVERRIDABLE and getattr(args, k, None) is not None]
        fixed += [k for k in ("data", "data_class", "name", "model") if getattr(args, k) is not None]
        if fixed:
            raise MedDiffError(f"--resume keeps the run's own {', '.join(fixed)} (see {run_dir / 'run_config.json'})")
        for key in _OVERRIDABLE:
            value = getattr(args, key, None)
            if value is not None:
                setattr(config, key, value)
    else:
        missing = [f"--{k}" for k in ("model", "data", "name") if getattr(args, k) is None]
        if missing:
            raise MedDiffError(f"missing {', '.join(missing)} (or give --resume RUN_DIR)")
        from medical_diffusion.generation.loading import check_model_path, check_output_folder

        # checked here, not after the model has loaded (that takes a while)
        data_folder = resolve_data_folder(args.data, args.data_class)
        check_model_path(args.model)
        if args.out:
            check_output_folder(args.out)
        values = {k: getattr(args, k) for k in _NEW_RUN if getattr(args, k, None) is not None}
        if "vectors" in values:
            values["n_vectors"] = values.pop("vectors")
        if is_tiny_model(args.model):  # a demo model: a quick run unless told otherwise
            from medical_diffusion.training.defaults import size_defaults

            for key, value in size_defaults(args.model).items():
                values.setdefault(key, value)
        if values.get("val_data") and values["val_data"].strip().lower() != "auto":
            values["val_data"] = str(resolve_data_folder(values["val_data"], what="validation", flag="--val-data"))
        config = TrainConfig(name=args.name, data_dir=str(data_folder), model=args.model, **values)
        if not is_tiny_model(config.model):
            config.model = str(Path(config.model).resolve())
        run_dir = Path(args.out) if args.out else Path("runs") / args.name
    config.validate()
    home = None if args.no_publish else embeddings_home(args.embeddings_dir)
    if home is not None:  # before the long run, not after it
        check_publishable(home, config.name, run_dir, force=args.force_publish)
    print(f"training on {training_images(config.data_dir, config.data_class).describe()}", flush=True)
    if is_tiny_model(config.model):
        log.info("model: tiny random-weight %s-shaped model (workflow demo: it learns noise, not anatomy)",
                 tiny_family(config.model))
    total = config.total_steps()
    bar = TqdmProgress(total=total, desc=f"train {config.name}")
    try:
        result = run_training(config, run_dir, resume=bool(args.resume), force=args.force, device=runtime.device,
                              dtype=runtime.dtype, attention=runtime.attention, progress=bar)
    finally:
        bar.close()
    state = "stopped" if result.interrupted else "done"
    loss = f", last loss {result.last_loss:.4f}" if result.last_loss is not None else ""
    print(f"{state}: {result.steps_done}/{total} steps{loss}; embedding {result.embedding_path}; run folder {result.run_dir}")
    if result.best_path is not None:
        print(f"best validation loss {result.best_val_loss:.4f} at step {result.best_step}: {result.best_path}")
    if result.ema_path is not None:
        print(f"EMA of the vectors: {result.ema_path}")
    if home is not None:
        published = publish_embedding(result.embedding_path, home, config.name, result.run_dir,
                                      force=args.force_publish)
        print(f"published {published} into the embeddings home {describe_home(args.embeddings_dir)}: "
              f"`meddiff generate` and the UI use it as {config.name!r}")
    return 0
