"""Where a training step of the embedded default's tiny Qwen2-VL spends its time, and what
torch.compile (inductor, CPU) does to it.

    .venv/bin/python bench/step_profile.py [--steps 30] [--threads 1]

One packed batch of 8 images (W = 5 tuples each, as the default trains), full fine-tuning with
the loss on the labelled positions only (skinlib.loss), AdamW, gradient clipping. The eager step is
profiled with torch.profiler: the self time of compute kernels (matrix products, attention,
convolution), of element-wise and reduction kernels, of memory work (allocation, copies, views),
and the remainder of the wall time, outside any ATen operator (Python, autograd bookkeeping and
dispatch). Then the same steps with the language model compiled (`torch.compile`, inductor):
its compile time (the first steps) and its steady step time, side by side with eager; and the
eager step under bfloat16 autocast (AMX or AVX-512 BF16 matrix units where the CPU has them), with
the CPU's flags named in the row.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from common import append, row, show, tiny_training_setup
from skinlib import model as models, qa
from skinlib.loss import labelled_loss

COMPUTE = ("mm", "addmm", "bmm", "matmul", "linear", "scaled_dot_product", "convolution", "conv")
MEMORY = ("empty", "copy_", "cat", "clone", "contiguous", "to", "_to_copy", "as_strided", "view", "reshape",
          "transpose", "t", "expand", "slice", "select", "index", "zeros", "fill_", "split", "stack",
          "unsqueeze", "permute", "resize_", "new_", "masked_select", "where")


def category(name: str) -> str:
    op = name.removeprefix("aten::")
    if any(k in op for k in COMPUTE):
        return "compute kernels (matmul, attention, conv)"
    if any(op == k or op.startswith(k) for k in MEMORY):
        return "memory (allocation, copies, views)"
    return "element-wise and reductions"


def cpu_flags() -> str:
    from pathlib import Path
    try:
        flags = set(next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                         if ln.startswith("flags")).split())
    except (OSError, StopIteration):
        return "unknown"
    return ", ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "no AVX-512"


def batches(root, n_batches: int, batch_size: int = 8):
    t = tiny_training_setup(root, max(64, batch_size * 4))
    data = qa.TupleDataset(t.tuples, t.cache, packed=True)
    return t.path, [t.collate([data[(s * batch_size + j) % len(data)] for j in range(batch_size)])
                    for s in range(n_batches)]


def stepper(model, bf16: bool = False):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(b):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = labelled_loss(model, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def timed(step, bs) -> float:
    t = time.perf_counter()
    for b in bs:
        step(b)
    return (time.perf_counter() - t) / len(bs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        path, bs = batches(tmp, a.steps + 10)
        warm, timed_bs, prof_bs = bs[:5], bs[5:5 + a.steps], bs[5 + a.steps:]
        eager = models.load(path).model.train()
        step = stepper(eager)
        for b in warm:
            step(b)
        eager_s = timed(step, timed_bs)
        with profile(activities=[ProfilerActivity.CPU]) as p:
            t = time.perf_counter()
            for b in prof_bs:
                step(b)
            wall = time.perf_counter() - t
        shares: dict[str, float] = {}
        for e in p.key_averages():
            if e.key.startswith("aten::"):
                k = category(e.key)
                shares[k] = shares.get(k, 0.0) + e.self_cpu_time_total / 1e6
        shares["outside ATen (Python, autograd, dispatch)"] = max(0.0, wall - sum(shares.values()))
        print(f"eager step {1000 * eager_s:.1f} ms; profiled wall {wall:.2f} s over {len(prof_bs)} steps:")
        for k, v in sorted(shares.items(), key=lambda kv: -kv[1]):
            print(f"  {k:<45} {v / wall:6.1%}")

        compiled = models.load(path).model.train()
        compiled.model.language_model = torch.compile(compiled.model.language_model)
        cstep = stepper(compiled)
        t = time.perf_counter()
        for b in warm:
            cstep(b)
        compile_s = time.perf_counter() - t
        compiled_s = timed(cstep, timed_bs)
        eager_again = timed(step, timed_bs)   # eager once more: the minimum of two is the least disturbed
        eager_s = min(eager_s, eager_again)
        half = models.load(path).model.train()
        hstep = stepper(half, bf16=True)
        for b in warm:
            hstep(b)
        bf16_s = timed(hstep, timed_bs)
        eager_s = min(eager_s, timed(step, timed_bs))
    parts = "; ".join(f"{k} {v / wall:.0%}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]))
    rows = [row("training step: eager vs torch.compile of the language model (inductor, CPU)",
                f"tiny Qwen2-VL, packed batch of 8 images x W=5, CPU {a.threads} thread(s), {a.steps} steps; "
                f"compile (first {len(warm)} steps) {compile_s:.0f} s; eager step profile: {parts}",
                eager_s, compiled_s),
            row("training step: float32 vs bfloat16 autocast (CPU)",
                f"tiny Qwen2-VL, packed batch of 8 images x W=5, CPU {a.threads} thread(s), {a.steps} steps; "
                f"CPU flags: {cpu_flags()}", eager_s, bf16_s)]
    show(rows)
    append(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
