"""The scale side study (probes/scale_study.py): its profiles, its table, the CNN reader it calls,
and the sentence chapter 3 builds from its CSV (metrics.scale_sentence)."""
import importlib.util
import sys

import numpy as np
import pandas as pd
import pytest

from skinlib import attributes, config, metrics, resumable, split

from conftest import REPO

sys.path.insert(0, str(REPO / "probes"))
spec = importlib.util.spec_from_file_location("scale_study", REPO / "probes" / "scale_study.py")
scale_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scale_study)
import cnn_reader  # noqa: E402  (put on the path above)

NAMES = list(attributes.NAMES)


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_a_size_profile_changes_only_the_phantom_size(tmp_path):
    base = config.load_profile("default")
    cfg = config.load_profile(scale_study.size_profile(700, tmp_path))
    changed = {k for k, v in _flat(cfg).items() if _flat(base).get(k) != v}
    assert changed == {"name", "data.n_images"}
    frac = base["data"]["test_fraction"]
    assert cfg["data"]["n_images"] == round(700 / (1 - frac))
    for n in (700, 3500, 10000, 30000):   # the training split the study asks for
        assert abs(scale_study.phantom_size(n, frac) * (1 - frac) - n) <= 1


def _readings(rng, readings=("greedy", "median")):
    return pd.concat([pd.DataFrame({"attribute": NAMES, "r2": rng.uniform(-0.2, 0.9, len(NAMES)),
                                    "mae": 1.0, "n": 500, "unparsed": 0, "reading": r})
                      .assign(r2_lo=lambda f: f.r2 - 0.1, r2_hi=lambda f: f.r2 + 0.1)
                      for r in readings], ignore_index=True)


def _cnn(rng):
    r2 = rng.uniform(-0.2, 0.9, len(NAMES))
    return pd.DataFrame({"attribute": NAMES, "r2": r2, "r2_lo": r2 - 0.1, "r2_hi": r2 + 0.1,
                         "n": 500})


def _meta(n):
    return {"n_train": n, "n_images": round(n / 0.7), "n_test": 300, "run": f"runs/scale/n{n}",
            "code": "abc1234", "wall_s": 1.5 * n}


def test_the_table_holds_every_size_model_and_attribute_in_order():
    rng = np.random.default_rng(0)
    parts = []
    for n in (3500, 700):   # out of order on purpose
        parts += [scale_study.qwen_rows(_readings(rng), _meta(n)),
                  scale_study.cnn_rows(_cnn(rng), _meta(n))]
    table = scale_study.assemble(parts)
    assert list(table.columns) == scale_study.COLUMNS
    assert len(table) == 2 * 3 * len(NAMES)
    assert list(table.n_train.unique()) == [700, 3500]
    assert set(table.model) == {"qwen_greedy", "qwen_median", "cnn"}
    one = table[(table.n_train == 700) & (table.model == "cnn")]
    assert list(one.attribute) == NAMES
    # the values are carried, not recomputed
    src = parts[3].set_index("attribute")
    assert np.allclose(one.set_index("attribute").r2, src.r2[NAMES])


def test_the_table_refuses_two_runs_of_one_size_and_a_frame_without_intervals():
    rng = np.random.default_rng(1)
    part = scale_study.cnn_rows(_cnn(rng), _meta(700))
    with pytest.raises(ValueError, match="n_train 700, model cnn, attribute areaMM2"):
        scale_study.assemble([part, part])
    with pytest.raises(KeyError, match="r2_lo"):
        scale_study.qwen_rows(_readings(rng).drop(columns=["r2_lo", "r2_hi"]), _meta(700))


def _scale(sizes, medians, hard_at):
    """A scale table whose median R² per size is `medians` and whose attribute B sits at
    hard_at[size] with a ±0.05 interval."""
    rows = []
    for n, m in zip(sizes, medians):
        for k, a in enumerate(NAMES):
            r = hard_at[n] if a == "B" else m + (k - 7.5) * 0.01
            rows.append({"n_train": n, "model": "cnn", "attribute": a, "r2": r,
                         "r2_lo": r - 0.05, "r2_hi": r + 0.05})
    return pd.DataFrame(rows)


def test_the_sentence_gives_the_slope_per_tenfold_and_the_intervals_verdict():
    sizes, medians = [700, 3500, 10000], [0.50, 0.60, 0.66]
    table = _scale(sizes, medians, {700: 0.0, 3500: 0.1, 10000: 0.3})
    text = metrics.scale_sentence(table, {"cnn": "CNN reader"}, hardest=["B"])
    got = table.groupby("n_train").r2.median()
    slope = np.polyfit(np.log10(sizes), got.to_numpy(), 1)[0]
    assert f"({slope:+.2f} per tenfold)" in text
    assert "CNN reader: R² median" in text and f"{got[10000]:.2f} at 10,000" in text
    assert "B 0.00 → 0.30, up beyond its intervals" in text
    ahead = got[10000] + slope * np.log10(282_564 / 10000)
    assert ahead < 1 and f"for CNN reader, {ahead:.2f} at the paper's size" in text
    assert f"{np.log10(282_564 / 10000):.1f} decades" in text
    # within noise: the interval at the largest size overlaps the smallest's
    flat = metrics.scale_sentence(_scale(sizes, medians, {700: 0.0, 3500: 0.0, 10000: 0.05}),
                                  hardest=["B"])
    assert "B 0.00 → 0.05, within its intervals" in flat


