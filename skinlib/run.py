"""Run the book's notebooks for one profile with papermill, stage by stage, with caching.

    python -m skinlib.run --profile default --out runs/default

Each stage's executed notebook lands next to its artifacts (runs/<profile>/<stage>/<stage>.ipynb).
A stage is reused when its key (notebook source, profile, skinlib source, input files, the key of
the stage before) is unchanged; changing anything reruns it and every stage after it. Its stamp
lists the files it made (its folder's and those it wrote under metrics/); one that is missing, cut
or altered since reruns the stage, with a line naming the file and what is wrong. A failing
stage stops the chain, names the notebook and the cell, and keeps the executed notebook with the
traceback.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from . import config, needs, resumable

PACKAGE_DIR = Path(__file__).parent


def _hash_files(paths, h) -> None:
    for p in sorted(paths):
        h.update(str(p.relative_to(config.REPO_ROOT) if p.is_relative_to(config.REPO_ROOT) else p).encode())
        h.update(p.read_bytes())


def _input_files(cfg: dict) -> list[Path]:
    """Data files a profile reads: stat'ed (size, mtime), not hashed (the release is ~100 GB)."""
    data = cfg.get("data", {})
    return [config.resolve_path(data[k]) for k in ("image_h5", "metadata_csv") if data.get(k)]


