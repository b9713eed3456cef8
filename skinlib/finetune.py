"""The fine-tuning stage for one profile: tuples, model, training, the saved fine-tuned model.

The 02_finetune notebook calls `run`; on several GPUs the same function runs under accelerate:

    accelerate launch -m skinlib.finetune --profile paper --out runs/paper

after which the notebook finds the finished model and only draws the figures. An interrupted run
(either way) resumes from its last checkpoint when started again.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from . import attributes, config, model as models, needs, qa, resumable, split, tuples, warmup
from .inputs import PACKING, check_packed_attention
from .train import HISTORY, Settings, train

TRAIN_KEYS = set(Settings.__dataclass_fields__)
STAGE_KEYS = {"method", "lora", "w", "tuple_seed", "packed", "keep_images", "compare_steps", "vision_warmup",
              "processes"}


def settings(train_cfg: dict) -> Settings:
    """The loop's settings from a profile's `train` section (its other keys are the stage's)."""
    unknown = set(train_cfg) - TRAIN_KEYS - STAGE_KEYS
    if unknown:
        raise KeyError(f"unknown key(s) in the profile's train section: {sorted(unknown)}; "
                       f"known: {', '.join(sorted(TRAIN_KEYS | STAGE_KEYS))}")
    return Settings.from_dict({k: v for k, v in train_cfg.items() if k in TRAIN_KEYS})


def _say(line: str) -> None:
    """A line on stderr from the main process only (under accelerate every process runs this)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(line, file=sys.stderr)


def base_name(cfg: dict, run) -> str:
    """The base checkpoint's folder or hub id (without building it)."""
    return str(config.base_model_dir(run)) if cfg["model"]["name"] == "tiny" else str(cfg["model"]["name"])


def base_model(cfg: dict, run) -> str:
    """The base checkpoint: the tiny random-init model built into the run folder (sealed; rebuilt,
    with a line saying why, when it fails its seal), or a hub id/folder."""
    m = cfg["model"]
    if m["name"] != "tiny":
        return base_name(cfg, run)
    path = config.base_model_dir(run)
    job = resumable.job_key({"tiny": {k: m.get(k) for k in ("sizes", "seed", "min_pixels", "max_pixels")},
                             "attributes": attributes.fingerprint()})
    problem = resumable.check_dir(path, job)
    if problem is None:
        return str(path)
    if path.exists():
        _say(f"02_finetune: tiny base model {problem}; building it again")
    # one temporary folder per process: under accelerate several may find it damaged at once
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    models.build_tiny(tmp, sizes=m.get("sizes") or None, seed=m["seed"],
                      min_pixels=m["min_pixels"], max_pixels=m["max_pixels"])
    resumable.seal_dir(tmp, job)
    shutil.rmtree(path, ignore_errors=True)
    try:
        os.replace(tmp, path)
    except OSError:   # another process put its (identical) build there first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


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


RECIPE = "recipe.json"
# train keys that cannot change the fine-tuned weights: changing them does not start a new model
NOT_IN_RECIPE = {"compare_steps", "keep_images", "checkpoint_every", "keep_checkpoints"}


def recipe(cfg: dict, run_dir) -> dict:
    """What the fine-tuned weights depend on: the model and train sections, the split's data
    (the manifest's hash: which images, which split, which values) and the attribute registry
    (questions and answer format, which the tuples and the tiny model's tokenizer are made of), and
    with packed training how packed rows are laid out (`inputs.PACKING`; absent without packing, so
    that a run of one tuple per sequence keeps its recipe, and its weights, across that change)."""
    import hashlib

    man = config.manifest_path(run_dir)   # missing: prepare() names it in its own error
    data = hashlib.sha256(man.read_bytes()).hexdigest()[:16] if man.exists() else None
    train = {k: v for k, v in cfg["train"].items() if k not in NOT_IN_RECIPE}
    out = {"model": cfg["model"], "train": train, "manifest": data, "attributes": attributes.fingerprint()}
    if cfg["train"].get("packed"):
        out["packing"] = PACKING
    return json.loads(json.dumps(out))


def recipe_key(cfg: dict, run_dir) -> str:
    """The recipe's job key: the saved model and the tuples are sealed with it."""
    return resumable.job_key(recipe(cfg, run_dir))


def start_recipe(cfg: dict, run_dir) -> bool:
    """True when the stage folder holds a finished model of this recipe (`finished`). Otherwise,
    what another recipe left there (model, checkpoints, tuples, warm-up, tiny base) is removed,
    with a line naming what changed, and this recipe is stamped: a changed profile never resumes
    from, or reuses, another recipe's weights."""
    stage = config.stage_dir(run_dir, "02_finetune")
    stamp, now = stage / RECIPE, recipe(cfg, run_dir)
    before = resumable.read_json(stamp)
    if before == now:
        return finished(run_dir, resumable.job_key(now))
    left = [p for p in (config.finetuned_dir(run_dir), config.checkpoint_dir(run_dir), config.tuples_path(run_dir),
                        stage / warmup.WEIGHTS, config.base_model_dir(run_dir), stage / "launched-profile.yaml")
            if p.exists() or resumable.seal_path(p).exists()]
    if left:
        if before is None:
            what = f"{stamp} is unreadable, so" if stamp.exists() else "no recipe stamp:"
            _say(f"02_finetune: {what} the files in {stage} may be another recipe's; removing "
                 f"{', '.join(p.name for p in left)}")
        else:
            what = ", ".join(_changes(before, now)) or "the recipe"
            _say(f"02_finetune: {what} changed since the files in {stage} were made; removing "
                 f"{', '.join(p.name for p in left)}")
        for p in left:
            shutil.rmtree(p) if p.is_dir() else resumable.remove(p)
    stage.mkdir(parents=True, exist_ok=True)
    resumable.write_json(stamp, now)
    return False


def finished(run_dir, job: str) -> bool:
    """True when the saved model and the tuples of recipe `job` pass their seals. A damaged model
    is named and removed (the next run saves it again from the last checkpoint, without
    retraining); damaged tuples are named (the next run writes them again)."""
    out = config.finetuned_dir(run_dir)
    if not out.exists():
        return False
    problem = models.check_finetuned(out, job)
    if problem is not None:
        _say(f"02_finetune: saved model refused: {problem}; saving it again from the last checkpoint")
        if int(os.environ.get("RANK", 0)) == 0:
            shutil.rmtree(out, ignore_errors=True)
        return False
    problem = resumable.check(config.tuples_path(run_dir), job)
    if problem is not None:
        _say(f"02_finetune: training tuples refused: {problem}; writing them again")
        return False
    return True


def _changes(before, now, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, e.g. ['train.epochs 4.0 -> 7.0']."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [c for k in sorted(set(before) | set(now), key=str)
                for c in _changes(before.get(k), now.get(k), f"{prefix}{k}.")]
    return [] if before == now else [f"{prefix[:-1]} {before!r} -> {now!r}"]


def run(cfg: dict, run_dir, device=None, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train (or resume, or find finished) and save the fine-tuned model; returns a summary."""
    from accelerate import Accelerator

    out = config.finetuned_dir(run_dir)
    procs = int(cfg["train"].get("processes") or 1)
    if procs > 1 and "WORLD_SIZE" not in os.environ and stop_after is None:
        if start_recipe(cfg, run_dir):
            return _saved_summary(out) | {"reused": True}
        launch(cfg, run_dir, procs, progress=progress)
        problem = models.check_finetuned(out, recipe_key(cfg, run_dir))
        if problem is not None:
            raise RuntimeError(f"02_finetune: the launched processes ended without a finished model ({problem}); "
                               f"run the stage again to resume from the last checkpoint in "
                               f"{config.checkpoint_dir(run_dir)}")
        return _saved_summary(out) | {"finished": True, "reused": False}
    # cpu=True also when torch sees no GPU: then `accelerate launch --multi_gpu --num_processes 2`
    # runs as gloo data parallelism on CPU cores instead of two unconnected copies
    acc = Accelerator(cpu=device == "cpu" or (device is None and models.default_device() == "cpu"))
    # What is written once (the tiny base, the tuples) is made by the main process first; the others
    # then read it instead of racing to write the same files. The main process also clears what
    # another recipe left; the others then find the recipe stamped. The vision warm-up, like the
    # training, runs in every process on its share of each batch; the main process saves it.
    with acc.main_process_first():
        if start_recipe(cfg, run_dir):
            return _saved_summary(out) | {"reused": True}
        loaded, tup, cache, st = prepare(cfg, run_dir, device=acc.device, progress=progress)
    job = recipe_key(cfg, run_dir)
    if acc.is_main_process:
        save_tuples(tup, config.tuples_path(run_dir), job)
    if cache.keep:
        cache.fill(tup.isic_id.unique(), progress=progress and acc.is_main_process)
    data = qa.TupleDataset(tup, cache, packed=cfg["train"]["packed"])
    net = loaded.model
    if cfg["train"]["packed"]:
        check_packed_attention(net)
    wu = cfg["train"].get("vision_warmup") or {}
    if wu.get("steps"):
        if cfg["train"]["method"] != "full":
            raise ValueError("train.vision_warmup is for full fine-tuning of a random-init model; "
                             "set its steps to 0 with method 'lora'")
        # every process takes its share of each warm-up batch (data parallel, like the training)
        warmup.warm_up(net, tup, cache, config.stage_dir(run_dir, "02_finetune"), steps=wu["steps"],
                       batch_size=wu["batch_size"], lr=wu["lr"], seed=st.seed,
                       progress=progress and acc.is_main_process, accelerator=acc)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())
    t0 = time.perf_counter()
    result = train(net, data, qa.collate(loaded.tokenizer, loaded.image_processor), st,
                   config.checkpoint_dir(run_dir), accelerator=acc, progress=progress,
                   stop_after=stop_after, count=qa.tuple_counter(loaded.tokenizer))
    if result["step"] < result["total_steps"]:   # only after stop_after: train raises otherwise
        message = (f"02_finetune: stopped after step {result['step']} of {result['total_steps']} "
                   f"(stop_after={stop_after}); no model saved yet. Run again to resume from the last "
                   f"checkpoint in {config.checkpoint_dir(run_dir)}")
        acc.print(message)
        return result | {"finished": False, "message": message}
    summary = {
        "method": cfg["train"]["method"], "base": base_name(cfg, run_dir), "tuples": len(tup),
        "images": int(tup.isic_id.nunique()), "trainable_parameters": trainable,
        "parameters": total, "steps": result["total_steps"], "resumed_from": result["resumed_from"],
        "train_seconds": round(time.perf_counter() - t0, 1), "processes": acc.num_processes,
        "device": str(acc.device), "packed": cfg["train"]["packed"],
        "vision_warmup_steps": int(wu.get("steps") or 0),
    }
    acc.wait_for_everyone()
    if acc.is_main_process:
        # the summary goes into the folder before it is sealed; the seal is written last
        models.save_finetuned(acc.unwrap_model(net), loaded.tokenizer, loaded.image_processor, out,
                              base=summary["base"], method=cfg["train"]["method"], job=job,
                              notes={SUMMARY: summary})
    acc.wait_for_everyone()   # no process returns before the model is whole
    return summary | {"finished": True, "reused": False}


SUMMARY = "summary.json"


def save_tuples(tup: pd.DataFrame, path: Path, job: str) -> None:
    """The training tuples (later stages read them), written whole and sealed with their rows."""
    resumable.remove(path)   # the old seal must not vouch for the new file while it is written
    path.parent.mkdir(parents=True, exist_ok=True)
    tup.to_parquet(resumable.partial_path(path), index=False)
    resumable.commit(path, job, rows=len(tup))


def shown_summary(summary: dict, run_dir) -> dict:
    """The summary as the book prints it: its paths (the base folder, the checkpoint it resumed
    from) relative to the run folder, never this machine's."""
    return {k: config.shown(v, run_dir) if k in ("base", "resumed_from") and v else v for k, v in summary.items()}


def _saved_summary(out: Path) -> dict:
    summary = resumable.read_json(out / SUMMARY)
    if summary is None:
        raise FileNotFoundError(f"{out / SUMMARY}: missing or not whole")
    return summary


def thread_share(cfg: dict, processes: int) -> int:
    """Each of `processes` processes on one machine gets its share of the profile's threads."""
    return max(1, int(cfg.get("threads", 1)) // int(processes))


def launch_command(processes: int, target: list[str]) -> list[str]:
    """`python -m accelerate.commands.launch --multi_gpu --num_processes N ... <target>` on a free
    port (two runs side by side must not share torchrun's 29500); `target` is a script and its
    arguments, or `-m module ...`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), *target]


def launch(cfg: dict, run_dir, processes: int, progress: bool = True) -> None:
    """Run this stage as `accelerate launch --multi_gpu --num_processes N -m skinlib.finetune`.

    Data parallelism through accelerate's own launcher (torchrun underneath): N GPUs on a GPU
    machine, N gloo processes on CPU cores (`run` asks for cpu=True when torch sees no GPU). The
    tiny default trains faster as 2 one-thread processes than as one process on 2 threads
    (bench/processes.py; its row in bench/results.csv). The profile, with the notebook's
    overrides, is handed over as a YAML file in the stage folder; the output is streamed so the
    progress bar shows in the notebook.
    """
    import yaml

    stage = config.stage_dir(run_dir, "02_finetune")
    stage.mkdir(parents=True, exist_ok=True)
    prof = stage / "launched-profile.yaml"
    resumable.write_text(prof, yaml.safe_dump({k: v for k, v in cfg.items() if k != "inherit"}, sort_keys=False))
    cmd = launch_command(processes, ["-m", "skinlib.finetune", "--profile", str(prof), "--out", str(run_dir)]
                         + ([] if progress else ["--quiet"]))
    env = {**os.environ, "OMP_NUM_THREADS": str(thread_share(cfg, processes)), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    seen: list[str] = []
    relay = _Relay() if progress else None
    try:
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):   # tqdm writes \r, not lines
            text = chunk.decode(errors="replace")
            seen.append(text)
            if relay:
                relay.write(text)
        rc = proc.wait()
    except BaseException:   # an interrupted cell stops the workers; the checkpoints stay
        proc.terminate()
        proc.wait()
        raise
    finally:
        if relay:
            relay.flush()
    if rc != 0:
        # torchrun ends with its own summary; the worker's exception is the line to show first
        text = "".join(seen)
        errors = re.findall(r"^(?:\[rank\d+\]: )?(\w+(?:Error|Exception)\b.*)$", text, flags=re.M)
        cause = errors[0] if errors else "(no exception line found)"
        raise RuntimeError(f"fine-tuning under `{' '.join(cmd[2:])}` failed (exit {rc}): {cause}\n"
                           f"last output:\n{text[-3000:]}")


class TerminalView:
    """The text a terminal shows after a stream of output: each line as its last carriage-return
    redraw left it. tqdm redraws a bar with \\r thousands of times; a stored notebook would keep
    every redraw as its own line. Fed in chunks split anywhere; keeps only what is still shown."""

    def __init__(self):
        self.lines: list[str] = []
        self.line = ""   # the line being drawn, from its last non-empty redraw on

    def feed(self, chunk: str) -> None:
        *done, self.line = (self.line + chunk).split("\n")
        self.lines += [self.shown(d) for d in done]
        segs = self.line.split("\r")
        last = max((i for i, seg in enumerate(segs) if seg), default=len(segs) - 1)
        self.line = "\r".join(segs[last:])

    @staticmethod
    def shown(line: str) -> str:
        return next((seg for seg in reversed(line.split("\r")) if seg), "")

    @property
    def text(self) -> str:
        return "\n".join(self.lines + ([self.shown(self.line)] if self.line else []))


class _Relay:
    """Shows a launched process's output as it comes. In a notebook kernel: one output area,
    redrawn in place (at most twice a second) with what a terminal would show, so the stored
    notebook, and the book, keep each bar's last state instead of every redraw. Elsewhere the
    output passes through to stderr, whose terminal redraws the bars itself."""

    def __init__(self, every: float = 0.5):
        self.view, self.every, self.last, self.handle = TerminalView(), every, 0.0, None
        try:
            from IPython import get_ipython
            if getattr(get_ipython(), "kernel", None) is not None:
                from IPython.display import Pretty, display
                self.handle = display(Pretty(""), display_id=True)
        except ImportError:
            pass

    def write(self, text: str) -> None:
        if self.handle is None:
            sys.stderr.write(text)
            sys.stderr.flush()
            return
        self.view.feed(text)
        if time.monotonic() - self.last >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.handle is not None:
            from IPython.display import Pretty
            self.handle.update(Pretty(self.view.text))
            self.last = time.monotonic()


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
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    cfg = config.load_profile(a.profile)
    # under accelerate launch the profile's threads are shared by the processes on this machine
    config.set_threads(thread_share(cfg, os.environ.get("LOCAL_WORLD_SIZE", 1)))
    run_dir = config.run_dir(cfg, a.out)
    # what this and every later stage needs (MONET too), before hours of training
    needs.exit_if_missing(cfg, needs.from_stage("02_finetune"), run_dir)
    summary = run(cfg, run_dir, progress=not a.quiet)
    if int(os.environ.get("RANK", 0)) == 0:   # shown in the notebook when it launched us: no machine paths
        print(json.dumps(shown_summary(summary, run_dir), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
