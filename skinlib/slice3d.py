"""Streaming reader and validator for a SLICE-3D (ISIC 2024) release.

A release is `<split>-image.hdf5` (one scalar dataset of JPEG bytes per isic_id) plus
`<split>-metadata.csv` (isic_id, patient_id, optionally target, and the tbp_lv_* columns).
Images are decoded one at a time; nothing is dropped silently: every CSV row is either kept or
listed in `exclusions`, and single attribute values are masked (NaN) with a recorded reason.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image

from skinlib import attributes as registry

WHOLE_ROW = "*"
ID_COLUMNS = ("isic_id", "patient_id")
SHOW = 5  # how many ids an error message lists

# reason -> meaning; attribute "*" marks a whole-row exclusion
REASONS = {
    "missing_id": "isic_id is empty",
    "missing_patient_id": "patient_id is empty",
    "duplicate_id": "isic_id appears more than once in the CSV (all its rows are excluded)",
    "missing_image": "isic_id is in the CSV but has no image in the HDF5",
    "corrupt_jpeg": "the image bytes cannot be decoded (found by verify())",
    "missing_value": "the attribute is empty / NaN in this row",
    "invalid_value": "the attribute is not a finite number in this row",
    "zero_is_missing": "the attribute is exactly 0, which the release writes when it is undefined",
    "unused_image": "an image in the HDF5 with no CSV row (not a CSV row; reported only)",
}
_ROW_REASONS = ("missing_id", "missing_patient_id", "duplicate_id", "missing_image", "corrupt_jpeg")
_VALUE_REASONS = ("missing_value", "invalid_value", "zero_is_missing")


class Slice3DError(ValueError):
    """A release that does not match the expected format."""


class MissingColumnError(Slice3DError):
    """The metadata CSV lacks a required column."""


class IdMismatchError(Slice3DError):
    """CSV ids and HDF5 keys disagree, or an id is duplicated / empty."""


class MissingValueError(Slice3DError):
    """A needed attribute value is empty or not a number."""


class CorruptImageError(Slice3DError):
    """An image's bytes cannot be decoded."""


def _first(ids, n: int = SHOW) -> str:
    ids = list(ids)
    more = f", ... (+{len(ids) - n} more)" if len(ids) > n else ""
    return ", ".join(str(i) for i in ids[:n]) + more


def decode_jpeg(data, source: str = "", isic_id: str = "") -> Image.Image:
    """JPEG bytes -> fully decoded RGB image; CorruptImageError naming source and id otherwise."""
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im.load()  # force the decode now: truncation shows up here, not later
            return im.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad bytes
        raise CorruptImageError(
            f"{source}: image {isic_id!r} cannot be decoded ({type(exc).__name__}: {exc})") from exc


