"""``meddiff mask`` (inpainting masks from geometry) and ``meddiff inpaint`` (A1111-style inpainting)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from medical_diffusion.errors import InputFileError, MedDiffError

if TYPE_CHECKING:  # the CLI's start-up imports neither PIL nor the mask module
    from PIL import Image

    from medical_diffusion.generation.masks import MaskSpec

log = logging.getLogger(__name__)


# -- mask -------------------------------------------------------------------------------------
class _ShapeAction(argparse.Action):
    """Collect --ellipse/--circle in the order given, as (kind, values)."""

    def __call__(self, parser, namespace, values, option_string=None):
        shapes = list(getattr(namespace, self.dest, None) or [])
        shapes.append((option_string.lstrip("-"), list(values)))
        setattr(namespace, self.dest, shapes)


def _spacing_from(args, image):
    """(spacing, source size) from ``--spacing-from``: a prepare manifest (row ``--entry``, the
    ``--image``'s row, or the spacing all rows share; rescaled to the ``--image``'s own grid when it is a
    picture of the same field of view at another size, e.g. a 128 px generated one), or any image input
    (a DICOM file or series, a volume, or a PNG listed in a prepare manifest)."""
    from medical_diffusion.datasets.image_input import read_image_input

    path = Path(args.spacing_from)
    if path.suffix.lower() == ".csv":
        from medical_diffusion.datasets.prepared_spacing import manifest_grid, spacing_on

        entry = args.entry
        if entry is None and image is not None:  # the --image's row when it is one of the manifest's outputs
            try:
                entry = image.path.resolve().relative_to(path.resolve().parent).as_posix()
            except ValueError:
                entry = None  # e.g. a generated image: the spacing the prepared images share
        spacing, prepared = manifest_grid(path, entry)
        if image is None:
            return spacing, prepared
        return spacing_on(image.size, spacing, prepared, image.path), image.size
    source = read_image_input(path)
    if source.spacing is None:
        why = ("is not listed with a pixel spacing in a prepare manifest" if source.kind == "picture"
               else "holds no pixel spacing")
        raise InputFileError(path, f"{why}; give --spacing SX SY")
    return source.spacing, source.size


def build_mask_spec(args):
    """A :class:`MaskSpec` from the command line and the overlay image (sizes and spacing from the
    inputs where given: ``--spacing-from``, else the ``--image`` itself)."""
    from medical_diffusion.datasets.image_input import read_image_input
    from medical_diffusion.datasets.prepared_spacing import check_prepared_geometry
    from medical_diffusion.datasets.slice_geometry import SliceGeometry
    from medical_diffusion.generation.masks import MaskShape, MaskSpec
    from medical_diffusion.limits import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, check_range

    shapes = []
    for kind, values in args.shapes or []:  # in command-line order
        if kind == "circle":
            shapes.append(MaskShape.circle(*values))
            continue
        if len(values) not in (4, 5):
            raise MedDiffError("--ellipse takes CX CY RX RY [ANGLE]")
        shapes.append(MaskShape((values[0], values[1]), (values[2], values[3]), values[4] if len(values) == 5 else 0.0))
    spacing = tuple(args.spacing) if args.spacing else None
    source_size = tuple(args.source_size) if args.source_size else None
    image = read_image_input(args.image, args.slice) if args.image else None
    if args.entry and not (args.spacing_from and args.spacing_from.lower().endswith(".csv")):
        raise MedDiffError("--entry names a row of a --spacing-from manifest.csv")
    if args.spacing_from:
        found, size = _spacing_from(args, image)
        spacing = spacing or found
        source_size = source_size or size
    elif image is not None and spacing is None:
        spacing = image.spacing
    if image is not None:
        source_size = source_size or image.size
    target = tuple(args.target_size)
    for value in target:
        check_range("mask --target-size", value, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    if image is not None and image.kind == "picture" and source_size and tuple(source_size) != image.size:
        # shapes placed on another grid (e.g. the series) and drawn on a prepared image: it must lie there
        check_prepared_geometry(image.path, SliceGeometry(tuple(source_size), image.size, spacing, args.fit))
    return MaskSpec(shapes=shapes, unit=args.unit, source_size=source_size or target, spacing=spacing,
                    target_size=target, feather=args.feather, invert=args.invert, fit=args.fit), \
        image.image if image is not None else None


def mask_output(text: str) -> Path:
    """The mask PNG for ``--out``: ``NAME.png`` as given, or ``NAME`` + ``.png``; other suffixes refused."""
    out = Path(text)
    if out.suffix == "":
        return out.with_name(out.name + ".png")
    if out.suffix.lower() != ".png":
        raise MedDiffError(f"{out}: the mask is written as PNG; give a .png name or a name without suffix "
                           f"(not {out.suffix!r})")
    return out


def run_mask(args) -> int:
    from medical_diffusion.atomic_io import atomic_write_text, check_writable
    from medical_diffusion.generation.masks import overlay_preview, render_mask
    from medical_diffusion.png_io import save_png

    if not args.shapes:
        raise MedDiffError("give at least one --ellipse or --circle")
    out = mask_output(args.out)
    spec, image = build_mask_spec(args)
    overlay_path = out.with_name(out.stem + ".overlay.png")
    json_path = out.with_suffix(".json")
    for path in (out, overlay_path, json_path):
        check_writable(path, args.force)
    result = render_mask(spec)
    for warning in result.warnings:
        log.warning("warning: %s", warning)
    save_png(result.mask, out)
    save_png(overlay_preview(image, result, spec), overlay_path)
    record = {
        "spec": json.loads(spec.to_json()),
        "mask": out.name,
        "target_spacing_mm": result.target_spacing,
        "shape_sizes_px": result.shape_sizes_px,
        "shape_sizes_mm": result.shape_sizes_mm,
        "repaint_fraction": float((result.mask > 127).mean()),
        "warnings": result.warnings,
        "image": str(args.image) if args.image else None,
        "spacing_from": str(args.spacing_from) if args.spacing_from else None,
    }
    atomic_write_text(json_path, json.dumps(record, indent=1))
    sizes = ", ".join(
        f"{w:.1f}x{h:.1f} mm" for w, h in result.shape_sizes_mm
    ) if result.shape_sizes_mm else ", ".join(f"{w:.0f}x{h:.0f} px" for w, h in result.shape_sizes_px)
    print(f"wrote {out} ({spec.target_size[0]}x{spec.target_size[1]}; shapes {sizes}), {overlay_path}, {json_path}")
    return 0


# -- inpaint ----------------------------------------------------------------------------------
class MaskInput(NamedTuple):
    """A mask (PIL "L", white = repaint), its label, and where it lies: ``spec`` for a mask JSON (drawn
    for ``spec.source_size`` on ``spec.target_size``), ``on_source`` for a label volume/DICOM (the source
    slice's own grid), neither for a mask picture (its own size)."""

    mask: Image.Image
    label: str
    spec: MaskSpec | None = None
    on_source: bool = False


def read_mask(path: str, slice_index: int | None = None) -> MaskInput:
    """A mask JSON written by ``meddiff mask`` (re-rendered), or any image input: a PNG as it is, a DICOM
    file or series or a label volume (at ``slice_index``) binarised (values > 0 repaint)."""
    from PIL import Image

    from medical_diffusion.datasets.file_kinds import is_dicom, is_volume
    from medical_diffusion.datasets.image_input import LABEL_WINDOW, read_image_input
    from medical_diffusion.generation.masks import MaskSpec, render_mask

    p = Path(path)
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(p.read_text("utf-8"))
            spec = MaskSpec.from_dict(data.get("spec", data))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputFileError(p, f"not a mask description ({exc})") from exc
        return MaskInput(Image.fromarray(render_mask(spec).mask), p.stem, spec)
    if p.is_dir() or is_volume(p) or is_dicom(p):
        labels = read_image_input(p, slice_index, window=LABEL_WINDOW).image.convert("L")
        return MaskInput(labels.point(lambda v: 255 if v else 0), p.stem, on_source=True)
    return MaskInput(read_image_input(p).image.convert("L"), p.stem)


def _on_one_grid(source, found: MaskInput, path: str):
    """(mask, image) of ``found`` and the image input ``source`` on the grid the mask was drawn for."""
    from PIL import Image

    from medical_diffusion.datasets.prepared_spacing import check_prepared_geometry
    from medical_diffusion.datasets.slice_geometry import SliceGeometry, square

    image, size = source.image, source.size
    if found.spec is not None:
        geo = found.spec.geometry()
        if size == tuple(geo.source_size):  # the source it was drawn on: fitted as the mask fits it
            return found.mask, Image.fromarray(geo.apply(image))
        if size == tuple(geo.target_size):  # already on the mask's grid
            if source.kind == "picture":
                check_prepared_geometry(source.path, geo)
            return found.mask, image
        (sw, sh), (tw, th) = geo.source_size, geo.target_size
        raise InputFileError(path, f"was drawn for a {sw}x{sh} source on a {tw}x{th} grid, but the image "
                                   f"{source.path} is {size[0]}x{size[1]}: give the image it was drawn on "
                                   f"({sw}x{sh}) or one on its grid ({tw}x{th})")
    if found.on_source:  # a label slice: on the source's own grid
        m = found.mask.size
        if size == m:  # the source itself: both fitted as prepare fits a slice
            geo = square(m)
            return Image.fromarray(geo.apply(found.mask, Image.NEAREST)), Image.fromarray(geo.apply(image))
        if size[0] != size[1]:
            raise InputFileError(path, f"is a {m[0]}x{m[1]} label slice, but the image {source.path} is "
                                       f"{size[0]}x{size[1]}: give the slice it labels or a prepared (square) image")
        geo = SliceGeometry(m, size)
        if source.kind == "picture":
            check_prepared_geometry(source.path, geo)
        return Image.fromarray(geo.apply(found.mask, Image.NEAREST)), image
    return found.mask, source.fitted(found.mask.size)  # a mask picture: the image fitted as prepare fits it


def load_inputs(image_path: str, mask_paths: list[str], slice_index: int | None = None):
    """The masks and the image, all on the grid the masks were drawn for: a mask JSON's source fitted as
    it records (pad or stretch), an image on its target grid kept, a label slice fitted nearest-neighbour
    as ``prepare`` fits a slice, a mask picture's image fitted onto it; anything else refused."""
    import numpy as np

    from medical_diffusion.datasets.image_input import read_image_input

    source = read_image_input(image_path, slice_index)
    placed = []
    for path in mask_paths:
        found = read_mask(path, slice_index)
        mask, image = _on_one_grid(source, found, path)
        if placed and (mask.size != placed[0][1].size or not np.array_equal(np.asarray(image), np.asarray(placed[0][2]))):
            raise InputFileError(path, f"puts the image on another grid ({mask.size[0]}x{mask.size[1]}"
                                       f"{'' if mask.size != placed[0][1].size else ', fitted otherwise'}) than "
                                       f"{mask_paths[0]}: all masks must share one grid")
        placed.append((found, mask, image))
    return [(mask, found.label) for found, mask, _ in placed], placed[0][2]


def run_inpaint(args) -> int:
    from medical_diffusion.atomic_io import atomic_write_text, check_writable
    from medical_diffusion.cli.generate import check_inputs, load_model_and_embeddings, warn_prompts
    from medical_diffusion.progress_bar import StepBar
    from medical_diffusion.generation.inpainting import inpaint, inpaint_grid
    from medical_diffusion.generation.sampling import resolve_seed
    from medical_diffusion.png_io import save_png

    from medical_diffusion.limits import check_sampling

    check_sampling(denoising_strength=args.denoising_strength, mask_blur=args.mask_blur, padding=args.padding)
    check_inputs(args, args.out, [args.prompt])
    masks, image = load_inputs(args.image, args.mask, args.slice)
    out = Path(args.out)
    grid_path = check_writable(out / "inpaint_grid.png", args.force)
    backend, _table, vectors = load_model_and_embeddings(args)
    warn_prompts(backend, [args.prompt], vectors, args.allow_plain_prompt)
    seed = resolve_seed(args.seed)
    results, records, failures = [], [], []
    bar = StepBar("inpaint")
    try:
        for j, (mask, label) in enumerate(masks):
            try:
                res = inpaint(
                    backend, image, mask, args.prompt, embeddings=vectors, negative_prompt=args.negative_prompt,
                    seed=seed, steps=args.steps, cfg_scale=args.cfg, denoising_strength=args.denoising_strength,
                    fill=args.fill, mask_blur=args.mask_blur, invert_mask=args.invert_mask,
                    only_masked=not args.whole_image, padding=args.padding, width=args.width, height=args.height,
                    progress=bar,
                )
            except MedDiffError as exc:
                failures.append(f"{args.mask[j]}: {exc}")
                continue
            path = out / f"inpaint_{j:02d}_{label}.png"
            sha = save_png(res.image, path)
            results.append((res, label))
            records.append({"file": path.name, "mask": str(args.mask[j]), "crop_region": res.crop_region,
                            "sha256": sha})
    finally:
        bar.close()
    if results:
        save_png(inpaint_grid(image, [r for r, _ in results], [l for _, l in results],
                              title=f"{args.prompt} (seed {seed}, {args.fill})"), grid_path)
    params = {"image": str(args.image), "slice": args.slice, "size": list(image.size), "prompt": args.prompt, "negative_prompt": args.negative_prompt,
              "seed": seed, "steps": args.steps, "cfg_scale": args.cfg, "denoising_strength": args.denoising_strength,
              "fill": args.fill, "mask_blur": args.mask_blur, "invert_mask": args.invert_mask,
              "only_masked": not args.whole_image, "padding": args.padding, "width": args.width,
              "height": args.height, "model": str(args.model)}
    atomic_write_text(out / "inpaint.json", json.dumps({"params": params, "results": records,
                                                        "failures": failures}, indent=1))
    for failure in failures:
        print(f"failed: {failure}")
    print(f"wrote {len(results)} inpainted image(s)" + (f" and {grid_path}" if results else "") + f" in {out}")
    return 1 if failures else 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "mask", help="inpainting mask from ellipses/circles in px or mm (PNG + overlay + JSON)",
        description="Draw an inpainting mask (white = repaint) from ellipses/circles whose centre and radii are "
                    "in source pixels or mm. Coordinates: x = column, y = row of the source grid, (0, 0) = centre "
                    "of the top-left pixel. The source (e.g. a DICOM slice) is fitted to the target size (512) as "
                    "'prepare images' fits it (aspect ratio kept, zero padding), so a mask drawn on the source "
                    "lies on the prepared image. For a prepared or generated image give --spacing-from "
                    "OUT/manifest.csv (or a PNG listed there): its spacing is recorded there. Writes OUT.png, "
                    "OUT.overlay.png (size labelled) and OUT.json.",
    )
    p.add_argument("--out", required=True, help="mask to write: OUT.png (a name without suffix gets .png)")
    p.add_argument("--ellipse", nargs="+", type=float, action=_ShapeAction, dest="shapes", metavar="V",
                   help="CX CY RX RY [ANGLE_DEG] (repeatable; all shapes are united)")
    p.add_argument("--circle", nargs=3, type=float, action=_ShapeAction, dest="shapes", metavar=("CX", "CY", "R"),
                   help="circle centre and radius (repeatable)")
    p.add_argument("--unit", choices=("px", "mm"), default="px", help="unit of centres, radii and feather")
    p.add_argument("--spacing", nargs=2, type=float, metavar=("SX", "SY"), help="mm per source pixel (x, y)")
    p.add_argument("--spacing-from", help="pixel spacing and source grid from a DICOM file or series folder, a "
                                          "volume, a prepared PNG, or a prepare manifest.csv")
    p.add_argument("--entry", help="row of the --spacing-from manifest.csv (output path or file name; default: "
                                   "the --image's row, else the spacing all rows share)")
    p.add_argument("--source-size", nargs=2, type=int, metavar=("W", "H"),
                   help="source pixel grid (default: from --spacing-from, else --image, else the target size)")
    p.add_argument("--target-size", nargs=2, type=int, default=(512, 512), metavar=("W", "H"),
                   help="the mask's grid, 64..2048 px (default 512 512)")
    p.add_argument("--fit", choices=("pad", "stretch"), default="pad",
                   help="how the source lies on the target: pad (as 'prepare images' does, default) or stretch")
    p.add_argument("--image", help="image for the overlay preview (PNG/JPEG, DICOM file or series folder, "
                                   "MHA/NIfTI volume); gives the spacing when nothing else does")
    p.add_argument("--slice", type=int, help="slice of a volume or series --image (default: middle)")
    p.add_argument("--feather", type=float, default=0.0, help="soft edge width (same unit)")
    p.add_argument("--invert", action="store_true", help="repaint everything outside the shapes")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=run_mask)

    from medical_diffusion.cli.generate import add_model_args

    p = subparsers.add_parser(
        "inpaint", help="inpaint masked areas with a trained embedding (A1111 img2img inpainting)",
        description="Inpaint with the (non-inpainting) SD2 base model the A1111 way: masked latent blending "
                    "every step, mask blur, 'only masked' crop with padding, paste-back. Several --mask give a "
                    "grid of the same image inpainted at several places (paper Figure 4).",
    )
    p.add_argument("--image", required=True,
                   help="image to inpaint (e.g. a generated healthy case): PNG/JPEG, DICOM file or series folder, "
                        "MHA/NIfTI volume: the one a mask JSON was drawn for (fitted as it records) or one on its "
                        "grid; for a label mask the slice it labels or a prepared (square) image")
    p.add_argument("--mask", action="append", required=True,
                   help="mask JSON from 'meddiff mask', or a mask image (PNG: white = repaint; DICOM or label "
                        "volume: labels > 0 repaint) (repeatable)")
    p.add_argument("--slice", type=int, help="slice of a volume or series --image/--mask (default: middle)")
    p.add_argument("--prompt", required=True, help="prompt for the masked area (e.g. the positive embedding)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--fill", choices=("original", "latent noise", "fill", "latent nothing"), default="original",
                   help="masked content before sampling (default: original)")
    p.add_argument("--denoising-strength", type=float, default=0.75, help="A1111 denoising strength (default 0.75)")
    p.add_argument("--mask-blur", type=int, default=4, help="mask blur in px (A1111 default 4)")
    p.add_argument("--invert-mask", action="store_true", help="repaint outside the mask")
    p.add_argument("--whole-image", action="store_true", help="process the whole picture, not only the masked area")
    p.add_argument("--padding", type=int, default=32, help="'only masked' padding in px (default 32)")
    p.add_argument("--force", action="store_true", help="overwrite an existing grid")
    add_model_args(p)
    p.set_defaults(func=run_inpaint)
