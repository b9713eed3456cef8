"""Cosine-similarity retrieval over embedding databases (paper §3: top-k by cosine), with faiss.

Every method answers the same `Retriever.search(queries, k) -> (ids, scores)`:

* `FlatIndex`: exact search (faiss IndexFlatIP over L2-normalised float32 vectors, so the inner
  product is the cosine); on a GPU when the installed faiss has GPU support and sees one.
* `CompressedIndex`: SQ8 (8-bit scalar quantiser, 1 byte a dimension: 1/4 of flat) or PQ codes
  (m bytes a vector), trained on the database vectors: the answer to the paper's space problem of
  one image+text database per attribute.
* `hierarchical`: the paper's two-stage search: top-b candidates by image-only, their image+text
  embeddings computed on demand (cached per attribute), re-ranked by cosine, top-k kept.

Ids are the caller's (isic_id strings or integers), stored beside the faiss index as .npy without
pickle; `save`/`load` never unpickle anything.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

INDEX_FILE, IDS_FILE, META_FILE = "index.faiss", "ids.npy", "meta.json"


def normalize(vectors, where: str = "vectors", first_row: int = 0) -> np.ndarray:
    """Float32 rows of unit L2 norm (a copy); a 1-D input is one row. Zero or non-finite rows
    are an error naming the first such row (numbered from `first_row`, for chunks): a cosine
    with them means nothing."""
    x = np.array(vectors, dtype=np.float32, copy=True)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{where}: expected a 2-D array (n, d), got shape {x.shape}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"{where}: {int(bad.sum())} row(s) with NaN/inf, "
                         f"first row {first_row + int(np.argmax(bad))}")
    norms = np.linalg.norm(x, axis=1)
    zero = norms == 0
    if zero.any():
        raise ValueError(f"{where}: {int(zero.sum())} zero vector(s), "
                         f"first row {first_row + int(np.argmax(zero))}")
    x /= norms[:, None]
    return np.ascontiguousarray(x)


def _chunks(x, where: str, chunk: int):
    """Normalised row blocks of x (a view is read, never modified): a 4 GB database is not
    copied whole."""
    for s in range(0, len(x), chunk):
        yield normalize(x[s:s + chunk], where, first_row=s)


def _as_ids(ids, n: int) -> np.ndarray:
    """Ids as a plain numpy array (unicode strings or int64), saveable without pickle."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"ids must be 1-D with one id per vector ({n}), got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind in "OUS":
        if arr.dtype.kind == "O" and not all(isinstance(i, str) for i in arr):
            raise TypeError("ids must be all strings or all integers")
        return arr.astype(str)
    raise TypeError(f"ids must be strings or integers, not {arr.dtype}")


