"""The training loss: `model(**batch).loss` (the LM head at every position) vs
`skinlib.loss.labelled_loss` (the head only where the next token is labelled), on the embedded
default's tiny Qwen2-VL.

    .venv/bin/python bench/loss.py [--steps 20] [--history-steps 300] [--processes 2]

1. Speed: full fine-tuning steps (forward, backward, AdamW) on the default's packed batches (8
   images, W=5 tuples each), the two losses timed alternately in one run (common.side_by_side),
   seconds per step; one row in results.csv.
2. Memory at the paper's sizes, from shapes: the (rows, length, vocab) logits and the float32
   copies the model's loss makes of them, vs the same for the scored tokens only. Printed.
3. Results (`--history-steps N`): the default's training settings (lr, warm-up, batch, clipping;
   full fine-tuning, packed rows) for N optimizer steps through `train.train`, once per loss, in
   `--processes` DDP processes as the default trains; the largest difference of the two loss
   histories and of the final weights. Printed (not a timing row).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import append, row, show, side_by_side
from skinlib import config, loss, model as models, phantom, qa, slice3d, train, tuples
from skinlib.inputs import IGNORE_INDEX, build_batch

ROOT = Path(__file__).resolve().parents[1]
PAPER_VOCAB = 152_064       # Qwen2-VL-7B's LM head
PAPER_BATCH = 16            # paper: batch 16, one tuple per sequence
PAPER_MAX_PIXELS = 50_176   # skinlib/profiles/paper.yaml: a 224 x 224 crop, 64 image tokens


def old_loss(model, batch):
    return model(**batch).loss


def setup(tmp, n_images=200):
    phantom.generate(n_images, f"{tmp}/ph", seed=0, workers=1, progress=False)
    ds = slice3d.Slice3D(f"{tmp}/ph/train-image.hdf5", f"{tmp}/ph/train-metadata.csv")
    path = models.build_tiny(f"{tmp}/tiny")
    loaded = models.load(path)
    cache = qa.ImageCache(ds, loaded.image_processor).fill(ds.ids, progress=False)
    tup = tuples.sample_tuples(ds.attribute_frame(), w=5, seed=0)
    return path, loaded, qa.TupleDataset(tup, cache, packed=True)


def stepper(path, batches, fn):
    """A full fine-tuning step per call, cycling through `batches`, with loss `fn`."""
    m = models.load(path).model
    m.requires_grad_(True)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    at = [0]

    def step():
        b = batches[at[0] % len(batches)]
        at[0] += 1
        fn(m, b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def speed(path, loaded, data, steps, repeat):
    collate = qa.collate(loaded.tokenizer, loaded.image_processor)
    batches = [collate([data[(s * 8 + j) % len(data)] for j in range(8)]) for s in range(steps)]
    base, ours = stepper(path, batches, old_loss), stepper(path, batches, loss.labelled_loss)
    for _ in range(3):          # warm-up
        base(), ours()
    run = lambda f: (lambda: [f() for _ in range(steps)])
    tb, to, _, _ = side_by_side(run(base), run(ours), repeat=repeat)
    b = batches[0]
    return tb / steps, to / steps, tuple(b["input_ids"].shape), int((b["labels"] != IGNORE_INDEX).sum())


def paper_memory(loaded):
    """Logit bytes per batch at the paper's sizes. Length: a one-tuple row with the paper profile's
    largest image (64 image tokens) and this project's tokenizer for the text (a ~1,000-token
    vocabulary: Qwen2's 152k-token one likely writes the prompt in fewer tokens). The full head's
    cost grows with the length, the scored tokens' does not: a line per 100 tokens of length."""
    import numpy as np
    from PIL import Image
    from transformers import Qwen2VLImageProcessor

    from skinlib.attributes import ATTRIBUTES

    proc = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=PAPER_MAX_PIXELS)
    im = Image.fromarray(np.zeros((224, 224, 3), np.uint8))
    lengths, scored = [], []
    for a in ATTRIBUTES:
        b = build_batch(loaded.tokenizer, proc, [im], [a.question], [a.format_answer(123.45)])
        lengths.append(b["input_ids"].shape[1])
        scored.append(int((b["labels"] != IGNORE_INDEX).sum()))
    L, k = max(lengths), float(np.mean(scored))
    gb = lambda elements, nbytes: elements * nbytes / 1e9
    full, only = PAPER_BATCH * L * PAPER_VOCAB, PAPER_BATCH * k * PAPER_VOCAB
    # bf16 logits (2 bytes), their float32 copy (4) and the float32 log-softmax that cross-entropy
    # keeps for the backward pass (4): 10 bytes per logit at the forward's peak, 4 held until backward
    lines = [f"paper sizes: batch {PAPER_BATCH}, length {L} (64 image tokens + text), vocab {PAPER_VOCAB:,}, "
             f"{k:.1f} scored tokens per row",
             f"  logits: {full / 1e6:.0f} M elements per batch vs {only / 1e6:.2f} M ({full / only:.0f}x fewer)",
             f"  bf16 logits alone: {gb(full, 2):.2f} GB vs {gb(only, 2):.3f} GB",
             f"  forward peak (bf16 + float32 copy + float32 log-softmax, 10 B each): "
             f"{gb(full, 10):.2f} GB vs {gb(only, 10):.3f} GB; saved {gb(full - only, 10):.2f} GB",
             f"  held until backward (float32 log-softmax): {gb(full, 4):.2f} GB vs {gb(only, 4):.3f} GB",
             f"  the full head per 100 tokens of length: {gb(PAPER_BATCH * 100 * PAPER_VOCAB, 10):.2f} GB "
             f"at the forward's peak"]
    return lines


