"""The SLICE-3D reader on the real fixtures, and each validation error on edited copies."""
from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from skinlib import attributes
from skinlib.slice3d import (CorruptImageError, IdMismatchError, MissingColumnError,
                             MissingValueError, Slice3D, open_release)

ZERO_MISSING = [a for a in attributes.ATTRIBUTES if a.zero_is_missing]
# an attribute for which 0 is an ordinary value (not "not measured", and inside its possible range)
ZERO_KEPT = next(a for a in attributes.ATTRIBUTES if not a.zero_is_missing and a.in_range([0.0])[0])


@pytest.fixture
def train_dir(fixtures_dir):
    return fixtures_dir / "isic2024-train-sample"


@pytest.fixture
def release(train_dir, tmp_path):
    """A writable copy of the real training sample: (image path, csv path, csv as text frame)."""
    h5 = tmp_path / "train-image.hdf5"
    csv = tmp_path / "train-metadata.csv"
    shutil.copyfile(train_dir / "train-image.hdf5", h5)  # copyfile: the source is read-only
    shutil.copyfile(train_dir / "train-metadata.csv", csv)
    text = pd.read_csv(csv, dtype=str, keep_default_na=False)
    return h5, csv, text


def expected_values(csv) -> pd.DataFrame:
    """The CSV's attribute values under short names, zero masked where the registry says so."""
    raw = pd.read_csv(csv)
    out = pd.DataFrame({a.name: raw[a.column].astype(float) for a in attributes.ATTRIBUTES})
    for a in ZERO_MISSING:
        out.loc[out[a.name] == 0, a.name] = np.nan
    return out


def write_csv(text: pd.DataFrame, csv) -> None:
    text.to_csv(csv, index=False)


def check_adds_up(ds: Slice3D) -> None:
    rep = ds.report()
    whole = rep[rep["effect"].isin(["kept", "row excluded"])]
    assert whole["count"].sum() == ds.csv_rows
    assert rep["count"].sum() == 1 * len(ds) + len(ds.exclusion_table())  # the table is the report's source
    ex = ds.exclusions
    row_ex = set(ex.loc[ex["attribute"] == "*", "isic_id"])
    assert len(ds) + (ex["attribute"] == "*").sum() == ds.csv_rows
    assert not row_ex & set(ds.ids)


# ---- real fixtures ---------------------------------------------------------------------------
def test_train_sample(train_dir):
    csv = train_dir / "train-metadata.csv"
    raw = pd.read_csv(csv, dtype={"isic_id": str})
    with open_release(train_dir) as ds:
        assert len(ds) == 5 and ds.csv_rows == 5
        assert ds.ids == list(raw["isic_id"])
        frame = ds.attribute_frame()
        assert list(frame.columns) == ["isic_id", "patient_id", *attributes.NAMES]
        np.testing.assert_array_equal(frame[list(attributes.NAMES)].to_numpy(),
                                      expected_values(csv).to_numpy())
        sizes = []
        for i in range(len(ds)):
            item = ds[i]
            assert item["isic_id"] == raw["isic_id"][i]
            assert item["patient_id"] == raw["patient_id"][i]
            assert item["target"] == raw["target"][i]
            assert item["image"].mode == "RGB"
            assert item["attributes"]["areaMM2"] == raw["tbp_lv_areaMM2"][i]
            sizes.append(item["image"].size)
        assert all(w == h and 91 <= w <= 157 for w, h in sizes)
        assert min(s[0] for s in sizes) == 91 and max(s[0] for s in sizes) == 157
        assert ds[-1]["isic_id"] == raw["isic_id"].iloc[-1]
        with pytest.raises(IndexError):
            ds[5]
        assert ds.exclusions.empty
        labels = ds.labels()
        assert list(labels.isic_id) == list(frame.isic_id) and list(labels.target) == list(raw.target)
        assert ds.verify(progress=False).empty and len(ds) == 5
    assert ds._h5 is None  # closed by the context manager


