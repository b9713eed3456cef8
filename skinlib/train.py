"""The fine-tuning loop (paper §3.2): accelerate, a cosine schedule, safetensors checkpoints, resume.

The same loop runs the embedded default on 2 CPU cores and the paper profile on several GPUs
(`accelerate launch`): accelerate places the model, shards the batches across processes and
averages the gradients.

Batches: the epochs' permutations, seeded by (seed, epoch), are read as one stream cut into
optimizer steps of `batch_size` items (a step may span two epochs); each process takes its equal
share of every step. So every batch is full, every process runs the same number of steps (DDP
waits for all of them at every step), and the number of steps is known before the first one.

Interruption: every `checkpoint_every` steps the trainable weights, the optimizer and scheduler
state, the step and every process's RNG state are written (safetensors + JSON, never pickle) into
`<out>/step-XXXXXXX/`, sealed (`resumable.seal_dir`) and renamed into place. `train` resumes from
the newest checkpoint of the same job that passes its seal; the batch order is a function of
(seed, epoch), so a resumed run sees the same batches and ends with the same weights as an
uninterrupted one. The loss history is appended to `<out>/history.csv` as it goes.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import resumable
from .loss import labelled_loss

CHECKPOINT_GLOB = "step-*"
HISTORY = "history.csv"
HISTORY_HEADER = "step,loss,lr,tuples_per_s,seconds"
# Part of every checkpoint's job: a change of how batches are drawn must not resume old checkpoints.
BATCH_ORDER = "epoch-stream-v1"


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
    """The batches of one run, in order, for `processes` processes: `steps` optimizer steps of
    `batch_size * processes` items each, taken from the stream of per-epoch permutations (epoch e
    seeded by (seed, e)); step s is the sampler's batches s*P .. s*P+P-1, one per process.

    Every batch holds exactly `batch_size` items and the sampler yields a multiple of `processes`
    batches: accelerate's shard (`BatchSamplerShard`) then gives every process exactly `steps`
    batches. A short batch at an epoch's end made it drop or pad whole rounds, so processes ran
    fewer steps than planned. The order never depends on when a run was interrupted, nor, for one
    global batch size, on the number of processes. Steps: `epochs * n` items rounded up to whole
    steps (at least one), so every requested item is seen."""

    def __init__(self, n: int, batch_size: int, epochs: float, seed: int, processes: int = 1):
        if n < 1 or batch_size < 1 or processes < 1 or not epochs > 0:
            raise ValueError(f"EpochBatches: need n, batch_size, processes >= 1 and epochs > 0; got n={n}, "
                             f"batch_size={batch_size}, processes={processes}, epochs={epochs}")
        self.n, self.batch_size, self.seed, self.processes = n, batch_size, seed, processes
        self.global_batch = batch_size * processes
        self.steps = max(1, math.ceil(round(epochs * n) / self.global_batch))

    def __len__(self):
        return self.steps * self.processes

    def __iter__(self):
        epoch, perm = None, None
        for b in range(len(self)):
            batch = []
            for pos in range(b * self.batch_size, (b + 1) * self.batch_size):
                e, k = divmod(pos, self.n)
                if e != epoch:
                    epoch, perm = e, np.random.default_rng([self.seed, e]).permutation(self.n)
                batch.append(int(perm[k]))
            yield batch


def batch_plan(n: int, settings: Settings, processes: int = 1) -> EpochBatches:
    """The sampler `train` uses for `n` items on `processes` processes: `batch_size` items per
    optimizer step over all processes (rounded down to a multiple of the process count, and at
    least one item per process)."""
    return EpochBatches(n, max(1, settings.batch_size // processes), settings.epochs, settings.seed, processes)


def job_key(settings: Settings, plan: EpochBatches, model) -> str:
    """What a checkpoint's weights depend on besides the model's start: the settings that change
    the result, the batch plan and the trainable parameters. A checkpoint of another job is never
    resumed."""
    spec = {"settings": {k: v for k, v in asdict(settings).items() if k not in ("checkpoint_every", "keep_checkpoints")},
            "items": plan.n, "global_batch": plan.global_batch, "steps": plan.steps, "batches": BATCH_ORDER,
            "trainable": [[n, list(p.shape)] for n, p in model.named_parameters() if p.requires_grad]}
    return resumable.job_key(spec)


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


def rng_states(accelerator) -> dict[str, torch.Tensor]:
    """Every process's torch RNG state (CPU, and its GPU's on a GPU), gathered to each process as
    `torch.<rank>` / `cuda.<rank>`: dropout masks on one process depend on its own state, which
    differs from the main process's when batches differ in shape."""
    own = {"torch": torch.get_rng_state()}
    if accelerator.device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(accelerator.device)
    out = {}
    for kind, state in own.items():
        if accelerator.num_processes > 1:   # states are equal-length byte vectors: one all-gather
            rows = accelerator.gather(state.to(accelerator.device)[None]).cpu()
        else:
            rows = state[None]
        out.update({f"{kind}.{r}": rows[r].contiguous() for r in range(rows.shape[0])})
    return out


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, keep: int = 2, job: str = "train",
                    rng: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `step` into `out` (temp folder, sealed, then renamed); keep the newest `keep`.
    `rng`: the processes' RNG states (`rng_states`; default this process's CPU state as rank 0)."""
    root = Path(out)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    opt_t, opt_j = _optimizer_tensors(optimizer)
    save_file(opt_t, tmp / "optimizer.safetensors")
    save_file(rng or {"torch.0": torch.get_rng_state()}, tmp / "rng.safetensors")
    resumable.write_json(tmp / "state.json", {
        "step": step, "optimizer": opt_j,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
    })
    resumable.seal_dir(tmp, job)   # last: a folder without its seal was never finished
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob(CHECKPOINT_GLOB))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def latest_checkpoint(out, job: str | None = None, say=_say) -> Path | None:
    """The newest checkpoint in `out` that passes its seal (of `job`, where given). Checkpoints
    that fail are skipped, with one line (through `say`) naming each and what is wrong, and which
    checkpoint the run resumes from instead."""
    root = Path(out)
    found = sorted(root.glob(CHECKPOINT_GLOB), reverse=True) if root.is_dir() else []
    bad = []
    for ckpt in found:
        problem = resumable.check_dir(ckpt, job)
        if problem is None:
            break
        bad.append(problem)
    else:
        ckpt = None
    if bad:
        then = f"resuming from {ckpt.name}" if ckpt else "starting from step 0"
        say(f"skipping damaged checkpoint(s): {'; '.join(bad)}; {then}")
    return ckpt


def load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    """Restore a checkpoint into model / optimizer / scheduler; returns its step."""
    path = Path(path)
    state = resumable.read_json(path / "state.json")
    if state is None:
        raise ValueError(f"{path}: state.json is missing or not whole")
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


def checkpoint_rng(path: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    """Process `rank`'s RNG states saved with a checkpoint ({"torch": ..., "cuda": ... on a GPU});
    rank 0's where the checkpoint was written by fewer processes."""
    saved = load_file(Path(path) / "rng.safetensors")
    out = {}
    for kind in ("torch", "cuda"):
        state = saved.get(f"{kind}.{rank}", saved.get(f"{kind}.0"))
        if state is not None:
            out[kind] = state
    return out


