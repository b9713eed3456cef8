"""skinlib.loss on the real tiny Qwen2-VL with real peft and accelerate: the LM head applied only
where labels are gives the model's own loss and gradients (plain, LoRA, packed rows, two DDP
processes), and the training loop applies it to no more rows than there are scored tokens."""
import json
import re
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skinlib import inputs, loss, model as mdl, train
from skinlib.attributes import ATTRIBUTES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return mdl.build_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


def items(n=6, w=1, seed=0):
    """(image, question(s), answer(s)) items; w > 1: packed, w tuples per image."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = Image.fromarray(rng.integers(0, 255, (130, 130, 3), dtype=np.uint8))
        attrs = [ATTRIBUTES[(i + k) % len(ATTRIBUTES)] for k in range(w)]
        ans = [a.format_answer(v) for a, v in zip(attrs, rng.uniform(-50, 500, w))]
        qs = [a.question for a in attrs]
        out.append((im, qs, ans) if w > 1 else (im, qs[0], ans[0]))
    return out


def collate_for(loaded):
    def collate(batch):
        return inputs.build_batch(loaded.tokenizer, loaded.image_processor,
                                  [b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch])
    return collate


def loss_and_grads(model, fn):
    """fn() -> loss; its value and the trainable parameters' gradients. The same seed before each
    forward: LoRA's dropout draws the same masks for both losses."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    value = fn()
    value.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return value.detach(), grads


def assert_same(model, batch, **kw):
    want, gw = loss_and_grads(model, lambda: model(**batch, **kw).loss)
    got, gg = loss_and_grads(model, lambda: loss.labelled_loss(model, batch, **kw))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert set(gg) == set(gw) and len(gw) > 0
    for n in gw:
        scale = float(gw[n].abs().max()) + 1e-12
        torch.testing.assert_close(gg[n] / scale, gw[n] / scale, rtol=0, atol=1e-5, msg=n)
    return gw


@pytest.mark.parametrize("kind", ["plain", "lora", "packed", "packed-lora"])
def test_the_loss_and_its_gradients_are_the_models_own(tiny, kind):
    loaded = mdl.load(tiny)
    model = loaded.model
    if "lora" in kind:
        torch.manual_seed(1)
        model = mdl.apply_lora(model, rank=4, dropout=0.1)
    model.train()
    batch = collate_for(loaded)(items(n=4, w=3 if "packed" in kind else 1))
    assert ("position_ids" in batch) == ("packed" in kind)
    grads = assert_same(model, batch)
    if "lora" in kind:
        assert any("lora_A" in n for n in grads) and not any("lm_head" in n for n in grads)
    else:
        assert "lm_head.weight" in grads     # the head's own gradient, from the scored rows only


def test_num_items_in_batch_divides_the_sum_as_the_models_loss_does(tiny):
    loaded = mdl.load(tiny)
    batch = collate_for(loaded)(items(n=3))
    assert_same(loaded.model, batch, num_items_in_batch=torch.tensor(40))
    # given as a batch key, as a trainer passing it through the inputs would
    want = loaded.model(**batch, num_items_in_batch=torch.tensor(40)).loss
    got = loss.labelled_loss(loaded.model, {**batch, "num_items_in_batch": torch.tensor(40)})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_scored_positions_are_those_before_a_label():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, 8]])
    keep, targets = loss.next_token_targets(labels)
    assert keep.tolist() == [[False, True, True, False, False], [True, False, False, True, False]]
    assert targets.tolist() == [5, 6, 7, 8]   # a row's last label is never predicted across rows


@pytest.mark.parametrize("packed", [False, True])
def test_training_applies_the_head_to_the_scored_tokens_only(tiny, tmp_path, packed):
    """The loop's forward passes: the LM head's input has as many rows as the batch has labelled
    tokens (model(**batch).loss gives it every position of every row)."""
    loaded = mdl.load(tiny)
    collate, scored, rows = collate_for(loaded), [], []

    def counting_collate(batch):
        out = collate(batch)
        scored.append(int((out["labels"] != inputs.IGNORE_INDEX).sum()))
        return out

    head = loaded.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, args, out: rows.append(args[0].numel() // head.in_features))
    try:
        train.train(loaded.model, items(n=8, w=3 if packed else 1), counting_collate,
                    train.Settings(lr=1e-3, batch_size=4, epochs=1, checkpoint_every=100), tmp_path, progress=False)
    finally:
        handle.remove()
    assert len(rows) == len(scored) == 2
    assert rows == scored, (rows, scored)


WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    from accelerate import Accelerator
    sys.path[:0] = [{tests!r}, {root!r}]
    from test_loss import items, collate_for, loss_and_grads
    from skinlib import loss, model as mdl

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2
    worst = {{}}
    for kind in ("full-packed", "lora"):
        loaded = mdl.load({tiny!r})
        model = loaded.model
        if kind == "lora":
            torch.manual_seed(1)
            model = mdl.apply_lora(model, rank=4, dropout=0.1)
        model.train()
        ddp = acc.prepare(model)
        assert type(ddp).__name__ == "DistributedDataParallel"
        # each process its own rows, as the loop's sharded loader gives them
        batch = collate_for(loaded)(items(n=2, w=3 if "packed" in kind else 1, seed=10 + acc.process_index))
        want, gw = loss_and_grads(ddp, lambda: ddp(**batch).loss)
        got, gg = loss_and_grads(ddp, lambda: loss.labelled_loss(ddp, batch))
        assert abs(float(got - want)) <= 1e-5 * abs(float(want)), (kind, float(got), float(want))
        assert set(gg) == set(gw) and gw
        worst[kind] = max(float((gg[n] - gw[n]).abs().max() / (gw[n].abs().max() + 1e-12)) for n in gw)
        # the gradients were averaged over the two processes: both hold the same
        flat = torch.cat([g.flatten() for g in gg.values()])
        both = acc.gather(flat[None])
        assert torch.equal(both[0], both[1]), kind
    # one write of one short line: the two processes share the pipe, and print may write in pieces
    os.write(1, ("RESULT %d %s\\n" % (acc.process_index, json.dumps(worst))).encode())
""")


def test_two_ddp_processes_get_the_models_own_loss_and_gradients(tiny, tmp_path):
    from skinlib.finetune import launch_command

    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests"), root=str(ROOT), tiny=str(tiny)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(launch_command(2, [str(script)]), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = dict(re.findall(r"^RESULT (\d) (\{[^}]*\})$", done.stdout, flags=re.M))
    assert sorted(results) == ["0", "1"], done.stdout[-2000:]
    for rank, text in results.items():
        worst = json.loads(text)
        assert set(worst) == {"full-packed", "lora"} and max(worst.values()) < 1e-5, (rank, text)