# ------------------------------------------------------------------------ results: loss histories
def history_worker(path, data_dir, steps, out_json):
    """In each launched process: the default's settings, `steps` steps, once per loss."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    cfg = config.load_profile("default")["train"]
    _, _, data = setup_from(data_dir, path)
    n_items = len(data)
    st = train.Settings(lr=cfg["lr"], batch_size=cfg["batch_size"], warmup_steps=cfg["warmup_steps"],
                        weight_decay=cfg["weight_decay"], grad_clip=cfg["grad_clip"], seed=cfg["seed"],
                        epochs=steps * cfg["batch_size"] / n_items, checkpoint_every=10 ** 9)
    loaded = models.load(path)
    collate = qa.collate(loaded.tokenizer, loaded.image_processor)
    result = {}
    # "nudged": the old loss from weights one float32 step (ulp) away, the size of the float noise
    # between the two losses: how far training alone carries noise of that size (the control)
    for name, fn in (("old", old_loss), ("new", loss.labelled_loss), ("nudged", old_loss)):
        m = models.load(path).model
        m.requires_grad_(True)
        if name == "nudged":
            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
        train.labelled_loss = fn          # the loop's loss call, swapped for this run only
        run = Path(data_dir) / f"run-{name}"      # one folder for all processes; the main one writes
        r = train.train(m, data, collate, st, run, accelerator=acc, progress=False)
        if acc.is_main_process:
            hist = (run / train.HISTORY).read_text().splitlines()[1:]
            result[name] = {"steps": r["step"], "seconds": r["seconds"],
                            "loss": [float(l.split(",")[1]) for l in hist]}
            torch.save(train.trainable_state(acc.unwrap_model(m)), f"{out_json}.{name}.pt")
    train.labelled_loss = loss.labelled_loss
    if acc.is_main_process:
        Path(out_json).write_text(json.dumps(result))
    acc.wait_for_everyone()


def setup_from(tmp, path):
    ds = slice3d.Slice3D(f"{tmp}/ph/train-image.hdf5", f"{tmp}/ph/train-metadata.csv")
    loaded = models.load(path)
    cache = qa.ImageCache(ds, loaded.image_processor).fill(ds.ids, progress=False)
    tup = tuples.sample_tuples(ds.attribute_frame(), w=5, seed=0)
    return path, loaded, qa.TupleDataset(tup, cache, packed=True)


def histories(path, tmp, steps, processes):
    from skinlib.finetune import launch_command

    out = Path(tmp) / "histories.json"
    args = [str(Path(__file__).resolve()), "--worker", str(path), str(tmp), str(steps), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = launch_command(processes, args) if processes > 1 else [sys.executable, *args]
    subprocess.run(cmd, env=env, check=True)
    h = json.loads(out.read_text())
    w = {k: torch.load(f"{out}.{k}.pt") for k in h}
    lines = [f"results: {steps} steps of the default's training ({processes} DDP process(es), full fine-tuning, "
             f"packed); 'nudged' = the old loss from weights one float32 ulp away (float noise alone)"]
    old = h["old"]["loss"]
    for k in ("new", "nudged"):
        other = h[k]["loss"]
        assert len(old) == len(other) == steps, (len(old), len(other), steps)
        d = [abs(a - b) for a, b in zip(old, other)]
        first = next((i + 1 for i, x in enumerate(d) if x > 1e-3), None)
        tail = lambda xs: sum(xs[-50:]) / len(xs[-50:])
        wdiff = max(float((w["old"][n] - w[k][n]).abs().max()) for n in w["old"])
        lines.append(f"  {k} vs old: max |loss difference| {max(d):.3g} (step {d.index(max(d)) + 1}); "
                     f"first > 1e-3 at step {first}; max over steps 1-10 {max(d[:10]):.2g}; mean loss of the "
                     f"last 50 steps {tail(other):.4f} vs {tail(old):.4f}; max |final weight difference| {wdiff:.3g}")
    lines.append("  training seconds: " + ", ".join(f"{k} {h[k]['seconds']:.1f}" for k in h))
    return lines


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        torch.set_num_threads(1)
        history_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="training steps per timed run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--history-steps", type=int, default=0, help="also compare N steps' loss histories")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--no-append", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path, loaded, data = setup(tmp)
        tb, to, shape, scored = speed(path, loaded, data, a.steps, a.repeat)
        report = paper_memory(loaded)
        if a.history_steps:
            report += histories(path, tmp, a.history_steps, a.processes)
    rows = [row("training loss: LM head at every position (model(**batch).loss) vs only where labelled "
                "(skinlib.loss.labelled_loss)",
                f"tiny Qwen2-VL (vocab {loaded.model.config.text_config.vocab_size}), full fine-tuning step, packed "
                f"batch of 8 images x W=5 ({shape[0]} rows x {shape[1]} tokens, {scored} scored), CPU {a.threads} "
                f"threads, {a.steps} steps x {a.repeat} alternating runs; seconds per step",
                tb, to)]
    show(rows)
    print("\n".join(report))
    if not a.no_append:
        append(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
