"""One protocol for long jobs: keyed by what they depend on, written as they go, resumed after an
interruption, never half-written, and checked before anything stored is reused.

- `job_key(spec)`: a job's identity, a hash of everything its result depends on.
- `write_bytes` / `write_text` / `write_json`: a file appears whole or not at all (a temporary
  file in the same folder, flushed to disk, then renamed over the target).
- `seal(path, job, rows=...)`: written last, beside a finished file, as `<name>.seal.json`: the
  job, the byte count, the sha256 and (for tables) the row count. `check(path, job)` returns None
  for the finished file of that job and otherwise a sentence naming the file and what is wrong
  (absent, unsealed, of another job, cut short, altered). A file without its seal is unfinished:
  a run killed between writing a file and sealing it redoes that file.
- Folders (a checkpoint, the saved model): `seal_dir` writes `SEAL.json` inside, listing every
  file's size and sha256; `check_dir` holds the folder to it.
- `Stamp`: a job folder's stamp (`job.json`). `Stamp.begin` clears what another job left there.

Why a checksum and not only a size: a shard cut at a line boundary still parses, and an array of
the right size may hold other vectors; both were once reused silently.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SEAL_SUFFIX = ".seal.json"
DIR_SEAL = "SEAL.json"


def job_key(spec) -> str:
    """16 hex digits of the sha256 of `spec` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` atomically: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path) -> dict | None:
    """The JSON object in `path`, or None when it is absent or not whole (a killed writer)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def partial_path(path) -> Path:
    """Where a writer puts `path` before it is whole (a library that writes files itself, such as
    safetensors or pandas, writes here; then `commit`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def commit(path, job: str, rows: int | None = None) -> Path:
    """Move the finished `partial_path(path)` onto `path` and seal it."""
    path = Path(path)
    os.replace(partial_path(path), path)
    seal(path, job, rows)
    return path


def write_csv(frame, path, job: str | None = None) -> Path:
    """Write a table as CSV atomically and seal it (job, bytes, sha256, rows), so a later reader
    can tell it whole and unaltered (`verified`). job: the job that made it; default the frame's
    own (`frame.attrs["job"]`, which `predict.predict_sharded` and `predict.sample` set)."""
    path = Path(path)
    job = job or frame.attrs.get("job")
    if not job:
        raise ValueError(f"write_csv {path.name}: no job given and the frame carries none")
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(partial_path(path), index=False)
    return commit(path, job, rows=len(frame))


# ------------------------------------------------------------------------------------ one file
def seal_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SEAL_SUFFIX)


def seal(path, job: str, rows: int | None = None) -> Path:
    """Seal the finished file `path` as job `job`'s (written after the file itself)."""
    path = Path(path)
    info = {"job": job, "bytes": path.stat().st_size, "sha256": digest(path)}
    if rows is not None:
        info["rows"] = int(rows)
    return write_json(seal_path(path), info)


def check(path, job: str | None = None, rows: int | None = None) -> str | None:
    """None when `path` is a finished, unaltered file (of `job`, with `rows` rows, where given);
    else what is wrong, naming the file."""
    path = Path(path)
    if not path.exists():
        return f"{path}: missing"
    info = read_json(seal_path(path))
    if info is None:
        return f"{path}: not sealed (a run stopped before it was finished, or it was copied in)"
    if job is not None and info.get("job") != job:
        return f"{path}: made by job {info.get('job')}, not by this job ({job})"
    size = path.stat().st_size
    if size != info.get("bytes"):
        return f"{path}: {size} bytes, sealed with {info.get('bytes')} (cut short or replaced)"
    if digest(path) != info.get("sha256"):
        return f"{path}: contents differ from those sealed (sha256 mismatch)"
    if rows is not None and info.get("rows") != rows:
        return f"{path}: sealed with {info.get('rows')} rows, {rows} expected"
    return None


def sealed_rows(path) -> int | None:
    info = read_json(seal_path(path))
    return None if info is None else info.get("rows")


def remove(path) -> None:
    """Remove a file and its seal (the seal first: a half-removed pair reads as unfinished)."""
    for p in (seal_path(path), Path(path)):
        p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------- one folder
def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != DIR_SEAL)


def seal_dir(folder, job: str) -> Path:
    """Seal a finished folder: SEAL.json inside lists every file's size and sha256."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": digest(p)} for p in _files(folder)}
    return write_json(folder / DIR_SEAL, {"job": job, "files": files})


def check_dir(folder, job: str | None = None) -> str | None:
    """None when `folder` holds exactly the files it was sealed with, unaltered; else what is
    wrong, naming the folder and the first file concerned."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder}: missing"
    info = read_json(folder / DIR_SEAL)
    if info is None:
        return f"{folder}: not sealed (a run stopped before it was finished)"
    if job is not None and info.get("job") != job:
        return f"{folder}: made by job {info.get('job')}, not by this job ({job})"
    want = info.get("files", {})
    have = {str(p.relative_to(folder)): p for p in _files(folder)}
    for name in sorted(set(want) - set(have)):
        return f"{folder}: {name} is missing"
    for name in sorted(set(have) - set(want)):
        return f"{folder}: {name} was not there when the folder was sealed"
    for name, meta in sorted(want.items()):
        p = have[name]
        if p.stat().st_size != meta["bytes"]:
            return f"{folder}: {name} has {p.stat().st_size} bytes, sealed with {meta['bytes']} (cut short?)"
        if digest(p) != meta["sha256"]:
            return f"{folder}: {name} differs from the sealed file (sha256 mismatch)"
    return None


# --------------------------------------------------------------------------------- a job folder
class Stamp:
    """The stamp of a job folder: which job its parts belong to.

    `begin(patterns)` makes `folder` this job's: when the stamp names another job (or none), the
    files matching `patterns` (and their seals) are removed first, then the stamp is written, so a
    changed job never mixes in, or resumes from, another job's parts."""

    def __init__(self, folder, spec: dict, name: str = "job.json"):
        self.folder, self.spec = Path(folder), spec
        self.key = job_key(spec)
        self.path = self.folder / name

    def current(self) -> str | None:
        info = read_json(self.path)
        return None if info is None else info.get("job")

    def begin(self, patterns) -> bool:
        """True when the folder already belonged to this job (its finished parts may be reused).
        `patterns`: globs of the parts (e.g. "shard-*.csv"); their seals go with them."""
        if self.current() == self.key:
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        for pattern in patterns:
            for p in [*self.folder.glob(pattern), *self.folder.glob(f".{pattern}.partial"),
                      *self.folder.glob(pattern + SEAL_SUFFIX)]:
                if p.is_file() and p != self.path:
                    p.unlink()
        write_json(self.path, {**self.spec, "job": self.key})
        return False


# ------------------------------------------------------------------------- a model's identity
def model_fingerprint(model) -> str:
    """A cheap identity of the weights: the first and last 8 values of every parameter (no
    arithmetic, so it is the same on every device). A model retrained at the same path, or tuned
    and untuned models under one caller's key, differ here."""
    h = hashlib.sha256()
    for name, p in getattr(model, "module", model).named_parameters():
        flat = p.detach().reshape(-1)
        h.update(name.encode())
        h.update(flat[:8].float().cpu().numpy().tobytes() + flat[-8:].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- a listing of finished files
def listing(root, paths) -> dict:
    """{path relative to `root`: bytes, mtime_ns, sha256} of finished files, for a stamp that
    vouches for them (each file is hashed once, when the stamp is written)."""
    root = Path(root)
    out = {}
    for p in sorted(Path(p) for p in paths):
        st = p.stat()
        out[p.relative_to(root).as_posix()] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest(p)}
    return out


def check_listing(root, files: dict) -> str | None:
    """None when every file of a `listing` is still there, whole and unaltered; else what is wrong
    with the first one that is not, naming it. A file whose size and mtime are unchanged is not
    read again (what makes checking gigabytes cheap); one whose mtime moved (a copy, a touch, a
    rewrite) is hashed, so only changed contents count."""
    root = Path(root)
    for name, meta in sorted(files.items()):
        p = root / name
        if not p.is_file():
            return f"{p}: missing"
        st = p.stat()
        if st.st_size != meta["bytes"]:
            return f"{p}: {st.st_size} bytes, {meta['bytes']} when it was made (cut short or replaced)"
        if st.st_mtime_ns != meta["mtime_ns"] and digest(p) != meta["sha256"]:
            return f"{p}: contents differ from those it was made with (sha256 mismatch)"
    return None


# ------------------------------------------------------------------------- reading what is stored
class Damaged(ValueError):
    """A stored file that does not pass `check`; the message names it and what is wrong."""


def verified(path, job: str | None = None, rows: int | None = None) -> Path:
    """`path` when it passes `check`; else FileNotFoundError (absent) or `Damaged`, saying what is
    wrong. For readers that must refuse, not recompute, what they were given."""
    problem = check(path, job, rows)
    if problem is not None:
        raise (FileNotFoundError if not Path(path).exists() else Damaged)(problem)
    return Path(path)
