"""Settings and input that must fail loudly (issue 27): each case on real files, damaged copies of
a small phantom release or of the shipped profiles, and the real command where it is one."""
from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time

import warnings

import h5py
import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from skinlib import attributes, config, run, slice3d
from skinlib.slice3d import ImageError, OutOfRangeError, Slice3D, Slice3DError, TargetError

REPO = config.REPO_ROOT
N = 40  # phantom crops: enough for the data chapter's sample grid after a few exclusions


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_release(tmp_path_factory, phantom_release):
    folder = tmp_path_factory.mktemp("phantom")
    phantom_release(folder, N, seed=7)
    return folder


@pytest.fixture
def release(base_release, tmp_path):
    """A writable copy of the phantom: (image path, csv path, csv as a text frame)."""
    h5, csv = tmp_path / "train-image.hdf5", tmp_path / "train-metadata.csv"
    shutil.copyfile(base_release / "train-image.hdf5", h5)
    shutil.copyfile(base_release / "train-metadata.csv", csv)
    return h5, csv, pd.read_csv(csv, dtype=str, keep_default_na=False)


def write_profile(path, body: str):
    path.write_text(body)
    return path


def one_line(exc) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    return msg


def adds_up(ds: Slice3D) -> None:
    rep = ds.report()
    assert rep.loc[rep.effect.isin(["kept", "row excluded"]), "count"].sum() == ds.csv_rows
    assert rep["count"].sum() == len(ds) + len(ds.exclusion_table())


# ---- 1. profile keys and types -------------------------------------------------------------------
@pytest.mark.parametrize("body,key,suggested", [
    ("data: {on_eror: raise}", "data.on_eror", "data.on_error"),
    ("data: {test_fracton: 0.5}", "data.test_fracton", "data.test_fraction"),
    ("dta: {n_images: 10}", "dta", "data"),
    ("train: {vision_warmup: {step: 3}}", "train.vision_warmup.step", "train.vision_warmup.steps"),
])
def test_an_unknown_profile_key_is_an_error_naming_it_and_the_closest(tmp_path, body, key, suggested):
    prof = write_profile(tmp_path / "typo.yaml", f"name: typo\ninherit: smoke\n{body}\n")
    with pytest.raises(config.ProfileError) as e:
        config.load_profile(prof)
    msg = one_line(e.value)
    assert str(prof) in msg and key in msg and f"did you mean {suggested}?" in msg


def test_a_typo_in_an_inherited_profile_names_that_file(tmp_path):
    parent = write_profile(tmp_path / "parent.yaml", "name: parent\ninherit: smoke\ndata: {on_eror: raise}\n")
    child = write_profile(tmp_path / "child.yaml", f"name: child\ninherit: {parent}\n")
    with pytest.raises(config.ProfileError, match=r"parent\.yaml: unknown key data\.on_eror"):
        config.load_profile(child)


@pytest.mark.parametrize("body,key,value,expected", [
    ('train: {vision_warmup: {lr: "1e-3"}}', "train.vision_warmup.lr", "'1e-3'", "a number"),
    ("train: {vision_warmup: {lr: 1e-3}}", "train.vision_warmup.lr", "'1e-3'", "a number"),  # YAML 1.1: text
    ("data: {n_images: 12.5}", "data.n_images", "12.5", "a whole number"),
    ("data: {verify_images: 'no'}", "data.verify_images", "'no'", "true or false"),
    ("data: {on_error: rase}", "data.on_error", "'rase'", "one of 'exclude', 'raise'"),
    ("train: {lora: 8}", "train.lora", "8", "a mapping"),
    ("embed: {multi: [areaMM2, aera]}", "embed.multi", "'aera'", "areaMM2"),
])
def test_a_wrong_type_is_an_error_naming_key_value_and_type(tmp_path, body, key, value, expected):
    prof = write_profile(tmp_path / "types.yaml", f"name: types\ninherit: smoke\n{body}\n")
    with pytest.raises(config.ProfileError) as e:
        config.load_profile(prof)
    msg = one_line(e.value)
    assert str(prof) in msg and key in msg and value in msg and expected in msg


def test_a_notebook_override_of_the_wrong_type_is_an_error():
    with pytest.raises(config.ProfileError, match=r"data\.test_fraction is '0\.5' \(str\), expected a number"):
        config.section("smoke", "data", test_fraction="0.5")


