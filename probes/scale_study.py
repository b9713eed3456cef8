"""How does R² grow with the number of training images? A side study, outside the main job.

    .venv/bin/python probes/scale_study.py --sizes 700 3500 [--reuse 3500=runs/default]

Each size is a number of training images. For each, the chain runs on the embedded default with
only the phantom's size changed (`data.n_images` = size / (1 - data.test_fraction), the test
fraction staying 0.3, so the patient split leaves about `size` training images), from the data
chapter to the prediction chapter, in runs/scale/n<size>/ (resumable: a rerun reuses finished
stages). Everything else is the default's, including its fixed vision warm-up steps and its
training epochs (so a smaller set is seen as often, in fewer steps). `--reuse SIZE=RUN` takes a
size's results from a finished run instead (the book's own runs/default is the size 3500). The CNN
reader (probes/cnn_reader.py, at the model's 112 x 112, the same epochs at every size) is then
trained on each run's training images; its result is kept in runs/scale/ beside the runs.

It writes probes/results/scale_r2.csv: one row per (size, model, attribute) with n_train (the
run's training images), n_images (the phantom's), n_test (test images scored), model
(qwen_<reading> for each reading the chain scored, the profile's headline `predict.reading` among
them; cnn for the CNN reader), r2, r2_lo, r2_hi (the chain's: skinlib.intervals.r2_intervals, 95%,
resampling test patients), wall_s (for the qwen rows the chain's seconds from the data chapter
to the prediction chapter, both readings together, per stage the longest run of it the study has
seen, as a rerun after a code change reuses finished parts; for the cnn rows its loading,
training and scoring), run and code (the last commit of the checkout holding the run before its
prediction stage finished). Chapter 3 reads it.

Which test images. Each run scores its own test split: the profile's `predict.n_images` (500) test
images drawn from it with the profile's seed, or all of them where the split has fewer (about 300
at 1,000 phantom images). The CNN reader is scored on exactly the chain's rows. The phantom draws
image i from its own random streams and patients in a fixed order, so the first N images of a
larger phantom are the N-image phantom (the study checks this on the images two runs share: same
JPEG bytes, same attribute values); but the patient split is drawn again over each size's patient
list, so the test images differ from size to size: each R² estimates the same population's R² on
other test patients, and the intervals say how far that alone moves it.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # probes/ is not a package
import cnn_reader  # noqa: E402

from skinlib import config, resumable, run as chain, split  # noqa: E402

STAGES = ["01_data", "02_finetune", "03_predict"]
COLUMNS = ["n_train", "n_images", "n_test", "model", "attribute", "r2", "r2_lo", "r2_hi",
           "wall_s", "run", "code"]
CNN = {"res": "112", "epochs": 14}


def phantom_size(n_train: int, test_fraction: float) -> int:
    """Phantom images that leave about n_train training images at this test fraction."""
    return int(round(n_train / (1 - test_fraction)))


def size_profile(n_train: int, folder: Path, base: str = "default") -> Path:
    """A profile file that inherits `base` and changes only the phantom's size."""
    frac = config.load_profile(base)["data"]["test_fraction"]
    path = Path(folder) / f"{base}-n{n_train}.yaml"
    resumable.write_text(path, yaml.safe_dump({
        "name": f"{base}-n{n_train}", "inherit": base,
        "data": {"n_images": phantom_size(n_train, frac)}}, sort_keys=False))
    return path


def run_size(n_train: int, root: Path) -> tuple[Path, str]:
    """(run folder, profile path) of one size, the chain run up to 03_predict."""
    out, profile = root / f"n{n_train}", str(size_profile(n_train, root))
    chain.run_chain(profile, out=out, stages=STAGES)
    return out, profile


def chain_seconds(run, record: Path) -> float:
    """Seconds of the study's stages in `run`: per stage the longest run of it that `record` (a
    JSON file in the study's folder) has seen, since a stage rerun after a code change reuses
    its finished parts and its stamp then holds only the shorter rerun."""
    seen = resumable.read_json(record) or {}
    for stage in STAGES:
        info = resumable.read_json(config.stage_stamp_path(run, stage))
        if info is None:
            raise FileNotFoundError(f"{config.stage_stamp_path(run, stage)}: no stamp; "
                                    "the stage has not finished in this run")
        seen[stage] = max(float(seen.get(stage, 0.0)), float(info["seconds"]))
    resumable.write_json(record, seen)
    return sum(seen[stage] for stage in STAGES)


def code_of(run) -> str:
    """The last commit of the checkout holding `run` before its prediction stage finished (by
    the stage's stamp; edits not committed then are not seen), or 'unknown'."""
    info = resumable.read_json(config.stage_stamp_path(run, STAGES[-1])) or {}
    got = subprocess.run(["git", "-C", str(Path(run).resolve()), "log", "-1", "--format=%h",
                          f"--before={info.get('finished', 'now')}"],
                         capture_output=True, text=True)
    return got.stdout.strip() if got.returncode == 0 and got.stdout.strip() else "unknown"


def run_label(run) -> str:
    """The run as the CSV names it: relative to this repository, else its last two parts."""
    p = Path(run).resolve()
    if p.is_relative_to(config.REPO_ROOT):
        return p.relative_to(config.REPO_ROOT).as_posix()
    return f"{p.parent.name}/{p.name}"


