"""Vision warm-up for a random-init model: a linear read-out of the vision tower, thrown away after.

The paper fine-tunes a Qwen2-VL whose vision tower was pretrained on millions of images: it already
sees lesions, and the language model already reads its tokens. The tiny default starts from random
weights; trained on question–answer tuples alone, its language model learns each attribute's usual
answer long before its vision tower learns to see the lesion, and it stalls there (the book shows
the measurement). A short warm-up stands in for the missing pretraining: the vision tower's output
tokens are averaged, a linear read-out regresses the *same training tuples'* values (standardised,
only the W attributes drawn per image), and after some hundreds of steps the read-out is discarded.
The model that is then fine-tuned is an ordinary Qwen2-VL; no test image and no other label is used.
"""
from __future__ import annotations

import contextlib
import hashlib
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import attributes, resumable

WEIGHTS = "vision-warmup.safetensors"


def targets(tup: pd.DataFrame, names=None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image ids, standardised values (n, A) with NaN where not drawn, and the mask) from tuples."""
    atts = [a.name for a in attributes.resolve(names)]
    unknown = set(tup.attribute) - set(atts)
    if unknown:
        raise KeyError(f"warm-up: tuples name unknown attribute(s) {sorted(unknown)}")
    wide = tup.pivot_table(index="isic_id", columns="attribute", values="value", aggfunc="first", sort=False)
    wide = wide.reindex(columns=atts)
    vals = wide.to_numpy(float)
    seen = np.isfinite(vals)
    n = seen.sum(0)
    mu = np.where(seen, vals, 0).sum(0) / np.maximum(n, 1)  # attributes never drawn: no NaN warnings
    sd = np.sqrt(np.where(seen, (vals - mu) ** 2, 0).sum(0) / np.maximum(n, 1))
    sd = np.where(sd > 0, sd, 1.0)
    z = (vals - mu) / sd
    return list(wide.index), z, np.isfinite(z)


def _pooled(visual, encoded) -> torch.Tensor:
    """Mean of the vision tower's (merged) output tokens per image."""
    out = visual(torch.cat([e.pixel_values for e in encoded]).to(next(visual.parameters()).device),
                 grid_thw=torch.stack([e.grid_thw for e in encoded]).to(next(visual.parameters()).device))
    tokens = out.pooler_output if hasattr(out, "pooler_output") else out
    counts = [int(e.grid_thw.prod()) // visual.spatial_merge_size ** 2 for e in encoded]
    return torch.stack([t.mean(0) for t in torch.split(tokens, counts)])


def job_key(visual, ids, z, steps: int, batch_size: int, lr: float, seed: int) -> str:
    """What the warmed weights depend on: the settings, the targets (ids and standardised values)
    and the tower's parameters (names and shapes; the recipe stamp covers where they came from)."""
    targets = hashlib.sha256(("\n".join(ids)).encode() + np.ascontiguousarray(z).tobytes()).hexdigest()[:16]
    return resumable.job_key({"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "targets": targets,
                              "tower": [[n, list(p.shape)] for n, p in visual.named_parameters()]})


def _tower(model):
    return model.model.visual if hasattr(model, "model") and hasattr(model.model, "visual") else model.visual


def warm_up(model, tup: pd.DataFrame, images, out_dir, steps: int = 400, batch_size: int = 32,
            lr: float = 1e-3, seed: int = 0, progress: bool = True, accelerator=None) -> dict:
    """Warm up `model`'s vision tower in place (see the module doc); returns {steps, loss_start,
    loss_end}. The warmed weights are saved (sealed) in `out_dir`; a second call of the same job
    loads them instead of training again (an interrupted fine-tuning run does not redo the
    warm-up). A saved file that fails its seal is named and trained again.

    Both ways leave the model in the same state apart from the tower's weights: no gradients, the
    same requires_grad and train/eval flags, and the global torch RNG as it was (so a resumed run
    that loads the warm-up continues exactly as the run that trained it).

    With an `accelerator` of several processes, every process must call this: each draws the same
    batch of `batch_size` images, encodes its share (every N-th), and the gradients are summed
    across processes, so each step is the one-process step on the whole batch (float-level
    differences aside) and no process waits idle for another. The main process saves the weights.
    (On 2 CPU cores it takes as long as one process on both cores: the tower's products already
    use two threads well.)"""
    from safetensors.torch import load_file

    visual = _tower(model)
    path = Path(out_dir) / WEIGHTS
    ids, z, mask = targets(tup)
    job = job_key(visual, ids, z, steps, batch_size, lr, seed)
    rank = accelerator.process_index if accelerator else 0
    problem = resumable.check(path, job)
    if problem is None:
        visual.load_state_dict(load_file(path))
        return {"steps": steps, "reused": str(path)}
    if rank == 0 and (path.exists() or resumable.seal_path(path).exists()):
        print(f"vision warm-up: {problem}; training it again", file=sys.stderr)
    dev = next(visual.parameters()).device
    with _kept_state(visual, dev):
        losses = _train_tower(visual, images, ids, z, mask, steps, batch_size, lr, seed, progress, accelerator)
    if rank == 0:
        _save(visual, path, job)
    return {"steps": steps, "loss_start": float(np.mean(losses[:20])), "loss_end": float(np.mean(losses[-20:]))}


@contextlib.contextmanager
def _kept_state(visual, device):
    """Restore what training the tower changes besides its weights: each module's train/eval
    flag, each parameter's requires_grad and gradient (the warm-up's last gradients would be added
    into the first fine-tuning step), and the global torch RNG (CPU, and the tower's GPU)."""
    device = torch.device(device)
    modes = [(m, m.training) for m in visual.modules()]
    params = [(p, p.requires_grad, p.grad) for p in visual.parameters()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training
            for p, flag, grad in params:
                p.grad = grad
                p.requires_grad_(flag)


def _train_tower(visual, images, ids, z, mask, steps, batch_size, lr, seed, progress, accelerator) -> list[float]:
    """The warm-up steps (a linear read-out of the tower's mean token, discarded after); returns
    this process's estimate of each step's batch loss."""
    from tqdm.auto import tqdm

    y = torch.tensor(np.nan_to_num(z), dtype=torch.float32)
    m = torch.tensor(mask, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dim = visual.merger.mlp[-1].out_features
    head = torch.nn.Linear(dim, y.shape[1]).to(next(visual.parameters()).device)
    visual.train()
    for p in visual.parameters():
        p.requires_grad_(True)
    params = list(visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    losses = []
    bar = tqdm(range(steps), desc="vision warm-up", unit="step", disable=not progress)
    for _ in bar:
        idx = torch.randperm(len(ids), generator=gen)[:batch_size]   # the same draw in every process
        seen = m[idx].sum().clamp(min=1)
        mine = idx[rank::world]
        pred = head(_pooled(visual, [images[ids[i]] for i in mine.tolist()]))
        dev = pred.device
        # this process's share of the whole batch's mean loss: the shares sum to that mean
        loss = (((pred - y[mine].to(dev)) ** 2) * m[mine].to(dev)).sum() / seen.to(dev)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            _sum_gradients(params, accelerator)
        opt.step()
        losses.append(loss.item() * world)   # this process's estimate of the batch loss
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return losses


def _save(visual, path: Path, job: str) -> None:
    """The tower's weights, written whole and then sealed (a file without its seal is redone)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in visual.state_dict().items()},
              str(resumable.partial_path(path)))
    resumable.commit(path, job)


def _sum_gradients(params, accelerator) -> None:
    """Sum the gradients of `params` across processes, in one all-reduce (no DDP wrapper, so no
    hooks are left on the vision tower when fine-tuning wraps the whole model afterwards)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")
    for p, part in zip(params, torch.split(flat, [g.numel() for g in grads])):
        p.grad = part.view_as(p)   # views of the fresh reduced buffer
