"""Patient-grouped split and the parquet manifest."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from skinlib import attributes
from skinlib.slice3d import open_release
from skinlib.split import build_manifest, load_manifest, patient_split, save_manifest


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    """~500 patients with 1-108 lesions each (skewed like SLICE-3D) and attribute values."""
    rng = np.random.default_rng(42)
    counts = np.clip(rng.geometric(1 / 6, size=500), 1, 108)
    patients = np.repeat([f"IP_{k:07d}" for k in range(500)], counts)
    n = len(patients)
    out = pd.DataFrame({"isic_id": [f"ISIC_{k:07d}" for k in rng.permutation(n)],
                        "patient_id": patients})
    for a in attributes.ATTRIBUTES:
        out[a.name] = rng.normal(5, 2, n)
    out.loc[::17, "norm_color"] = np.nan
    return out.sample(frac=1, random_state=1).reset_index(drop=True)


def test_split_groups_patients(frame):
    s = patient_split(frame, 0.3, seed=0)
    assert list(s.columns) == ["isic_id", "patient_id", "split"]
    assert list(s["isic_id"]) == list(frame["isic_id"])  # every id once, input order
    assert set(s["split"]) == {"train", "test"}
    assert (s.groupby("patient_id")["split"].nunique() == 1).all()
    assert abs((s["split"] == "test").mean() - 0.3) < 0.01


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.8])
def test_split_fraction(frame, fraction):
    s = patient_split(frame, fraction, seed=3)
    assert abs((s["split"] == "test").mean() - fraction) < 0.01


def test_split_deterministic(frame):
    a = patient_split(frame, seed=0)
    pd.testing.assert_frame_equal(a, patient_split(frame, seed=0))
    assert not a["split"].equals(patient_split(frame, seed=1)["split"])
    # independent of the input row order
    shuffled = patient_split(frame.iloc[::-1], seed=0).set_index("isic_id")["split"]
    assert shuffled.loc[a["isic_id"]].tolist() == a["split"].tolist()


def test_split_errors(frame):
    one = frame[frame["patient_id"] == frame["patient_id"][0]]
    with pytest.raises(ValueError, match="at least 2 patients"):
        patient_split(one)
    for bad in (0, 1, -0.2, 1.5, "0.3"):
        with pytest.raises(ValueError, match="test_fraction"):
            patient_split(frame, bad)
    with pytest.raises(ValueError, match="duplicated isic_id"):
        patient_split(pd.concat([frame, frame.iloc[:1]]))
    with pytest.raises(ValueError, match="patient_id"):
        patient_split(frame.drop(columns="patient_id"))


def test_two_patients_both_sides():
    tiny = pd.DataFrame({"isic_id": list("abcd"), "patient_id": ["p", "p", "p", "q"]})
    for seed in range(5):
        for fraction in (0.05, 0.95):
            assert set(patient_split(tiny, fraction, seed)["split"]) == {"train", "test"}


def test_manifest_round_trip(frame, tmp_path):
    m = build_manifest(frame, 0.3, seed=0)
    assert list(m.columns[:3]) == ["isic_id", "patient_id", "split"]
    path = save_manifest(m, tmp_path / "sub" / "manifest.parquet")
    back = load_manifest(path, attributes="all")
    pd.testing.assert_frame_equal(back, m)
    assert back["norm_color"].isna().sum() == frame["norm_color"].isna().sum()


def test_manifest_from_real_fixture(fixtures_dir, tmp_path):
    ds = open_release(fixtures_dir / "isic2024-train-sample")
    m = build_manifest(ds.attribute_frame(), 0.4, seed=0)
    back = load_manifest(save_manifest(m, tmp_path / "m.parquet"))
    assert sorted(back["isic_id"]) == sorted(ds.ids) and set(back["split"]) == {"train", "test"}


def test_load_manifest_rejects(frame, tmp_path):
    m = build_manifest(frame, 0.3, seed=0)
    leaked = m.copy()
    p = leaked["patient_id"][0]
    rows = leaked.index[leaked["patient_id"] == p]
    leaked.loc[rows, "split"] = "train"
    leaked.loc[rows[:1], "split"] = "test"
    if len(rows) == 1:  # give the patient a second image on the other side
        extra = leaked.loc[rows].assign(isic_id="ISIC_extra", split="train")
        leaked = pd.concat([leaked, extra], ignore_index=True)
    path = tmp_path / "leak.parquet"
    leaked.to_parquet(path, index=False)  # written around save_manifest's own check
    with pytest.raises(ValueError) as err:
        load_manifest(path)
    assert str(path) in str(err.value) and "both train and test" in str(err.value) and p in str(err.value)
    with pytest.raises(ValueError, match="both train and test"):
        save_manifest(leaked, tmp_path / "never.parquet")
    assert not (tmp_path / "never.parquet").exists()

    path = tmp_path / "nosplit.parquet"
    m.drop(columns="split").to_parquet(path, index=False)
    with pytest.raises(ValueError, match=f"{path}.*split"):
        load_manifest(path)
    with pytest.raises(ValueError, match="missing column.*areaMM2"):
        m2 = tmp_path / "few.parquet"
        m.drop(columns="areaMM2").to_parquet(m2, index=False)
        load_manifest(m2, attributes=["areaMM2", "B"])
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_manifest(tmp_path / "nothere.parquet")


def _with_target(frame, sick_patients):
    return frame.assign(target=frame["patient_id"].isin(sick_patients).astype(int))


def test_split_unchanged_when_both_halves_hold_malignant_lesions(frame, fixtures_dir):
    """The check changes nothing where the seeded split already holds malignant lesions on both
    sides: on the 5,000 real rows (393 malignant) and on a frame with malignant lesions scattered."""
    import warnings

    real = pd.read_csv(fixtures_dir / "isic2024-metadata-sample5k.csv")
    scattered = _with_target(frame, frame["patient_id"].unique()[::7])
    for f in (real, scattered):
        with warnings.catch_warnings():
            warnings.simplefilter("error")        # no re-draw
            checked = patient_split(f, 0.3, seed=0)
        pd.testing.assert_frame_equal(checked, patient_split(f[["isic_id", "patient_id"]], 0.3, seed=0))
        assert set(checked.loc[f["target"].to_numpy() == 1, "split"]) == {"train", "test"}


def test_split_redraws_when_a_half_has_no_malignant_lesion(frame):
    plain = patient_split(frame, 0.3, seed=0)
    train_only = plain.loc[plain.split == "train", "patient_id"].unique()[:4]
    labelled = _with_target(frame, train_only)
    with pytest.warns(UserWarning, match="drawn again stratified"):
        s = patient_split(labelled, 0.3, seed=0)
    sick = labelled["target"].to_numpy() == 1
    assert set(s.loc[sick, "split"]) == {"train", "test"}
    assert (s.groupby("patient_id")["split"].nunique() == 1).all()      # still no patient on both sides
    assert abs((s["split"] == "test").mean() - 0.3) < 0.02
    assert list(s["isic_id"]) == list(frame["isic_id"])
    with pytest.warns(UserWarning):
        again = patient_split(labelled.iloc[::-1], 0.3, seed=0).set_index("isic_id")["split"]
    assert again.loc[s["isic_id"]].tolist() == s["split"].tolist()      # seeded, order-free
    # the labels may also be passed beside the frame
    with pytest.warns(UserWarning):
        pd.testing.assert_frame_equal(patient_split(frame, 0.3, seed=0, target=labelled["target"]), s)


def test_split_target_errors(frame):
    one = _with_target(frame, frame["patient_id"].unique()[:1])
    with pytest.raises(ValueError, match="1 patient\\(s\\) with a malignant lesion"):
        patient_split(one)
    bad = one.assign(target=one["target"].astype(float))
    bad.loc[3, "target"] = np.nan
    with pytest.raises(ValueError, match=f"target must be 0 or 1; 1 row.*{bad.isic_id[3]}"):
        patient_split(bad)
    with pytest.raises(ValueError, match="3 target values"):
        patient_split(frame, target=[0, 1, 0])