class Slice3D:
    """One split of a SLICE-3D release, validated on construction, images streamed on demand.

    `on_error="raise"` stops at the first problem; `"exclude"` records it in `exclusions`.
    Value 0 of a zero_is_missing attribute is always masked (reason "zero_is_missing"), never raised.
    Usable as a torch Dataset; `transform` (optional) is applied to each PIL image.
    """

    def __init__(self, image_h5_path, metadata_csv_path, attributes=None, on_error: str = "raise",
                 transform=None):
        if on_error not in ("raise", "exclude"):
            raise ValueError(f"on_error must be 'raise' or 'exclude', not {on_error!r}")
        self.image_path = Path(image_h5_path)
        self.metadata_path = Path(metadata_csv_path)
        self.attributes = registry.resolve(attributes)
        self.on_error = on_error
        self.transform = transform
        self.unused_images: list[str] = []
        self.verified = False
        self._h5 = None
        self._pid = None
        self._excl: list[tuple[str, str, str, str]] = []  # (isic_id, attribute, reason, detail)

        for p, what in ((self.image_path, "image HDF5"), (self.metadata_path, "metadata CSV")):
            if not p.is_file():
                raise FileNotFoundError(f"{what} not found: {p}")
        frame = self._read_csv()
        self.csv_rows = len(frame)
        keep = self._check_ids(frame)
        values = self._check_values(frame, keep)
        self._set_kept(frame, keep, values)

    # ---- construction ---------------------------------------------------------------------
    def _read_csv(self) -> pd.DataFrame:
        src = self.metadata_path
        frame = pd.read_csv(src, dtype={"isic_id": str, "patient_id": str}, low_memory=False)
        needed = list(ID_COLUMNS) + [a.column for a in self.attributes]
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise MissingColumnError(
                f"{src}: missing column(s) {', '.join(missing)} "
                f"(has {len(frame.columns)} columns: {_first(frame.columns, 8)})")
        for c in ID_COLUMNS:
            frame[c] = frame[c].str.strip()
        return frame.reset_index(drop=True)

    def _problem(self, exc_type, message: str, rows, reason: str, detail) -> None:
        """Raise, or record whole-row exclusions for `rows` (a boolean mask over the CSV)."""
        if self.on_error == "raise":
            raise exc_type(message)
        for i in np.flatnonzero(rows):
            self._excl.append((self._ids[i], WHOLE_ROW, reason, detail(i)))

    def _check_ids(self, frame: pd.DataFrame) -> np.ndarray:
        """Boolean mask of CSV rows whose ids are usable; records or raises the others."""
        src, h5 = self.metadata_path, self.image_path
        ids = frame["isic_id"]
        self._ids = ids.fillna("").to_numpy(dtype=object)
        keep = np.ones(len(frame), dtype=bool)

        for col, reason in (("isic_id", "missing_id"), ("patient_id", "missing_patient_id")):
            bad = (frame[col].isna() | (frame[col] == "")).to_numpy() & keep
            if bad.any():
                rows = np.flatnonzero(bad)
                self._problem(IdMismatchError,
                              f"{src}: {bad.sum()} row(s) with empty {col}, "
                              f"data rows {_first(rows + 1)}", bad, reason,
                              lambda i, c=col: f"data row {i + 1}: empty {c}")
                keep &= ~bad

        dup = ids.duplicated(keep=False).to_numpy() & keep
        if dup.any():
            dup_ids = pd.unique(self._ids[dup])
            counts = ids[dup].value_counts()
            self._problem(IdMismatchError,
                          f"{src}: {len(dup_ids)} duplicated isic_id(s) over {dup.sum()} rows: "
                          f"{_first(dup_ids)}", dup, "duplicate_id",
                          lambda i: f"data row {i + 1}: appears {counts[self._ids[i]]} times")
            keep &= ~dup

        with h5py.File(h5, "r") as f:
            keys = set(f.keys())
        no_image = keep & ~pd.Series(self._ids).isin(keys).to_numpy()
        if no_image.any():
            self._problem(IdMismatchError,
                          f"{src}: {no_image.sum()} isic_id(s) have no image in {h5}: "
                          f"{_first(self._ids[no_image])}", no_image, "missing_image",
                          lambda i: f"data row {i + 1}: not a key of {h5.name}")
            keep &= ~no_image

        unused = sorted(keys - set(ids.dropna()))
        if unused:
            if self.on_error == "raise":
                raise IdMismatchError(f"{h5}: {len(unused)} image(s) have no row in {src}: "
                                      f"{_first(unused)}")
            self.unused_images = unused
        return keep

    def _check_values(self, frame: pd.DataFrame, keep: np.ndarray) -> np.ndarray:
        """Float matrix (CSV rows x attributes), NaN where a value is missing / masked."""
        src = self.metadata_path
        values = np.full((len(frame), len(self.attributes)), np.nan)
        for j, a in enumerate(self.attributes):
            raw = frame[a.column]
            num = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
            empty = raw.isna().to_numpy() | (raw.astype(str).str.strip() == "").to_numpy()
            problems = (
                ("missing_value", empty, "is empty"),
                ("invalid_value", ~empty & ~np.isfinite(num), "is not a finite number"),
            )
            for reason, bad, says in problems:
                bad = bad & keep
                if not bad.any():
                    continue
                if self.on_error == "raise":
                    i = int(np.flatnonzero(bad)[0])
                    raise MissingValueError(
                        f"{src}: data row {i + 1} (line {i + 2}), isic_id {self._ids[i]}: column "
                        f"{a.column} {says} ({raw.iloc[i]!r}); {bad.sum()} such row(s) in all")
                for i in np.flatnonzero(bad):
                    self._excl.append((self._ids[i], a.name, reason,
                                       f"data row {i + 1}: {a.column}={raw.iloc[i]!r}"))
            ok = np.isfinite(num)
            if a.zero_is_missing:
                zero = keep & ok & (num == 0)
                for i in np.flatnonzero(zero):
                    self._excl.append((self._ids[i], a.name, "zero_is_missing",
                                       f"data row {i + 1}: {a.column}=0"))
                ok &= ~zero
            values[ok, j] = num[ok]
        return values

    def _set_kept(self, frame: pd.DataFrame, keep: np.ndarray, values: np.ndarray) -> None:
        self.metadata = frame[keep].reset_index(drop=True)
        self._values = values[keep]
        self._kept_ids = self.metadata["isic_id"].to_numpy(dtype=object)
        self._patients = self.metadata["patient_id"].to_numpy(dtype=object)
        self._target = (self.metadata["target"].to_numpy() if "target" in self.metadata.columns
                        else None)

    # ---- images -----------------------------------------------------------------------------
    def _file(self) -> h5py.File:
        # A handle inherited through fork is not reused: each process opens its own.
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.image_path, "r")
            self._pid = os.getpid()
        return self._h5

    def image_bytes(self, isic_id: str) -> bytes:
        """The raw JPEG bytes stored for `isic_id`."""
        f = self._file()
        if isic_id not in f:
            raise KeyError(f"{self.image_path}: no image {isic_id!r}")
        node = f[isic_id]
        if not isinstance(node, h5py.Dataset):
            raise CorruptImageError(f"{self.image_path}: {isic_id!r} is a group, not JPEG bytes")
        data = node[()]
        if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1:
            data = data.tobytes()  # some re-packed releases store bytes as a uint8 vector
        if not isinstance(data, (bytes, np.bytes_, np.void)):
            raise CorruptImageError(f"{self.image_path}: {isic_id!r} holds {type(data).__name__}, "
                                    "not JPEG bytes")
        return bytes(data)

    def image(self, isic_id: str) -> Image.Image:
        """Decode the image of `isic_id` (RGB); CorruptImageError if it cannot be decoded."""
        return decode_jpeg(self.image_bytes(isic_id), str(self.image_path), isic_id)

    def verify(self, progress: bool = True) -> pd.DataFrame:
        """Decode every kept image once (streaming); returns the corrupt ones found.

        In "exclude" mode corrupt images become whole-row exclusions ("corrupt_jpeg");
        in "raise" mode the first one raises CorruptImageError.
        """
        from tqdm.auto import tqdm

        bad = []
        for isic_id in tqdm(self._kept_ids, desc=f"verify {self.image_path.name}",
                            disable=not progress, unit="img"):
            try:
                self.image(isic_id)
            except CorruptImageError as exc:
                if self.on_error == "raise":
                    raise
                bad.append((isic_id, WHOLE_ROW, "corrupt_jpeg", str(exc)))
        if bad:
            self._excl.extend(bad)
            gone = pd.Series(self._kept_ids).isin({b[0] for b in bad}).to_numpy()
            self._set_kept(self.metadata, ~gone, self._values)
        self.verified = True
        return pd.DataFrame(bad, columns=["isic_id", "attribute", "reason", "detail"])

    def close(self) -> None:
        """Close this process's HDF5 handle (reopened on the next image access)."""
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = self._pid = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):  # for spawn-started workers: never ship an open handle
        state = self.__dict__.copy()
        state["_h5"] = state["_pid"] = None
        return state

    # ---- dataset protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._kept_ids)

    def __getitem__(self, i: int) -> dict:
        """dict(isic_id, patient_id, image, attributes={short name: float, NaN if masked}[, target])."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        isic_id = self._kept_ids[i]
        img = self.image(isic_id)
        item = {
            "isic_id": isic_id,
            "patient_id": self._patients[i],
            "image": self.transform(img) if self.transform is not None else img,
            "attributes": {a.name: float(v) for a, v in zip(self.attributes, self._values[i])},
        }
        if self._target is not None:
            item["target"] = self._target[i]
        return item

    @property
    def ids(self) -> list[str]:
        """isic_ids of the kept rows, in CSV order."""
        return list(self._kept_ids)

    # ---- tables -------------------------------------------------------------------------------
    def attribute_frame(self) -> pd.DataFrame:
        """isic_id, patient_id and one column per attribute short name (NaN where excluded)."""
        out = self.metadata[list(ID_COLUMNS)].copy()
        for j, a in enumerate(self.attributes):
            out[a.name] = self._values[:, j]
        return out

    @property
    def exclusions(self) -> pd.DataFrame:
        """One row per excluded CSV row (attribute "*") or masked value: isic_id, attribute, reason, detail."""
        return pd.DataFrame(self._excl, columns=["isic_id", "attribute", "reason", "detail"])

    def counts(self) -> dict:
        """csv_rows, kept_rows, excluded_rows, masked_values, unused_images."""
        ex = self.exclusions
        return {
            "csv_rows": self.csv_rows,
            "kept_rows": len(self),
            "excluded_rows": int((ex["attribute"] == WHOLE_ROW).sum()),
            "masked_values": int((ex["attribute"] != WHOLE_ROW).sum()),
            "unused_images": len(self.unused_images),
        }

    def report(self) -> pd.DataFrame:
        """Tidy summary (reason, attribute, count): "kept", whole-row reasons, per-attribute reasons.

        kept + the whole-row reasons (attribute "*", except "unused_image") == CSV rows.
        """
        ex = self.exclusions
        rows = [("kept", WHOLE_ROW, len(self))]
        order = {r: k for k, r in enumerate(REASONS)}
        names = {a.name: k for k, a in enumerate(self.attributes)}
        if len(ex):
            g = ex.groupby(["reason", "attribute"], sort=False).size()
            g = sorted(g.items(), key=lambda kv: (order[kv[0][0]], names.get(kv[0][1], -1)))
            rows += [(r, a, int(n)) for (r, a), n in g]
        if self.unused_images:
            rows.append(("unused_image", WHOLE_ROW, len(self.unused_images)))
        return pd.DataFrame(rows, columns=["reason", "attribute", "count"])

    def __repr__(self) -> str:
        c = self.counts()
        return (f"Slice3D({self.image_path.name}, {self.metadata_path.name}: {c['kept_rows']} of "
                f"{c['csv_rows']} rows kept, {c['masked_values']} values masked, "
                f"{len(self.attributes)} attributes, on_error={self.on_error!r})")


def find_release(directory, split: str = "train") -> tuple[Path, Path]:
    """(image HDF5, metadata CSV) of `split` in `directory`: `{split}-image.hdf5` and
    `{split}-metadata.csv`, or a single prefixed pair such as `isic2024-{split}-image.hdf5`."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"release folder not found: {d}")
    found = []
    for suffix in (f"{split}-image.hdf5", f"{split}-metadata.csv"):
        exact = d / suffix
        hits = [exact] if exact.is_file() else sorted(d.glob(f"*-{suffix}"))
        if len(hits) != 1:
            have = sorted(p.name for p in d.iterdir() if p.suffix in (".hdf5", ".h5", ".csv"))
            why = "no file" if not hits else f"{len(hits)} files ({_first(h.name for h in hits)})"
            raise FileNotFoundError(
                f"{d}: {why} matching {suffix!r} (expected {split}-image.hdf5 and "
                f"{split}-metadata.csv, or one '<prefix>-' pair); found: {_first(have) or 'none'}")
        found.append(hits[0])
    return found[0], found[1]


def open_release(directory=None, split: str = "train", *, image=None, metadata=None, **kw) -> Slice3D:
    """Slice3D of `split` found in `directory` (see find_release); explicit `image` / `metadata`
    paths override the search. Further keywords go to Slice3D."""
    if image is None or metadata is None:
        if directory is None:
            raise ValueError("open_release needs a directory or both image= and metadata=")
        img, meta = find_release(directory, split)
        image = image if image is not None else img
        metadata = metadata if metadata is not None else meta
    return Slice3D(image, metadata, **kw)


FIXTURE_RELEASES = (("isic2024-train-sample/train-image.hdf5", "isic2024-train-sample/train-metadata.csv"),
                    ("isic2024-test-image.hdf5", "isic2024-test-metadata.csv"))


def fixture_images(fixtures_dir) -> list[tuple[str, Image.Image]]:
    """(isic_id, image) of the eight real SLICE-3D crops shipped in the project's fixtures."""
    fixtures_dir = Path(fixtures_dir)
    out = []
    for h5, csv in FIXTURE_RELEASES:
        with Slice3D(fixtures_dir / h5, fixtures_dir / csv) as r:
            out += [(i, r.image(i)) for i in r.metadata.isic_id]
    return out
