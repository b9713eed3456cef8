"""Peak host memory of stage 05 (load the vectors, search every method, score), of chapter 6's
feature loading and of the explorer's searches, per database vector, and what it comes to at the
paper's sizes.

    .venv/bin/python bench/memory.py [--n 2000 6000] [--queries 200] [--width 3584] [--modes ...]

A synthetic run is written per size: the four extractions of 04_embed in the real shard format
(float16 safetensors shards, sealed, with their job stamp; random vectors: memory does not depend on
the values) and the four small arrays (encoder, multi-attribute). Each size is measured in its own
process (Linux VmHWM, less the process's RSS after its imports), once per mode: "stored", the way
stage 05 reads now (`study.stored_vectors`: image+text vectors read one attribute at a time from the
shards), and "whole", the way it read before (every extraction whole, as float32,
`study.load_vectors`); likewise "features" / "features_whole" for chapter 6 (`study.image_features`:
h_im and the encoder's vector only) and "explore" / "explore_whole" for the explorer
(`explore.RunVectors`: one stored query through every method and attribute). The database's part
grows with N; the slope in bytes per database vector (and per query vector) is what the paper-size
figure is extrapolated from. With the default modes a row is appended to bench/results.csv: its
baseline_s/ours_s are the two ways' wall times at the largest size; the size column gives the peak
figures and the extrapolation.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAPER = {"n_db": 282_564, "n_q": 118_495, "width": 3_584, "attributes": 16, "k": 5, "b": 200}


def peak_bytes() -> int:
    """This process's peak RSS (Linux /proc VmHWM). Not getrusage's ru_maxrss: that keeps the
    high-water mark of the process image exec replaced, i.e. of the forking parent (a test
    session of some GB), so a child would report its parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024   # kB
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory is measured on Linux only")