def _module_file(name: str) -> Path | None:
    """skinlib.a.b -> its source file (a module or a package's __init__), None if not ours."""
    parts = name.split(".")
    if parts[0] != PACKAGE_DIR.name:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _imports(path: Path, package: str) -> set[str]:
    """Names of skinlib modules a source file imports anywhere (functions' late imports too);
    `from skinlib.x import y` names both x and, should y be a module, x.y."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative: from the file's package upwards
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {n for n in found if _module_file(n) is not None}


def package_sources(notebook: Path) -> list[Path]:
    """The skinlib source files a notebook can run: those it imports and, transitively, theirs
    (with each package's __init__ on the way). A stage's key hashes these, not the whole
    package, so editing a module a stage never imports does not rerun it (stage 01 of the paper
    profile verifies 401,059 JPEGs)."""
    todo, seen = list(_imports(notebook, "")), set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):   # importing a.b.c runs a and a.b first
            prefix = ".".join(parts[:i])
            if prefix in seen or _module_file(prefix) is None:
                continue
            seen.add(prefix)
            path = _module_file(prefix)
            package = prefix if path.name == "__init__.py" else prefix.rpartition(".")[0]
            todo.extend(_imports(path, package) - seen)
    return sorted({_module_file(n) for n in seen})


def stage_key(stage: str, notebook: Path, cfg: dict, sections: tuple[str, ...], upstream: str) -> str:
    h = hashlib.sha256()
    h.update(stage.encode())
    h.update(upstream.encode())
    used = {k: cfg.get(k) for k in sections}
    used["seed"] = cfg.get("seed")
    h.update(json.dumps(used, sort_keys=True).encode())
    _hash_files([notebook], h)
    _hash_files(package_sources(notebook), h)
    _hash_files(PACKAGE_DIR.glob("data/*"), h)
    for rel in config.STAGE_INPUTS.get(stage, ()):
        p = config.REPO_ROOT / rel
        h.update(p.read_bytes() if p.exists() else b"<absent>")
    for p in _input_files(cfg):
        st = p.stat() if p.exists() else None
        h.update(f"{p}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}".encode())
    return h.hexdigest()[:16]


# A stage's stamp vouches for the files it made: every file of its folder and the files it wrote
# under metrics/ (which later stages read, e.g. 04 reads r2.csv), each with its size, mtime and
# sha256 (`resumable.listing`). Checking it stats every file and hashes only those whose mtime
# moved, so a cached `make book` does not read the paper profile's tens of GB of shards again;
# the shards, arrays and encoder carry their own seals, which their readers hash in full.
def _metrics_state(run: Path) -> dict[Path, tuple[int, int]]:
    """(size, mtime_ns) of every file under metrics/: what a stage changed there is its own."""
    folder = config.metrics_dir(run)
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()} \
        if folder.is_dir() else {}


def _stage_outputs(run: Path, stage: str, metrics_before: dict) -> list[Path]:
    """The files a stage that just ran made: its folder's (not its stamp) and those it wrote under
    metrics/ (new or changed since `metrics_before`)."""
    stamp = config.stage_stamp_path(run, stage)
    own = [p for p in config.stage_dir(run, stage).rglob("*") if p.is_file() and p != stamp]
    wrote = [p for p, st in _metrics_state(run).items() if metrics_before.get(p) != st]
    return own + wrote


def _write_stamp(run: Path, stage: str, info: dict, outputs: list[Path]) -> None:
    """The stage's stamp, written whole (after the files it lists)."""
    resumable.write_json(config.stage_stamp_path(run, stage), {**info, "files": resumable.listing(run, outputs)})


def _stamp_damage(run: Path, stage: str, info: dict) -> str | None:
    """None when the files the stamp lists are all there, whole and unaltered; else the first that
    is not and what is wrong with it."""
    files = info.get("files")
    if not isinstance(files, dict) or f"{stage}/{config.executed_notebook_path(run, stage).name}" not in files:
        return f"{config.stage_stamp_path(run, stage)} lists no files (an older stamp): nothing vouches for the stage's output"
    return resumable.check_listing(run, files)


def execute_stage(stage: str, notebook: Path, profile: str, run: Path, kernel: str | None = None,
                  parameters: dict | None = None) -> Path:
    """Convert the jupytext source and execute it with papermill; returns the executed notebook.

    `parameters` (besides profile and out) must all be names of the notebook's parameters cell:
    papermill itself only warns about an unknown one and runs on. A KeyboardInterrupt leaves with
    `.stage` set, so the caller can say which stage stopped."""
    import jupytext
    import papermill

    out_nb = config.executed_notebook_path(run, stage)
    params = {"profile": profile, "out": str(run), **config.STAGE_PARAMETERS.get(stage, {}), **(parameters or {})}
    nb = jupytext.read(notebook)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / f"{stage}.ipynb"
            jupytext.write(nb, src)
            _check_parameters(notebook, set(papermill.inspect_notebook(str(src))), params)
            out_nb.parent.mkdir(parents=True, exist_ok=True)
            papermill.execute_notebook(
                str(src), str(out_nb), parameters=params, kernel_name=kernel or "python3",
                cwd=str(config.REPO_ROOT), progress_bar=False, log_output=False,
                # the kernel's own log goes to this terminal, not the notebook: on Ctrl-C it
                # prints a traceback of its closed socket; a cell's errors are in the notebook
                extra_arguments=["--IPKernelApp.log_level=CRITICAL"],
            )
    except KeyboardInterrupt as e:
        e.stage = stage
        raise
    return out_nb


class ParameterError(ValueError):
    """A notebook parameter that the notebook's parameters cell does not define."""


def notebook_parameters(notebook: Path) -> set[str]:
    """The names the jupytext notebook's parameters cell defines (papermill's own reading)."""
    import jupytext
    import papermill

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "notebook.ipynb"
        jupytext.write(jupytext.read(notebook), src)
        return set(papermill.inspect_notebook(str(src)))


def _check_parameters(notebook: Path, known: set[str], params: dict) -> None:
    unknown = [k for k in params if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ParameterError(f"{notebook}: no parameter {unknown[0]!r} in its parameters cell; "
                             f"{hint}known: {', '.join(sorted(known))}")


def _parameter_value(text: str):
    """A -p value read as papermill's own -p reads it: True / False / None, int, float, else text."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def run_notebook(notebook, profile: str = "default", out: str | None = None, parameters: dict | None = None,
                 kernel: str | None = None) -> Path:
    """Run one chapter notebook by hand, as the chain runs it (README "Running pieces by hand"):
    the profile checked, every parameter checked against the notebook's parameters cell, the
    executed notebook in its stage folder. That stage's cache stamp is removed: its files may
    now differ from what the stamp vouches for, so the next chain run redoes it."""
    nb = Path(notebook)
    nb = nb if nb.exists() else config.REPO_ROOT / nb
    if not nb.is_file():
        raise FileNotFoundError(f"notebook {notebook} not found")
    stage = nb.stem
    if stage not in config.STAGE_NAMES:
        raise ParameterError(f"notebook {notebook} is not a chapter of the chain; known: {', '.join(config.STAGE_NAMES)}")
    for k in ("profile", "out"):
        if k in (parameters or {}):
            raise ParameterError(f"give {k} with --{k}, not -p {k}")
    cfg = config.load_profile(profile)
    run = config.run_dir(cfg, out).resolve()
    _check_parameters(nb, notebook_parameters(nb), {"profile": profile, "out": run, **(parameters or {})})
    needs.require(cfg, [stage], run)   # what the chapter reads from outside the repository
    config.stage_stamp_path(run, stage).unlink(missing_ok=True)
    try:
        return execute_stage(stage, nb, str(config.profile_path(profile).resolve()), run, kernel, parameters)
    except ParameterError:
        raise
    except Exception as e:  # as in the chain: name the cell, keep the executed notebook
        raise StageFailed(stage, str(notebook), config.executed_notebook_path(run, stage), e) from e


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
    # models, data, GPUs and disk, checked in seconds instead of found missing hours in
    needs.require(cfg, [s for s in config.STAGE_NAMES if wanted is None or s in wanted], run)
    status: dict[str, str] = {}
    upstream = ""
    for stage, nb_rel, sections in config.STAGES:
        notebook = config.REPO_ROOT / nb_rel
        key = stage_key(stage, notebook, cfg, sections, upstream)
        upstream = key
        if wanted is not None and stage not in wanted:
            continue
        stamp = config.stage_stamp_path(run, stage)
        info = None if force else resumable.read_json(stamp)
        if info is not None and info.get("key") == key:
            damage = _stamp_damage(run, stage, info)
            if damage is None:
                print(f"[{stage}] cached: parameters and inputs unchanged (key {key}); reusing {stamp.parent}")
                status[stage] = "cached"
                continue
            print(f"[{stage}] rerunning: {damage}")
        stamp.unlink(missing_ok=True)
        print(f"[{stage}] running {nb_rel} (key {key}) ...", flush=True)
        metrics_before = _metrics_state(run)
        t0 = time.perf_counter()
        try:
            executed = execute_stage(stage, notebook, prof_arg, run, kernel)
        except Exception as e:  # papermill's error names the cell; keep the executed notebook
            raise StageFailed(stage, nb_rel, config.executed_notebook_path(run, stage), e) from e
        dt = time.perf_counter() - t0
        _write_stamp(run, stage, {"key": key, "seconds": round(dt, 1), "notebook": nb_rel, "profile": cfg["name"],
                                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")},
                     _stage_outputs(run, stage, metrics_before))
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
    ap.add_argument("--notebook", default=None, help="run only this chapter notebook (no cache), e.g. notebooks/01_data.py")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="with --notebook: a parameter of its parameters cell, read as papermill's -p")
    a = ap.parse_args(argv)
    if a.p and not a.notebook:
        ap.error("-p needs --notebook (the chain's parameters are the profile's)")
    # On Ctrl-C the kernel dies with the runner, and nbclient (through traitlets' logger, or the
    # 'papermill' logger papermill hands it) and asyncio log its last words to the terminal; a
    # stage's real failures reach StageFailed and the executed notebook, so those loggers say
    # nothing here. Of papermill's own records only nbclient's dead-kernel line goes: a dead
    # kernel is a DeadKernelError, reported as the stage's failure (or as the interruption).
    for name in ("traitlets", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("papermill").addFilter(lambda r: not r.getMessage().startswith("Kernel died"))
    try:
        if a.notebook:
            params = {k: _parameter_value(v) for k, v in a.p}
            print(f"executed notebook: {run_notebook(a.notebook, a.profile, a.out, params, a.kernel)}")
        else:
            run_chain(a.profile, a.out, a.stages, a.force, a.kernel)
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        where = f"stage {e.stage} stopped" if getattr(e, "stage", None) else "stopped"
        print(f"interrupted: {where}; rerun the same command to resume (finished stages are reused, "
              "fine-tuning continues from its last checkpoint)", file=sys.stderr)
        return 130
    except (KeyError, ValueError, OSError) as e:  # a profile, a stage name, a parameter, a file
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