def test_the_sentence_caps_a_line_past_one_and_says_one_size_has_no_trend():
    table = _scale([700, 3500], [0.5, 0.9], {700: 0.5, 3500: 0.9})
    steep = metrics.scale_sentence(table)
    got = table.groupby("n_train").r2.median()
    slope = (got[3500] - got[700]) / np.log10(3500 / 700)
    one = 3500 * 10 ** ((1 - got[3500]) / slope)     # where the line crosses 1
    assert f"for cnn, R² = 1 at about {float(f'{one:.2g}'):,.0f} training images" in steep
    assert "R² cannot pass 1" in steep
    falling = metrics.scale_sentence(_scale([700, 3500], [0.6, 0.5], {700: 0.5, 3500: 0.5}))
    assert "for cnn, no rise to carry on" in falling
    one = metrics.scale_sentence(_scale([700], [0.5], {700: 0.5}))
    assert "one size: no trend yet" in one and "no trend to carry" in one
    with pytest.raises(KeyError, match="r2_hi"):
        metrics.scale_sentence(_scale([700], [0.5], {700: 0.5}).drop(columns="r2_hi"))


def test_the_hardest_attributes_are_the_lowest_at_the_largest_size():
    table = _scale([700, 3500], [0.5, 0.6], {700: 0.9, 3500: -0.5})
    assert metrics.scale_hardest(table, "cnn", k=1) == ["B"]
    assert metrics.scale_hardest(table, "cnn", k=3)[0] == "B"
    with pytest.raises(KeyError, match="qwen_median"):
        metrics.scale_hardest(table, "qwen_median")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, phantom_release):
    """A run folder holding only what the CNN reader reads: a 90-image phantom and its split."""
    run = tmp_path_factory.mktemp("run")
    ds = phantom_release(config.phantom_dir(run), 90, seed=3)
    frame = ds.attribute_frame()
    sp = split.patient_split(frame, test_fraction=0.3, seed=0)
    split.save_manifest(frame.merge(sp[["isic_id", "split"]], on="isic_id"),
                        config.manifest_path(run))
    return run


def test_the_cnn_reader_scores_the_chains_rows_of_a_run(tiny_run):
    man = split.load_manifest(config.manifest_path(tiny_run))
    test = man[man.split == "test"]
    # without predictions: every test image
    every = cnn_reader.read_run(tiny_run, "default", epochs=1, threads=1, log=lambda m: None)
    assert every.on == "all test images" and every.n_test == len(test)
    assert every.n_train == int((man.split == "train").sum())
    # with the chain's predictions: exactly their rows
    ids = list(test.isic_id[:8])
    rows = test[test.isic_id.isin(ids)].melt(id_vars=["isic_id"], value_vars=NAMES,
                                             var_name="attribute", value_name="true")
    rows = rows[rows.attribute != "B"]    # a row the chain did not score is not scored
    path = config.predictions_path(tiny_run)
    resumable.write_text(path, rows.assign(reply="", pred=0.0).to_csv(index=False))
    try:
        got = cnn_reader.read_run(tiny_run, "default", epochs=1, threads=1, log=lambda m: None)
        assert got.on == "chain" and got.n_test == len(ids)
        want = rows.dropna(subset=["true"]).groupby("attribute").size()
        assert dict(zip(got.r2.attribute, got.r2.n)) == want.to_dict()
        assert {"r2", "r2_lo", "r2_hi"} <= set(got.r2.columns)
        # an id outside the run's test split is refused, naming the file
        other = man.isic_id[man.split == "train"].iloc[0]
        resumable.write_text(path, rows.assign(isic_id=other).to_csv(index=False))
        with pytest.raises(ValueError, match="predictions.csv"):
            cnn_reader.read_run(tiny_run, "default", epochs=1, threads=1, log=lambda m: None)
    finally:
        path.unlink()


def test_the_wall_time_keeps_each_stages_longest_run(tmp_path):
    run, record = tmp_path / "run", tmp_path / "wall.json"

    def stamps(seconds):
        for stage, s in zip(scale_study.STAGES, seconds):
            resumable.write_json(config.stage_stamp_path(run, stage), {"seconds": s})

    stamps([50.0, 360.0, 70.0])
    assert scale_study.chain_seconds(run, record) == 480.0
    stamps([15.0, 24.0, 90.0])   # a rerun that reused the first two stages' work
    assert scale_study.chain_seconds(run, record) == 50.0 + 360.0 + 90.0
    config.stage_stamp_path(run, scale_study.STAGES[0]).unlink()
    with pytest.raises(FileNotFoundError, match="01_data"):
        scale_study.chain_seconds(run, record)
