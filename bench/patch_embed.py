"""The vision tower's patch embedding: Qwen2-VL's Conv3d (kernel = stride: one output per patch)
vs the same weights as one matrix product (`skinlib.model.patch_embed_as_linear`).

    .venv/bin/python bench/patch_embed.py [--steps 20] [--threads 1]

Three workloads of the embedded default's tiny Qwen2-VL, each timed side by side with the stock
forward and with the linear one: a fine-tuning step (packed batch of 8 images x W = 5), a vision
warm-up step (the tower and a read-out on 32 images) and a generate call of 64 rows (one image
each, as prediction asks 16 questions per image). The row also gives the largest difference of
the outputs (float rounding only: the same numbers, summed in another order).
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import torch

from common import append, row, show, side_by_side, tiny_training_setup
from skinlib import attributes, model as models, predict, qa, warmup
from skinlib.loss import labelled_loss


def stock(model):
    """The class's own Conv3d forward back in place (undoing load()'s replacement)."""
    embed = model.model.visual.patch_embed
    vars(embed).pop("forward", None)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = tiny_training_setup(tmp, 64)
        path, ds, loaded, cache, collate = t.path, t.ds, t.loaded, t.cache, t.collate
        data = qa.TupleDataset(t.tuples, cache, packed=True)
        batches = [collate([data[(s * 8 + j) % len(data)] for j in range(8)]) for s in range(a.steps)]

        def train_steps(model):
            opt = torch.optim.SGD(model.parameters(), lr=0.0)   # lr 0: both runs see the same weights
            for b in batches:
                labelled_loss(model, b).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                return float(labelled_loss(model, batches[0]))

        def warm_steps(model):
            vis = model.model.visual
            enc = [cache[i] for i in ds.ids[:32]]
            for _ in range(a.steps):
                out = warmup._pooled(vis, enc)
                out.pow(2).mean().backward()
            vis.zero_grad(set_to_none=True)
            return out.detach()

        questions = [att.question for att in attributes.resolve(None)]
        rows_q = [questions[j % len(questions)] for j in range(64)]
        imgs = [cache[ds.ids[j // 16]] for j in range(64)]

        def generate(model):
            return [predict.generate(model, loaded.tokenizer, loaded.image_processor, imgs, rows_q, 8)
                    for _ in range(max(1, a.steps // 5))][-1]

        linear, conv = models.load(path).model, stock(models.load(path).model)
        for name, fn, size in (
                ("fine-tuning step", train_steps, f"{a.steps} steps, packed batch of 8 images x W=5"),
                ("vision warm-up step", warm_steps, f"{a.steps} steps, the tower on 32 images"),
                ("generate call", generate, f"{max(1, a.steps // 5)} calls of 64 rows, 8 new tokens")):
            conv_s, lin_s, out_c, out_l = side_by_side(lambda: fn(conv.train(name != "generate call")),
                                                       lambda: fn(linear.train(name != "generate call")), repeat=2)
            same = (out_c == out_l) if isinstance(out_c, list) else float((torch.as_tensor(out_c) - torch.as_tensor(out_l)).abs().max())
            note = ("replies identical" if same is True else "replies differ" if same is False
                    else f"max |difference| {same:.1e}")
            rows.append(row(f"{name}: patch embedding as Conv3d vs the same weights as a matrix product",
                            f"tiny Qwen2-VL, CPU {a.threads} thread(s), {size}; {note}", conv_s, lin_s))
    show(rows)
    append(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
