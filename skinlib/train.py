"""The fine-tuning loop (paper §3.2): accelerate, a cosine schedule, safetensors checkpoints, resume.

The same loop runs the embedded default on 2 CPU cores and the paper profile on several GPUs
(`accelerate launch`): accelerate places the model, shards the batches across processes and
averages the gradients; nothing here knows how many processes there are.

Interruption: every `checkpoint_every` steps the trainable weights, the optimizer and scheduler
state, the step and the RNG state are written (safetensors + JSON, never pickle) into
`<out>/checkpoints/step-XXXXXXX/`, atomically. `train` resumes from the newest one it finds; the
batch order is a function of (seed, epoch), so a resumed run sees the same batches and ends with
the same weights as an uninterrupted one. The loss history is appended to `<out>/history.csv` as
it goes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
HISTORY = "history.csv"


@dataclass
class Settings:
    lr: float = 1e-4             # paper: 1e-4, cosine
    batch_size: int = 16         # paper: 16 (per optimizer step, over all processes)
    epochs: float = 1.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint_every: int = 200  # optimizer steps
    keep_checkpoints: int = 2
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise KeyError(f"unknown training setting(s) {sorted(unknown)}; known: {sorted(known)}")
        whole = {f.name for f in fields(cls) if f.type == "int"}   # annotations are strings here
        out = {}
        for k, v in d.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (k in whole and not float(v).is_integer()):
                # YAML 1.1 reads 2e-3 (no point before the e) as the string "2e-3", not a number
                hint = "; write it with a point, e.g. 2.0e-3" if isinstance(v, str) else ""
                raise TypeError(f"training setting {k!r} must be {'a whole number' if k in whole else 'a number'}, "
                                f"got {v!r} ({type(v).__name__}){hint}")
            out[k] = int(v) if k in whole else v
        return cls(**out)


def cosine_schedule(optimizer, warmup: int, total: int):
    """Linear warm-up to the base lr, then cosine decay to 0 at `total` steps."""
    def factor(step):
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        t = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EpochBatches(torch.utils.data.Sampler):
    """Batches of indices for every epoch in a row, each epoch a permutation seeded by (seed,
    epoch): the order never depends on when a run was interrupted."""

    def __init__(self, n: int, batch_size: int, epochs: float, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = math.ceil(n / batch_size)
        self.total = max(1, int(round(epochs * self.per_epoch)))

    def __len__(self):
        return self.total

    def __iter__(self):
        for b in range(self.total):
            epoch, k = divmod(b, self.per_epoch)
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            yield perm[k * self.batch_size:(k + 1) * self.batch_size].tolist()


# ---------------------------------------------------------------------------- checkpoints
def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically (temp folder, then rename); keep the newest `keep`."""
    root = Path(out) / CHECKPOINTS
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    opt_t, opt_j = _optimizer_tensors(optimizer)
    save_file(opt_t, tmp / "optimizer.safetensors")
    rng = {"torch": torch.get_rng_state()}
    save_file(rng, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({
        "step": step, "optimizer": opt_j,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
    }, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out) -> Path | None:
    root = Path(out) / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").exists()) if root.exists() else []
    return done[-1] if done else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    """Restore a checkpoint into model / optimizer / scheduler; returns its step."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    unknown = set(weights) - set(params)
    if unknown:
        raise KeyError(f"{path}: checkpoint holds parameters the model lacks: {sorted(unknown)[:5]}")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    opt_t = load_file(path / "optimizer.safetensors")
    sd = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
    for key, v in list(opt_t.items()) + list(state["optimizer"]["scalars"].items()):
        pid, k = key.split(".", 1)
        sd["state"].setdefault(int(pid), {})[k] = v
    optimizer.load_state_dict(sd)
    sched = scheduler.state_dict()
    sched.update(state["scheduler"])
    scheduler.load_state_dict(sched)
    return int(state["step"])


def checkpoint_rng(path: Path) -> torch.Tensor:
    """The torch RNG state saved with a checkpoint (dropout masks depend on it)."""
    return load_file(Path(path) / "rng.safetensors")["torch"]


# ---------------------------------------------------------------------------- the loop
def train(model, dataset, collate, settings: Settings, out, accelerator=None, progress: bool = True,
          stop_after: int | None = None, count=None) -> dict:
    """Fine-tune `model` (its parameters with requires_grad) on `dataset` items batched by `collate`
    (which returns the model's keyword inputs, `labels` included). Resumes from the newest
    checkpoint under `out`. `stop_after` ends the run after that many optimizer steps of this
    call (used to test interruption). `count(batch)` gives the number of tuples in a batch for
    the throughput figure (default: the batch's first dimension).

    Returns {"step", "total_steps", "resumed_from", "seconds"}.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    acc = accelerator or Accelerator()
    torch.manual_seed(settings.seed)
    # Each process takes every num_processes-th batch of the sampler (accelerate's default), so a
    # batch here is one process's share of the paper's global batch.
    per_process = max(1, settings.batch_size // acc.num_processes)
    sampler = EpochBatches(len(dataset), per_process, settings.epochs, settings.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train: the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    # accelerate steps a prepared scheduler once per process per optimizer step: its length is
    # counted in sampler batches, the progress in optimizer steps
    scheduler = cosine_schedule(optimizer, settings.warmup_steps * acc.num_processes, len(sampler))
    total = math.ceil(len(sampler) / acc.num_processes)
    model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)

    start, resumed, rng = 0, None, None
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        start = load_checkpoint(ckpt, acc.unwrap_model(model), optimizer, scheduler)
        resumed, rng = str(ckpt), checkpoint_rng(ckpt)
        acc.print(f"resuming from {ckpt} (step {start} of {total})")
    history = out / HISTORY
    if start == 0 and history.exists():
        history.unlink()
    elif history.exists():  # drop the rows of steps after the checkpoint: they are redone
        lines = history.read_text().splitlines()
        keep = [lines[0]] + [ln for ln in lines[1:] if int(ln.split(",", 1)[0]) <= start]
        history.write_text("\n".join(keep) + "\n")
    count = count or (lambda b: int(b["input_ids"].shape[0]))

    model.train()
    t0, seen, step = time.perf_counter(), 0, start
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not (progress and acc.is_main_process))
    batches = acc.skip_first_batches(loader, start) if start else loader
    try:
        for batch in batches:
            if rng is not None:
                # restored only now: starting a data-loader iterator draws from the torch RNG,
                # which the uninterrupted run did once before its first step, not here
                torch.set_rng_state(rng)
                rng = None
            with acc.accumulate(model):
                loss = model(**batch).loss
                acc.backward(loss)
                if settings.grad_clip:
                    acc.clip_grad_norm_(params, settings.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            seen += count(batch) * acc.num_processes
            rate = seen / (time.perf_counter() - t0)
            lval = float(acc.gather(loss.detach()).mean())
            bar.set_postfix(loss=f"{lval:.3f}", tuples_s=f"{rate:.1f}")
            bar.update(1)
            if acc.is_main_process:
                new = not history.exists()
                with history.open("a") as f:
                    if new:
                        f.write("step,loss,lr,tuples_per_s,seconds\n")
                    f.write(f"{step},{lval:.6f},{scheduler.get_last_lr()[0]:.3e},{rate:.3f},"
                            f"{time.perf_counter() - t0:.3f}\n")
            if step % settings.checkpoint_every == 0 or step == total:
                acc.wait_for_everyone()
                if acc.is_main_process:
                    save_checkpoint(out, step, acc.unwrap_model(model), optimizer, scheduler,
                                    settings.keep_checkpoints)
            if stop_after is not None and step - start >= stop_after:
                break
    finally:
        bar.close()
    return {"step": step, "total_steps": total, "resumed_from": resumed,
            "seconds": time.perf_counter() - t0}
