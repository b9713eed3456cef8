"""Profiles (one YAML each, in skinlib/profiles/) and the paths derived from a run folder.

A profile may `inherit` another and override any key; notebook parameters override the profile
(None means "take the profile's value"). Every key of every profile file is checked against
SCHEMA when it is loaded, so a typo or a wrong type stops the run before any stage, naming the
file and the dotted key. Paths are derived here and nowhere else.

Which way inheritance runs: `paper` inherits `default`, not the reverse. The default is the
profile every test and every fresh clone runs, so it is complete by construction and checked on
every run; `paper.yaml` is then exactly the list of where the paper's run departs from it, each
line with the paper's value, the toy-only settings (vision warm-up, the full-vs-LoRA comparison,
packing) switched off there by name. The other way round, the default would be a list of toy
departures from a profile that cannot run here, and a key missing from it would only show on a
GPU machine.
"""
from __future__ import annotations

import copy
import difflib
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import attributes

PROFILE_DIR = Path(__file__).parent / "profiles"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Stages of the chain, in order: (stage name, notebook source, profile sections it reads).
# A stage's cache key covers only its own sections, so tuning a later stage keeps earlier ones.
STAGES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("00_phantom", "notebooks/00_phantom.py", ("reference",)),
    ("01_data", "notebooks/01_data.py", ("data", "reference")),
    ("02_finetune", "notebooks/02_finetune.py", ("model", "train")),
    ("03_predict", "notebooks/03_predict.py", ("predict",)),
    ("04_embed", "notebooks/04_embed.py", ("embed",)),
    ("05_retrieval", "notebooks/05_retrieval.py", ("retrieval",)),
    ("06_malignancy", "notebooks/06_malignancy.py", ()),
    ("07_explore", "notebooks/07_explore.py", ("retrieval",)),
    ("08_performance", "notebooks/08_performance.py", ()),
)
# Parameters the batch run gives a stage besides profile and out.
STAGE_PARAMETERS: dict[str, dict] = {"07_explore": {"live": False}}
# Files besides the data that a stage reads (hashed into its cache key).
STAGE_INPUTS: dict[str, tuple[str, ...]] = {"03_predict": ("probes/results/scale_r2.csv",),
                                             "05_retrieval": ("probes/results/seed_ordering.csv",),
                                             "08_performance": ("bench/results.csv",)}
STAGE_NAMES: tuple[str, ...] = tuple(s[0] for s in STAGES)


class ProfileError(KeyError, ValueError):
    """A profile that cannot be used (unknown name or key, wrong type); the message is one line.
    A KeyError and a ValueError, for callers that catch either."""

    def __str__(self) -> str:  # KeyError's own would quote the message
        return str(self.args[0])


