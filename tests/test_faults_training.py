"""Training that survives interruption with the same result (issue 27, training part; issue 29).

Real tiny Qwen2-VL, real accelerate (one in-process run, one `accelerate launch` of two gloo
processes), real safetensors files damaged byte by byte. Each test failed on the code before the
fix: a resume after the vision warm-up gave another model; two processes ran fewer steps than
planned; damaged checkpoints, warm-up weights and models were reused; checkpoints landed in
`checkpoints/checkpoints/`.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from skinlib import config, finetune, inputs, model as mdl, qa, resumable, split, train, tuples, warmup

# smaller than the default tiny model: these tests train it several times over
SMALL = {"vision_depth": 1, "vision_embed_dim": 32, "vision_heads": 2, "hidden_size": 64, "text_layers": 1,
         "text_heads": 4, "text_kv_heads": 2, "intermediate_size": 128, "mrope_section": [2, 3, 3]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return mdl.build_tiny(tmp_path_factory.mktemp("tiny"), sizes=SMALL, seed=0)


@pytest.fixture(scope="module")
def release(tmp_path_factory, phantom_release):
    return phantom_release(tmp_path_factory.mktemp("phantom"), 24, seed=3)


def flip_byte(path: Path) -> None:
    """Change one byte in the tensor data of a safetensors file (its header still parses)."""
    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    data[(start + len(data)) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ 1. resume after the warm-up
def stage_cfg() -> dict:
    cfg = config.load_profile("smoke")
    cfg["model"]["sizes"] = SMALL
    # in this process (stop_after never launches); 8 steps, a checkpoint every 3
    cfg["train"].update(epochs=2.0, batch_size=4, warmup_steps=1, checkpoint_every=3, keep_checkpoints=2,
                        processes=1, compare_steps=0, vision_warmup={"steps": 4, "batch_size": 4, "lr": 1.0e-3})
    return cfg


def new_run(release, root: Path, name: str) -> Path:
    run = root / name
    shutil.copytree(release.image_path.parent, config.phantom_dir(run))
    manifest = split.build_manifest(release.attribute_frame(), test_fraction=0.3, seed=0)
    split.save_manifest(manifest, config.manifest_path(run))
    return run


def weights(run: Path) -> dict[str, torch.Tensor]:
    # copies: load_file maps the file, and a test that damages it would change these too
    return {k: v.clone() for k, v in load_file(config.finetuned_dir(run) / "model.safetensors").items()}


def losses(run: Path) -> pd.DataFrame:
    return pd.read_csv(config.checkpoint_dir(run) / train.HISTORY)[["step", "loss", "lr"]]


@pytest.fixture(scope="module")
def uninterrupted(release, tmp_path_factory):
    """The stage run once, warm-up and training in one go."""
    run = new_run(release, tmp_path_factory.mktemp("a"), "run")
    summary = finetune.run(stage_cfg(), run, device="cpu", progress=False)
    assert summary["finished"] and summary["steps"] == 8
    return run, summary


@pytest.mark.parametrize("stops", [[1, 4], [3, 3]], ids=["before-first-checkpoint-then-after-it",
                                                          "at-checkpoints"])
def test_an_interrupted_stage_ends_bit_identical_to_an_uninterrupted_one(uninterrupted, release, tmp_path, stops):
    """[1, 4]: stopped one step after the warm-up's save (no checkpoint yet: the rerun loads the
    warm-up and starts training afresh), then one step after the first checkpoint. [3, 3]: stopped
    exactly at the checkpoints of steps 3 and 6."""
    want_run, want = uninterrupted
    run = new_run(release, tmp_path, "run")
    cfg = stage_cfg()
    for n in stops:
        cut = finetune.run(cfg, run, device="cpu", progress=False, stop_after=n)
        assert not cut["finished"] and "run again" in cut["message"].lower()
    assert (config.stage_dir(run, "02_finetune") / warmup.WEIGHTS).exists()
    done = finetune.run(cfg, run, device="cpu", progress=False)
    assert done["finished"] and done["steps"] == want["steps"]
    a, b = weights(want_run), weights(run)
    assert set(a) == set(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    pd.testing.assert_frame_equal(losses(run), losses(want_run))


def test_warm_up_run_and_warm_up_loaded_leave_the_model_in_the_same_state(tiny, release, tmp_path):
    """Gradients, requires_grad, train/eval flags and the global RNG: the same whether the warm-up
    trained just now or was loaded from its file (only then does a resume continue the same run)."""
    def state(m):
        return ({n: p.grad is None for n, p in m.named_parameters()},
                {n: p.requires_grad for n, p in m.named_parameters()},
                {n: mod.training for n, mod in m.named_modules()})

    tup = tuples.sample_tuples(release.attribute_frame(), w=5, seed=0)
    after = []
    for _ in range(2):   # first trains and saves, second loads
        loaded = mdl.load(tiny)
        m = loaded.model
        m.model.visual.patch_embed.requires_grad_(False)   # a caller's choices must survive
        m.model.visual.blocks.train()
        before = state(m)
        torch.manual_seed(123)
        rng = torch.get_rng_state()
        cache = qa.ImageCache(release, loaded.image_processor)
        info = warmup.warm_up(m, tup, cache, tmp_path, steps=3, batch_size=4, progress=False)
        assert torch.equal(torch.get_rng_state(), rng)
        assert state(m) == before
        after.append((info, m.model.visual.state_dict()))
    (ran, w_ran), (reused, w_loaded) = after
    assert "reused" not in ran and "reused" in reused
    assert all(torch.equal(w_ran[k], w_loaded[k]) for k in w_ran)


# ------------------------------------------------------------------ 2. steps the loader delivers
@pytest.mark.parametrize("n,batch,epochs,procs", [
    (3499, 8, 7.0, 2), (3500, 8, 7.0, 2), (3501, 8, 7.0, 2),   # the default's sizes around 3,500
    (155, 8, 4.0, 2), (7, 4, 3.0, 2), (10, 6, 2.5, 3), (5, 16, 1.0, 4), (13, 3, 1.0, 1),
    (282_564, 16, 1.0, 3),                                     # the paper's training set on 3 GPUs
])
def test_every_process_gets_exactly_the_planned_steps_of_full_batches(n, batch, epochs, procs):
    """What accelerate's shard of the sampler yields in each process, counted with accelerate's own
    prepare_data_loader (as `Accelerator.prepare` calls it in process i of P)."""
    from accelerate.data_loader import prepare_data_loader

    settings = train.Settings(batch_size=batch, epochs=epochs, seed=0)
    plan = train.batch_plan(n, settings, procs)
    loader = torch.utils.data.DataLoader(range(n), batch_sampler=plan, collate_fn=list)
    shards = []
    for i in range(procs):
        shard = prepare_data_loader(loader, num_processes=procs, process_index=i, put_on_device=False)
        got = list(shard)
        assert len(got) == len(shard) == plan.steps, (i, len(got), len(shard), plan.steps)
        assert {len(b) for b in got} == {batch // procs}
        shards.append(got)
    # every requested item is trained, each as often as the others up to one
    seen = collections.Counter(i for got in shards for b in got for i in b)
    items = sum(seen.values())
    assert items == plan.steps * plan.global_batch and items - plan.global_batch < round(epochs * n) <= items
    assert set(seen) == set(range(n)) and max(seen.values()) - min(seen.values()) <= 1
    # the same steps for one global batch on any number of processes (the bench compares 1 with 2)
    assert train.batch_plan(n, train.Settings(batch_size=plan.global_batch, epochs=epochs), 1).steps == plan.steps


WORKER = """
import json, sys, torch
import numpy as np
from PIL import Image
from accelerate import Accelerator
from safetensors.torch import save_file
from skinlib import inputs, model as mdl, train
torch.set_num_threads(1)
base, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
acc = Accelerator(cpu=True)

