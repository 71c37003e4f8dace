"""``meddiff generate`` / ``interpolate`` / ``compose``: images from trained embeddings."""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

from medical_diffusion.errors import MedDiffError
from medical_diffusion.progress_bar import StepBar

log = logging.getLogger(__name__)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every sampling command."""
    g = p.add_argument_group("model and embeddings")
    g.add_argument("--model", required=True,
                   help="diffusers folder, .ckpt/.safetensors file (SD1/SD2/SDXL), or 'tiny' / 'tiny-sd1' / "
                        "'tiny-sdxl' (random-weight workflow demos)")
    g.add_argument("--embeddings-dir",
                   help="folder of embedding files; each is used by its name in prompts (default, when no "
                        "--embedding is given either: the embeddings home, ./embeddings or $MEDDIFF_EMBEDDINGS_DIR, "
                        "where 'meddiff train' publishes)")
    g.add_argument("--embedding", action="append", default=[], metavar="FILE", help="an embedding file (repeatable)")
    g.add_argument("--allow-plain-prompt", action="store_true",
                   help="sample prompt parts that use none of the loaded embeddings as plain text (without it such "
                        "a part, e.g. a misspelt name, is refused)")
    from medical_diffusion.devices import add_device_arguments

    add_device_arguments(g, attention=True)
    s = p.add_argument_group("sampling (Euler ancestral, A1111 semantics)")
    s.add_argument("--negative-prompt", default="", help="shared negative prompt (default: empty)")
    s.add_argument("--seed", type=int, default=0, help="seed (-1: random)")
    s.add_argument("--steps", type=int, default=100, help="sampling steps (paper: 100)")
    s.add_argument("--cfg", type=float, default=2.0, help="CFG scale (paper: 2; 3 for three pathologies)")
    s.add_argument("--width", type=int, default=512)
    s.add_argument("--height", type=int, default=512)


def check_inputs(args, out: str | None = None, prompts=()) -> None:
    """Check the device, model, embedding sources, the embedding names in ``prompts`` and the output
    folder before the model loads (that takes a while).

    Without ``--embeddings-dir`` and ``--embedding`` the embeddings home is read: ``args.embeddings_dir``
    becomes that folder (None when it does not exist) and ``args.embeddings_where`` says where was looked.
    """
    from medical_diffusion.devices import runtime_from_args
    from medical_diffusion.generation.loading import check_model_path, check_output_folder, embedding_sources

    from medical_diffusion.limits import check_sampling

    # the limits the tabs and the API have (a --width 100000 would allocate before failing)
    check_sampling(steps=args.steps, cfg_scale=args.cfg, width=args.width, height=args.height, seed=args.seed)
    args.runtime = runtime_from_args(args)  # --device cuda without CUDA: one line, before anything loads
    check_model_path(args.model)
    sources = embedding_sources(args.embeddings_dir, args.embedding)
    args.embeddings_dir = str(sources.folder) if sources.folder else None
    args.embeddings_where = sources.where
    if out:
        check_output_folder(out)
    check_prompt_names(args, prompts)


def check_prompt_names(args, prompts, allow_plain: bool | None = None) -> None:
    """Refuse, before the model loads, prompts with a part that names none of the embeddings on disk
    (file names; ``--allow-plain-prompt`` lets plain text through unless ``allow_plain`` is False)."""
    from medical_diffusion.generation import loading

    loading.check_prompt_names(prompts, args.embeddings_dir, args.embedding, where=args.embeddings_where,
                               allow_plain=args.allow_plain_prompt if allow_plain is None else allow_plain)


def load_model_and_embeddings(args):
    from medical_diffusion.generation.loading import load_embedding_table, load_model, vectors_of

    runtime = getattr(args, "runtime", None)
    if runtime is None:
        from medical_diffusion.devices import runtime_from_args

        runtime = args.runtime = runtime_from_args(args)
    backend = load_model(args.model, runtime)
    table = load_embedding_table(backend, args.embeddings_dir, args.embedding,
                                 where=getattr(args, "embeddings_where", None))
    log.info("embeddings: %s (from %s)", ", ".join(f"{n} ({e.vectors.shape[0]} vectors)"
                                                   for n, e in sorted(table.items())) or "none", table.where)
    return backend, table, vectors_of(table)


def warn_prompts(backend, prompts, vectors, allow_plain: bool = False) -> None:
    """Refuse prompts whose parts use none of the loaded embeddings (unless ``allow_plain``); log the
    token-budget warnings."""
    from medical_diffusion.generation.loading import prompts_warnings

    for warning in prompts_warnings(backend, list(prompts), vectors, allow_plain=allow_plain):
        log.warning("warning: %s", warning)


def sample_kwargs(args) -> dict:
    return dict(negative_prompt=args.negative_prompt, steps=args.steps, cfg_scale=args.cfg,
                width=args.width, height=args.height)


def ti_hashes(args, prompts) -> dict[str, dict[str, str]]:
    """The files and sha256 of the embeddings (``--embeddings-dir`` / the home, ``--embedding``) that
    ``prompts`` use, for the PNGs' ``TI hashes``."""
    from medical_diffusion.generation.outputs import embedding_hashes

    return embedding_hashes(args.embeddings_dir, [p for p in prompts if p], args.embedding)


