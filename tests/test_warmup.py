"""The vision warm-up: targets come only from the training tuples, its loss falls, and its weights
are saved and reused (real tiny Qwen2-VL, real phantom images)."""
import numpy as np
import pandas as pd
import pytest
import torch

from skinlib import model as mdl, phantom, qa, slice3d, tuples, warmup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("phantom")
    phantom.generate(24, out, seed=5, workers=1, progress=False)
    ds = slice3d.Slice3D(out / "train-image.hdf5", out / "train-metadata.csv", on_error="exclude")
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
    # a second model picks up the saved weights without training
    again = mdl.load(path)
    info2 = warmup.warm_up(again.model, tup, cache, tmp_path, steps=60, progress=False)
    assert "reused" in info2
    for k in changed:
        assert torch.equal(again.model.state_dict()[k], after[k])