def gpu_available() -> bool:
    """Whether the installed faiss was built with GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class Retriever(ABC):
    """Anything that returns the top-k database ids and cosine scores for query vectors."""

    @abstractmethod
    def search(self, queries, k: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
        """(ids (Q, k), scores (Q, k)) best first. `exclude` (Q ids) drops that id from row q's
        results, e.g. the query itself when the query is a database image."""


class _FaissIndex(Retriever):
    """Shared code: id bookkeeping, exclusion, save/load, memory accounting."""

    kind = ""

    def __init__(self, dim: int):
        if not (isinstance(dim, (int, np.integer)) and dim > 0):
            raise ValueError(f"dim must be a positive integer, not {dim!r}")
        self.dim = int(dim)
        self.ids = np.empty(0, dtype=np.int64)
        self.index = self._make()

    def _make(self):
        raise NotImplementedError

    def _cpu(self):
        return self.index

    def _meta(self) -> dict:
        return {"kind": self.kind, "dim": self.dim}

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored codes (vectors × code size), the figure that scales with the
        database; ids and quantiser tables are not counted."""
        return self.ntotal * int(self._cpu().code_size)

    def _check(self, vectors, where):
        x = np.asarray(vectors)
        if x.ndim in (1, 2) and x.shape[-1] != self.dim:
            raise ValueError(f"{where}: dimension {x.shape[-1]}, index has {self.dim}")
        return normalize(x, where)

    def add(self, vectors, ids, chunk: int = 65_536) -> None:
        """Add database vectors (normalised here, `chunk` rows at a time) with their ids; ids
        must stay unique. Everything is checked before anything is added."""
        x = np.asarray(vectors)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"database vectors: shape {x.shape}, index has dimension {self.dim}")
        new = _as_ids(ids, len(x))
        if self.ntotal and new.dtype.kind != self.ids.dtype.kind:
            raise TypeError(f"ids are {new.dtype}, the index holds {self.ids.dtype}")
        allids = np.concatenate([self.ids, new]) if self.ntotal else new
        uniq, counts = np.unique(allids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"{int((counts > 1).sum())} duplicated id(s), e.g. {uniq[counts > 1][0]!r}")
        for _ in _chunks(x, "database vectors", chunk):
            pass  # validate every row first: a bad row must not leave a half-filled index
        self._train_if_needed(x)
        for block in _chunks(x, "database vectors", chunk):
            self.index.add(block)
        self.ids = allids

    def _train_if_needed(self, x):
        pass

    def search(self, queries, k: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
        x = self._check(queries, "query vectors")
        extra = 0
        if exclude is not None:
            exclude = np.asarray(exclude)
            if exclude.shape != (len(x),):
                raise ValueError(f"exclude must hold one id per query ({len(x)}), got shape {exclude.shape}")
            if self.ntotal and (exclude.dtype.kind in "iu") != (self.ids.dtype.kind == "i"):
                raise TypeError(f"exclude ids are {exclude.dtype}, the index holds {self.ids.dtype}")
            extra = 1  # ids are unique, so at most one hit per row to drop
        if not (isinstance(k, (int, np.integer)) and 0 < k <= self.ntotal - extra):
            raise ValueError(f"k={k!r}: need 1 <= k <= {self.ntotal - extra} "
                             f"(database of {self.ntotal}{', one excluded per query' if extra else ''})")
        scores, pos = self.index.search(x, int(k) + extra)
        if (pos < 0).any():
            raise RuntimeError(f"faiss returned fewer than {k + extra} results for some query")
        ids = self.ids[pos]
        if extra:
            keep = ids != exclude[:, None]
            # keep the first k kept entries of every row (rows without a hit drop their last)
            keep &= np.cumsum(keep, axis=1) <= k
            ids = ids[keep].reshape(len(x), k)
            scores = scores[keep].reshape(len(x), k)
        return ids, scores

    def vectors_of(self, ids) -> np.ndarray:
        """Stored vectors for database ids (decoded, hence approximate, for compressed codes)."""
        ids = np.asarray(ids)
        if self.ntotal == 0:
            raise KeyError("the index is empty")
        order = np.argsort(self.ids, kind="stable")
        at = np.searchsorted(self.ids, ids, sorter=order)
        at = np.minimum(at, len(order) - 1)
        pos = order[at]
        bad = self.ids[pos] != ids
        if bad.any():
            raise KeyError(f"{int(bad.sum())} id(s) not in the index, e.g. {ids[bad][0]!r}")
        return self._cpu().reconstruct_batch(pos.astype(np.int64))

    def search_by_id(self, ids, k: int, exclude_self: bool = True):
        """Search with database images as queries (the explorer), the query itself left out."""
        ids = np.asarray(ids)
        return self.search(self.vectors_of(ids), k, exclude=ids if exclude_self else None)

    def save(self, path) -> Path:
        """Write a folder: index.faiss (faiss.write_index), ids.npy (no pickle), meta.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._cpu(), str(path / INDEX_FILE))
        np.save(path / IDS_FILE, self.ids, allow_pickle=False)
        (path / META_FILE).write_text(json.dumps(self._meta(), indent=1) + "\n")
        return path


class FlatIndex(_FaissIndex):
    """Exact cosine search; `device` "auto" uses a GPU when faiss can, "cpu" never does."""

    kind = "flat"

    def __init__(self, dim: int, device: str = "auto"):
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be auto, cpu or gpu, not {device!r}")
        if device == "gpu" and not gpu_available():
            raise RuntimeError("device='gpu' but faiss has no GPU support or sees no GPU "
                               "(faiss-cpu is installed, or no CUDA device)")
        self.on_gpu = device != "cpu" and gpu_available()
        super().__init__(dim)

    def _make(self):
        index = faiss.IndexFlatIP(self.dim)
        if self.on_gpu:
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, 0, index)
        return index

    def _cpu(self):
        return faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index

    @property
    def nbytes(self) -> int:
        return self.ntotal * self.dim * 4


class CompressedIndex(_FaissIndex):
    """Cosine search over compressed codes: kind "sq8" (1 byte a dimension) or "pq" (m sub-vectors
    of `nbits` bits). Trained on the first vectors added (or call `train`)."""

    def __init__(self, dim: int, kind: str = "sq8", m: int = 16, nbits: int = 8):
        if kind not in ("sq8", "pq"):
            raise ValueError(f"kind must be 'sq8' or 'pq', not {kind!r}")
        if kind == "pq" and dim % m:
            raise ValueError(f"pq: dim {dim} is not a multiple of m={m}")
        self.kind, self.m, self.nbits = kind, int(m), int(nbits)
        super().__init__(dim)

    def _make(self):
        if self.kind == "sq8":
            return faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
        return faiss.IndexPQ(self.dim, self.m, self.nbits, faiss.METRIC_INNER_PRODUCT)

    def _meta(self):
        return {**super()._meta(), "m": self.m, "nbits": self.nbits}

    def train(self, vectors) -> None:
        """Fit the quantiser on (normalised) vectors, usually the database itself."""
        x = self._check(vectors, "training vectors")
        if self.kind == "pq" and len(x) < 2 ** self.nbits:
            raise ValueError(f"pq with nbits={self.nbits} needs at least {2 ** self.nbits} "
                             f"training vectors, got {len(x)}")
        self.index.train(x)

    def _train_if_needed(self, x):
        if not self.index.is_trained:
            self.train(x)


def load(path) -> _FaissIndex:
    """Read a folder written by `.save` (a FlatIndex loads onto the GPU when faiss can)."""
    path = Path(path)
    for name in (INDEX_FILE, IDS_FILE, META_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"index folder {path}: missing {name}")
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("kind") == "flat":
        out = FlatIndex(meta["dim"])
    elif meta.get("kind") in ("sq8", "pq"):
        out = CompressedIndex(meta["dim"], meta["kind"], meta.get("m", 16), meta.get("nbits", 8))
    else:
        raise ValueError(f"{path / META_FILE}: unknown index kind {meta.get('kind')!r}")
    index = faiss.read_index(str(path / INDEX_FILE))
    if index.d != out.dim or index.ntotal != len(ids := np.load(path / IDS_FILE, allow_pickle=False)):
        raise ValueError(f"{path}: index holds {index.ntotal} vectors of dim {index.d}, "
                         f"meta says dim {out.dim}, ids.npy holds {len(ids)}")
    if isinstance(out, FlatIndex) and out.on_gpu:
        index = faiss.index_cpu_to_gpu(out._res, 0, index)
    out.index, out.ids = index, ids
    return out


class EmbedCache:
    """Wraps `embed_candidates(ids, attribute) -> (n, d)` so that each (attribute, id) vector is
    computed once; `calls` and `computed` count the work actually done."""

    def __init__(self, embed_candidates: Callable):
        self.embed = embed_candidates
        self.store: dict = {}
        self.calls = 0
        self.computed = 0

    def __call__(self, ids, attribute: str) -> np.ndarray:
        """Normalised vectors for `ids` (in order); only the uncached ones are computed, in one call."""
        ids = list(ids)
        todo = list(dict.fromkeys(i for i in ids if (attribute, i) not in self.store))
        if todo:
            vecs = normalize(self.embed(np.asarray(todo), attribute), f"embeddings for {attribute!r}")
            if len(vecs) != len(todo):
                raise ValueError(f"embed_candidates returned {len(vecs)} vectors for {len(todo)} ids")
            self.calls += 1
            self.computed += len(todo)
            for i, v in zip(todo, vecs):
                self.store[(attribute, i)] = v
        return np.stack([self.store[(attribute, i)] for i in ids])


def hierarchical(image_index: Retriever, query_image, query_joint, embed_candidates: Callable,
                 attribute: str, k: int = 5, b: int = 200, exclude=None,
                 chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The paper's hierarchical search: top-b by image-only cosine, re-ranked by the cosine between
    the query's image+text vector (query_joint, (Q, d')) and the candidates' image+text vectors,
    top-k kept (ties keep the image-only order).

    `embed_candidates(ids, attribute)` gives the candidates' image+text vectors; pass an
    `EmbedCache` to compute each candidate once per attribute across calls (a plain function is
    wrapped in a fresh cache). Queries are processed `chunk` at a time to bound memory."""
    if not (0 < k <= b):
        raise ValueError(f"need 0 < k <= b, got k={k}, b={b}")
    qj = normalize(query_joint, "query image+text vectors")
    qi = np.asarray(query_image)
    if len(qi) != len(qj):
        raise ValueError(f"{len(qi)} image query vectors but {len(qj)} image+text ones")
    cache = embed_candidates if isinstance(embed_candidates, EmbedCache) else EmbedCache(embed_candidates)
    ex = None if exclude is None else np.asarray(exclude)
    out_ids, out_scores = [], []
    for s in range(0, len(qj), chunk):
        cand, _ = image_index.search(qi[s:s + chunk], b, None if ex is None else ex[s:s + chunk])
        uniq, inv = np.unique(cand, return_inverse=True)
        vecs = cache(uniq, attribute)  # (U, d')
        if vecs.shape[1] != qj.shape[1]:
            raise ValueError(f"candidate vectors have dim {vecs.shape[1]}, queries {qj.shape[1]}")
        scores = np.einsum("qbd,qd->qb", vecs[inv.reshape(cand.shape)], qj[s:s + chunk])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out_ids.append(np.take_along_axis(cand, order, axis=1))
        out_scores.append(np.take_along_axis(scores, order, axis=1))
    return np.concatenate(out_ids), np.concatenate(out_scores)


def flat_topk(database, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain numpy reference: cosine by matmul, top-k by argpartition then a sort of those k
    (positions into `database`, scores). Used by tests and bench/search.py."""
    db = normalize(database, "database vectors")
    q = normalize(queries, "query vectors")
    sims = q @ db.T
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(sims, part, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(top, order, axis=1)