def fresh():
    loaded = mdl.load(base)
    torch.manual_seed(1)
    return loaded, mdl.apply_lora(loaded.model, rank=4, dropout=0.1)

loaded, m = fresh()
rng = np.random.default_rng(0)
imgs = [Image.fromarray(rng.integers(0, 255, (130, 130, 3), dtype=np.uint8)) for _ in range(n)]
enc = inputs.encode_images(loaded.image_processor, imgs)
# answers of 1 to 7 characters: the processes' batches differ in shape, and so do their RNG draws
items = [(e, "What is the area of the lesion in mm²?", f"{rng.uniform(1, 999):.{i % 4}f}") for i, e in enumerate(enc)]
def collate(b):
    return inputs.build_batch(loaded.tokenizer, loaded.image_processor, [i[0] for i in b], [i[1] for i in b],
                              [i[2] for i in b])
settings = train.Settings(lr=5e-3, batch_size=4, epochs=3, warmup_steps=2, checkpoint_every=2, seed=0)
res = {"whole": train.train(m, items, collate, settings, out + "/whole", accelerator=acc, progress=False)}
save_file(train.trainable_state(m), f"{out}/whole-{acc.process_index}.safetensors")
loaded, m = fresh()
res["cut"] = train.train(m, items, collate, settings, out + "/cut", accelerator=acc, progress=False, stop_after=3)
loaded, m = fresh()
res["rest"] = train.train(m, items, collate, settings, out + "/cut", accelerator=acc, progress=False)
save_file(train.trainable_state(m), f"{out}/cut-{acc.process_index}.safetensors")
with open(f"{out}/result-{acc.process_index}.json", "w") as f:
    json.dump(res, f)