# ---- 2. notebook parameters ------------------------------------------------------------------------
def test_an_unknown_notebook_parameter_stops_the_stage_before_it_runs(tmp_path):
    nb = REPO / "notebooks/01_data.py"
    with pytest.raises(run.ParameterError) as e:
        run.execute_stage("01_data", nb, "smoke", tmp_path, parameters={"test_fracton": 0.5})
    msg = one_line(e.value)
    assert "test_fracton" in msg and "did you mean 'test_fraction'?" in msg and str(nb) in msg
    assert not (tmp_path / "01_data").exists()


def test_the_one_notebook_command_refuses_an_unknown_parameter(tmp_path, capsys):
    code = run.main(["--notebook", "notebooks/01_data.py", "--profile", "smoke", "--out", str(tmp_path / "x"),
                     "-p", "test_fracton", "0.5"])
    err = capsys.readouterr().err
    assert code != 0 and "test_fracton" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_the_one_notebook_command_runs_a_real_release_and_reports_every_exclusion(release, tmp_path, capsys):
    # A `source: slice3d` profile (the README's old papermill pipe failed on its missing folder)
    # on a release with one damage of each kind the chapter must count.
    h5, csv, text = release
    ids = list(text.isic_id)
    text["target"] = "0"
    text.loc[~text.patient_id.duplicated(), "target"] = "1"  # a malignant lesion in every patient
    text.loc[1, attributes.get("areaMM2").column] = "-2"
    text.loc[2, "target"] = "7"
    text.drop(index=3).to_csv(csv, index=False)  # ids[3]: an image with no CSV row
    put_image(h5, ids[4], reencode(h5, ids[4], "png"))
    put_image(h5, ids[5], reencode(h5, ids[5], "grey"))
    prof = write_profile(tmp_path / "real.yaml", yaml.safe_dump(
        {"name": "real", "inherit": "smoke", "data": {"source": "slice3d", "image_h5": str(h5), "metadata_csv": str(csv)}}))
    out = tmp_path / "run"
    code = run.main(["--notebook", "notebooks/01_data.py", "--profile", str(prof), "--out", str(out),
                     "-p", "test_fraction", "0.5"])
    assert code == 0, capsys.readouterr().err
    assert (out / "01_data" / "01_data.ipynb").exists() and config.manifest_path(out).exists()
    table = pd.read_csv(config.exclusions_path(out))
    got = {(r.isic_id, r.reason) for r in table.itertuples()}
    assert {(ids[1], "out_of_range"), (ids[2], "invalid_target"), (ids[3], "unused_image"),
            (ids[4], "not_jpeg"), (ids[5], "not_rgb")} <= got
    # the chapter's table shows the same entries: every reason of the csv
    executed = nbformat.read(out / "01_data" / "01_data.ipynb", as_version=4)
    shown = "".join(o.get("data", {}).get("text/plain", "") for c in executed.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
    for reason in set(table.reason):
        assert reason in shown, reason


# ---- 3. profiles that cannot run ---------------------------------------------------------------------
def test_a_real_release_without_paths_is_one_clear_error(tmp_path):
    prof = write_profile(tmp_path / "real.yaml", "name: real\ninherit: smoke\ndata: {source: slice3d}\n")
    with pytest.raises(config.ProfileError) as e:
        config.load_profile(prof)
    msg = one_line(e.value)
    assert str(prof) in msg and "data.image_h5" in msg and "None" not in msg
    with pytest.raises(config.ProfileError, match="data.metadata_csv"):
        config.release_files({"name": "x", "data": {"source": "slice3d", "image_h5": "a.hdf5", "metadata_csv": None}}, tmp_path)


@pytest.mark.parametrize("args,says", [
    (["--profile", "nope"], "unknown profile 'nope'"),
    (["--profile", "smok"], "did you mean 'smoke'?"),
    (["--profile", "smoke", "--stages", "01_dta"], "unknown stages"),
])
def test_the_command_says_one_line_and_exits_non_zero(args, says, tmp_path, capsys):
    assert run.main(args + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ---- 4. Ctrl-C ------------------------------------------------------------------------------------------
def test_ctrl_c_in_a_stage_names_it_and_exits_130(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a new process group, as a terminal's Ctrl-C reaches the runner and its kernel together; SIGINT
    # restored in case this test itself runs where it is ignored (a background job)
    proc = subprocess.Popen([sys.executable, "-m", "skinlib.run", "--profile", "smoke", "--out", str(out),
                             "--stages", "01_data"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    executed = out / "01_data" / "01_data.ipynb"
    deadline = time.time() + 60
    while not executed.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # inside the stage: papermill has written the notebook and starts its kernel
    assert proc.poll() is None, "the stage ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()  # nothing but our line: no traceback, not even the kernel's
    assert len(lines) == 1 and "01_data" in lines[0] and "rerun the same command" in lines[0], err
    assert not config.stage_stamp_path(out, "01_data").exists()


# ---- 5. make book PROFILE=path/x.yaml -----------------------------------------------------------------
def test_make_book_names_the_run_folder_after_the_profile_file():
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    dry = subprocess.run(["make", "-n", "book", "PROFILE=some/where/x.yaml", "STAMP=Makefile"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert "--profile some/where/x.yaml --out runs/x\n" in dry and "--run runs/x\n" in dry


# ---- 6. duplicated header -------------------------------------------------------------------------------
def test_a_duplicated_column_is_refused_naming_column_and_file(release):
    h5, csv, text = release
    col = attributes.get("areaMM2").column
    text.insert(len(text.columns), col, "999", allow_duplicates=True)
    text.to_csv(csv, index=False)
    with pytest.raises(Slice3DError) as e:
        Slice3D(h5, csv, on_error="exclude")
    msg = one_line(e.value)
    assert str(csv) in msg and col in msg and "repeats" in msg


# ---- 7. files that are not what they claim ---------------------------------------------------------------
def _not_hdf5(h5, csv, text):
    h5.write_text("isic_id,patient_id\n")
    return h5, "not a readable HDF5 file"


def _empty(h5, csv, text):
    csv.write_bytes(b"")
    return csv, "empty"


def _binary(h5, csv, text):
    csv.write_bytes(h5.read_bytes()[:4096])
    return csv, "binary"


def _semicolons(h5, csv, text):
    text.to_csv(csv, index=False, sep=";")
    return csv, "separated by ';'"


def _latin1(h5, csv, text):
    text.loc[3, "attribution"] = "Hôpital Édouard"
    text.to_csv(csv, index=False, encoding="latin-1")
    return csv, "not UTF-8 text (byte 0xf4 on line 5"


def _header_only(h5, csv, text):
    text.iloc[:0].to_csv(csv, index=False)
    return csv, "no data rows"


@pytest.mark.parametrize("damage", [_not_hdf5, _empty, _binary, _semicolons, _latin1, _header_only],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_file_of_the_wrong_kind_is_named_with_what_was_expected(release, damage):
    h5, csv, text = release
    bad, says = damage(h5, csv, text)
    with pytest.raises(Slice3DError) as e:
        Slice3D(h5, csv, on_error="exclude")
    msg = one_line(e.value)
    assert str(bad) in msg and says in msg and "expected" in msg


# ---- 8. images -------------------------------------------------------------------------------------------
def reencode(h5, isic_id: str, kind: str) -> bytes:
    """The crop of `isic_id` written again as `kind`."""
    with h5py.File(h5, "r") as f:
        im = Image.open(io.BytesIO(f[isic_id][()].tobytes())).convert("RGB")
    buf = io.BytesIO()
    side = int(slice3d.MAX_PIXELS ** 0.5) + 1
    if kind == "png":
        im.save(buf, "PNG")
    elif kind == "gif":
        im.save(buf, "GIF")
    elif kind == "cmyk":
        im.convert("CMYK").save(buf, "JPEG")
    elif kind == "grey":
        im.convert("L").save(buf, "JPEG")
    elif kind == "strip":
        im.resize((3000, 10)).save(buf, "JPEG")
    elif kind == "large":
        im.resize((side, side)).save(buf, "JPEG", quality=30)
    elif kind == "claims_12000":  # a small JPEG whose header says 12000 x 12000 (PIL only warns)
        im.save(buf, "JPEG")
        data = bytearray(buf.getvalue())
        sof = data.index(b"\xff\xc0")
        data[sof + 5:sof + 9] = (12000).to_bytes(2, "big") * 2
        return bytes(data)
    return buf.getvalue()


def put_image(h5, isic_id: str, data: bytes) -> None:
    with h5py.File(h5, "a") as f:
        del f[isic_id]
        f.create_dataset(isic_id, data=np.void(data))


@pytest.mark.parametrize("kind,reason,kept", [
    ("png", "not_jpeg", True),        # the same RGB pixels: kept, counted
    ("gif", "not_rgb", False),        # a palette of 256 colours
    ("cmyk", "not_rgb", False),
    ("grey", "not_rgb", False),
    ("strip", "image_shape", False),  # 3000 x 10
    ("large", "image_too_large", False),
    ("claims_12000", "image_too_large", False),
])
def test_an_image_unlike_the_releases_is_counted(release, kind, reason, kept):
    h5, csv, text = release
    target = text.isic_id[6]
    put_image(h5, target, reencode(h5, target, kind))
    ds = Slice3D(h5, csv, on_error="exclude")
    if not kept:  # asked for before verify(): an error naming the image, not a crash later
        with pytest.raises(ImageError, match=target):
            ds.image(target)
    with warnings.catch_warnings(record=True) as caught:  # PIL's decompression-bomb warning included
        warnings.simplefilter("always")
        ds.verify(progress=False)
    assert not [str(w.message) for w in caught]
    table = ds.exclusion_table()
    mine = table[table.isic_id == target]
    assert mine.reason.tolist() == [reason], table
    assert mine.effect.item() == ("kept, counted" if kept else "row excluded")
    assert (target in ds.ids) == kept and len(ds) == N - (not kept)
    rep = ds.report().set_index("reason")["count"]
    assert rep[reason] == 1
    adds_up(ds)
    strict = Slice3D(h5, csv)
    if kept:
        strict.verify(progress=False)
        assert strict.counts()["counted_images"] == 1
    else:
        with pytest.raises(ImageError, match=target) as e:
            strict.verify(progress=False)
        assert e.value.reason == reason and str(h5) in str(e.value)


def test_images_without_a_row_are_in_the_exclusion_table(release):
    h5, csv, text = release
    text.drop(index=[0, 5]).to_csv(csv, index=False)
    ds = Slice3D(h5, csv, on_error="exclude")
    table = ds.exclusion_table()
    unused = table[table.reason == "unused_image"]
    assert sorted(unused.isic_id) == sorted(text.isic_id[[0, 5]]) and set(unused.effect) == {"image unused"}
    adds_up(ds)


# ---- 9. values outside what an attribute can take -------------------------------------------------------
@pytest.mark.parametrize("name,value", [
    ("areaMM2", "0"), ("areaMM2", "-3.5"), ("minorAxisMM", "0"), ("clin_size_long_diam_mm", "-1"),
    ("perimeterMM", "0"), ("norm_color", "10.5"), ("norm_border", "-0.2"), ("norm_border", "11"),
    ("stdLExt", "-1"), ("A", "300"), ("deltaL", "-150"),
])
def test_an_impossible_value_is_counted_not_scored(release, name, value):
    h5, csv, text = release
    a = attributes.get(name)
    row = 7
    text.loc[row, a.column] = value
    text.to_csv(csv, index=False)
    with pytest.raises(OutOfRangeError) as e:
        Slice3D(h5, csv)
    msg = one_line(e.value)
    assert f"data row {row + 1}" in msg and text.isic_id[row] in msg and a.column in msg and a.range_text() in msg
    ds = Slice3D(h5, csv, on_error="exclude")
    frame = ds.attribute_frame().set_index("isic_id")
    assert np.isnan(frame.loc[text.isic_id[row], name])
    assert frame.loc[text.isic_id[row]].drop(["patient_id", name]).notna().any()  # the others stay
    ex = ds.exclusions
    assert ex.loc[ex.reason == "out_of_range", ["isic_id", "attribute"]].values.tolist() == [[text.isic_id[row], name]]
    adds_up(ds)


def test_zero_of_a_zero_is_missing_score_is_still_not_measured(release):
    h5, csv, text = release
    text.loc[4, attributes.get("norm_color").column] = "0"
    text.to_csv(csv, index=False)
    ex = Slice3D(h5, csv).exclusions
    assert ex.query("attribute == 'norm_color' and isic_id == @text.isic_id[4]").reason.tolist() == ["zero_is_missing"]


# ---- 10. target ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["2", "-1", "", "yes", "0.5"])
def test_a_target_other_than_0_or_1_is_an_error_or_a_counted_exclusion(release, value):
    h5, csv, text = release
    row = 9
    text.loc[row, "target"] = value
    text.to_csv(csv, index=False)
    with pytest.raises(TargetError) as e:
        Slice3D(h5, csv)
    msg = one_line(e.value)
    assert f"data row {row + 1}" in msg and text.isic_id[row] in msg and "target" in msg
    ds = Slice3D(h5, csv, on_error="exclude")
    assert text.isic_id[row] not in ds.ids and len(ds) == N - 1
    ex = ds.exclusions
    whole = ex[ex.attribute == "*"]
    assert whole[["isic_id", "reason"]].values.tolist() == [[text.isic_id[row], "invalid_target"]]
    assert f"data row {row + 1}" in whole.detail.item()
    # the labels stay with the kept rows, as integers
    assert ds.metadata["target"].dtype.kind == "i" and set(ds.metadata["target"]) <= {0, 1}
    want = text.drop(index=row).set_index("isic_id")["target"].astype(int)
    got = ds.metadata.set_index("isic_id")["target"]
    pd.testing.assert_series_equal(got, want.loc[got.index], check_dtype=False, check_names=False)
    adds_up(ds)
