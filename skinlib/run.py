"""Run the book's notebooks for one profile with papermill, stage by stage, with caching.

    python -m skinlib.run --profile default --out runs/default

Each stage's executed notebook lands next to its artifacts (runs/<profile>/<stage>/<stage>.ipynb).
A stage is reused when its key (notebook source, profile, skinlib source, input files, the key of
the stage before) is unchanged; changing anything reruns it and every stage after it. A failing
stage stops the chain, names the notebook and the cell, and keeps the executed notebook with the
traceback.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

from . import config

PACKAGE_DIR = Path(__file__).parent


def _hash_files(paths, h) -> None:
    for p in sorted(paths):
        h.update(str(p.relative_to(config.REPO_ROOT) if p.is_relative_to(config.REPO_ROOT) else p).encode())
        h.update(p.read_bytes())


def _input_files(cfg: dict) -> list[Path]:
    """Data files a profile reads: stat'ed (size, mtime), not hashed (the release is ~100 GB)."""
    data = cfg.get("data", {})
    return [config.resolve_path(data[k]) for k in ("image_h5", "metadata_csv") if data.get(k)]


def stage_key(stage: str, notebook: Path, cfg: dict, sections: tuple[str, ...], upstream: str) -> str:
    h = hashlib.sha256()
    h.update(stage.encode())
    h.update(upstream.encode())
    used = {k: cfg.get(k) for k in sections}
    used["seed"] = cfg.get("seed")
    h.update(json.dumps(used, sort_keys=True).encode())
    _hash_files([notebook], h)
    _hash_files(PACKAGE_DIR.rglob("*.py"), h)
    _hash_files(PACKAGE_DIR.glob("data/*"), h)
    for rel in config.STAGE_INPUTS.get(stage, ()):
        p = config.REPO_ROOT / rel
        h.update(p.read_bytes() if p.exists() else b"<absent>")
    for p in _input_files(cfg):
        st = p.stat() if p.exists() else None
        h.update(f"{p}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}".encode())
    return h.hexdigest()[:16]


def _executed_path(run: Path, stage: str) -> Path:
    return config.stage_dir(run, stage) / f"{stage}.ipynb"


def _stamp_path(run: Path, stage: str) -> Path:
    return config.stage_dir(run, stage) / ".stage.json"


def execute_stage(stage: str, notebook: Path, profile: str, run: Path, kernel: str | None = None) -> Path:
    """Convert the jupytext source and execute it with papermill; returns the executed notebook."""
    import jupytext
    import papermill

    out_nb = _executed_path(run, stage)
    out_nb.parent.mkdir(parents=True, exist_ok=True)
    nb = jupytext.read(notebook)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{stage}.ipynb"
        jupytext.write(nb, src)
        papermill.execute_notebook(
            str(src), str(out_nb),
            parameters={"profile": profile, "out": str(run), **config.STAGE_PARAMETERS.get(stage, {})},
            kernel_name=kernel or "python3",
            cwd=str(config.REPO_ROOT),
            progress_bar=False, log_output=False,
        )
    return out_nb


def run_chain(profile: str = "default", out: str | None = None, stages: list[str] | None = None,
              force: bool = False, kernel: str | None = None) -> dict[str, str]:
    """Run the chain; returns {stage: "ran" | "cached"}. Raises StageFailed on the first failure."""
    cfg = config.load_profile(profile)
    # Notebooks receive the profile as a path so a custom YAML works the same as a named one.
    prof_arg = str(config.profile_path(profile).resolve())
    run = config.run_dir(cfg, out).resolve()
    run.mkdir(parents=True, exist_ok=True)
    wanted = set(stages) if stages else None
    if wanted and wanted - set(config.STAGE_NAMES):
        raise KeyError(f"unknown stages {sorted(wanted - set(config.STAGE_NAMES))}; known: {', '.join(config.STAGE_NAMES)}")
    status: dict[str, str] = {}
    upstream = ""
    for stage, nb_rel, sections in config.STAGES:
        notebook = config.REPO_ROOT / nb_rel
        key = stage_key(stage, notebook, cfg, sections, upstream)
        upstream = key
        if wanted is not None and stage not in wanted:
            continue
        stamp = _stamp_path(run, stage)
        if not force and stamp.exists() and json.loads(stamp.read_text()).get("key") == key \
                and _executed_path(run, stage).exists():
            print(f"[{stage}] cached: parameters and inputs unchanged (key {key}); reusing {stamp.parent}")
            status[stage] = "cached"
            continue
        if stamp.exists():
            stamp.unlink()
        print(f"[{stage}] running {nb_rel} (key {key}) ...", flush=True)
        t0 = time.perf_counter()
        try:
            executed = execute_stage(stage, notebook, prof_arg, run, kernel)
        except Exception as e:  # papermill's error names the cell; keep the executed notebook
            raise StageFailed(stage, nb_rel, _executed_path(run, stage), e) from e
        dt = time.perf_counter() - t0
        stamp.write_text(json.dumps({"key": key, "seconds": round(dt, 1), "notebook": nb_rel,
                                     "profile": cfg["name"], "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
        print(f"[{stage}] done in {dt:.1f} s -> {executed}")
        status[stage] = "ran"
    return status


class StageFailed(RuntimeError):
    def __init__(self, stage, notebook, executed, err):
        cell = getattr(err, "exec_count", None)
        what = f"{getattr(err, 'ename', type(err).__name__)}: {getattr(err, 'evalue', err)}"
        where = f" in the cell with execution count {cell}" if cell is not None else ""
        super().__init__(f"stage {stage} failed: notebook {notebook}{where}: {what}\n"
                         f"the executed notebook with the traceback is {executed}")
        self.stage, self.executed = stage, executed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default", help="profile name (skinlib/profiles) or a .yaml path")
    ap.add_argument("--out", default=None, help="run folder (default runs/<profile>)")
    ap.add_argument("--stages", nargs="*", help="run only these stages (their cached inputs are reused)")
    ap.add_argument("--force", action="store_true", help="rerun even when cached")
    ap.add_argument("--kernel", default=None, help="Jupyter kernel name (default python3)")
    a = ap.parse_args(argv)
    try:
        run_chain(a.profile, a.out, a.stages, a.force, a.kernel)
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
