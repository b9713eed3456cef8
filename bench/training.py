"""Training throughput: one tuple per sequence (the paper) vs all W tuples of an image packed into
one sequence (the image prefix once, each tuple seeing the prefix and itself: `skinlib.inputs`),
tuples per second on the embedded default's tiny Qwen2-VL.

    .venv/bin/python bench/training.py [--steps 40]

Same images, same tuples (W=5), same optimizer; full fine-tuning steps timed after 3 warm-up steps.
Batches: 8 tuples per step unpacked, 8 images (40 tuples) per step packed; the row gives seconds per
1,000 tuples for each, measured side by side.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from common import append, row, show, tiny_training_setup
from skinlib import model as models, qa


def seconds_per_tuple(loaded, data, batch_size, steps, count):
    collate = qa.collate(loaded.tokenizer, loaded.image_processor)
    m = loaded.model
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    batches = [collate([data[(s * batch_size + j) % len(data)] for j in range(batch_size)])
               for s in range(steps + 3)]
    n, t0 = 0, None
    for s, b in enumerate(batches):
        if s == 3:
            t0 = time.perf_counter()
        loss = m(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if s >= 3:
            n += count(b)
    return (time.perf_counter() - t0) / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        t = tiny_training_setup(tmp, 200)
        path, loaded, cache, tup = t.path, t.loaded, t.cache, t.tuples
        count = qa.tuple_counter(loaded.tokenizer)
        single = seconds_per_tuple(loaded, qa.TupleDataset(tup, cache), 8, a.steps, count)
        loaded = models.load(path)
        packed = seconds_per_tuple(loaded, qa.TupleDataset(tup, cache, packed=True), 8, a.steps, count)
    rows = [row("training throughput: one tuple per sequence vs W=5 packed per image (prefix-shared)",
                f"tiny Qwen2-VL, 16 image tokens, full fine-tuning, {a.steps} steps each, CPU {a.threads} "
                f"threads ({1 / single:.0f} vs {1 / packed:.0f} tuples/s; seconds per 1,000 tuples)",
                1000 * single, 1000 * packed)]
    show(rows)
    append(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
