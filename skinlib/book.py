"""Render the book from a run folder's executed notebooks.

    python -m skinlib.book --run runs/default

The book shows papermill's executed copies as they are (it never re-executes): they are copied
into book/run/, papermill's injected-parameters cell is hidden, and Jupyter Book 1.x builds
_build/html with warnings as errors.

The book is read offline: the scripts Sphinx and myst-nb would take from CDNs (MathJax, require.js,
the ipywidgets HTML manager) are installed from the npm registry (pinned in VENDOR, kept in
.cache/npm) and copied into `_vendor/`, which `_config.yml` serves as static files, beside the
book's own stylesheet (book/_static/skinlib.css: code and outputs sized for the page).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

from . import config

BOOK_FILES = ("_config.yml", "_toc.yml", "book")
# npm packages the pages load, and which of their files the book serves (under _static/).
VENDOR = {"mathjax": "3.2.2", "requirejs": "2.3.7", "@jupyter-widgets/html-manager": "1.0.15"}
VENDOR_FILES = {  # destination under _vendor/ -> source under node_modules/
    "mathjax/tex-mml-chtml.js": "mathjax/es5/tex-mml-chtml.js",
    "mathjax/output": "mathjax/es5/output",
    "mathjax/input": "mathjax/es5/input",
    "mathjax/ui": "mathjax/es5/ui",
    "mathjax/a11y": "mathjax/es5/a11y",
    "require.min.js": "requirejs/require.js",
    "html-manager": "@jupyter-widgets/html-manager/dist",
}
NPM_CACHE = config.REPO_ROOT / ".cache" / "npm"
# Loaded between require.js and the manager: without it require.js resolves the manager's module,
# and with it the fonts, relative to the page instead of the book's _static folder.
PATHS_JS = ('(function(){var d=document.documentElement.dataset.content_root+"_static/html-manager";'
            'require.config({paths:{"@jupyter-widgets":d,"@jupyter-widgets/html-manager/dist":d}});})();\n')


def vendor(root: Path, cache: Path = NPM_CACHE) -> Path:
    """Install the pinned npm packages once into `cache` and copy the served files to root/_vendor."""
    stamp = cache / "installed.txt"
    want = " ".join(f"{k}@{v}" for k, v in VENDOR.items())
    if not stamp.exists() or stamp.read_text() != want:
        npm = shutil.which("npm")
        if npm is None:
            raise FileNotFoundError("npm not found: the book serves MathJax, require.js and the ipywidgets "
                                    "HTML manager itself and installs them from the npm registry "
                                    "(Debian: apt-get install npm)")
        cache.mkdir(parents=True, exist_ok=True)
        print(f"book: npm install {want} -> {cache}", flush=True)
        subprocess.run([npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund", "--loglevel=error",
                        *want.split()], check=True)
        stamp.write_text(want)
    dest = root / "_vendor"
    if dest.exists():
        shutil.rmtree(dest)
    for rel, src in VENDOR_FILES.items():
        src, out = cache / "node_modules" / src, dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.map", "embed.js", "*.LICENSE.txt"))
        else:
            shutil.copy2(src, out)
    (dest / "html-manager-paths.js").write_text(PATHS_JS)
    return dest


def collect(run: str | Path, dest: Path) -> list[Path]:
    """Copy every stage's executed notebook into `dest`; a missing one is an error naming it."""
    run = Path(run)
    missing = [s for s in config.STAGE_NAMES if not config.executed_notebook_path(run, s).exists()]
    if missing:
        raise FileNotFoundError(f"run folder {run} lacks executed notebooks for stages {', '.join(missing)}; "
                                f"run `python -m skinlib.run --out {run}` first")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    out = []
    for stage in config.STAGE_NAMES:
        nb = nbformat.read(config.executed_notebook_path(run, stage), as_version=4)
        for cell in nb.cells:
            tags = cell.metadata.setdefault("tags", [])
            if "injected-parameters" in tags:
                if "remove-cell" not in tags:
                    tags.append("remove-cell")
                cell.source = _without_machine_paths(cell.source, run)   # the page's source copy keeps it
        pm = nb.metadata.get("papermill", {})
        for key in ("input_path", "output_path"):
            if pm.get(key):
                pm[key] = config.shown(pm[key], run)
        for key, value in (pm.get("parameters") or {}).items():
            if isinstance(value, str):
                pm["parameters"][key] = config.shown(value, run)
        path = dest / f"{stage}.ipynb"
        nbformat.write(nb, path)
        out.append(path)
    return out


def _without_machine_paths(text: str, run: Path) -> str:
    """`text` with the run folder and the repository written as <run> and the repository-relative
    path: the book shows no path of the machine that built it."""
    return (text.replace(str(Path(run).resolve()), "<run>").replace(str(config.REPO_ROOT.resolve()) + "/", ""))


def explorer_files(run: str | Path, root: Path) -> Path:
    """Copy the kernel-free explorer's files (07_explore writes them next to its notebook) to
    root/_vendor/explore, which the pages load as _static/explore/."""
    from .explore import static_dir  # a late import: skinlib.explore loads torch

    src = static_dir(run)
    if not (src / "data.js").exists():
        raise FileNotFoundError(f"{src} lacks data.js: the run's 07_explore stage predates the book's explorer; "
                                f"run `python -m skinlib.run --out {run} --stages 07_explore --force`")
    dest = root / "_vendor" / "explore"
    shutil.copytree(src, dest)
    return dest


def build(run: str | Path, root: str | Path | None = None, strict: bool = True) -> Path:
    """Build the book of `run` in `root` (default: the repository; a test passes a scratch folder,
    into which the book's sources are copied). Returns the html folder."""
    root = Path(root) if root else config.REPO_ROOT
    if root.resolve() != config.REPO_ROOT.resolve():
        root.mkdir(parents=True, exist_ok=True)
        for name in BOOK_FILES:
            src = config.REPO_ROOT / name
            if src.is_dir():
                shutil.copytree(src, root / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("run"))
            else:
                shutil.copy2(src, root / name)
    collect(run, root / "book" / "run")
    vendor(root)
    explorer_files(run, root)
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe), "build", str(root)] + (["-W", "-n", "--keep-going"] if strict else [])
    subprocess.run(cmd, check=True)
    return root / "_build" / "html"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="run folder (default runs/default)")
    ap.add_argument("--no-strict", action="store_true", help="do not fail on warnings")
    a = ap.parse_args(argv)
    try:
        html = build(a.run or config.run_dir("default"), strict=not a.no_strict)
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"book: {html / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
