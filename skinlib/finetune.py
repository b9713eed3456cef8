"""The fine-tuning stage for one profile: tuples, model, training, the saved fine-tuned model.

The 02_finetune notebook calls `run`; on several GPUs the same function runs under accelerate:

    accelerate launch -m skinlib.finetune --profile paper --out runs/paper

after which the notebook finds the finished model and only draws the figures. An interrupted run
(either way) resumes from its last checkpoint when started again.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

from . import config, model as models, qa, split, tuples, warmup
from .train import HISTORY, Settings, train

TRAIN_KEYS = set(Settings.__dataclass_fields__)
STAGE_KEYS = {"method", "lora", "w", "tuple_seed", "packed", "keep_images", "compare_steps", "vision_warmup"}


def settings(train_cfg: dict) -> Settings:
    """The loop's settings from a profile's `train` section (its other keys are the stage's)."""
    unknown = set(train_cfg) - TRAIN_KEYS - STAGE_KEYS
    if unknown:
        raise KeyError(f"unknown key(s) in the profile's train section: {sorted(unknown)}; "
                       f"known: {', '.join(sorted(TRAIN_KEYS | STAGE_KEYS))}")
    return Settings.from_dict({k: v for k, v in train_cfg.items() if k in TRAIN_KEYS})


def base_model(cfg: dict, run) -> str:
    """The base checkpoint: the tiny random-init model built into the run folder, or a hub id/folder."""
    m = cfg["model"]
    if m["name"] == "tiny":
        path = config.base_model_dir(run)
        if not (path / "config.json").exists():
            models.build_tiny(path, sizes=m.get("sizes") or None, seed=m["seed"],
                              min_pixels=m["min_pixels"], max_pixels=m["max_pixels"])
        return str(path)
    return str(m["name"])


def prepare(cfg: dict, run, device=None, progress: bool = True):
    """(loaded model ready to train, training tuples, image cache, settings) for a profile."""
    m, t = cfg["model"], cfg["train"]
    if t["method"] not in ("full", "lora"):
        raise ValueError(f"train.method must be 'full' or 'lora', not {t['method']!r}")
    manifest = split.load_manifest(config.manifest_path(run))
    trn = manifest[manifest.split == "train"]
    tup = tuples.sample_tuples(trn, w=t["w"], seed=t["tuple_seed"])
    loaded = models.load(base_model(cfg, run), dtype=m.get("dtype"), device=device,
                         attn_implementation=m.get("attn_implementation"),
                         min_pixels=m["min_pixels"], max_pixels=m["max_pixels"])
    net = loaded.model
    if t["method"] == "lora":
        lo = t["lora"]
        net = models.apply_lora(net, rank=lo["rank"], alpha=lo["alpha"], dropout=lo["dropout"],
                                vision=lo["vision"], language=lo["language"])
    else:
        net.requires_grad_(True)
    from . import slice3d
    release = slice3d.Slice3D(*config.release_files(cfg, run), on_error=cfg["data"]["on_error"])
    cache = qa.ImageCache(release, loaded.image_processor, keep=t["keep_images"])
    return models.Loaded(net, loaded.tokenizer, loaded.image_processor), tup, cache, settings(t)


def run(cfg: dict, run_dir, device=None, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train (or resume, or find finished) and save the fine-tuned model; returns a summary."""
    from accelerate import Accelerator

    out = config.finetuned_dir(run_dir)
    if (out / models.FINETUNE_NOTE).exists():
        return json.loads((out / "summary.json").read_text()) | {"reused": True}
    acc = Accelerator(cpu=device == "cpu")
    loaded, tup, cache, st = prepare(cfg, run_dir, device=acc.device, progress=progress)
    config.tuples_path(run_dir).parent.mkdir(parents=True, exist_ok=True)
    tup.to_parquet(config.tuples_path(run_dir), index=False)
    if cache.keep:
        cache.fill(tup.isic_id.unique(), progress=progress and acc.is_main_process)
    data = qa.TupleDataset(tup, cache, packed=cfg["train"]["packed"])
    net = loaded.model
    wu = cfg["train"].get("vision_warmup") or {}
    if wu.get("steps"):
        if cfg["train"]["method"] != "full":
            raise ValueError("train.vision_warmup is for full fine-tuning of a random-init model; "
                             "set its steps to 0 with method 'lora'")
        warmup.warm_up(net, tup, cache, config.stage_dir(run_dir, "02_finetune"), steps=wu["steps"],
                                batch_size=wu["batch_size"], lr=wu["lr"], seed=st.seed,
                                progress=progress and acc.is_main_process)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())
    t0 = time.perf_counter()
    result = train(net, data, qa.collate(loaded.tokenizer, loaded.image_processor), st,
                   config.checkpoint_dir(run_dir), accelerator=acc, progress=progress,
                   stop_after=stop_after, count=qa.tuple_counter(loaded.tokenizer))
    if result["step"] < result["total_steps"]:
        return result | {"finished": False}
    summary = {
        "method": cfg["train"]["method"], "base": base_model(cfg, run_dir), "tuples": len(tup),
        "images": int(tup.isic_id.nunique()), "trainable_parameters": trainable,
        "parameters": total, "steps": result["total_steps"], "resumed_from": result["resumed_from"],
        "train_seconds": round(time.perf_counter() - t0, 1), "processes": acc.num_processes,
        "device": str(acc.device), "packed": cfg["train"]["packed"],
        "vision_warmup_steps": int(wu.get("steps") or 0),
    }
    acc.wait_for_everyone()
    if acc.is_main_process:
        models.save_finetuned(acc.unwrap_model(net), loaded.tokenizer, loaded.image_processor, out,
                              base=summary["base"], method=cfg["train"]["method"])
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary | {"finished": True, "reused": False}


def compare_methods(cfg: dict, run_dir, steps: int = 150, methods=("full", "lora")) -> pd.DataFrame:
    """Train the base model a few steps with each method on the same batches (fresh copies, a
    scratch folder); returns the loss histories (step, loss, ..., method). For the book's "why
    full fine-tuning" figure: cheap, and measured rather than asserted."""
    import tempfile

    frames = []
    for method in methods:
        c = {**cfg, "train": {**cfg["train"], "method": method}}
        loaded, tup, cache, st = prepare(c, run_dir, device="cpu")
        st.checkpoint_every = 10 ** 9  # no checkpoints: a scratch run
        data = qa.TupleDataset(tup, cache, packed=c["train"]["packed"])
        with tempfile.TemporaryDirectory() as tmp:
            train(loaded.model, data, qa.collate(loaded.tokenizer, loaded.image_processor), st, tmp,
                  progress=False, stop_after=steps, count=qa.tuple_counter(loaded.tokenizer))
            h = pd.read_csv(Path(tmp) / HISTORY)
        frames.append(h.assign(method=method))
    return pd.concat(frames, ignore_index=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--out", default=None, help="run folder (default runs/<profile>)")
    a = ap.parse_args(argv)
    cfg = config.load_profile(a.profile)
    config.set_threads(cfg.get("threads", 1))
    summary = run(cfg, config.run_dir(cfg, a.out))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
