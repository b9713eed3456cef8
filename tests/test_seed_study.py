"""The seed side study's comparison of ordering verdicts (probes/seed_study.py)."""
import importlib.util

import pandas as pd

from skinlib import config, resumable

from conftest import REPO

spec = importlib.util.spec_from_file_location("seed_study", REPO / "probes" / "seed_study.py")
seed_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seed_study)


def _run(folder, verdicts):
    order = pd.DataFrame({"attribute": ["areaMM2", "B"], "comparison": ["image_text<image"] * 2,
                          "difference": [-3.0, 1.0], "lo": [-5.0, -1.0], "hi": [-1.0, 3.0], "verdict": verdicts})
    r2 = pd.DataFrame({"attribute": ["areaMM2", "B"], "r2": [0.8, 0.5], "reading": "median"})
    for path, frame in ((config.ordering_path(folder), order), (config.r2_readings_path(folder), r2)):
        resumable.write_text(path, frame.to_csv(index=False))
        resumable.seal(path, "test")
    return folder


def test_verdicts_are_set_side_by_side_and_compared(tmp_path):
    runs = {0: _run(tmp_path / "a", ["holds", "not separable"]), 1: _run(tmp_path / "b", ["holds", "reversed"])}
    wide, r2 = seed_study.compare(runs)
    assert list(wide.agree) == [True, False]
    assert {"verdict_seed0", "verdict_seed1", "difference_seed1"} <= set(wide.columns)
    assert sorted(r2.seed.unique()) == [0, 1]


def test_a_seed_profile_changes_only_the_training_seeds(tmp_path):
    path = seed_study.seed_profile(3, tmp_path)
    cfg, base = config.load_profile(path), config.load_profile("default")
    assert cfg["train"]["seed"] == cfg["train"]["tuple_seed"] == cfg["model"]["seed"] == 3
    strip = lambda c: {**c, "name": None, "train": {**c["train"], "seed": 0, "tuple_seed": 0},
                       "model": {**c["model"], "seed": 0}}
    assert strip(cfg) == strip(base)
