"""The median reading of the answer distribution vs constrained greedy decoding, same rows.

    .venv/bin/python bench/reading.py [--images 32]

Every phantom image asked every attribute (`predict.predict`'s rows), held to the answer shapes of
the phantom's own training tuples (`answer_format.shapes`: open widths where the answers have
them, e.g. areaMM2 2-3 integer digits, which the reading enumerates). Two rows, each measured side
by side in one run:
- `predict.predict(shapes=...)`, what chapter 3 runs: constrained greedy, then the rows the
  constraint changed asked again without it (with the random-init tiny model that is most rows);
- constrained greedy alone (`predict.generate` with row_shapes over the same batches, no re-ask).
Ours is `median_reading.predict` on the same rows and batch size. The goal: ours within 1.5x of
greedy's time (ratio >= 0.67). Random weights: the cost does not depend on what the model says,
except through how many rows the constraint changes (row 1) and the answers' widths (the same
shapes in both).
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import torch

from common import append, row, show, side_by_side
from skinlib import answer_format, attributes, median_reading, model as models, phantom, predict, qa, slice3d, tuples


def greedy_only(loaded, cache, truth, shapes, batch_size):
    """Constrained greedy replies for predict.predict's rows, without its re-ask."""
    long, questions, max_new = predict._asked(loaded.tokenizer, truth, attributes.ATTRIBUTES, None, None, shapes)
    out = []
    for s in range(0, len(long), batch_size):
        rows = long.iloc[s:s + batch_size]
        out += predict.generate(loaded.model, loaded.tokenizer, loaded.image_processor,
                                [cache[i] for i in rows.isic_id], questions[s:s + batch_size], max_new,
                                row_shapes=[shapes[a] for a in rows.attribute])[0]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        # 600 images: enough training answers that some attributes' answers have two widths
        phantom.generate(max(a.images, 600), f"{tmp}/ph", seed=0, workers=1, progress=False)
        ds = slice3d.Slice3D(f"{tmp}/ph/train-image.hdf5", f"{tmp}/ph/train-metadata.csv")
        frame = ds.attribute_frame()
        shapes = answer_format.shapes(tuples.sample_tuples(frame, w=5, seed=0))
        truth = frame.head(a.images)
        loaded = models.load(models.build_tiny(f"{tmp}/tiny"))
        cache = qa.ImageCache(ds, loaded.image_processor).fill(truth.isic_id, progress=False)
        args = (loaded.model, loaded.tokenizer, loaded.image_processor, cache, truth)
        kw = dict(shapes=shapes, batch_size=a.batch_size, progress=False)
        pred_s, ours_s, greedy, ours = side_by_side(lambda: predict.predict(*args, **kw),
                                                    lambda: median_reading.predict(*args, **kw))
        alone_s, ours2_s, _, _ = side_by_side(lambda: greedy_only(loaded, cache, truth, shapes, a.batch_size),
                                              lambda: median_reading.predict(*args, **kw))
        n, changed = len(ours), int(greedy.overridden.sum())
        opened = sorted(k for k, s in shapes.items() if s.min_width < s.max_width)
        size = (f"{a.images} phantom images x 16 questions = {n} rows, batch {a.batch_size}, tiny Qwen2-VL, "
                f"CPU {a.threads} threads; open widths {', '.join(opened)}; unresolved mass max "
                f"{ours.unresolved.max():.2g}")
        rows = [row("median reading vs predict.predict(shapes) (constrained greedy + re-ask of the "
                    f"{changed} of {n} rows it changed)", size, pred_s, ours_s),
                row("median reading vs constrained greedy alone (predict.generate with row_shapes)",
                    size, alone_s, ours2_s)]
    show(rows)
    append(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
