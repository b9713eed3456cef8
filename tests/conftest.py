"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The real SLICE-3D samples: $SKIN_FIXTURES, else <repo>/../shared/fixtures."""
    path = Path(os.environ.get("SKIN_FIXTURES", REPO.parent / "shared" / "fixtures"))
    if not path.is_dir():
        pytest.fail(f"fixtures folder not found: {path} (set SKIN_FIXTURES to the folder holding "
                    "isic2024-test-image.hdf5 and isic2024-train-sample/)")
    return path


@pytest.fixture(scope="session")
def phantom_release():
    """A function (folder, n, seed, on_error="exclude") -> the Slice3D release of an n-image
    phantom written into `folder` (one worker, no progress bar)."""
    def make(folder, n: int, seed: int, on_error: str = "exclude"):
        from skinlib import phantom, slice3d
        folder = Path(folder)
        phantom.generate(n, folder, seed=seed, workers=1, progress=False)
        return slice3d.Slice3D(folder / "train-image.hdf5", folder / "train-metadata.csv", on_error=on_error)
    return make


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The whole chain on the smoke profile, executed once per session by papermill."""
    from skinlib import run
    out = tmp_path_factory.mktemp("runs") / "smoke"
    status = run.run_chain("smoke", out=out)
    return out, status


@pytest.fixture(scope="session")
def smoke_book(smoke_run, tmp_path_factory):
    """The book of the smoke run, built by Jupyter Book in a scratch folder: the html folder."""
    from skinlib import book
    return book.build(smoke_run[0], root=tmp_path_factory.mktemp("book"))
