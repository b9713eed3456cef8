"""What a profile needs from outside the repository, checked in seconds before the chain starts.

    python -m skinlib.needs --profile paper --out runs/paper

The paper profile needs two checkpoints (model.name, embed.encoder.name), the release's two data
files, GPUs for `train.processes`, and tens of GB of disk for the embedding shards. Each is found
missing here, with one line per missing piece saying what to do, instead of hours into the chain:
the data stage, then the training, then method (e) of chapter 4 failing on a download it cannot
make. There is no network: a hub id counts as present only when it is already in the local
Hugging Face cache.

`skinlib.run` checks the stages it is asked to run; `require(cfg, from_stage("02_finetune"), run)`
checks a stage and everything after it (what `skinlib.finetune` starts).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

from . import attributes, config

# What each kind of need is read by (stages of config.STAGES).
DATA_STAGES = config.STAGE_NAMES[1:]                       # every stage after the phantom's reads the release
MODEL_STAGES = ("02_finetune", "03_predict", "04_embed", "07_explore")  # the base (LoRA's, the untuned model)
ENCODER_STAGES = ("04_embed",)                            # method (e)
TRAIN_STAGES = ("02_finetune",)                           # train.processes
SHARD_STAGES = ("04_embed",)                              # the embedding shards

# Files a checkpoint folder must hold, besides config.json and safetensors weights, per model_type.
LAYOUTS = {
    "qwen2_vl": (("preprocessor_config.json",), ("tokenizer_config.json",), ("tokenizer.json", "vocab.json")),
    "clip": (("preprocessor_config.json",),),
}
WHAT = {"qwen2_vl": "a Qwen2-VL checkpoint", "clip": "a CLIP checkpoint (MONET is one)"}
# Weights above this on a machine without a CUDA GPU: the profile is meant for GPUs.
LARGE_WEIGHTS = 4 * 2 ** 30
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class NeedsMissing(ValueError):
    """Some external needs are missing; the message has one line per missing piece."""

    def __init__(self, lines: list[str]):
        self.lines = list(lines)
        super().__init__(f"{len(lines)} thing(s) this run needs are missing (nothing has run yet):\n"
                         + "\n".join(f"  - {line}" for line in lines))


def from_stage(first: str) -> tuple[str, ...]:
    """`first` and every stage after it."""
    return config.STAGE_NAMES[config.STAGE_NAMES.index(first):]


def layout(kind: str) -> str:
    """The files a local folder of `kind` must hold, in words."""
    extra = {"qwen2_vl": ", tokenizer.json (or vocab.json + merges.txt), tokenizer_config.json and "
                         "preprocessor_config.json",
             "clip": " and preprocessor_config.json"}[kind]
    return ("config.json, the safetensors weights (model.safetensors, or model.safetensors.index.json "
            f"with its shards){extra}")


def folder_problem(folder: Path, kind: str) -> str | None:
    """None when `folder` holds a checkpoint of model_type `kind` that loads from safetensors;
    else what is missing or wrong, in words."""
    if not (folder / "config.json").is_file():
        return f"{folder} has no config.json"
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError):
        return f"{folder / 'config.json'} is not a JSON object"
    if model_type != kind:
        return f"{folder / 'config.json'} has model_type {model_type!r}, not {WHAT[kind]} ({kind!r})"
    problems = []
    weights = _weights_problem(folder)
    if weights:
        problems.append(weights)
    for choice in LAYOUTS[kind]:
        if not any((folder / f).is_file() for f in choice):
            problems.append(f"it has no {' or '.join(choice)}")
    if (folder / "vocab.json").is_file() and not (folder / "tokenizer.json").is_file() \
            and not (folder / "merges.txt").is_file():
        problems.append("it has vocab.json but no merges.txt")
    return f"{folder}: " + "; ".join(problems) if problems else None


def _weights_problem(folder: Path) -> str | None:
    if (folder / "model.safetensors").is_file():
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{index.name} is not a safetensors index (no weight_map)"
        lacking = [s for s in shards if not (folder / s).is_file()]
        return f"{len(lacking)} of its {len(shards)} safetensors shards are missing (first: {lacking[0]})" \
            if lacking else None
    if any(folder.glob("*.bin")):
        return ("it has only PyTorch .bin weights, and weights are read from safetensors only (a .bin "
                "file is a pickle, never loaded here): fetch the repository's .safetensors files")
    return "it has no weights (model.safetensors, or model.safetensors.index.json and its shards)"


def hub_cache() -> Path:
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def cached(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot folder of a hub repository, or None when it is not in the cache."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:   # not cached (LocalEntryNotFoundError), a bad id or revision: not there
        return None


def checkpoint(key: str, name: str, kind: str, revision: str | None = None) -> tuple[Path | None, str | None]:
    """(folder, None) where profile key `key` (value `name`) names a usable checkpoint, a local
    folder or a hub id in the local cache; else (None, the line saying what to do)."""
    local = config.resolve_path(name)
    if local.exists():
        problem = folder_problem(local, kind) if local.is_dir() else f"{local} is a file, not a folder"
        if problem is None:
            return local, None
        return None, f"{key} {name!r}: {problem}{_revision_hint(key, problem)}. A local folder needs {layout(kind)}"
    rev = f" --revision {revision}" if revision else ""
    if not HUB_ID.fullmatch(name):
        return None, (f"{key} {name!r}: no such folder ({local}) and not a hub id: set {key} to a hub id "
                      f"or to a folder with {layout(kind)}")
    snap = cached(name, revision)
    if snap is None:
        return None, (f"{key} {name!r}: not a local folder, and not in the Hugging Face cache "
                      f"({hub_cache()}): download it before the chain starts, with "
                      f"`hf download {name}{rev}`, or set {key} to a folder with {layout(kind)}")
    problem = folder_problem(snap, kind)
    if problem is not None:
        return None, (f"{key} {name!r}: the cached copy is incomplete ({problem}): finish it with "
                      f"`hf download {name}{rev}`{_revision_hint(key, problem)}")
    return snap, None


def _revision_hint(key: str, problem: str) -> str:
    # MonetEncoder takes a hub revision: a repository's safetensors conversion (refs/pr/N)
    if key == "embed.encoder.name" and ".bin weights" in problem:
        return "; or set embed.encoder.revision to a revision that has them (e.g. a refs/pr/N conversion)"
    return ""


def weight_bytes(folder: Path) -> int:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        if total:
            return int(total)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def width(folder: Path | None, cfg: dict) -> int | None:
    """The language model's hidden size: the width of every stored vector."""
    if cfg["model"]["name"] == "tiny":
        from .model import TINY_SIZES
        return int({**TINY_SIZES, **(cfg["model"].get("sizes") or {})}["hidden_size"])
    if folder is None:
        return None
    conf = json.loads((folder / "config.json").read_text())
    return int((conf.get("text_config") or {}).get("hidden_size") or conf["hidden_size"])


