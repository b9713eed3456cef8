"""Streaming reader and validator for a SLICE-3D (ISIC 2024) release.

A release is `<split>-image.hdf5` (one scalar dataset of JPEG bytes per isic_id) plus
`<split>-metadata.csv` (isic_id, patient_id, optionally target, and the tbp_lv_* columns).
Images are decoded one at a time; nothing is dropped silently: every CSV row is either kept or
listed in `exclusions`, and single attribute values are masked (NaN) with a recorded reason.
`exclusion_table()` adds what is counted but not a CSV row (images without a row, images kept in
another format): it is what the data chapter writes to exclusions.csv and shows.
"""
from __future__ import annotations

import csv
import io
import os
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image

from skinlib import attributes as registry

WHOLE_ROW = "*"
ID_COLUMNS = ("isic_id", "patient_id")
SHOW = 5  # how many ids an error message lists
TARGET = "target"  # the malignancy label (0 benign, 1 malignant); the public test set has none

# Images the reader uses. The release's crops are square RGB JPEGs of about 133 px (15 mm of skin):
# the bound on pixels keeps one decode at 12 MB whatever a file claims, and a side below 28 px (one
# Qwen2-VL merged patch) or sides more than 2x apart are not a lesion crop (the image processor
# fails on ratios above 200, far from the reader, without the id).
MAX_PIXELS = 2048 * 2048
MIN_SIDE = 28
MAX_ASPECT = 2.0

# reason -> meaning; attribute "*" marks a whole-row exclusion
REASONS = {
    "missing_id": "isic_id is empty",
    "missing_patient_id": "patient_id is empty",
    "duplicate_id": "isic_id appears more than once in the CSV (all its rows are excluded)",
    "invalid_target": "target (the malignancy label) is not 0 or 1",
    "missing_image": "isic_id is in the CSV but has no image in the HDF5",
    "corrupt_jpeg": "the image bytes cannot be decoded (found by verify())",
    "image_too_large": f"the image has more than {MAX_PIXELS:,} pixels; it is not decoded",
    "image_shape": f"a side under {MIN_SIDE} px or sides more than {MAX_ASPECT:g}x apart: not a lesion crop",
    "not_rgb": "the image is not RGB colour (greyscale, palette/GIF, CMYK, alpha): its colours "
               "are not the ones the attributes were measured on",
    "missing_value": "the attribute is empty / NaN in this row",
    "invalid_value": "the attribute is not a finite number in this row",
    "zero_is_missing": "the attribute is exactly 0, which the release writes when it is undefined",
    "out_of_range": "the attribute is outside the values it can take (attributes.py: low, high)",
    "not_jpeg": "the image is RGB but not JPEG (e.g. PNG): same pixels, so it is kept and counted",
    "unused_image": "an image in the HDF5 with no CSV row (not a CSV row; counted only)",
}
_ROW_REASONS = ("missing_id", "missing_patient_id", "duplicate_id", "invalid_target", "missing_image",
                "corrupt_jpeg", "image_too_large", "image_shape", "not_rgb")
_VALUE_REASONS = ("missing_value", "invalid_value", "zero_is_missing", "out_of_range")
_NOTE_REASONS = ("not_jpeg",)
# What each entry of exclusion_table() did to the data.
ROW_EXCLUDED, VALUE_MASKED, IMAGE_UNUSED, COUNTED = "row excluded", "value masked", "image unused", "kept, counted"
_EXPECTED_CSV = "the release's comma-separated UTF-8 <split>-metadata.csv with a header row"
_EXPECTED_H5 = "the release's <split>-image.hdf5: one dataset of JPEG bytes per isic_id"


class Slice3DError(ValueError):
    """A release that does not match the expected format."""


class MissingColumnError(Slice3DError):
    """The metadata CSV lacks a required column."""


class IdMismatchError(Slice3DError):
    """CSV ids and HDF5 keys disagree, or an id is duplicated / empty."""


class MissingValueError(Slice3DError):
    """A needed attribute value is empty or not a number."""


class OutOfRangeError(Slice3DError):
    """An attribute value outside what the attribute can take (e.g. an area <= 0)."""


class TargetError(Slice3DError):
    """The malignancy label is not 0 or 1."""


class ImageError(Slice3DError):
    """An image the reader does not use; `reason` is its key in REASONS."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class CorruptImageError(ImageError):
    """An image's bytes cannot be decoded."""

    def __init__(self, message: str):
        super().__init__(message, "corrupt_jpeg")


