"""The vision warm-up: targets come only from the training tuples, its loss falls, and its weights
are saved and reused (real tiny Qwen2-VL, real phantom images)."""
import numpy as np
import pandas as pd
import pytest
import torch

from skinlib import model as mdl, qa, tuples, warmup


@pytest.fixture(scope="module")
def setup(tmp_path_factory, phantom_release):
    torch.set_num_threads(1)
    ds = phantom_release(tmp_path_factory.mktemp("phantom"), 24, seed=5)
    path = mdl.build_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    return ds, path


def test_targets_standardise_only_the_drawn_values():
    tup = pd.DataFrame({"isic_id": ["a", "a", "b", "c"], "attribute": ["areaMM2", "A", "areaMM2", "A"],
                        "value": [1.0, 10.0, 3.0, 30.0]})
    ids, z, mask = warmup.targets(tup)
    assert ids == ["a", "b", "c"]
    j_area, j_a = 0, 12  # registry positions of areaMM2 and A
    assert mask.sum() == 4 and mask[:, j_area].tolist() == [True, True, False]
    assert z[:2, j_area] == pytest.approx([-1.0, 1.0]) and z[[0, 2], j_a] == pytest.approx([-1.0, 1.0])
    assert np.isnan(z[2, j_area])
    with pytest.raises(KeyError, match="bogus"):
        warmup.targets(tup.assign(attribute=["bogus", "A", "areaMM2", "A"]))


def test_warm_up_lowers_its_loss_touches_only_the_vision_tower_and_is_reused(setup, tmp_path):
    ds, path = setup
    loaded = mdl.load(path)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    tup = tuples.sample_tuples(ds.attribute_frame(), w=5, seed=0)
    cache = qa.ImageCache(ds, loaded.image_processor)
    info = warmup.warm_up(loaded.model, tup, cache, tmp_path, steps=60, batch_size=8, lr=3e-3, progress=False)
    assert info["loss_end"] < info["loss_start"]
    after = loaded.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".visual." in f".{k}" for k in changed), sorted(changed)[:5]
    # a second model picks up the saved weights of the same job without training
    again = mdl.load(path)
    info2 = warmup.warm_up(again.model, tup, cache, tmp_path, steps=60, batch_size=8, lr=3e-3, progress=False)
    assert "reused" in info2
    for k in changed:
        assert torch.equal(again.model.state_dict()[k], after[k])


WORKER = """
import sys, torch
from accelerate import Accelerator
from safetensors.torch import save_file
from skinlib import model as mdl, qa, slice3d, tuples, warmup
torch.set_num_threads(1)
phantom_dir, model_path, out = sys.argv[1:4]
acc = Accelerator(cpu=True)
ds = slice3d.Slice3D(phantom_dir + "/train-image.hdf5", phantom_dir + "/train-metadata.csv", on_error="exclude")
loaded = mdl.load(model_path)
tup = tuples.sample_tuples(ds.attribute_frame(), w=5, seed=0)
cache = qa.ImageCache(ds, loaded.image_processor)
warmup.warm_up(loaded.model, tup, cache, out, steps=4, batch_size=8, lr=1e-3, progress=False, accelerator=acc)
visual = loaded.model.model.visual
save_file({k: v.contiguous() for k, v in visual.state_dict().items()}, f"{out}/rank{acc.process_index}.safetensors")
"""


def test_two_process_warm_up_takes_the_one_process_steps(setup, tmp_path):
    # two real gloo processes through accelerate's launcher, each encoding half of every batch:
    # with the gradients summed, both end with the same weights as one process on the whole batch
    import os
    import subprocess

    from safetensors.torch import load_file

    from skinlib import finetune

    ds, path = setup
    phantom_dir = str(ds.image_path.parent)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    two = tmp_path / "two"
    two.mkdir()
    cmd = finetune.launch_command(2, [str(script), phantom_dir, str(path), str(two)])
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    r0, r1 = load_file(two / "rank0.safetensors"), load_file(two / "rank1.safetensors")
    assert set(r0) == set(r1) and all(torch.equal(r0[k], r1[k]) for k in r0)   # one model, not two
    assert (two / warmup.WEIGHTS).exists()

    loaded = mdl.load(path)
    start = {k: v.clone() for k, v in loaded.model.model.visual.state_dict().items()}
    tup = tuples.sample_tuples(ds.attribute_frame(), w=5, seed=0)
    cache = qa.ImageCache(ds, loaded.image_processor)
    warmup.warm_up(loaded.model, tup, cache, tmp_path / "one", steps=4, batch_size=8, lr=1e-3, progress=False)
    one = loaded.model.model.visual.state_dict()
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    apart = max(float((one[k] - r0[k]).abs().max()) for k in one)
    # Adam moves each weight by about lr per step; a process training on its half batch alone
    # would land a large fraction of that away, float-level summation order far less
    assert moved > 1e-3 and apart < 0.02 * moved, (moved, apart)