"""


def test_two_processes_train_every_planned_step_and_resume_to_the_same_weights(tiny, tmp_path):
    """Two real gloo processes on 7 items (batches of 2 per process do not divide them), 3 epochs,
    LoRA with dropout: every planned step runs, the scheduler ends with the run, and a run cut at
    step 3 and resumed (every process from its own RNG state) ends bit-identical."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = finetune.launch_command(2, [str(script), str(tiny), str(tmp_path), "7"])
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"result-{i}.json").read_text()) for i in (0, 1))
    whole = r0["whole"]
    assert whole["step"] == whole["total_steps"] == r1["whole"]["step"]
    assert whole["total_steps"] * 4 >= 3 * 7                      # all three epochs
    assert r0["cut"]["step"] == 3 and r0["rest"]["resumed_from"].endswith("step-0000002")
    assert r0["rest"]["step"] == whole["total_steps"]
    w = {f"{run}-{i}": load_file(tmp_path / f"{run}-{i}.safetensors") for run in ("whole", "cut") for i in (0, 1)}
    for k in w["whole-0"]:
        assert torch.equal(w["whole-0"][k], w["whole-1"][k]), k   # one model on both processes
        assert torch.equal(w["whole-0"][k], w["cut-0"][k]) and torch.equal(w["cut-0"][k], w["cut-1"][k]), k
    # the history's learning rates are the schedule's over exactly total_steps optimizer steps
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-3)
    sched = train.cosine_schedule(opt, 2, whole["total_steps"])
    want = []
    for _ in range(whole["total_steps"]):
        opt.step()
        sched.step()
        want.append(float(f"{sched.get_last_lr()[0]:.3e}"))
    for run in ("whole", "cut"):
        hist = pd.read_csv(tmp_path / run / train.HISTORY)
        assert hist.step.tolist() == list(range(1, whole["total_steps"] + 1))
        assert hist.lr.tolist() == want and want[-1] == 0.0


# ------------------------------------------------------------------ 3. damaged artifacts
def lora(tiny):
    loaded = mdl.load(tiny)
    torch.manual_seed(1)
    return loaded, mdl.apply_lora(loaded.model, rank=4, dropout=0.1)


def lora_items(loaded, n=12):
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (130, 130, 3), dtype=np.uint8)) for _ in range(n)]
    enc = inputs.encode_images(loaded.image_processor, imgs)
    items = [(e, "What is the area of the lesion in mm²?", f"{rng.uniform(1, 40):.1f}") for e in enc]

    def collate(b):
        return inputs.build_batch(loaded.tokenizer, loaded.image_processor, [i[0] for i in b],
                                  [i[1] for i in b], [i[2] for i in b])
    return items, collate


def test_a_damaged_checkpoint_is_named_and_the_run_resumes_from_the_one_before(tiny, tmp_path, capsys):
    settings = train.Settings(lr=5e-3, batch_size=4, epochs=2, checkpoint_every=2, keep_checkpoints=3, seed=0)
    loaded, m = lora(tiny)
    items, collate = lora_items(loaded)
    train.train(m, items, collate, settings, tmp_path / "a", progress=False)
    want = train.trainable_state(m)

    loaded, m = lora(tiny)
    train.train(m, items, collate, settings, tmp_path / "b", progress=False, stop_after=5)
    assert [p.name for p in sorted((tmp_path / "b").glob(train.CHECKPOINT_GLOB))] == ["step-0000002", "step-0000004"]
    flip_byte(tmp_path / "b" / "step-0000004" / "trainable.safetensors")   # still loads: the damage is silent
    capsys.readouterr()
    loaded, m = lora(tiny)
    rest = train.train(m, items, collate, settings, tmp_path / "b", progress=False)
    said = capsys.readouterr()
    line = [ln for ln in (said.out + said.err).splitlines() if ln.startswith("skipping")]
    assert len(line) == 1 and "step-0000004" in line[0] and "trainable.safetensors" in line[0], said
    assert "sha256" in line[0] and "resuming from step-0000002" in line[0]
    assert rest["resumed_from"].endswith("step-0000002") and rest["step"] == 6
    got = train.trainable_state(m)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # a checkpoint without its seal (a run killed before sealing, or one copied in) is not trusted
    # either; with none left the run says it starts from step 0
    for ckpt in (tmp_path / "b").glob(train.CHECKPOINT_GLOB):
        (ckpt / resumable.DIR_SEAL).unlink()
    lines = []
    assert train.latest_checkpoint(tmp_path / "b", say=lines.append) is None
    assert len(lines) == 1 and "not sealed" in lines[0] and "starting from step 0" in lines[0]