def qwen_rows(r2_readings: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """The chain's R² of every reading (r2_readings.csv) as study rows."""
    need = {"attribute", "r2", "r2_lo", "r2_hi", "reading"}
    if need - set(r2_readings.columns):
        raise KeyError(f"r2_readings lacks columns {sorted(need - set(r2_readings.columns))}")
    out = r2_readings.assign(model="qwen_" + r2_readings.reading.astype(str))
    return out.assign(**meta)[COLUMNS]


def cnn_rows(r2: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """The CNN reader's R² (attribute, r2, r2_lo, r2_hi) as study rows."""
    return r2.assign(model="cnn", **meta)[COLUMNS]


def assemble(parts) -> pd.DataFrame:
    """One table of every size and model, ordered by size, model and the registry's attributes."""
    table = pd.concat(list(parts), ignore_index=True)
    dup = table.duplicated(["n_train", "model", "attribute"])
    if dup.any():
        r = table[dup].iloc[0]
        raise ValueError(f"two rows for n_train {r.n_train}, model {r.model}, "
                         f"attribute {r.attribute}: two runs of one size?")
    order = {n: k for k, n in enumerate(cnn_reader.NAMES)}
    return (table.assign(_a=table.attribute.map(order))
            .sort_values(["n_train", "model", "_a"]).drop(columns="_a")
            .reset_index(drop=True))


def cnn_cached(run, profile, root: Path, size: int) -> pd.DataFrame:
    """The CNN reader on one run, computed once per run state (kept in the study's folder)."""
    path = root / f"cnn-n{size}-{CNN['res']}-e{CNN['epochs']}.csv"
    job = resumable.job_key({"run": str(Path(run).resolve()), **CNN,
                             "manifest": resumable.digest(config.manifest_path(run)),
                             "rows": resumable.digest(config.predictions_path(run))})
    if resumable.check(path, job) is None:
        return pd.read_csv(path)
    got = cnn_reader.read_run(run, profile, CNN["res"], CNN["epochs"],
                              log=lambda m: print(f"  cnn n{size}: {m}", flush=True))
    if got.on != "chain":
        raise FileNotFoundError(f"{config.predictions_path(run)}: the chain's predictions")
    frame = got.r2.assign(n_train=got.n_train, n_test=got.n_test, wall_s=round(got.seconds, 1))
    resumable.write_csv(frame, path, job=job)
    return frame


def same_images(runs: dict[int, Path], profile_of: dict[int, str]) -> str:
    """Check that the images two runs share are the same drawing (bytes and attributes)."""
    sizes = sorted(runs)
    lines = []
    for a, b in zip(sizes, sizes[1:]):
        ma = split.load_manifest(config.manifest_path(runs[a])).set_index("isic_id")
        mb = split.load_manifest(config.manifest_path(runs[b])).set_index("isic_id")
        ids = ma.index.intersection(mb.index)
        ha = config.release_files(config.load_profile(profile_of[a]), runs[a])[0]
        hb = config.release_files(config.load_profile(profile_of[b]), runs[b])[0]
        with h5py.File(ha, "r") as fa, h5py.File(hb, "r") as fb:
            differ = [i for i in ids if fa[i][()].tobytes() != fb[i][()].tobytes()]
        cols = [c for c in cnn_reader.NAMES if c in ma.columns and c in mb.columns]
        va, vb = ma.loc[ids, cols].to_numpy(float), mb.loc[ids, cols].to_numpy(float)
        values = np.array_equal(va, vb, equal_nan=True)
        tests = set(ma.index[ma.split == "test"]) & set(mb.index[mb.split == "test"])
        lines.append(f"n{a} vs n{b}: {len(ids):,} shared images, {len(differ)} with other bytes, "
                     f"attribute values {'equal' if values else 'DIFFERENT'}; "
                     f"{len(tests):,} of them in both test splits")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[700, 3500],
                    help="training images per run")
    ap.add_argument("--reuse", nargs="*", default=[], metavar="SIZE=RUN",
                    help="take a size's results from a finished run folder (profile default)")
    ap.add_argument("--root", default=str(config.REPO_ROOT / "runs" / "scale"))
    a = ap.parse_args(argv)
    reuse = {int(k): Path(v) for k, v in (r.split("=", 1) for r in a.reuse)}
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    runs, profiles = {}, {}
    for size in a.sizes:
        if size in reuse:
            runs[size], profiles[size] = reuse[size], "default"
        else:
            runs[size], profiles[size] = run_size(size, root)
    parts = []
    for size, run in runs.items():
        cfg = config.load_profile(profiles[size])
        r2 = pd.read_csv(resumable.verified(config.r2_readings_path(run)))
        cnn = cnn_cached(run, profiles[size], root, size)
        meta = {"n_train": int(cnn.n_train.iloc[0]), "n_images": cfg["data"]["n_images"],
                "n_test": int(cnn.n_test.iloc[0]), "run": run_label(run),
                "code": code_of(run)}
        wall = chain_seconds(run, root / f"wall-n{size}.json")
        parts.append(qwen_rows(r2, {**meta, "wall_s": round(wall, 1)}))
        parts.append(cnn_rows(cnn, {**meta, "wall_s": float(cnn.wall_s.iloc[0])}))
    table = assemble(parts)
    if len(runs) > 1:
        print(same_images(runs, profiles))
    resumable.write_text(config.scale_r2_path(), table.to_csv(index=False))
    med = table.groupby(["n_train", "model"]).r2.median().unstack().round(3)
    print(f"R² median per size and model -> {config.scale_r2_path()}\n{med.to_string()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