def encoder_width(folder: Path | None, cfg: dict) -> int | None:
    enc = cfg["embed"]["encoder"]
    if enc["kind"] != "monet":
        from .encoder import ARCH_DEFAULTS
        return int({**ARCH_DEFAULTS, **(enc.get("arch") or {})}["channels"][-1])
    if folder is None:
        return None
    return int(json.loads((folder / "config.json").read_text()).get("projection_dim", 512))


def image_count(cfg: dict) -> int | None:
    """Images in the release: the phantom's size, or the metadata CSV's rows (counted, not parsed)."""
    data = cfg["data"]
    if data["source"] == "phantom":
        return int(data["n_images"])
    path = config.resolve_path(data["metadata_csv"])
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        return max(0, sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b"")) - 1)


def shard_bytes(cfg: dict, n_images: int, d: int, e: int) -> int:
    """Bytes of 04_embed's float16 vectors: per database and query image the tuned h_im and its 16
    h_im,a, the untuned h_im and the multi-attribute vector (all `d` wide) and the encoder's."""
    n_test = round(n_images * cfg["data"]["test_fraction"])
    n_q = min(cfg["embed"]["n_queries"] or n_test, n_test)
    per_image = 2 * (d * (len(attributes.ATTRIBUTES) + 3) + e)
    return (n_images - n_test + n_q) * per_image


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _existing(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def gpu_count() -> int:
    import torch
    return torch.cuda.device_count()


def missing(cfg: dict, stages=None, run=None, gpus: int | None = None, free: int | None = None) -> list[str]:
    """One line per external need of `stages` (default: the whole chain) that is not met. `run`:
    the run folder (for its free disk and the shards already there). `gpus` and `free` (bytes)
    default to what this machine has."""
    stages = set(config.STAGE_NAMES if stages is None else stages)
    unknown = stages - set(config.STAGE_NAMES)
    if unknown:
        raise KeyError(f"unknown stages {sorted(unknown)}; known: {', '.join(config.STAGE_NAMES)}")
    run = Path(run) if run is not None else config.run_dir(cfg)
    lines: list[str] = []
    data = cfg["data"]
    if stages & set(DATA_STAGES) and data["source"] == "slice3d":
        for key, file in (("image_h5", "train-image.hdf5"), ("metadata_csv", "train-metadata.csv")):
            path = config.resolve_path(data[key])
            if not path.is_file():
                lines.append(f"data.{key} {data[key]!r}: {path} not found: put the ISIC 2024 (SLICE-3D) training "
                             f"release's {file} there, or set data.{key} in the profile to where it is")
    model = cfg["model"]["name"]
    model_dir = enc_dir = None
    if stages & set(MODEL_STAGES) and model != "tiny":
        model_dir, line = checkpoint("model.name", model, "qwen2_vl")
        lines += [line] if line else []
    enc = cfg["embed"]["encoder"]
    if stages & set(ENCODER_STAGES) and enc["kind"] == "monet":
        enc_dir, line = checkpoint("embed.encoder.name", enc["name"], "clip", enc.get("revision"))
        lines += [line] if line else []
    if stages & set(TRAIN_STAGES + MODEL_STAGES):
        procs = int(cfg["train"].get("processes") or 1)
        big = model_dir is not None and weight_bytes(model_dir) > LARGE_WEIGHTS
        if procs > 1 or big:
            gpus = gpu_count() if gpus is None else gpus
            if gpus and procs > gpus and stages & set(TRAIN_STAGES):
                lines.append(f"train.processes is {procs} but torch sees {gpus} GPU(s): set train.processes to "
                             f"{gpus} or fewer in the profile, or run where {procs} GPUs are visible "
                             "(CUDA_VISIBLE_DEVICES)")
            if not gpus and big:
                lines.append(f"model.name {model!r} has {_gb(weight_bytes(model_dir))} of weights and torch sees no "
                             "CUDA GPU: run on a GPU machine with torch's CUDA build (environment.yml)")
    if stages & set(SHARD_STAGES):
        n, d, e = image_count(cfg), width(model_dir, cfg), encoder_width(enc_dir, cfg)
        if None not in (n, d, e):
            done = config.stage_dir(run, "04_embed") / "embeddings"
            have = sum(p.stat().st_size for p in done.rglob("*") if p.is_file()) if done.is_dir() else 0
            need = max(0, shard_bytes(cfg, n, d, e) - have)
            free = shutil.disk_usage(_existing(run)).free if free is None else free
            if need > free:
                lines.append(f"disk: the embedding shards of {n:,} images at width {d} need about {_gb(need)} "
                             f"under {run}, and {_gb(free)} is free there: free some space, or give the run "
                             "folder (--out) a larger disk")
    return lines


def require(cfg: dict, stages=None, run=None) -> None:
    """Raise NeedsMissing (one line per missing piece) unless every need of `stages` is met."""
    lines = missing(cfg, stages, run)
    if lines:
        raise NeedsMissing(lines)


def exit_if_missing(cfg: dict, stages=None, run=None) -> None:
    """For a command's main(): print the missing needs (once, under accelerate) and exit 2."""
    try:
        require(cfg, stages, run)
    except NeedsMissing as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default", help="profile name (skinlib/profiles) or a .yaml path")
    ap.add_argument("--out", default=None, help="run folder (default runs/<profile>)")
    ap.add_argument("--stages", nargs="*", help="check only what these stages need (default: the whole chain)")
    a = ap.parse_args(argv)
    try:
        cfg = config.load_profile(a.profile)
        require(cfg, a.stages, config.run_dir(cfg, a.out))
    except (KeyError, ValueError, OSError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    print(f"profile {cfg['name']!r}: every external need is met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
