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