def _text(value) -> str:
    """A CSV cell as an error message shows it: text quoted, numbers plain."""
    return repr(value) if isinstance(value, str) else str(value)


def _first(ids, n: int = SHOW) -> str:
    ids = list(ids)
    more = f", ... (+{len(ids) - n} more)" if len(ids) > n else ""
    return ", ".join(str(i) for i in ids[:n]) + more


def decode_image(data, source: str = "", isic_id: str = "") -> tuple[Image.Image, str | None]:
    """Image bytes -> (fully decoded RGB image, note); ImageError naming source and id when the
    image is not one the reader uses. note is "not_jpeg" for an RGB image stored in another format."""
    where = f"{source}: image {isic_id!r}"
    try:
        # PIL only warns below 2 x its own limit; the reader's bound (checked next) is lower
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(bytes(data)))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{where}: {exc}", "image_too_large") from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad bytes
        raise CorruptImageError(f"{where} cannot be decoded ({type(exc).__name__}: {exc})") from exc
    with im:
        _check_header(im, where)  # from the header alone: nothing large is decoded
        try:
            im.load()  # force the decode now: truncation shows up here, not later
        except Exception as exc:
            raise CorruptImageError(f"{where} cannot be decoded ({type(exc).__name__}: {exc})") from exc
        return im.convert("RGB"), (None if im.format == "JPEG" else "not_jpeg")


def _check_header(im: Image.Image, where: str) -> None:
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise ImageError(f"{where} is {w} x {h} = {w * h:,} pixels, more than the reader's bound "
                         f"of {MAX_PIXELS:,} (a release crop is about 133 x 133)", "image_too_large")
    if min(w, h) < MIN_SIDE or max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageError(f"{where} is {w} x {h} px: a crop of the release is square and at least "
                         f"{MIN_SIDE} px a side (sides at most {MAX_ASPECT:g}x apart here)", "image_shape")
    if im.mode != "RGB":
        raise ImageError(f"{where} is {im.format} in colour mode {im.mode}, not RGB: converting it "
                         "would invent the colours the attributes were measured on", "not_rgb")


def decode_jpeg(data, source: str = "", isic_id: str = "") -> Image.Image:
    """Image bytes -> fully decoded RGB image (see decode_image); ImageError otherwise."""
    return decode_image(data, source, isic_id)[0]