def test_damaged_or_unsealed_warm_up_weights_are_named_and_trained_again(tiny, release, tmp_path, capsys):
    tup = tuples.sample_tuples(release.attribute_frame(), w=5, seed=0)

    def warm(**kw):
        loaded = mdl.load(tiny)
        cache = qa.ImageCache(release, loaded.image_processor)
        info = warmup.warm_up(loaded.model, tup, cache, tmp_path, steps=3, batch_size=4, progress=False, **kw)
        return info, loaded.model.model.visual.state_dict()

    first, w1 = warm()
    path = tmp_path / warmup.WEIGHTS
    assert resumable.check(path) is None
    for damage, named in ((flip_byte, "sha256"), (lambda p: resumable.seal_path(p).unlink(), "not sealed")):
        damage(path)
        capsys.readouterr()
        info, w2 = warm()
        err = capsys.readouterr().err
        assert "reused" not in info and str(path) in err and named in err, err
        assert all(torch.equal(w1[k], w2[k]) for k in w1)     # the same warm-up, trained again
        assert resumable.check(path) is None
    # weights warmed with other settings are not this job's
    capsys.readouterr()
    info, _ = warm(lr=3e-3)
    assert "reused" not in info and "not by this job" in capsys.readouterr().err


def test_a_damaged_fine_tuned_model_is_refused_naming_folder_and_file(tiny, tmp_path):
    loaded = mdl.load(tiny)
    out = tmp_path / "model"
    mdl.save_finetuned(loaded.model, loaded.tokenizer, loaded.image_processor, out, base=str(tiny), method="full",
                       notes={"summary.json": {"steps": 1}})
    assert mdl.check_finetuned(out) is None and not list(tmp_path.glob(".*partial*"))
    mdl.load_finetuned(out)
    flip_byte(out / "model.safetensors")
    with pytest.raises(ValueError, match=rf"(?s){out}.*model\.safetensors.*sha256"):
        mdl.load_finetuned(out)
    mdl.save_finetuned(loaded.model, loaded.tokenizer, loaded.image_processor, out, base=str(tiny), method="full")
    (out / "stray.json").write_text("{}")
    with pytest.raises(ValueError, match=r"stray\.json"):
        mdl.load_finetuned(out)


def test_the_stage_refuses_its_damaged_model_and_saves_it_again_from_the_last_checkpoint(
        uninterrupted, tmp_path, capsys):
    want_run, want = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(want_run, run)
    before = weights(run)
    flip_byte(config.finetuned_dir(run) / "model.safetensors")
    capsys.readouterr()
    again = finetune.run(stage_cfg(), run, device="cpu", progress=False)
    err = capsys.readouterr().err
    assert "saved model refused" in err and "model.safetensors" in err, err
    assert again["finished"] and not again["reused"]
    assert again["resumed_from"].endswith(f"step-{want['steps']:07d}")   # re-saved, not retrained
    after = weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert finetune.run(stage_cfg(), run, device="cpu", progress=False)["reused"]
    # the training tuples later stages read are sealed with their rows
    assert resumable.check(config.tuples_path(run), rows=len(pd.read_parquet(config.tuples_path(run)))) is None


def test_a_half_written_recipe_stamp_is_named_and_the_stage_starts_afresh(tmp_path, capsys):
    cfg, run = stage_cfg(), tmp_path / "run"
    stage = config.stage_dir(run, "02_finetune")
    stage.mkdir(parents=True)
    (stage / finetune.RECIPE).write_text('{"model": {"name": "ti')   # a writer killed mid-file
    config.tuples_path(run).write_text("left by some other recipe")
    assert finetune.start_recipe(cfg, run) is False
    err = capsys.readouterr().err
    assert "unreadable" in err and str(stage / finetune.RECIPE) in err and "tuples.parquet" in err, err
    assert not config.tuples_path(run).exists()
    assert resumable.read_json(stage / finetune.RECIPE) == finetune.recipe(cfg, run)


# ------------------------------------------------------------------ 4. where checkpoints go
def test_checkpoints_and_history_are_where_config_says(uninterrupted):
    run, summary = uninterrupted
    ckpts = config.checkpoint_dir(run)
    assert not (ckpts / "checkpoints").exists()
    assert [p.name for p in sorted(ckpts.glob(train.CHECKPOINT_GLOB))] == ["step-0000006", "step-0000008"]
    assert all(resumable.check_dir(p) is None for p in ckpts.glob(train.CHECKPOINT_GLOB))
    assert len(losses(run)) == summary["steps"]