def test_test_set_without_target(fixtures_dir):
    csv = fixtures_dir / "isic2024-test-metadata.csv"
    raw = pd.read_csv(csv)
    assert "target" not in raw.columns
    ds = open_release(fixtures_dir, split="test")
    assert ds.metadata_path == csv
    assert len(ds) == 3 and ds.ids == list(raw["isic_id"])
    assert [ds.image(i).size for i in ds.ids] == [(141, 141), (125, 125), (119, 119)]
    assert "target" not in ds[0] and ds.labels() is None
    frame = ds.attribute_frame()
    np.testing.assert_array_equal(frame[list(attributes.NAMES)].to_numpy(),
                                  expected_values(csv).to_numpy())
    # this real test set has one row where both zero_is_missing attributes are 0
    zero_id = raw.loc[raw[ZERO_MISSING[0].column] == 0, "isic_id"].item()
    assert frame.loc[frame["isic_id"] == zero_id, [a.name for a in ZERO_MISSING]].isna().all(axis=None)
    rep = ds.report().set_index(["reason", "attribute"])["count"]
    assert rep[("kept", "*")] == 3
    for a in ZERO_MISSING:
        assert rep[("zero_is_missing", a.name)] == 1
    check_adds_up(ds)


def test_open_release_names_folder_and_files(fixtures_dir, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        open_release(tmp_path, split="train")
    assert str(tmp_path) in str(err.value) and "train-image.hdf5" in str(err.value)
    ds = open_release(image=fixtures_dir / "isic2024-test-image.hdf5",
                      metadata=fixtures_dir / "isic2024-test-metadata.csv", attributes=["areaMM2"])
    assert len(ds) == 3 and list(ds[0]["attributes"]) == ["areaMM2"]


class Probe(Slice3D):
    """Reports which process read each item and with which HDF5 handle."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        item.update(pid=os.getpid(), handle_pid=self._pid, handle=id(self._h5))
        return item


def to_tensor(im):
    return torch.from_numpy(np.array(im.resize((32, 32))))


def test_dataloader_fork_workers(train_dir):
    ds = Probe(train_dir / "train-image.hdf5", train_dir / "train-metadata.csv", transform=to_tensor)
    first = ds[0]  # the parent opens its handle before the fork
    assert first["handle_pid"] == os.getpid()
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2,
                                         multiprocessing_context="fork")
    seen, pids = [], set()
    for batch in loader:
        seen += list(batch["isic_id"])
        assert tuple(batch["image"].shape[1:]) == (32, 32, 3)
        assert batch["attributes"]["areaMM2"].dtype == torch.float64
        # each worker opened its own handle instead of reusing the inherited one
        assert torch.equal(batch["pid"], batch["handle_pid"])
        assert (batch["handle"] != first["handle"]).all()
        pids |= set(batch["pid"].tolist())
    assert sorted(seen) == sorted(ds.ids)
    assert os.getpid() not in pids and len(pids) == 2
    # the parent's handle is untouched and still reads
    again = ds[1]
    assert again["handle"] == first["handle"] and again["image"].shape == (32, 32, 3)


# ---- validation errors -------------------------------------------------------------------------
def test_missing_column(release):
    h5, csv, text = release
    col = attributes.get("areaMM2").column
    write_csv(text.drop(columns=[col, "patient_id"]), csv)
    with pytest.raises(MissingColumnError) as err:
        Slice3D(h5, csv)
    assert str(csv) in str(err.value) and col in str(err.value) and "patient_id" in str(err.value)
    write_csv(text.drop(columns=[col]), csv)
    assert len(Slice3D(h5, csv, attributes=["deltaL", "B"], on_error="exclude")) == 5


def test_id_in_csv_not_in_hdf5(release):
    h5, csv, text = release
    gone = text["isic_id"][2]
    with h5py.File(h5, "a") as f:
        del f[gone]
    with pytest.raises(IdMismatchError) as err:
        Slice3D(h5, csv)
    msg = str(err.value)
    assert str(csv) in msg and str(h5) in msg and gone in msg and " 1 " in msg
    ds = Slice3D(h5, csv, on_error="exclude")
    assert len(ds) == 4 and gone not in ds.ids
    ex = ds.exclusions
    assert ex[["isic_id", "attribute", "reason"]].values.tolist() == [[gone, "*", "missing_image"]]
    check_adds_up(ds)


def test_id_in_hdf5_not_in_csv(release):
    h5, csv, text = release
    extra = text["isic_id"][4]
    write_csv(text.drop(index=4), csv)
    with pytest.raises(IdMismatchError) as err:
        Slice3D(h5, csv)
    assert str(h5) in str(err.value) and extra in str(err.value)
    ds = Slice3D(h5, csv, on_error="exclude")
    assert len(ds) == 4 and ds.unused_images == [extra] and ds.exclusions.empty
    rep = ds.report().set_index("reason")["count"]
    assert rep["unused_image"] == 1 and rep["kept"] == 4
    check_adds_up(ds)


def test_duplicate_id(release):
    h5, csv, text = release
    dup = text["isic_id"][1]
    write_csv(pd.concat([text, text.iloc[[1]]], ignore_index=True), csv)
    with pytest.raises(IdMismatchError) as err:
        Slice3D(h5, csv)
    assert str(csv) in str(err.value) and dup in str(err.value) and "duplicated" in str(err.value)
    ds = Slice3D(h5, csv, on_error="exclude")
    assert ds.csv_rows == 6 and len(ds) == 4 and dup not in ds.ids
    ex = ds.exclusions
    assert (ex["reason"] == "duplicate_id").sum() == 2 and set(ex["isic_id"]) == {dup}
    check_adds_up(ds)


def test_empty_patient_id(release):
    h5, csv, text = release
    text.loc[3, "patient_id"] = ""
    write_csv(text, csv)
    with pytest.raises(IdMismatchError, match="patient_id"):
        Slice3D(h5, csv)
    ds = Slice3D(h5, csv, on_error="exclude")
    assert ds.exclusions["reason"].tolist() == ["missing_patient_id"] and len(ds) == 4


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_jpeg(release, damage):
    h5, csv, text = release
    bad = text["isic_id"][3]
    with h5py.File(h5, "a") as f:
        good = bytes(f[bad][()])
        data = good[: len(good) // 2] if damage == "truncated" else b"\x00garbage, not a JPEG" * 10
        del f[bad]
        f.create_dataset(bad, data=np.bytes_(data))
    ds = Slice3D(h5, csv)  # construction does not decode
    assert len(ds) == 5 and ds.image(text["isic_id"][0]).size[0] > 0
    with pytest.raises(CorruptImageError) as err:
        ds.image(bad)
    assert str(h5) in str(err.value) and bad in str(err.value)
    with pytest.raises(CorruptImageError, match=bad):
        ds[3]
    with pytest.raises(CorruptImageError, match=bad):
        ds.verify(progress=False)
    ds = Slice3D(h5, csv, on_error="exclude")
    found = ds.verify(progress=False)
    assert found["isic_id"].tolist() == [bad] and ds.verified
    assert len(ds) == 4 and bad not in ds.ids and bad not in set(ds.attribute_frame()["isic_id"])
    assert ds.exclusions[["isic_id", "attribute", "reason"]].values.tolist() == [[bad, "*", "corrupt_jpeg"]]
    # kept rows still line up with their own values after the exclusion
    frame = ds.attribute_frame().set_index("isic_id")
    raw = pd.read_csv(csv).set_index("isic_id")
    for i in range(len(ds)):
        item = ds[i]
        assert item["attributes"]["areaMM2"] == raw.loc[item["isic_id"], "tbp_lv_areaMM2"]
        assert frame.loc[item["isic_id"], "areaMM2"] == item["attributes"]["areaMM2"]
    check_adds_up(ds)


def test_nan_attribute(release):
    h5, csv, text = release
    a = attributes.get("deltaB")
    row = 2  # 0-based; the message counts data rows from 1
    nan_id = text["isic_id"][row]
    text.loc[row, a.column] = ""
    write_csv(text, csv)
    with pytest.raises(MissingValueError) as err:
        Slice3D(h5, csv)
    msg = str(err.value)
    assert str(csv) in msg and "data row 3" in msg and nan_id in msg and a.column in msg
    ds = Slice3D(h5, csv, on_error="exclude")
    assert len(ds) == 5  # the row stays; only that value is masked
    frame = ds.attribute_frame().set_index("isic_id")
    assert np.isnan(frame.loc[nan_id, a.name])
    assert frame.drop(columns=["patient_id"]).isna().sum().sum() == 1
    assert np.isnan(ds[row]["attributes"][a.name]) and ds[row]["attributes"]["areaMM2"] > 0
    ex = ds.exclusions
    assert ex[["isic_id", "attribute", "reason"]].values.tolist() == [[nan_id, a.name, "missing_value"]]
    rep = ds.report().set_index(["reason", "attribute"])["count"]
    assert rep[("missing_value", a.name)] == 1 and rep[("kept", "*")] == 5
    assert ds.counts() == {"csv_rows": 5, "kept_rows": 5, "excluded_rows": 0,
                           "masked_values": 1, "unused_images": 0, "counted_images": 0}
    # a subset of attributes that does not need the column is unaffected
    assert Slice3D(h5, csv, attributes=["areaMM2"]).exclusions.empty


def test_non_numeric_attribute(release):
    h5, csv, text = release
    text.loc[0, "tbp_lv_A"] = "n/a?"
    write_csv(text, csv)
    with pytest.raises(MissingValueError, match="tbp_lv_A"):
        Slice3D(h5, csv)
    ds = Slice3D(h5, csv, on_error="exclude")
    assert ds.exclusions["reason"].tolist() == ["invalid_value"] and np.isnan(ds[0]["attributes"]["A"])


def test_zero_is_missing(release):
    h5, csv, text = release
    for a in ZERO_MISSING:
        text.loc[1, a.column] = "0"
    text.loc[1, ZERO_KEPT.column] = "0.0"
    write_csv(text, csv)
    ds = Slice3D(h5, csv)  # raise mode: zeros are masked, never raised on
    assert len(ds) == 5
    values = ds[1]["attributes"]
    assert all(np.isnan(values[a.name]) for a in ZERO_MISSING)
    assert values[ZERO_KEPT.name] == 0.0  # 0 is a real value for the others
    ex = ds.exclusions
    assert set(ex["reason"]) == {"zero_is_missing"}
    assert sorted(ex["attribute"]) == sorted(a.name for a in ZERO_MISSING)
    assert (ds.report()["reason"] == "zero_is_missing").sum() == len(ZERO_MISSING)
    assert ds.metadata.loc[1, ZERO_MISSING[0].column] == 0  # metadata keeps the released value


def test_report_adds_up_with_mixed_problems(release):
    h5, csv, text = release
    a = attributes.get("Bext")
    text.loc[0, a.column] = ""
    text = pd.concat([text, text.iloc[[4]]], ignore_index=True)  # duplicate of row 4
    write_csv(text, csv)
    with h5py.File(h5, "a") as f:
        del f[text["isic_id"][2]]
        f.create_dataset("ISIC_0000000", data=np.bytes_(b"orphan"))
    ds = Slice3D(h5, csv, on_error="exclude")
    ds.verify(progress=False)
    c = ds.counts()
    assert c == {"csv_rows": 6, "kept_rows": 3, "excluded_rows": 3, "masked_values": 1,
                 "unused_images": 1, "counted_images": 0}
    rep = ds.report()
    assert rep["count"].sum() == 6 + 1 + 1  # rows + masked value + unused image
    check_adds_up(ds)
    kept_or_excluded = set(ds.ids) | set(ds.exclusions.query("attribute == '*'")["isic_id"])
    assert kept_or_excluded == set(text["isic_id"])


def test_fixture_images_are_the_eight_real_crops(fixtures_dir):
    from skinlib import slice3d

    crops = slice3d.fixture_images(fixtures_dir)
    assert len(crops) == 8 and all(i.startswith("ISIC_") for i, _ in crops)
    assert all(90 <= im.size[0] <= 160 for _, im in crops)
