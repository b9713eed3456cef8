"""``python -m skinlib.explore``: the live explorer in JupyterLab, on a fresh notebook copy of
chapter 7 in an ignored folder (`live/`), so exploring never writes into the tracked
notebooks/07_explore.py."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from skinlib import config

NOTEBOOK = config.REPO_ROOT / "notebooks" / "07_explore.py"
SCRATCH = config.REPO_ROOT / "live"  # ignored by git: the live copy of the chapter


def prepare_live(profile: str, run, dest=SCRATCH) -> Path:
    """A fresh notebook copy of the chapter in `dest` with the run's parameters and live=True.

    JupyterLab opens an .ipynb as a notebook (a jupytext .py opens in the text editor), and its
    autosave writes into this copy: the tracked notebooks/07_explore.py is only read."""
    import jupytext
    import nbformat

    nb = jupytext.read(NOTEBOOK)
    params = {"profile": str(config.profile_path(profile).resolve()), "out": str(Path(run).resolve()), "live": True}
    # as papermill does: the values in a tagged cell right after the parameters cell
    cell = nbformat.v4.new_code_cell("# Parameters (python -m skinlib.explore)\n" +
                                     "\n".join(f"{k} = {v!r}" for k, v in params.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    at = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if not at:
        raise ValueError(f"{NOTEBOOK} has no cell tagged 'parameters'")
    nb.cells.insert(at[0] + 1, cell)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "07_explore.ipynb"
    jupytext.write(nb, path)
    return path


# Server settings for a reader's machine: nothing fetched from the internet (news, update checks,
# the PyPI extension manager), bound to this machine only.
LAB_ARGS = ("--ServerApp.ip=127.0.0.1", "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly")


def missing_run_files(run) -> list[str]:
    """The artifacts the explorer reads that `run` lacks (empty when it can start)."""
    need = [config.manifest_path(run), config.finetuned_dir(run), config.stage_dir(run, "04_embed")]
    return [str(p) for p in need if not Path(p).exists()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Open the live retrieval explorer in JupyterLab: a fresh notebook copy of "
                    "notebooks/07_explore.py in an ignored folder, run against a finished run. "
                    "Arguments after -- go to `jupyter lab` (e.g. -- --no-browser --port 8890).")
    ap.add_argument("--profile", default="default", help="profile name or YAML (default: default)")
    ap.add_argument("--run", default=None, help="run folder (default runs/<profile>)")
    ap.add_argument("--dest", default=str(SCRATCH), help=f"folder for the notebook copy (default {SCRATCH})")
    ap.add_argument("lab_args", nargs=argparse.REMAINDER, help="passed on to jupyter lab")
    a = ap.parse_args(argv)
    run = config.run_dir(a.profile, a.run)
    missing = missing_run_files(run)
    if missing:
        print(f"error: {run} is not a finished run (missing {', '.join(missing)}); run `make book` "
              f"(or python -m skinlib.run --profile {a.profile}) first", file=sys.stderr)
        return 1
    lab = Path(sys.executable).with_name("jupyter-lab")
    if not lab.exists():
        print("error: JupyterLab is not installed in this environment: .venv/bin/pip install -e '.[live]'",
              file=sys.stderr)
        return 1
    path = prepare_live(a.profile, run, a.dest)
    print(f"explorer: {path} (a copy; the tracked notebooks/07_explore.py is not written)", flush=True)
    extra = [x for x in a.lab_args if x != "--"]
    # replaced by jupyter lab (not a child): Ctrl-C and signals reach the server directly
    os.execv(lab, [str(lab), str(path), *LAB_ARGS, *extra])
