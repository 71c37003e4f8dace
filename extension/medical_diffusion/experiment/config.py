"""Experiment configs: a YAML file or a shipped preset, ``extends:`` a preset, ``--set`` overrides.

A config names the data, the model, the base training and sampling settings, and the sweeps of
``table1`` (FID/MFID against parameters) and ``table2`` (classifier mixes). Relative paths are read
relative to the config file's folder (for a preset: the current folder).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from medical_diffusion.backend.families import is_tiny_model
from medical_diffusion.errors import InputFileError, MedDiffError

PRESETS = ("tiny", "paper-table1", "paper-table2")
TOP_KEYS = {"name", "workdir", "model", "device", "seed", "data", "classes", "train", "sample", "table1",
            "table2", "extends", "estimates"}
DATA_KINDS = ("phantoms", "picai", "prepared")
VARY_KEYS = ("steps", "cfg", "n_vectors", "cases")
SAMPLE_KEYS = {"steps", "cfg", "width", "height", "seed", "negative_prompt", "sampler", "batch_size"}
PLACEHOLDER = "FILL_ME"


@dataclass
class ExperimentConfig:
    """A merged, checked config; ``data`` is the plain dict (all defaults filled in)."""

    source: str  # the file or preset it came from
    base_dir: Path  # relative paths are resolved against this
    data: dict[str, Any]
    workdir: Path

    @property
    def name(self) -> str:
        return str(self.data["name"])

    def path(self, value: str | None) -> str | None:
        """A config path made absolute (``tiny`` and empty values are kept)."""
        if value is None or is_tiny_model(value) or str(value) == "random-init":
            return value
        p = Path(str(value)).expanduser()
        return str(p if p.is_absolute() else (self.base_dir / p).resolve())


def preset_text(name: str) -> str:
    """The YAML text of a shipped preset."""
    if name not in PRESETS:
        raise MedDiffError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return resources.files("medical_diffusion.experiment").joinpath("presets", f"{name}.yaml").read_text("utf-8")


def _parse_yaml(text: str, where: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MedDiffError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise MedDiffError(f"{where}: expected a mapping of settings at the top level")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base`` (mappings merged key by key; lists and values replaced; null drops a mapping)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if value is None and isinstance(out.get(key), dict):  # `key: null` drops an inherited section
            out.pop(key)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(data: dict, text: str) -> None:
    """``a.b.c=VALUE`` (VALUE read as YAML) into ``data``."""
    import yaml

    if "=" not in text:
        raise MedDiffError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. table1.bootstrap.reps=200")
    path, raw = text.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise MedDiffError(f"--set {text!r}: empty key")
    node = data
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None


def load_config(source: str | Path, overrides: tuple[str, ...] | list[str] = (), workdir: str | None = None,
                extra: dict | None = None) -> ExperimentConfig:
    """Read ``source`` (a YAML file or a preset name), resolve ``extends``, apply overrides, check it."""
    text_source = str(source)
    path = Path(text_source)
    if path.suffix.lower() in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise InputFileError(path, "config file not found")
        data = _parse_yaml(path.read_text("utf-8"), str(path))
        base_dir = path.resolve().parent
    else:
        data = _parse_yaml(preset_text(text_source), f"preset {text_source}")
        base_dir = Path.cwd()
    seen = [text_source]
    while "extends" in data:
        parent = str(data.pop("extends"))
        if parent in seen:
            raise MedDiffError(f"{text_source}: 'extends' loops ({' -> '.join(seen + [parent])})")
        seen.append(parent)
        data = deep_merge(_parse_yaml(preset_text(parent), f"preset {parent}"), data)
    if extra:
        data = deep_merge(data, extra)
    for item in overrides:
        apply_override(data, item)
    data = _fill_defaults(data, text_source)
    wd = Path(workdir) if workdir else Path(str(data["workdir"])).expanduser()
    if not wd.is_absolute():
        wd = (Path.cwd() if workdir else base_dir) / wd
    return ExperimentConfig(text_source, base_dir, data, wd.resolve())


def _need(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise MedDiffError(f"{where}: {message}")


def _fill_defaults(data: dict, where: str) -> dict:
    unknown = sorted(set(data) - TOP_KEYS)
    _need(not unknown, where, f"unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(TOP_KEYS))})")
    data.setdefault("name", Path(where).stem)
    data.setdefault("workdir", f"meddiff-experiment-{data['name']}")
    data.setdefault("device", "auto")
    data.setdefault("seed", 0)
    data.setdefault("estimates", {})
    _need("model" in data, where, "give 'model' (a diffusers folder, an SD1/SD2/SDXL .safetensors or .ckpt, "
          "or 'tiny', 'tiny-sd1', 'tiny-sdxl')")
    d = data.get("data")
    _need(isinstance(d, dict) and d.get("kind") in DATA_KINDS, where,
          f"'data.kind' must be one of {', '.join(DATA_KINDS)}")
    d.setdefault("prepare", {})
    if d["kind"] == "picai":
        _need(bool(d.get("images")) and bool(d.get("labels")), where, "data kind picai needs 'images' and 'labels'")
    if d["kind"] == "prepared":
        _need(bool(d.get("path")), where, "data kind prepared needs 'path' (a `meddiff prepare` output folder)")
    if d["kind"] == "phantoms":
        d.setdefault("cases_per_class", 12)
    classes = data.get("classes")
    _need(isinstance(classes, dict) and classes, where, "'classes' maps class labels to embedding names")
    data.setdefault("train", {})
    data["train"].setdefault("cases", 100)
    data["train"].setdefault("n_vectors", 64)
    s = data.setdefault("sample", {})
    unknown = sorted(set(s) - SAMPLE_KEYS)
    _need(not unknown, where, f"unknown sample setting(s) {', '.join(unknown)}")
    for key, value in (("steps", 100), ("cfg", 2.0), ("width", 512), ("height", 512), ("seed", 0),
                       ("negative_prompt", ""), ("sampler", "euler_a"), ("batch_size", 1)):
        s.setdefault(key, value)
    _need(s["sampler"] == "euler_a", where, "only the euler_a sampler is available (the paper's)")
    t1 = data.get("table1")
    if t1 is not None:
        t1.setdefault("classes", [next(iter(classes))])
        for c in t1["classes"]:
            _need(c in classes, where, f"table1 class {c!r} is not in 'classes'")
        t1.setdefault("n_generated", 1000)
        real = t1.setdefault("real", {})
        real.setdefault("from", "embedding")
        real.setdefault("n", 1000)
        real.setdefault("disjoint_from_training", False)
        vary = t1.setdefault("vary", {})
        unknown = sorted(set(vary) - set(VARY_KEYS))
        _need(not unknown, where, f"table1.vary: unknown parameter(s) {', '.join(unknown)} (known: {', '.join(VARY_KEYS)})")
        t1.setdefault("metrics", {"fid": {"extractor": "inception", "weights": None}})
        t1.setdefault("preprocessing", "paper")
        b = t1.setdefault("bootstrap", {})
        b.setdefault("reps", 1000)
        b.setdefault("resample", "both")
        b.setdefault("confidence", 0.95)
        t1.setdefault("batch_size", 32)
    t2 = data.get("table2")
    if t2 is not None:
        _need(set(classes) == {"neg", "pos"}, where, "table2 needs classes neg and pos (the classifier's labels)")
        t2.setdefault("column", "prostate")
        t2.setdefault("n_generated", 1000)
        _need(bool(t2.get("mixes")), where, "table2.mixes is empty")
        names = [m.get("name") for m in t2["mixes"]]
        _need(len(set(names)) == len(names) and all(names), where, "table2 mixes need unique names")
        for m in t2["mixes"]:
            _need(isinstance(m.get("real"), int) and isinstance(m.get("synthetic"), int), where,
                  f"mix {m.get('name')}: 'real' and 'synthetic' are whole numbers")
        c = t2.setdefault("classifier", {})
        for key, value in (("steps", 6250), ("batch_size", 32), ("lr", 1e-4), ("size", 196), ("runs", 10),
                           ("augment", True), ("bf16", False), ("weights", None)):
            c.setdefault(key, value)
    _need(t1 is not None or t2 is not None, where, "give 'table1' and/or 'table2'")
    return data


def placeholder_paths(cfg: ExperimentConfig) -> list[str]:
    """Config values still holding the presets' FILL_ME placeholder."""
    found = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, str) and PLACEHOLDER in node:
            found.append(f"{prefix}: {node}")

    walk(cfg.data, "")
    return found
