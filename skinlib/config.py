"""Profiles (one YAML each, in skinlib/profiles/) and the paths derived from a run folder.

A profile may `inherit` another and override any key; notebook parameters override the profile
(None means "take the profile's value"). Paths are derived here and nowhere else.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

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
    ("06_explore", "notebooks/06_explore.py", ("retrieval",)),
    ("07_performance", "notebooks/07_performance.py", ()),
)
# Parameters the batch run gives a stage besides profile and out.
STAGE_PARAMETERS: dict[str, dict] = {"06_explore": {"live": False}}
# Files besides the data that a stage reads (hashed into its cache key).
STAGE_INPUTS: dict[str, tuple[str, ...]] = {"07_performance": ("bench/results.csv",)}
STAGE_NAMES: tuple[str, ...] = tuple(s[0] for s in STAGES)


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
        raise KeyError(f"unknown profile {profile!r}; known: {', '.join(known)} (or give a .yaml path)")
    return p


def load_profile(profile: str | os.PathLike = "default", _seen: tuple = ()) -> dict:
    """The profile as a nested dict, with `inherit` resolved."""
    path = profile_path(profile)
    if path in _seen:
        raise ValueError(f"profile inheritance loops: {' -> '.join(map(str, _seen + (path,)))}")
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"profile {path}: top level must be a mapping")
    parent = cfg.pop("inherit", None)
    if parent:
        cfg = _merge(load_profile(parent, _seen + (path,)), cfg)
    return cfg


def section(profile: str | os.PathLike | dict, name: str, **overrides) -> dict:
    """One section of a profile (e.g. "data") with notebook overrides applied.

    Overrides that are None keep the profile's value; an override the profile does not know is an
    error (a typo in a papermill -p would otherwise be silently ignored).
    """
    cfg = profile if isinstance(profile, dict) else load_profile(profile)
    if name not in cfg:
        raise KeyError(f"profile {cfg.get('name')!r} has no section {name!r}")
    sec = copy.deepcopy(cfg[name])
    for k, v in overrides.items():
        if k not in sec:
            raise KeyError(f"parameter {k!r} is not a key of profile section {name!r}; known: {', '.join(sec)}")
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
    return stage_dir(run, "03_predict") / "predictions.csv"


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


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads: on 2 cores, oversubscription slows training by 10x or more."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    torch.set_num_threads(int(n))


def resolve_path(p: str | os.PathLike) -> Path:
    """A profile's relative path is relative to the repository root, not the current folder."""
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else REPO_ROOT / p