def resident_bytes() -> int:
    """The RSS now (Linux /proc): the baseline. Not the peak so far: the imports' freed
    temporaries would hide the first few hundred MB of the work."""
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_extraction(folder: Path, ids, arrays: dict, names, shard_size: int = 256) -> Path:
    """An `embed.extract` output folder holding `arrays` (kind -> float16 (n, ...) array): the
    same stamp, shard names, safetensors layout, header metadata and seals as `extract` writes."""
    import numpy as np
    from safetensors.numpy import save_file

    from skinlib import attributes, embed, resumable

    ids = [str(i) for i in ids]
    kinds = [k for k in embed.KINDS if k in arrays]
    n_shards = -(-len(ids) // shard_size)
    spec = {"format": embed.FORMAT, "ids": resumable.job_key(ids), "n_ids": len(ids), "n_shards": n_shards,
            "names": list(names), "questions": embed.attribute_questions(names) if "image_text" in kinds else [],
            "kinds": kinds, "shard_size": shard_size, "model_key": "synthetic", "weights": "synthetic"}
    stamp = resumable.Stamp(folder, spec, embed.STAMP)
    stamp.begin([embed.SHARDS])
    assert all(a in attributes.NAMES for a in names)
    for s in range(n_shards):
        span = slice(s * shard_size, (s + 1) * shard_size)
        path = folder / f"shard-{s:05d}.safetensors"
        save_file({k: np.ascontiguousarray(arrays[k][span], dtype=np.float16) for k in kinds},
                  str(resumable.partial_path(path)), metadata={"job": stamp.key, "ids": json.dumps(ids[span])})
        resumable.commit(path, stamp.key, rows=len(ids[span]))
    return folder


def write_run(run: Path, n_db: int, n_q: int, width: int, shard_size: int = 256, seed: int = 0,
              encoder_width: int = 768) -> dict:
    """A run folder with everything `study.stored_vectors` reads, random float16 vectors written
    shard by shard (never one whole array in memory). Returns the frames of attribute values."""
    import numpy as np
    import pandas as pd

    from skinlib import attributes, config, study

    rng = np.random.default_rng(seed)
    names = list(attributes.NAMES)
    frames = {}
    for part, n, prefix in (("db", n_db, "D"), ("queries", n_q, "Q")):
        ids = [f"{prefix}{i:07d}" for i in range(n)]
        for tag, kinds in (("tuned", ("image", "image_text")), ("untuned", ("image",))):
            # memory-mapped scratch arrays: the writer reads them shard by shard
            with tempfile.TemporaryDirectory(dir=run.parent) as tmp:
                arrays = {}
                for k in kinds:
                    shape = (n, width) if k == "image" else (n, len(names), width)
                    arrays[k] = np.lib.format.open_memmap(Path(tmp) / f"{k}.npy", "w+", np.float16, shape)
                    for s in range(0, n, shard_size):
                        arrays[k][s:s + shard_size] = rng.standard_normal((min(shard_size, n - s), *shape[1:]),
                                                                           dtype=np.float32)
                write_extraction(config.embeddings_dir(run, f"{tag}_{part}"), ids, arrays, names, shard_size)
                del arrays
        study.save_array(run, f"encoder_{part}", rng.standard_normal((n, encoder_width), dtype=np.float32))
        study.save_array(run, f"multi_{part}", rng.standard_normal((n, width), dtype=np.float32))
        frame = pd.DataFrame({a: rng.normal(10, 3, n) for a in names})
        frame.insert(0, "isic_id", ids)
        frames[part] = frame
    pd.concat([frames["db"], frames["queries"]]).to_parquet(run / "values.parquet", index=False)
    return frames


def _whole_vectors(run: Path) -> tuple[list, list, dict]:
    """Every extraction whole in float32 (`study.load_vectors`, all 16 attributes): how stage 05,
    chapter 6 and the explorer read before they streamed."""
    from skinlib import study

    db_ids, db_vec = study.load_vectors(run, "tuned_db")
    q_ids, q_vec = study.load_vectors(run, "tuned_queries")
    return db_ids, q_ids, {
        "db_image": db_vec["image"], "q_image": q_vec["image"],
        "db_image_text": db_vec["image_text"], "q_image_text": q_vec["image_text"],
        "db_untuned": study.load_vectors(run, "untuned_db")[1]["image"],
        "q_untuned": study.load_vectors(run, "untuned_queries")[1]["image"],
        "db_encoder": study.load_array(run, "encoder_db"), "q_encoder": study.load_array(run, "encoder_queries"),
        "db_multi": study.load_array(run, "multi_db"), "q_multi": study.load_array(run, "multi_queries")}


def _stage05(run: Path, mode: str, k: int, b: int, peaks: dict, values) -> tuple[list, list, int]:
    """Stage 05: load ("stored": as now, `study.stored_vectors`; "whole": as before), every
    method, the percentile scoring (of the attribute frame `values`)."""
    import numpy as np

    from skinlib import percentiles, study

    db_ids, q_ids, vec = study.stored_vectors(run) if mode == "stored" else _whole_vectors(run)
    peaks["after_load"] = peak_bytes()
    results, cost = study.run_methods(db_ids, q_ids, vec, k=k, b=b, multi_names=["areaMM2", "Bext"], progress=False)
    peaks["after_search"] = peak_bytes()
    by_id = values.set_index("isic_id")
    long = study.score(results, by_id.loc[db_ids].reset_index(), by_id.loc[q_ids].reset_index())
    percentiles.summary(long)
    return db_ids, q_ids, sum(np.asarray(r).size for r in results.values())


def _features(run: Path, mode: str, peaks: dict) -> tuple[list, list, int]:
    """Chapter 6's embedding features of every database and query image ("features": as now,
    `study.image_features`; "features_whole": as the chapter read before, every extraction whole
    in float32, then its rows in the probes' order)."""
    from skinlib import study

    if mode == "features":
        db_ids = study.open_vectors(run, "tuned_db").ids
        q_ids = study.open_vectors(run, "tuned_queries").ids
        got = study.image_features(run, db_ids, q_ids)
    else:
        got = {}
        for tag in ("tuned", "untuned"):
            db_ids, db = study.load_vectors(run, f"{tag}_db")
            q_ids, q = study.load_vectors(run, f"{tag}_queries")
            got[tag] = (db["image"][list(range(len(db_ids)))], q["image"][list(range(len(q_ids)))])
            del db, q
        got["encoder"] = (study.load_array(run, "encoder_db"), study.load_array(run, "encoder_queries"))
    peaks["after_load"] = peaks["after_search"] = peak_bytes()
    return db_ids, q_ids, sum(a.shape[0] for pair in got.values() for a in pair)


def _explore(run: Path, mode: str, k: int, b: int, peaks: dict) -> tuple[list, list, int]:
    """The explorer's searches: one stored query through every method and, for the methods that
    ask one, every attribute ("explore": as now, `explore.RunVectors`; "explore_whole": as the
    explorer held them before, every extraction whole in float32 and every index it built kept)."""
    from skinlib import attributes, explore, study

    names = list(attributes.NAMES)
    picks = [(m, j, a) for m in explore.METHODS
             for j, a in (enumerate(names[:1]) if m in explore.IMAGE_ONLY else enumerate(names))]
    n = 0
    if mode == "explore":
        v = explore.RunVectors(run)
        db_ids, q_ids = v.db_ids, v.q_ids
        peaks["after_load"] = peak_bytes()
        for m, j, a in picks:
            n += v.top(m, j, a, v.stored([q_ids[0]], j, explore.explorer.NEEDS[m]), k, b=b)[0].size
    else:
        db_ids, q_ids, vec = _whole_vectors(run)
        peaks["after_load"] = peak_bytes()
        kept = {}   # every index a pick built, as the explorer kept them
        for m, j, a in picks:
            key = {"image_text": "image_text", "hierarchical": "image"}.get(m, explore.explorer.INDEX_KEY.get(m))
            at = j if key == "image_text" else None
            if (key, at) not in kept:
                kept[(key, at)] = study.flat(vec[f"db_{key}"] if at is None else vec[f"db_{key}"][:, at], db_ids)
            n += 1
    peaks["after_search"] = peak_bytes()
    return db_ids, q_ids, n


def child(run: Path, mode: str, k: int, b: int) -> dict:
    """One piece of vector work in this process, by `mode`: stage 05's ("stored" as now, "whole"
    as before), chapter 6's feature loading ("features", "features_whole"), the explorer's
    searches ("explore", "explore_whole"). Peak RSS above the RSS after the imports."""
    import gc

    import faiss  # noqa: F401  (imported before the baseline is taken)
    import numpy as np  # noqa: F401
    import pandas as pd

    from skinlib import explore, percentiles, study  # noqa: F401

    # read before the baseline: the frame is the scoring's input, and the first read_parquet
    # loads pyarrow's libraries (tens of MB that are not the vector work)
    values = pd.read_parquet(run / "values.parquet")
    gc.collect()
    base = resident_bytes()
    t0 = time.perf_counter()
    peaks: dict = {}
    if mode in ("stored", "whole"):
        db_ids, q_ids, n = _stage05(run, mode, k, b, peaks, values)
    elif mode in ("features", "features_whole"):
        db_ids, q_ids, n = _features(run, mode, peaks)
    elif mode in ("explore", "explore_whole"):
        db_ids, q_ids, n = _explore(run, mode, k, b, peaks)
    else:
        raise ValueError(f"mode {mode!r}: stored, whole, features, features_whole, explore or explore_whole")
    return {"mode": mode, "n_db": len(db_ids), "n_q": len(q_ids), "seconds": time.perf_counter() - t0,
            "base": base, "after_load": peaks["after_load"] - base, "after_search": peaks["after_search"] - base,
            "peak": peak_bytes() - base, "n_results": int(n)}


def measure(run: Path, mode: str, k: int = 5, b: int = 200, env: dict | None = None) -> dict:
    """`child` in a fresh process (its own ru_maxrss), one thread (as the tests run)."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(run), "--mode", mode, "--k", str(k), "--b", str(b)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit(points: list[dict], key: str = "peak") -> tuple[float, float, float]:
    """(bytes per database vector, bytes per query vector, constant): least squares through the
    measured peaks (n_db and n_q both varied)."""
    import numpy as np

    X = np.array([[p["n_db"], p["n_q"], 1.0] for p in points])
    y = np.array([p[key] for p in points], float)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    return float(coef[0]), float(coef[1]), float(coef[2])


def at_paper(coef) -> float:
    return coef[0] * PAPER["n_db"] + coef[1] * PAPER["n_q"] + coef[2]


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import append, row, show

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[2000, 6000], help="database sizes (at --queries)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--more-queries", type=int, nargs="*", default=[1000],
                    help="query counts also measured at the first database size (for the per-query slope)")
    ap.add_argument("--width", type=int, default=PAPER["width"])
    ap.add_argument("--k", type=int, default=PAPER["k"])
    ap.add_argument("--b", type=int, default=PAPER["b"])
    ap.add_argument("--modes", nargs="+", default=["stored", "whole"])
    ap.add_argument("--tmp", default=None, help="folder for the synthetic runs (default: the system's)")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="stored", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(Path(a.child), a.mode, a.k, a.b)))
        return 0
    import shutil

    sizes = [(n, a.queries) for n in a.n] + [(a.n[0], q) for q in a.more_queries]
    got = {m: [] for m in a.modes}
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        for n, nq in sizes:
            run = Path(tmp) / f"n{n}-q{nq}"
            run.mkdir()
            write_run(run, n, nq, a.width)
            for m in a.modes:
                got[m].append(measure(run, m, a.k, a.b))
                p = got[m][-1]
                print(f"{m:6s} n_db={n:>7,} n_q={nq:>6,}: peak {p['peak'] / 2**20:8.1f} MiB above imports "
                      f"(after load {p['after_load'] / 2**20:.1f}, after search {p['after_search'] / 2**20:.1f}), "
                      f"{p['seconds']:.1f} s", flush=True)
            shutil.rmtree(run)
    parts = []
    for m in a.modes:
        coef = fit(got[m])
        paper = at_paper(coef)
        print(f"{m}: {coef[0]:,.0f} B per database vector ({coef[0] / a.width:.2f} per dimension), "
              f"{coef[1]:,.0f} B per query vector, constant {coef[2] / 2**20:.0f} MiB -> at the paper's "
              f"{PAPER['n_db']:,} x {PAPER['n_q']:,}: {paper / 2**30:.1f} GiB above the imports")
        peaks = "/".join(f"{p['peak'] / 2**20:.0f}" for p in got[m])
        parts.append(f"{m}: peaks {peaks} MiB, {coef[0]:,.0f} B/db vector, {coef[1]:,.0f} B/query, "
                     f"paper {paper / 2**30:.1f} GiB")
    label = " ".join(f"{n}x{q}" for n, q in sizes)
    size = f"db x q = {label}, d={a.width} a=16 k={a.k} b={a.b}; " + "; ".join(parts)
    if set(a.modes) == {"stored", "whole"}:
        r = row("stage 05 peak memory: whole float32 arrays vs per-attribute streaming", size,
                got["whole"][-1]["seconds"], got["stored"][-1]["seconds"])
        show([r])
        if not a.no_append:
            append([r])
    return 0


if __name__ == "__main__":
    sys.exit(main())