def _csv_header(path: Path) -> list[str]:
    """The CSV's column names, checked before pandas reads the file: pandas renames a repeated
    name to `name.1` and silently uses the first copy, and its errors do not name the file."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip():
        raise Slice3DError(f"{path}: the file is empty; expected {_EXPECTED_CSV}")
    nul = head.find(b"\x00")
    if nul >= 0:
        raise Slice3DError(f"{path}: binary data (a NUL byte at offset {nul}), not text; "
                           f"expected {_EXPECTED_CSV}")
    try:
        line = head.split(b"\n", 1)[0].decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Slice3DError(_not_utf8(path)) from None
    names = next(csv.reader([line.rstrip("\r")]))
    if len(names) == 1:
        seps = [s for s in ";\t|" if s in line]
        if seps:
            raise Slice3DError(f"{path}: the header is one column separated by {seps[0]!r}; expected "
                               f"{_EXPECTED_CSV} (re-save it with ',' between columns)")
    where = {}
    for k, n in enumerate(names, start=1):
        where.setdefault(n, []).append(k)
    dup = {n: ks for n, ks in where.items() if len(ks) > 1}
    if dup:
        said = "; ".join(f"{n!r} at columns {', '.join(map(str, ks))}" for n, ks in dup.items())
        raise Slice3DError(f"{path}: the header repeats column(s) {said}: which copy holds the "
                           "values is unknown; keep one")
    return names


def _not_utf8(path: Path) -> str:
    """Where a file stops being UTF-8 (read only when decoding has already failed)."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
        return f"{path}: not UTF-8 text; expected {_EXPECTED_CSV}"
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return (f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}; latin-1?); "
                f"expected {_EXPECTED_CSV} (re-encode it, e.g. iconv -f latin1 -t utf-8)")


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:  # h5py's message names neither the file nor what was expected
        raise Slice3DError(f"{path}: not a readable HDF5 file ({exc}); expected {_EXPECTED_H5}") from exc


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
        self._notes: list[tuple[str, str, str, str]] = []  # kept but counted, same columns

        for p, what in ((self.image_path, "image HDF5"), (self.metadata_path, "metadata CSV")):
            if not p.is_file():
                raise FileNotFoundError(f"{what} not found: {p}")
        frame = self._read_csv()
        self.csv_rows = len(frame)
        keep = self._check_ids(frame)
        keep = self._check_target(frame, keep)
        values = self._check_values(frame, keep)
        self._set_kept(frame, keep, values)

    # ---- construction ---------------------------------------------------------------------
    def _read_csv(self) -> pd.DataFrame:
        src = self.metadata_path
        _csv_header(src)
        try:
            frame = pd.read_csv(src, dtype={"isic_id": str, "patient_id": str}, low_memory=False)
        except UnicodeDecodeError:
            raise Slice3DError(_not_utf8(src)) from None
        except pd.errors.ParserError as exc:
            raise Slice3DError(f"{src}: {exc}; expected {_EXPECTED_CSV}") from exc
        if frame.empty:
            raise Slice3DError(f"{src}: a header but no data rows; expected {_EXPECTED_CSV}")
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

        with _open_h5(h5) as f:
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

    def _check_target(self, frame: pd.DataFrame, keep: np.ndarray) -> np.ndarray:
        """`keep` without the rows whose label is not 0 or 1 (raised in raise mode); the labels
        of the kept rows become integers."""
        if TARGET not in frame.columns:
            return keep
        raw = frame[TARGET]
        num = pd.to_numeric(raw, errors="coerce")
        bad = keep & ~num.isin([0, 1]).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            self._problem(TargetError,
                          f"{self.metadata_path}: data row {i + 1} (line {i + 2}), isic_id {self._ids[i]}: "
                          f"{TARGET} is {_text(raw.iloc[i])}, not 0 (benign) or 1 (malignant); "
                          f"{bad.sum()} such row(s) in all", bad, "invalid_target",
                          lambda i: f"data row {i + 1}: {TARGET}={_text(raw.iloc[i])}")
            keep = keep & ~bad
        frame[TARGET] = num
        return keep

    def _check_values(self, frame: pd.DataFrame, keep: np.ndarray) -> np.ndarray:
        """Float matrix (CSV rows x attributes), NaN where a value is missing / masked."""
        values = np.full((len(frame), len(self.attributes)), np.nan)
        for j, a in enumerate(self.attributes):
            raw = frame[a.column]
            num = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
            empty = raw.isna().to_numpy() | (raw.astype(str).str.strip() == "").to_numpy()
            self._value_problem(a, raw, "missing_value", empty & keep, "is empty", MissingValueError)
            self._value_problem(a, raw, "invalid_value", ~empty & ~np.isfinite(num) & keep,
                                "is not a finite number", MissingValueError)
            ok = np.isfinite(num)
            if a.zero_is_missing:  # the release's own "not measured": masked, never raised on
                zero = keep & ok & (num == 0)
                for i in np.flatnonzero(zero):
                    self._excl.append((self._ids[i], a.name, "zero_is_missing",
                                       f"data row {i + 1}: {a.column}=0"))
                ok &= ~zero
            outside = ok & ~a.in_range(np.where(ok, num, 0.0))
            self._value_problem(a, raw, "out_of_range", outside & keep,
                                f"is outside the values it can take ({a.range_text()})", OutOfRangeError)
            ok &= ~outside
            values[ok, j] = num[ok]
        return values

    def _value_problem(self, a, raw: pd.Series, reason: str, bad: np.ndarray, says: str, exc_type) -> None:
        """Raise on the first row of `bad`, or mask each (reason recorded per value)."""
        if not bad.any():
            return
        if self.on_error == "raise":
            i = int(np.flatnonzero(bad)[0])
            raise exc_type(f"{self.metadata_path}: data row {i + 1} (line {i + 2}), isic_id {self._ids[i]}: "
                           f"column {a.column} {says} ({_text(raw.iloc[i])}); {bad.sum()} such row(s) in all")
        for i in np.flatnonzero(bad):
            self._excl.append((self._ids[i], a.name, reason, f"data row {i + 1}: {a.column}={_text(raw.iloc[i])}"))

    def _set_kept(self, frame: pd.DataFrame, keep: np.ndarray, values: np.ndarray) -> None:
        self.metadata = frame[keep].reset_index(drop=True)
        self._values = values[keep]
        self._kept_ids = self.metadata["isic_id"].to_numpy(dtype=object)
        self._patients = self.metadata["patient_id"].to_numpy(dtype=object)
        if TARGET in self.metadata.columns:  # every kept label is 0 or 1 (_check_target)
            self.metadata[TARGET] = self.metadata[TARGET].astype("int64")
        self._target = self.metadata[TARGET].to_numpy() if TARGET in self.metadata.columns else None

    # ---- images -----------------------------------------------------------------------------
    def _file(self) -> h5py.File:
        # A handle inherited through fork is not reused: each process opens its own.
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = _open_h5(self.image_path)
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
        """Decode the image of `isic_id` (RGB); ImageError naming it if the reader cannot use it."""
        return decode_image(self.image_bytes(isic_id), str(self.image_path), isic_id)[0]

    def verify(self, progress: bool = True) -> pd.DataFrame:
        """Decode every kept image once (streaming); returns the unusable ones found.

        In "exclude" mode they become whole-row exclusions (reason: corrupt_jpeg, image_too_large,
        image_shape or not_rgb); in "raise" mode the first one raises ImageError. Images kept in
        another format than JPEG are counted ("not_jpeg", see exclusion_table).
        """
        from tqdm.auto import tqdm

        bad, self._notes = [], []
        for isic_id in tqdm(self._kept_ids, desc=f"verify {self.image_path.name}",
                            disable=not progress, unit="img"):
            try:
                _, note = decode_image(self.image_bytes(isic_id), str(self.image_path), isic_id)
            except ImageError as exc:
                if self.on_error == "raise":
                    raise
                bad.append((isic_id, WHOLE_ROW, exc.reason, str(exc)))
                continue
            if note:
                self._notes.append((isic_id, WHOLE_ROW, note, REASONS[note]))
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

    def labels(self) -> pd.DataFrame | None:
        """isic_id and target (0/1) of the kept rows, in `attribute_frame`'s order; None for a
        release without labels (the public test metadata has no target column)."""
        if self._target is None:
            return None
        return pd.DataFrame({"isic_id": self._kept_ids, TARGET: self._target})

    @property
    def exclusions(self) -> pd.DataFrame:
        """One row per excluded CSV row (attribute "*") or masked value: isic_id, attribute, reason, detail."""
        return pd.DataFrame(self._excl, columns=["isic_id", "attribute", "reason", "detail"])

    def exclusion_table(self) -> pd.DataFrame:
        """Everything excluded or counted, one row each: `exclusions`, the HDF5 images with no CSV
        row and the images kept but counted (verify()); `effect` says which (row excluded, value
        masked, image unused, kept, counted). What exclusions.csv holds."""
        ex = self.exclusions
        ex.insert(3, "effect", np.where(ex["attribute"] == WHOLE_ROW, ROW_EXCLUDED, VALUE_MASKED))
        unused = [(i, WHOLE_ROW, "unused_image", IMAGE_UNUSED, f"a key of {self.image_path.name} with no row in "
                   f"{self.metadata_path.name}") for i in self.unused_images]
        notes = [(i, a, r, COUNTED, d) for i, a, r, d in self._notes]
        more = pd.DataFrame(unused + notes, columns=list(ex.columns))
        return pd.concat([ex, more], ignore_index=True) if len(more) else ex

    def counts(self) -> dict:
        """csv_rows, kept_rows, excluded_rows, masked_values, unused_images, counted_images."""
        ex = self.exclusions
        return {
            "csv_rows": self.csv_rows,
            "kept_rows": len(self),
            "excluded_rows": int((ex["attribute"] == WHOLE_ROW).sum()),
            "masked_values": int((ex["attribute"] != WHOLE_ROW).sum()),
            "unused_images": len(self.unused_images),
            "counted_images": len(self._notes),
        }

    def report(self) -> pd.DataFrame:
        """Tidy summary of exclusion_table() (reason, attribute, count, effect), "kept" first.

        kept + the rows whose effect is "row excluded" == CSV rows.
        """
        ex = self.exclusion_table()
        rows = [("kept", WHOLE_ROW, len(self), "kept")]
        order = {r: k for k, r in enumerate(REASONS)}
        names = {a.name: k for k, a in enumerate(self.attributes)}
        if len(ex):
            g = ex.groupby(["reason", "attribute", "effect"], sort=False).size()
            g = sorted(g.items(), key=lambda kv: (order[kv[0][0]], names.get(kv[0][1], -1)))
            rows += [(r, a, int(n), e) for (r, a, e), n in g]
        return pd.DataFrame(rows, columns=["reason", "attribute", "count", "effect"])

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