def set_rng(states: dict[str, torch.Tensor], device) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


# ---------------------------------------------------------------------------- history
def trim_history(path: Path, step: int) -> None:
    """Keep the history rows of steps up to `step` (those after a checkpoint are redone); a row cut
    short by a killed run is dropped too."""
    path = Path(path)
    if step == 0 or not path.exists():
        path.unlink(missing_ok=True)
        return
    width = HISTORY_HEADER.count(",") + 1
    keep = [ln for ln in path.read_text().splitlines()[1:]
            if ln.count(",") + 1 == width and ln.split(",", 1)[0].isdigit() and int(ln.split(",", 1)[0]) <= step]
    resumable.write_text(path, "\n".join([HISTORY_HEADER, *keep]) + "\n")


def append_history(path: Path, step: int, loss: float, lr: float, rate: float, seconds: float) -> None:
    new = not path.exists()
    with path.open("a") as f:
        if new:
            f.write(HISTORY_HEADER + "\n")
        f.write(f"{step},{loss:.6f},{lr:.3e},{rate:.3f},{seconds:.3f}\n")


# ---------------------------------------------------------------------------- the loop
def train(model, dataset, collate, settings: Settings, out, accelerator=None, progress: bool = True,
          stop_after: int | None = None, count=None) -> dict:
    """Fine-tune `model` (its parameters with requires_grad) on `dataset` items batched by `collate`
    (which returns the model's keyword inputs, `labels` included). `out` is the checkpoint folder
    (checkpoints `step-*` and history.csv); the run resumes from its newest sound checkpoint.
    `stop_after` ends the run after that many optimizer steps of this call (used to test
    interruption). `count(batch)` gives the number of tuples in a batch for the throughput figure
    (default: the batch's first dimension).

    Returns {"step", "total_steps", "resumed_from", "seconds"}; "step" is below "total_steps" only
    after `stop_after`.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    acc = accelerator or Accelerator()
    torch.manual_seed(settings.seed)
    plan = batch_plan(len(dataset), settings, acc.num_processes)
    total = plan.steps
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=plan, collate_fn=collate)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train: the model has no trainable parameters")
    for p in model.parameters():   # a caller's gradients (e.g. a warm-up's) must not enter step 1
        p.grad = None
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    # Not prepared: accelerate would step it once per process per optimizer step. This loop steps
    # it once per optimizer step, so its length is the plan's steps on any number of processes.
    scheduler = cosine_schedule(optimizer, settings.warmup_steps, total)
    job = job_key(settings, plan, model)
    model, optimizer, loader = acc.prepare(model, optimizer, loader)
    if len(loader) != total:
        raise RuntimeError(f"train: this process's data loader holds {len(loader)} batches, the plan {total} "
                           f"steps ({plan.n} items, {plan.processes} process(es) of {plan.batch_size})")

    start, resumed, rng = 0, None, None
    ckpt = latest_checkpoint(out, job, say=acc.print)
    if ckpt is not None:
        start = load_checkpoint(ckpt, acc.unwrap_model(model), optimizer, scheduler)
        resumed, rng = str(ckpt), checkpoint_rng(ckpt, acc.process_index)
        acc.print(f"resuming from {ckpt} (step {start} of {total})")
    history = out / HISTORY
    acc.wait_for_everyone()   # every process has chosen its checkpoint before any is removed
    if acc.is_main_process:
        trim_history(history, start)
        # checkpoints after the one resumed are redone (and may be the damaged ones skipped)
        for later in sorted(out.glob(CHECKPOINT_GLOB)):
            if later.name > f"step-{start:07d}":
                shutil.rmtree(later, ignore_errors=True)
    acc.wait_for_everyone()
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
                set_rng(rng, acc.device)
                rng = None
            with acc.accumulate(model):
                # the LM head only where labels are, not (rows, length, vocab) logits; the same
                # loss as model(**batch).loss (skinlib/loss.py)
                loss = labelled_loss(model, batch)
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
                append_history(history, step, lval, scheduler.get_last_lr()[0], rate, time.perf_counter() - t0)
            if step % settings.checkpoint_every == 0 or step == total:
                states = rng_states(acc)   # every process takes part in the gather
                acc.wait_for_everyone()
                if acc.is_main_process:
                    save_checkpoint(out, step, acc.unwrap_model(model), optimizer, scheduler,
                                    settings.keep_checkpoints, job=job, rng=states)
            if stop_after is not None and step - start >= stop_after:
                break
    finally:
        bar.close()
    if step < total and (stop_after is None or step - start < stop_after):
        raise RuntimeError(f"train: the data loader ended after step {step} of the planned {total} "
                           f"({plan.n} items, {plan.processes} process(es) of {plan.batch_size}); "
                           f"the last checkpoint is kept in {out}")
    return {"step": step, "total_steps": total, "resumed_from": resumed,
            "seconds": time.perf_counter() - t0}
