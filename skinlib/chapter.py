"""The opening every chapter notebook shares: its profile, run folder, split and release.

    ch = chapter.open(profile, out, "03_predict", predict={"n_images": n_images})
    ch.cfg, ch.run, ch.manifest, ch.train, ch.test, ch.release

A notebook's parameters override keys of profile sections, passed by section name; they are
checked as `config.section` checks them (an unknown key or a wrong type names the parameter).
What a chapter reads from earlier stages (the manifest, the release) is read on first use, so
the chapters that write them (00_phantom, 01_data) open the same way.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import config, slice3d, split


@dataclass
class Chapter:
    """One chapter's view of its run: the profile with the notebook's overrides, and the run folder."""
    stage: str
    cfg: dict
    run: Path

    @functools.cached_property
    def manifest(self) -> pd.DataFrame:
        """The patient split 01_data saved (validated; a missing one names its path)."""
        return split.load_manifest(config.manifest_path(self.run))

    @property
    def train(self) -> pd.DataFrame:
        """The training split: the retrieval database, the images the model was trained on."""
        return self.manifest[self.manifest.split == "train"]

    @property
    def test(self) -> pd.DataFrame:
        """The test split: patients the model never saw."""
        return self.manifest[self.manifest.split == "test"]

    @property
    def release_files(self) -> tuple[Path, Path]:
        """(image HDF5, metadata CSV) of the run's release."""
        return config.release_files(self.cfg, self.run)

    @functools.cached_property
    def release(self) -> slice3d.Slice3D:
        """The release, read with the profile's rule for bad rows."""
        return slice3d.Slice3D(*self.release_files, on_error=self.cfg["data"]["on_error"])

    @property
    def fixtures(self) -> Path:
        """The folder of real SLICE-3D samples the chapters compare with (it may be absent)."""
        return config.resolve_path(self.cfg["reference"]["fixtures_dir"])


def open(profile, out, stage: str, **sections: dict) -> Chapter:  # noqa: A001 (chapter.open)
    """Load `profile`, apply each section's overrides (None keeps the profile's value), pin the
    threads and return the chapter's `Chapter`. `stage` must be one of config.STAGE_NAMES."""
    if stage not in config.STAGE_NAMES:
        raise KeyError(f"chapter.open: unknown stage {stage!r}; known: {', '.join(config.STAGE_NAMES)}")
    cfg = config.load_profile(profile)
    for name, overrides in sections.items():
        cfg[name] = config.section(cfg, name, **overrides)
    config.set_threads(cfg.get("threads", 1))
    return Chapter(stage, cfg, config.run_dir(cfg, out))