# ---- the known settings ------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """What one profile key may hold: `kind` ("int", "number", "bool", "str", or "list" of
    `item`s), None when `null`, and only `choices` when given (for a list: of its items)."""
    kind: str
    null: bool = False
    choices: tuple = ()
    item: str = ""

    def problem(self, value) -> str | None:
        """None when `value` fits, else what was expected, in words."""
        if value is None:
            return None if self.null else f"{_WORDS[self.kind]} (not null)"
        if self.kind == "list":
            if not isinstance(value, list) or not all(_fits(self.item, v) for v in value):
                return f"a list of {_WORDS[self.item]}s"
            bad = [v for v in value if self.choices and v not in self.choices]
            return f"a list of known names ({_not_known(bad[0], self.choices)})" if bad else None
        if not _fits(self.kind, value):
            return _WORDS[self.kind] + (" or null" if self.null else "")
        if self.choices and value not in self.choices:
            return "one of " + ", ".join(map(repr, self.choices))
        return None


def _not_known(name, known) -> str:
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f"{name!r} is not one" + (f"; did you mean {close[0]!r}?" if close else "")


_WORDS = {"int": "a whole number", "number": "a number", "bool": "true or false", "str": "text",
          "list": "a list"}


def _fits(kind: str, v) -> bool:
    if isinstance(v, bool):  # YAML's true is an int to Python; never a count
        return kind == "bool"
    return {"int": isinstance(v, int), "number": isinstance(v, (int, float)),
            "str": isinstance(v, str), "bool": False}[kind]


INT, NUM, BOOL, STR = Setting("int"), Setting("number"), Setting("bool"), Setting("str")
OPT_INT, OPT_STR = Setting("int", null=True), Setting("str", null=True)
INTS, NUMS = Setting("list", item="int"), Setting("list", item="number")

# How chapter 3 reads a reply: the likeliest string (the paper's), or the median of the model's
# answer distribution in the answer shape (skinlib/median_reading.py).
READINGS = ("greedy", "median")

# Every key a profile may set, by section: a dict is a mapping of its own keys, a Setting a value.
# The phantom's, the tiny model's and the encoder's keys mirror the code that reads them
# (tests/test_config.py holds them equal: model.TINY_SIZES, train.Settings, encoder.TRAIN_KEYS,
# encoder.ARCH_DEFAULTS / AUGMENT_DEFAULTS).
SCHEMA: dict = {
    "name": STR,
    "inherit": STR,
    "seed": INT,
    "threads": INT,
    "data": {
        # checked by release_files (a value here would fail the chain's own failing-stage test)
        "source": STR,
        "n_images": INT, "phantom_seed": INT, "phantom_workers": INT,
        "image_h5": OPT_STR, "metadata_csv": OPT_STR,
        "on_error": Setting("str", choices=("exclude", "raise")),
        "test_fraction": NUM, "split_seed": INT, "verify_images": BOOL,
    },
    "reference": {"fixtures_dir": STR},
    "model": {
        "name": STR,
        "sizes": {"vision_depth": INT, "vision_embed_dim": INT, "vision_heads": INT, "hidden_size": INT,
                  "text_layers": INT, "text_heads": INT, "text_kv_heads": INT, "intermediate_size": INT,
                  "mrope_section": INTS, "max_position_embeddings": INT},
        "seed": INT, "min_pixels": INT, "max_pixels": INT,
        "dtype": OPT_STR, "attn_implementation": OPT_STR,
    },
    "train": {
        "method": Setting("str", choices=("full", "lora")),
        "lora": {"rank": INT, "alpha": NUM, "dropout": NUM, "vision": BOOL, "language": BOOL},
        "w": INT, "tuple_seed": INT, "packed": BOOL,
        "vision_warmup": {"steps": INT, "batch_size": INT, "lr": NUM},
        "processes": INT, "keep_images": BOOL, "compare_steps": INT,
        # the loop's own (train.Settings)
        "lr": NUM, "batch_size": INT, "epochs": NUM, "warmup_steps": INT, "weight_decay": NUM,
        "grad_clip": NUM, "checkpoint_every": INT, "keep_checkpoints": INT, "seed": INT,
    },
    "predict": {
        "n_images": OPT_INT, "batch_size": INT, "constrain": BOOL,
        "readings": Setting("list", item="str", choices=READINGS),
        "reading": Setting("str", choices=READINGS), "beam": INT,
        "sample": {"k": INT, "n_images": OPT_INT, "seed": INT, "batch_size": INT},
    },
    "embed": {
        "n_queries": OPT_INT, "shard_size": INT, "batch_size": INT,
        "multi": Setting("list", item="str", choices=attributes.NAMES + attributes.COLUMNS),
        "encoder": {
            "kind": Setting("str", choices=("monet", "contrastive")),
            # monet
            "name": STR, "dtype": OPT_STR, "revision": OPT_STR,
            # contrastive (encoder.train_contrastive)
            "epochs": NUM, "batch_size": INT, "lr": NUM, "seed": INT, "steps": OPT_INT,
            "temperature": NUM, "weight_decay": NUM, "warmup_frac": NUM,
            "arch": {"image_size": INT, "channels": INTS, "convs": INTS, "proj_hidden": INT, "proj_dim": INT},
            "augment_params": {"crop_scale": NUMS, "crop_ratio": NUMS, "flip_rot90": BOOL, "brightness": NUM,
                               "contrast": NUM, "channel_gain": NUM, "blur_p": NUM, "noise_std": NUM},
        },
    },
    "retrieval": {"k": INT, "b": INT},
}


def check_profile(cfg: dict, path, schema: dict = SCHEMA, prefix: str = "") -> None:
    """ProfileError for the first key of `cfg` (one profile file, as read) that SCHEMA does not
    know, naming the closest known key, or whose value has the wrong type."""
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(str(key), [str(k) for k in schema], n=1, cutoff=0.6)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"known: {', '.join(schema)}"
            raise ProfileError(f"profile {path}: unknown key {dotted} ({hint})")
        want = schema[key]
        if isinstance(want, dict):
            if not isinstance(value, dict):
                raise ProfileError(f"profile {path}: {dotted} is {value!r} ({type(value).__name__}), "
                                   f"expected a mapping of {', '.join(want)}")
            check_profile(value, path, want, dotted + ".")
        else:
            check_value(dotted, value, want, f"profile {path}")


def check_value(dotted: str, value, want: Setting, where: str) -> None:
    """ProfileError naming `where`, the dotted key, the value and the type expected."""
    expected = want.problem(value)
    if expected is None:
        return
    hint = ""
    if where.startswith("profile") and isinstance(value, str) and want.kind in ("int", "number") \
            and _is_number(value):
        # YAML 1.1 reads 1e-3 (no point before the e) as text, not a number
        hint = "; YAML reads it as text: write it with a point and no quotes, e.g. 1.0e-3"
    raise ProfileError(f"{where}: {dotted} is {value!r} ({type(value).__name__}), expected {expected}{hint}")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _check_sources(cfg: dict, path) -> None:
    """A real release needs both of its files named (checked once inheritance is resolved)."""
    data = cfg.get("data") or {}
    if data.get("source") == "slice3d":
        for key, what in (("image_h5", "<split>-image.hdf5"), ("metadata_csv", "<split>-metadata.csv")):
            if not data.get(key):
                raise ProfileError(f"profile {path}: data.source is 'slice3d' but data.{key} is not set "
                                   f"(the path of the release's {what})")


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def profile_path(profile: str | os.PathLike) -> Path:
    p = Path(profile)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise FileNotFoundError(f"profile file {p} does not exist")
        return p
    p = PROFILE_DIR / f"{profile}.yaml"
    if not p.exists():
        known = sorted(q.stem for q in PROFILE_DIR.glob("*.yaml"))
        close = difflib.get_close_matches(str(profile), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ProfileError(f"unknown profile {profile!r}; {hint}known: {', '.join(known)} (or give a .yaml path)")
    return p


def load_profile(profile: str | os.PathLike = "default", _seen: tuple = ()) -> dict:
    """The profile as a nested dict, with `inherit` resolved; every file's keys checked (SCHEMA)."""
    path = profile_path(profile)
    if path in _seen:
        raise ProfileError(f"profile inheritance loops: {' -> '.join(map(str, _seen + (path,)))}")
    cfg = _read_yaml(path)
    check_profile(cfg, path)
    parent = cfg.pop("inherit", None)
    if parent:
        cfg = _merge(load_profile(parent, _seen + (path,)), cfg)
    if not _seen:
        _check_sources(cfg, path)
    return cfg


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:  # yaml's own message spans several lines
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ProfileError(f"profile {path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(cfg, dict):
        raise ProfileError(f"profile {path}: top level must be a mapping")
    return cfg


def section(profile: str | os.PathLike | dict, name: str, **overrides) -> dict:
    """One section of a profile (e.g. "data") with notebook overrides applied.

    Overrides that are None keep the profile's value; an override the profile does not know, or
    of the wrong type, is an error (a typo in a papermill -p would otherwise be silently ignored).
    """
    cfg = profile if isinstance(profile, dict) else load_profile(profile)
    if name not in cfg:
        raise ProfileError(f"profile {cfg.get('name')!r} has no section {name!r}")
    sec = copy.deepcopy(cfg[name])
    for k, v in overrides.items():
        if k not in sec:
            raise ProfileError(f"parameter {k!r} is not a key of profile section {name!r}; known: {', '.join(sec)}")
        want = SCHEMA.get(name, {}).get(k)
        if v is not None and isinstance(want, Setting):
            check_value(f"{name}.{k}", v, want, f"parameter {k}")
        if v is not None:
            sec[k] = v
    return sec


def run_dir(profile: str | os.PathLike | dict, out: str | os.PathLike | None = None) -> Path:
    """The run folder: `out` if given, else runs/<profile name> under the repository."""
    if out:
        return Path(out)
    cfg = profile if isinstance(profile, dict) else load_profile(profile)
    return REPO_ROOT / "runs" / cfg["name"]


def stage_dir(run: str | os.PathLike, stage: str) -> Path:
    if stage not in STAGE_NAMES:
        raise KeyError(f"unknown stage {stage!r}; known: {', '.join(STAGE_NAMES)}")
    return Path(run) / stage


def stage_stamp_path(run, stage: str) -> Path:
    """What `skinlib.run` wrote when the stage finished: its key, seconds and file listing."""
    return stage_dir(run, stage) / ".stage.json"


def executed_notebook_path(run, stage: str) -> Path:
    """The stage's executed notebook, next to its artifacts."""
    return stage_dir(run, stage) / f"{stage}.ipynb"


# Artifacts, derived from the run folder.
def phantom_dir(run) -> Path:
    return stage_dir(run, "01_data") / "phantom"


def manifest_path(run) -> Path:
    return stage_dir(run, "01_data") / "manifest.parquet"


def exclusions_path(run) -> Path:
    return stage_dir(run, "01_data") / "exclusions.csv"


def release_files(cfg: dict, run) -> tuple[Path, Path]:
    """(image HDF5, metadata CSV) of the run's release: the phantom 01_data wrote, or the real one."""
    data = cfg["data"]
    if data["source"] == "phantom":
        d = phantom_dir(run)
        return d / "train-image.hdf5", d / "train-metadata.csv"
    if data["source"] == "slice3d":
        _check_sources(cfg, f"{cfg.get('name')!r}")
        return resolve_path(data["image_h5"]), resolve_path(data["metadata_csv"])
    raise ValueError(f"profile {cfg.get('name')!r}: data.source must be 'phantom' or 'slice3d', not {data['source']!r}")


def base_model_dir(run) -> Path:
    """Where 02_finetune builds the embedded default's random-init tiny Qwen2-VL."""
    return stage_dir(run, "02_finetune") / "base"


def checkpoint_dir(run) -> Path:
    return stage_dir(run, "02_finetune") / "checkpoints"


def finetuned_dir(run) -> Path:
    """The fine-tuned model (full weights, or the LoRA adapter + a note of its base)."""
    return stage_dir(run, "02_finetune") / "model"


def tuples_path(run) -> Path:
    return stage_dir(run, "02_finetune") / "tuples.parquet"


def predictions_path(run) -> Path:
    """Greedy replies to every question (03_predict)."""
    return stage_dir(run, "03_predict") / "predictions.csv"


def reading_path(run, reading: str) -> Path:
    """One reading's predictions: greedy is predictions.csv, others <reading>.csv (03_predict)."""
    return predictions_path(run) if reading == "greedy" else stage_dir(run, "03_predict") / f"{reading}.csv"


def reply_shards_dir(run, reading: str) -> Path:
    """Where one reading's prediction shards are written as they finish (03_predict)."""
    return stage_dir(run, "03_predict") / ("shards" if reading == "greedy" else f"shards-{reading}")


def sampled_path(run) -> Path:
    """The sampled replies of chapter 3's diagnostic (predict.sample)."""
    return stage_dir(run, "03_predict") / "sampled.csv"


def r2_readings_path(run) -> Path:
    """R² of every reading the profile scores, with intervals, beside r2.csv's headline."""
    return metrics_dir(run) / "r2_readings.csv"


def metrics_dir(run) -> Path:
    """Summaries that scripts and the book read: r2.csv, retrieval.csv."""
    return Path(run) / "metrics"


def r2_path(run) -> Path:
    return metrics_dir(run) / "r2.csv"


def embeddings_dir(run, which: str) -> Path:
    """Shards of one extraction: tuned_db, tuned_queries, untuned_db, ... (04_embed)."""
    return stage_dir(run, "04_embed") / "embeddings" / which


def encoder_dir(run) -> Path:
    """The baseline image encoder, method (e)."""
    return stage_dir(run, "04_embed") / "encoder"


def queries_path(run) -> Path:
    """The query images (test split or its seeded subset), one isic_id per row."""
    return stage_dir(run, "04_embed") / "queries.csv"


def percentiles_path(run) -> Path:
    return stage_dir(run, "05_retrieval") / "percentiles.parquet"


def retrieval_path(run) -> Path:
    return metrics_dir(run) / "retrieval.csv"


def malignancy_path(run) -> Path:
    """The malignancy probes' results: one row per feature set (06_malignancy)."""
    return metrics_dir(run) / "malignancy.csv"


def malignancy_scores_path(run) -> Path:
    """One row per (test lesion, feature set): the probe's score and the label."""
    return metrics_dir(run) / "malignancy_scores.csv"


def malignancy_probe_path(run) -> Path:
    """The attribute probe fitted on the training images' true attributes, as sealed JSON (06_malignancy;
    the explorer applies it to the attributes the model reads)."""
    return stage_dir(run, "06_malignancy") / "attribute_probe.json"


def seed_ordering_path() -> Path:
    """The side study of the ordering across training seeds (probes/seed_study.py), committed."""
    return REPO_ROOT / "probes" / "results" / "seed_ordering.csv"


def scale_r2_path() -> Path:
    """The side study of R² against the number of training images (probes/scale_study.py), committed."""
    return REPO_ROOT / "probes" / "results" / "scale_r2.csv"


def ordering_path(run) -> Path:
    """The Fig. 4 ordering as paired comparisons with bootstrap intervals (05_retrieval)."""
    return metrics_dir(run) / "ordering.csv"


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads: on 2 cores, oversubscription slows training by 10x or more."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    torch.set_num_threads(int(n))


def shown(path, run=None) -> str:
    """A path as the book prints it: relative to the run folder (`<run>/...`) or the repository,
    never this machine's absolute path (a hub id or a relative path is shown as it is)."""
    p = Path(path)
    if not p.is_absolute():
        return str(path)
    p = p.resolve()
    roots = ([(Path(run).resolve(), "<run>/")] if run is not None and p != Path(run).resolve() else [])
    for root, prefix in roots + [(REPO_ROOT.resolve(), "")]:
        if p.is_relative_to(root):
            return prefix + p.relative_to(root).as_posix()
    return p.name


def resolve_path(p: str | os.PathLike) -> Path:
    """A profile's relative path is relative to the repository root, not the current folder."""
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else REPO_ROOT / p