def parse_class_prompt(text: str, index: int) -> tuple[str, str]:
    """``LABEL=PROMPT`` (or a bare prompt, labelled ``class<index>``)."""
    match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)=(.*)$", text, re.S)
    if match:
        return match.group(1), match.group(2)
    return f"class{index}", text


def _batch_size(text: str) -> int:
    """``--batch-size``: a whole number from 1 to :data:`~medical_diffusion.limits.MAX_BATCH_SIZE`."""
    from medical_diffusion.limits import MAX_BATCH_SIZE

    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {MAX_BATCH_SIZE}, got {text!r}")
    return value


# -- generate ---------------------------------------------------------------------------------
def run_generate(args) -> int:
    from medical_diffusion.generation.outputs import names_in
    from medical_diffusion.generation.sampling import resolve_seed
    from medical_diffusion.generation.synthetic_set import SetParams, embedding_fingerprint, generate_set

    classes = dict(parse_class_prompt(p, i) for i, p in enumerate(args.prompt))
    if len(classes) != len(args.prompt):
        raise MedDiffError("two --prompt options use the same class label")
    check_inputs(args, args.out, list(classes.values()))
    backend, table, vectors = load_model_and_embeddings(args)
    warn_prompts(backend, classes.values(), vectors, args.allow_plain_prompt)
    seed = args.seed
    manifest = Path(args.out) / "manifest.json"
    if seed < 0 and manifest.exists() and not args.restart:  # a random seed is drawn once per set
        try:
            seed = int(json.loads(manifest.read_text("utf-8"))["params"]["seed"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    prompts = [*classes.values(), args.negative_prompt]
    used = names_in(prompts, table)
    params = SetParams(
        classes=classes, seed=resolve_seed(seed), steps=args.steps, cfg_scale=args.cfg,
        negative_prompt=args.negative_prompt, width=args.width, height=args.height,
        paired_seeds=args.paired_seeds, model=str(args.model),
        embeddings={name: embedding_fingerprint(table[name]) for name in used},
    )
    bar = StepBar("generate", unit="image")
    try:
        result = generate_set(backend, params, args.out, args.n, embeddings=vectors, batch_size=args.batch_size,
                              restart=args.restart, progress=bar, ti_hashes=ti_hashes(args, prompts))
    finally:
        bar.close()
    print(f"{result.generated} generated, {result.skipped} already present, {len(result.failures)} failed; "
          f"manifest: {result.manifest}")
    for rel, problem in result.failures:
        print(f"failed: {rel}: {problem}")
    return 1 if result.failures else 0


# -- interpolate ------------------------------------------------------------------------------
def _save_frames(frames, out: Path, stem: str, grid_title: str, params: dict, force: bool, hashes: dict,
                 cfg_scales=None) -> Path:
    """``OUT/<stem>_NN.png`` per frame and ``OUT/<stem>_grid.png`` (the first frame's prompt), each with
    A1111's ``parameters`` text (``cfg_scales``: each frame's, when they differ from ``params``'), and
    ``OUT/<stem>.json`` with the parameters, the frames and the embedding files used (``hashes``)."""
    from medical_diffusion.atomic_io import atomic_write_text, check_writable
    from medical_diffusion.generation.interpolation import frames_grid
    from medical_diffusion.generation.outputs import png_parameters
    from medical_diffusion.png_io import save_png

    out.mkdir(parents=True, exist_ok=True)
    grid_path = check_writable(out / f"{stem}_grid.png", force)
    cfg_scales = list(cfg_scales) if cfg_scales is not None else [None] * len(frames)
    records = []
    for j, (frame, cfg) in enumerate(zip(frames, cfg_scales)):
        path = out / f"{stem}_{j:02d}.png"
        sha = save_png(frame.image, path, text=png_parameters(frame.prompt, params, hashes, cfg))
        records.append({"file": path.name, "label": frame.label, "prompt": frame.prompt, "t": frame.t, "sha256": sha})
    save_png(frames_grid(frames, grid_title), grid_path,
             text=png_parameters(frames[0].prompt, params, hashes, cfg_scales[0]) if frames else None)
    atomic_write_text(out / f"{stem}.json", json.dumps({"params": params, "frames": records, "embeddings": hashes},
                                                       indent=1))
    return grid_path


def run_interpolate(args) -> int:
    from medical_diffusion.generation.interpolation import interpolate_embeddings, interpolate_prompts
    from medical_diffusion.generation.sampling import resolve_seed

    check_inputs(args, args.out)
    # embedding mode blends two embeddings: the names are needed whatever --allow-plain-prompt says
    check_prompt_names(args, [args.healthy, args.diseased], False if args.mode == "embedding" else None)
    backend, table, vectors = load_model_and_embeddings(args)
    seed = resolve_seed(args.seed)
    bar = StepBar("interpolate")
    try:
        if args.mode == "prompt":
            warn_prompts(backend, [f"{args.healthy} AND {args.diseased}"], vectors, args.allow_plain_prompt)
            frames = interpolate_prompts(backend, args.healthy, args.diseased, args.k, embeddings=vectors, seed=seed,
                                         progress=bar, **sample_kwargs(args))
        else:
            missing = [n for n in (args.healthy, args.diseased) if n not in table]
            if missing:
                raise MedDiffError(f"embedding mode needs embedding names; not loaded: {', '.join(missing)} "
                                   f"(looked in {table.where}; loaded: {', '.join(sorted(table)) or 'none'})")
            frames = interpolate_embeddings(backend, table[args.healthy], table[args.diseased], args.k,
                                            mode=args.blend, template=args.template, embeddings=vectors, seed=seed,
                                            progress=bar, **sample_kwargs(args))
    finally:
        bar.close()
    params = {"mode": args.mode, "healthy": args.healthy, "diseased": args.diseased, "k": args.k, "seed": seed,
              "model": str(args.model), "blend": args.blend if args.mode == "embedding" else None,
              **sample_kwargs(args)}
    title = f"{args.healthy} -> {args.diseased} ({args.mode}{', ' + args.blend if args.mode == 'embedding' else ''}), seed {seed}"
    hashes = ti_hashes(args, [f.prompt for f in frames] + [args.healthy, args.diseased, args.negative_prompt])
    grid = _save_frames(frames, Path(args.out), "interpolation", title, params, args.force, hashes)
    print(f"wrote {len(frames)} images and {grid}")
    return 0


# -- compose ----------------------------------------------------------------------------------
def _parse_addition(text: str) -> tuple[str, float]:
    match = re.match(r"^(.*?)(?::\s*([-+]?(?:\d+\.?|\d*\.\d+)))?$", text.strip())
    name, weight = match.group(1).strip(), match.group(2)
    if not name:
        raise MedDiffError(f"--add {text!r}: expected NAME or NAME:STRENGTH")
    return name, float(weight) if weight is not None else 1.0


def run_compose(args) -> int:
    from medical_diffusion.generation.composition import compose, composition_stages
    from medical_diffusion.generation.sampling import resolve_seed

    additions = [_parse_addition(a) for a in args.add]
    stage_cfg = [float(v) for v in args.stage_cfg.split(",")] if args.stage_cfg else None
    stages = composition_stages(args.base, additions, base_weight=args.base_weight, cfg_scale=args.cfg,
                                stage_cfg=stage_cfg)
    check_inputs(args, args.out, [s.prompt for s in stages])
    backend, table, vectors = load_model_and_embeddings(args)
    warn_prompts(backend, [s.prompt for s in stages], vectors, args.allow_plain_prompt)
    seed = resolve_seed(args.seed)
    kwargs = sample_kwargs(args)
    kwargs.pop("cfg_scale")
    bar = StepBar("compose")
    try:
        frames = compose(backend, stages, embeddings=vectors, seed=seed, progress=bar, **kwargs)
    finally:
        bar.close()
    params = {"base": args.base, "add": additions, "base_weight": args.base_weight, "seed": seed,
              "stages": [{"prompt": s.prompt, "cfg_scale": s.cfg_scale} for s in stages], "model": str(args.model),
              **kwargs}
    hashes = ti_hashes(args, [s.prompt for s in stages] + [args.negative_prompt])
    grid = _save_frames(frames, Path(args.out), "composition", f"{args.base} + pathologies, seed {seed}", params,
                        args.force, hashes, cfg_scales=[s.cfg_scale for s in stages])
    print(f"wrote {len(frames)} images and {grid}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="N images per class prompt into OUT/<label>/ with a resumable manifest",
        description="Generate a synthetic data set: N images per class prompt (A1111 composable syntax, "
                    "embeddings by name) into OUT/<label>/NNNNN.png with OUT/manifest.json. Re-running the same "
                    "command resumes.",
    )
    p.add_argument("--prompt", action="append", required=True, metavar="LABEL=PROMPT",
                   help="class label and prompt, e.g. neg=prostate_neg (repeatable); each prompt part must use "
                        "a loaded embedding unless --allow-plain-prompt")
    p.add_argument("-n", "--n", type=int, required=True, help="images per class (paper: 1000)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=_batch_size, default=1,
                   help="images per model call (1..64, default 1); image i keeps its own seed and noise, so a batch "
                        "gives the same images as single calls (to float rounding); larger batches use the GPU better")
    p.add_argument("--paired-seeds", action="store_true", help="use the same seeds for every class")
    p.add_argument("--restart", action="store_true", help="ignore an existing manifest with other parameters")
    add_model_args(p)
    p.set_defaults(func=run_generate)

    p = subparsers.add_parser(
        "interpolate", help="healthy -> diseased in K steps at one seed, images + labelled grid",
        description="Interpolate from healthy to diseased at one seed. 'prompt' mode uses A1111 composable "
                    "weights 'healthy :(1-t) AND diseased :t' (the paper); 'embedding' mode blends the two "
                    "embeddings' vectors into one.",
    )
    p.add_argument("--healthy", required=True, help="healthy embedding name, or a prompt that uses one "
                                                    "(plain text only with --allow-plain-prompt)")
    p.add_argument("--diseased", required=True, help="diseased embedding name, or a prompt that uses one "
                                                     "(plain text only with --allow-plain-prompt)")
    p.add_argument("-k", "--k", type=int, default=5, help="number of images, including both ends (default 5)")
    p.add_argument("--mode", choices=("prompt", "embedding"), default="prompt")
    p.add_argument("--blend", choices=("linear", "slerp"), default="linear", help="embedding-mode blend")
    p.add_argument("--template", default="{}", help="embedding-mode prompt with {} for the blended embedding")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite an existing grid")
    add_model_args(p)
    p.set_defaults(func=run_interpolate)

    p = subparsers.add_parser(
        "compose", help="add pathologies one by one at one seed, labelled strip",
        description="Start from a base (healthy) prompt and add pathologies one by one with strengths, all at "
                    "one seed (paper Figure 3: strength 0.5 each, CFG 3 for three).",
    )
    p.add_argument("--base", required=True, help="base embedding name (e.g. the healthy embedding) or a prompt "
                                                 "that uses one")
    p.add_argument("--add", action="append", required=True, metavar="NAME[:STRENGTH]",
                   help="pathology prompt/embedding with its strength (repeatable, in order)")
    p.add_argument("--base-weight", type=float, default=1.0,
                   help="weight of the base once pathologies are added (0 drops it)")
    p.add_argument("--stage-cfg", help="comma-separated CFG per stage (base + one per pathology)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite an existing strip")
    add_model_args(p)
    p.set_defaults(func=run_compose)
