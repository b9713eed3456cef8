"""Shared helpers for the benchmarks: the machine description and the results.csv appender.

Every row is one comparison measured side by side in one run: `baseline_s` and `ours_s` are
seconds for the same work, `ratio` = baseline_s / ours_s (> 1: ours is faster).
"""
from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import time
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.csv"
COLUMNS = ["benchmark", "size", "baseline_s", "ours_s", "ratio", "machine", "date"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def faiss_blas_core() -> str:
    """The OpenBLAS kernel faiss-cpu's bundled BLAS picked ("" if not found). Its 0.3.15 copy does
    not know recent Xeons and falls back to "Prescott" (SSE3), which slows flat search at large
    d; OPENBLAS_CORETYPE=SkylakeX (set before faiss loads) selects the AVX-512 kernels."""
    import ctypes
    import glob

    import faiss

    libs = glob.glob(str(Path(faiss.__file__).parent.parent / "faiss_cpu.libs" / "libopenblas*"))
    try:
        f = ctypes.CDLL(libs[0]).openblas_get_corename
        f.restype = ctypes.c_char_p
        return f().decode()
    except (IndexError, OSError, AttributeError):
        return ""


def machine() -> str:
    """e.g. "2 cores, Intel(R) Xeon(R) Processor, python 3.11.7, numpy 2.4.6, torch 2.13.0,
    faiss-cpu 1.15.1 (BLAS core Prescott)" (cores = those this process may use)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    faiss_pkg = next((p for p in ("faiss-gpu", "faiss-cpu", "faiss") if _version(p) != "absent"),
                     "faiss")
    core = faiss_blas_core()
    return (f"{cores} cores, {_cpu_model()}, python {platform.python_version()}, "
            f"numpy {_version('numpy')}, torch {_version('torch')}, {faiss_pkg} {_version(faiss_pkg)}"
            + (f" (BLAS core {core})" if core else ""))


def best_of(fn, repeat: int = 1):
    """(fastest wall time in seconds over `repeat` runs, the last result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def side_by_side(baseline, ours, repeat: int = 3, pause: float = 0.5):
    """Time two callables alternately, `repeat` times each, pausing between runs so one library's
    idle-spinning BLAS/OpenMP threads do not slow the other; the fastest of each (shared cores:
    the minimum is the least disturbed run). Returns (baseline_s, ours_s, baseline_out, ours_out)."""
    tb, to = float("inf"), float("inf")
    out_b = out_o = None
    for _ in range(repeat):
        time.sleep(pause)
        t, out_b = best_of(baseline)
        tb = min(tb, t)
        time.sleep(pause)
        t, out_o = best_of(ours)
        to = min(to, t)
    return tb, to, out_b, out_o


def row(benchmark: str, size: str, baseline_s: float, ours_s: float) -> dict:
    return {"benchmark": benchmark, "size": size, "baseline_s": f"{baseline_s:.4g}",
            "ours_s": f"{ours_s:.4g}", "ratio": f"{baseline_s / ours_s:.3g}",
            "machine": machine(), "date": dt.date.today().isoformat()}


def append(rows, path: Path = RESULTS) -> Path:
    """Append result rows (dicts with exactly COLUMNS) to results.csv, writing the header when the
    file is new; a file with another header is an error, not silently mixed."""
    rows = list(rows)
    for r in rows:
        if list(r) != COLUMNS:
            raise ValueError(f"result row has columns {list(r)}, expected {COLUMNS}")
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header != COLUMNS:
            raise ValueError(f"{path}: header {header} is not {COLUMNS}")
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerows(rows)
    return path


def show(rows) -> None:
    """Print result rows as an aligned table (machine and date once, below)."""
    rows = list(rows)
    if not rows:
        return
    cols = ["benchmark", "size", "baseline_s", "ours_s", "ratio"]
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(width[c]) for c in cols))
    print(f"[{rows[0]['machine']}; {rows[0]['date']}]")


def tiny_training_setup(root, n_images: int, w: int = 5):
    """What the training benchmarks share, in `root`: an `n_images` phantom, the tiny Qwen2-VL
    (built, saved, loaded), every image encoded once, W tuples per image and the collate.
    Returns a namespace: path, ds, loaded, cache, tuples, collate."""
    from types import SimpleNamespace

    from skinlib import model as models, phantom, qa, slice3d, tuples

    phantom.generate(n_images, f"{root}/ph", seed=0, workers=1, progress=False)
    ds = slice3d.Slice3D(f"{root}/ph/train-image.hdf5", f"{root}/ph/train-metadata.csv")
    path = models.build_tiny(f"{root}/tiny")
    loaded = models.load(path)
    cache = qa.ImageCache(ds, loaded.image_processor).fill(ds.ids, progress=False)
    return SimpleNamespace(path=path, ds=ds, loaded=loaded, cache=cache,
                           tuples=tuples.sample_tuples(ds.attribute_frame(), w=w, seed=0),
                           collate=qa.collate(loaded.tokenizer, loaded.image_processor))
