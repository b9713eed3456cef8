"""The retrieval study of the paper (§3.3, §4.2) for one run: which vectors, which methods, scores.

Database = the training images, queries = (a seeded subset of) the test images, as in the paper.
Methods, each a function query -> top-k database ids (`METHODS` names them as retrieval.csv does):

  image_text      (a) h_im,a: one flat index per attribute over the database's image+text vectors
  hierarchical    (b) top-b by h_im, re-ranked by h_im,a computed on the fly for the candidates
  image           (c) h_im of the fine-tuned model
  image_untuned   (d) h_im of the model before fine-tuning
  baseline_encoder(e) a general image encoder trained without the attributes (skinlib.encoder)
  multi_attribute (f) one question about several attributes, final token (beyond the paper)
  image_text_sq8  (a) with 8-bit scalar-quantised indexes (beyond the paper: 4x less memory)
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import attributes, config, embed, percentiles, resumable, retrieval

PAPER_METHODS = ("image_text", "hierarchical", "image", "image_untuned", "baseline_encoder")
EXTRA_METHODS = ("multi_attribute", "image_text_sq8")
MULTI = "multi"   # the label of method (f)'s one question in its extraction
LABELS = {
    "image_text": "(a) image+text",
    "hierarchical": "(b) hierarchical",
    "image": "(c) image, fine-tuned",
    "image_untuned": "(d) image, untuned",
    "baseline_encoder": "(e) baseline encoder",
    "multi_attribute": "(f) multi-attribute",
    "image_text_sq8": "(a) image+text, SQ8",
}


def queries(manifest: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """The query images: the test split, or a seeded subset of `n` of it (in manifest order)."""
    test = manifest[manifest.split == "test"]
    if n and n < len(test):
        test = test.sample(n, random_state=seed).sort_index()
    return test


class CandidateEmbedder:
    """`(ids, attribute) -> h_im,a vectors` computed with the model on demand, for the
    hierarchical method. The first time an image is needed all 16 questions are answered from
    one prefix pass (that is what the prefix sharing buys), and kept; `computed` counts images."""

    def __init__(self, loaded, images, names=None, batch_size: int = 8):
        self.loaded, self.images, self.batch_size = loaded, images, batch_size
        self.names = [a.name for a in attributes.resolve(names)]
        self.prompts = embed.Prompts(loaded.tokenizer, loaded.image_processor, embed.attribute_questions(self.names))
        self.store: dict[str, np.ndarray] = {}
        self.computed = 0

    def __call__(self, ids, attribute: str) -> np.ndarray:
        todo = [i for i in dict.fromkeys(map(str, ids)) if i not in self.store]
        for s in range(0, len(todo), 64):
            chunk = todo[s:s + 64]
            out = embed.embed(self.loaded.model, self.loaded.tokenizer, self.loaded.image_processor,
                              [self.images[i] for i in chunk], self.prompts.questions, image=False,
                              batch_size=self.batch_size, prompts=self.prompts)["image_text"].numpy()
            self.store.update(zip(chunk, out))
            self.computed += len(chunk)
        j = self.names.index(attribute)
        return np.stack([self.store[str(i)][j] for i in ids])


def flat(vectors: np.ndarray, ids) -> retrieval.FlatIndex:
    # no float32 copy here: FlatIndex.add normalises `chunk` rows at a time into float32, which
    # gives the same numbers as converting the whole array first
    index = retrieval.FlatIndex(vectors.shape[1], device="auto")
    index.add(vectors, np.asarray(ids))
    return index


def _attribute_vectors(source, j: int, name: str) -> np.ndarray:
    """(n, d) image+text vectors of one attribute: column j of an (n, A, d) array, or attribute
    `name` read from the shards of an `embed.StoredEmbeddings` (only that attribute is read)."""
    if isinstance(source, embed.StoredEmbeddings):
        if name not in source.names:
            raise KeyError(f"{source.folder}: no image+text vectors for {name!r} (the job stored {source.names})")
        return source.attribute(source.names.index(name))
    return np.asarray(source[:, j])


def run_methods(db_ids, q_ids, vec: dict, k: int = 5, b: int = 200, candidates=None,
                multi_names=(), names=None, progress: bool = True):
    """Top-k ids per (method, attribute): {(method, attribute or None): ids (Q, k)}, plus timing and
    memory per method. `vec` holds the arrays: db_image, q_image, db_image_text (N, A, d),
    q_image_text, db_untuned, q_untuned, db_encoder, q_encoder, db_multi, q_multi (any may be
    missing; its methods are skipped). db_image_text and q_image_text may instead be
    `embed.StoredEmbeddings` (`stored_vectors`): then one attribute's vectors are read at a time,
    and held only while that attribute is searched. Float16 arrays are searched as they are
    (normalised in float32 chunks), the same numbers as float32 copies of them.
    `candidates(ids, attribute)` computes h_im,a for the hierarchical method (default: the
    database's stored image+text vectors of that attribute — the same numbers the model gives)."""
    from tqdm.auto import tqdm

    names = [a.name for a in attributes.resolve(names)]
    db_ids, q_ids = np.asarray(db_ids), np.asarray(q_ids)
    out, cost = {}, []

    def timed(method, fn, index_bytes):
        t0 = time.perf_counter()
        res = fn()
        cost.append({"method": method, "seconds": time.perf_counter() - t0, "index_bytes": index_bytes})
        return res

    for m, key in (("image", "image"), ("image_untuned", "untuned"), ("baseline_encoder", "encoder")):
        if f"db_{key}" in vec:
            index = flat(vec[f"db_{key}"], db_ids)
            out[(m, None)] = timed(m, lambda: index.search(vec[f"q_{key}"].astype(np.float32), k)[0], index.nbytes)
            del index  # one index at a time
    if "db_image_text" in vec:
        db_tt, q_tt = vec["db_image_text"], vec["q_image_text"]
        for kind, method in (("flat", "image_text"), ("sq8", "image_text_sq8")):
            total, secs = 0, 0.0
            for j, name in enumerate(tqdm(names, desc=method, disable=not progress)):
                x = _attribute_vectors(db_tt, j, name)
                if kind == "flat":
                    index = flat(x, db_ids)
                else:
                    index = retrieval.CompressedIndex(x.shape[1], "sq8")
                    index.add(x, db_ids)
                del x
                t0 = time.perf_counter()
                out[(method, name)] = index.search(_attribute_vectors(q_tt, j, name).astype(np.float32), k)[0]
                secs += time.perf_counter() - t0
                total += index.nbytes
                del index
            cost.append({"method": method, "seconds": secs, "index_bytes": total})
        image_index = flat(vec["db_image"], db_ids)
        pos = {i: n for n, i in enumerate(db_ids)}
        t0 = time.perf_counter()
        computed = 0
        for j, name in enumerate(tqdm(names, desc="hierarchical", disable=not progress)):
            if candidates is None:
                x = _attribute_vectors(db_tt, j, name)

                def lookup(ids, attribute, x=x):
                    return x[[pos[i] for i in ids]]
            # one cache per attribute, dropped after it: a candidate's vector is needed for its
            # own attribute only, and a cache over all 16 grows to 16 copies of the database
            cache = retrieval.EmbedCache(lookup if candidates is None else candidates)
            out[("hierarchical", name)] = retrieval.hierarchical(
                image_index, vec["q_image"].astype(np.float32),
                _attribute_vectors(q_tt, j, name).astype(np.float32), cache, name, k=k, b=min(b, len(db_ids)))[0]
            computed += cache.computed
            del cache
            x = lookup = None
        cost.append({"method": "hierarchical", "seconds": time.perf_counter() - t0,
                     "index_bytes": image_index.nbytes, "candidates_embedded": computed})
        del image_index
    if "db_multi" in vec and multi_names:
        index = flat(vec["db_multi"], db_ids)
        res = timed("multi_attribute", lambda: index.search(vec["q_multi"].astype(np.float32), k)[0], index.nbytes)
        for name in multi_names:
            out[("multi_attribute", name)] = res
    return out, pd.DataFrame(cost)


def score(results: dict, db: pd.DataFrame, q: pd.DataFrame, names=None) -> pd.DataFrame:
    """Percentile ranks (percentiles.percentile_frame) for every (method, attribute) result; a method
    without an attribute (image-only ones) is scored on all attributes."""
    names = [a.name for a in attributes.resolve(names)]
    frames = []
    for (method, name), ids in results.items():
        which = names if name is None else [name]
        frames.append(percentiles.percentile_frame(db, q, ids, names=which, method=method))
    long = pd.concat(frames, ignore_index=True)
    long["method"] = long["method"].astype(str)
    long["attribute"] = long["attribute"].astype(str)
    return long


def pca2(x: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """The first two principal components, for the embedding map: the top eigenvectors of the
    d x d scatter matrix, accumulated `chunk` rows at a time in float64 (no float64 copy of the
    whole: 8 GB at the paper's database, and an SVD of it would take minutes). Each component's
    sign is fixed so its largest loading is positive (an SVD's sign is arbitrary)."""
    x = np.asarray(x)
    blocks = lambda: (x[s:s + chunk].astype(np.float64) for s in range(0, len(x), chunk))
    mu = sum(b.sum(0) for b in blocks()) / len(x)
    scatter = np.zeros((x.shape[1], x.shape[1]))
    for b in blocks():
        b -= mu
        scatter += b.T @ b
    top = np.linalg.eigh(scatter)[1][:, ::-1][:, :2]
    top *= np.sign(top[np.abs(top).argmax(0), [0, 1]])
    return np.concatenate([(b - mu) @ top for b in blocks()])


def load_vectors(run, which: str) -> tuple[list[str], dict]:
    """Embeddings of one extraction (config.embeddings_dir(run, which)) as float32, every kind
    whole: at the paper's size the fine-tuned database's alone is 65 GB. For small runs and
    tests; the chapters read what they use (`stored_vectors`, `column`, `image_features`)."""
    ids, arrays = embed.load_embeddings(config.embeddings_dir(run, which), dtype=np.float32)
    return ids, arrays


def open_vectors(run, which: str) -> embed.StoredEmbeddings:
    """A finished extraction of 04_embed (e.g. "tuned_db"), checked, for reading in pieces."""
    return embed.open_embeddings(config.embeddings_dir(run, which))


class Column:
    """One stored vector per image, read whole or for some images, as `dtype`, in bounded memory:
    `kind` of an extraction (`embed.StoredEmbeddings`: "image" never touches the image+text
    block; "image_text" is read one attribute at a time, the attribute given to `read`, or the
    only one of a one-question job such as method (f)'s), or an array `save_array` wrote
    (memory-mapped .npy, its rows the images `ids`). ids: the images the rows must be."""

    def __init__(self, source, kind: str = "image", ids=None):
        want = None if ids is None else [str(i) for i in ids]
        if isinstance(source, embed.StoredEmbeddings):
            if kind not in source.kinds:
                raise KeyError(f"{source.folder}: no {kind!r} vectors (this job stored {list(source.kinds)})")
            self.stored, self.kind, self.where = source, kind, source.folder
            self.ids = list(source.ids)
            if want is not None and self.ids != want:
                raise ValueError(f"{source.folder}: holds other images than the database/queries; rerun 04_embed")
            self.width = source.shape(kind)[-1]
        else:
            self.stored, self.kind, self.where = None, None, Path(source)
            self.array = np.load(self.where, mmap_mode="r", allow_pickle=False)
            if self.array.ndim != 2 or (want is not None and len(want) != len(self.array)):
                raise ValueError(f"{self.where}: shape {self.array.shape}, expected ({len(want or [])}, d): "
                                 "not the database/queries' vectors; rerun 04_embed")
            self.ids, self.width = want, self.array.shape[1]
            self._pos = None if want is None else {i: n for n, i in enumerate(want)}

    def read(self, ids=None, dtype=np.float16, attribute: int | None = None) -> np.ndarray:
        """Every image's vector, or those of `ids` in that order: (n, width) of `dtype`."""
        if self.stored is not None:
            if self.kind == "image_text" and attribute is None:
                if len(self.stored.names) != 1:
                    raise ValueError(f"{self.where}: {len(self.stored.names)} questions stored; "
                                     "say which attribute to read")
                attribute = 0
            return self.stored.read(self.kind, attribute, dtype=dtype, ids=ids)
        if attribute is not None:
            raise ValueError(f"{self.where}: one vector per image, no attribute axis")
        if ids is None:
            rows = np.arange(len(self.array))
        elif self._pos is None:
            raise ValueError(f"{self.where}: rows not named; give Column the images' ids")
        else:
            lacking = [i for i in map(str, ids) if i not in self._pos]
            if lacking:
                raise KeyError(f"{self.where}: no vectors for {len(lacking)} image(s), e.g. {lacking[:3]}")
            rows = np.array([self._pos[str(i)] for i in ids], dtype=np.int64)
        out = np.empty((len(rows), self.width), dtype=dtype)
        for s in range(0, len(rows), 8192):   # a block at a time: no float16 copy of the whole
            out[s:s + 8192] = self.array[rows[s:s + 8192]]
        return out


class PerAttribute:
    """An extraction's image+text vectors as a (n, 16, d) array is indexed by `xd[:, j]` (j the
    attribute's place in the registry): attribute j's (n, d) block read from the float16 shards
    as float32 when asked, so `metrics.readout_table` holds one attribute at a time, never the
    whole (65 GB for the paper's database)."""
    ndim = 3

    def __init__(self, stored: embed.StoredEmbeddings):
        self.stored = stored

    def __len__(self) -> int:
        return len(self.stored.ids)

    def __getitem__(self, key) -> np.ndarray:
        rows, j = key if isinstance(key, tuple) and len(key) == 2 else (key, None)
        if rows != slice(None) or not isinstance(j, (int, np.integer)):
            raise IndexError("PerAttribute reads one attribute of every image: [:, j]")
        name = attributes.NAMES[int(j)]
        if name not in self.stored.names:
            raise KeyError(f"{self.stored.folder}: no image+text vectors for {name!r}")
        return self.stored.read("image_text", self.stored.names.index(name), dtype=np.float32)


def column(run, name: str, kind: str = "image", ids=None) -> Column:
    """The vectors 04_embed stored as `name` as a `Column`: an extraction folder where there is
    one, else the sealed .npy `save_array` wrote (refused, named, if missing, cut or altered)."""
    folder = config.embeddings_dir(run, name)
    if (folder / embed.STAMP).exists():
        return Column(embed.open_embeddings(folder), kind, ids)
    return Column(resumable.verified(folder.with_suffix(".npy"), name), kind, ids)


def image_features(run, train_ids, test_ids, dtype=np.float32) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Chapter 6's embedding features, {"tuned" | "untuned" | "encoder": (rows of `train_ids`,
    rows of `test_ids`)}: h_im of the fine-tuned and the untuned model and the baseline encoder's
    vector, read shard by shard (or from the memory-mapped array) straight into `dtype` arrays.
    The 16 image+text vectors are never read: the peak is the six results plus one shard. The
    encoder's arrays are in the order 04_embed extracted (its database and queries)."""
    tuned = {p: open_vectors(run, f"tuned_{p}") for p in ("db", "queries")}
    out = {}
    for tag in ("tuned", "untuned", "encoder"):
        parts = []
        for p, ids in (("db", train_ids), ("queries", test_ids)):
            c = Column(tuned[p], "image") if tag == "tuned" else column(run, f"{tag}_{p}", ids=tuned[p].ids)
            parts.append(c.read(ids, dtype=dtype))
        out[tag] = tuple(parts)
    return out


def stored_vectors(run) -> tuple[list[str], list[str], dict]:
    """(database ids, query ids, `vec` for `run_methods`) of a run's extractions, in bounded
    memory: the image-only arrays whole in float16 (one vector per image each), the image+text
    vectors left in their shards (`embed.StoredEmbeddings`) for `run_methods` to read one
    attribute at a time. Refuses extractions whose images disagree."""
    tuned_db = embed.open_embeddings(config.embeddings_dir(run, "tuned_db"))
    tuned_q = embed.open_embeddings(config.embeddings_dir(run, "tuned_queries"))
    untuned_db = embed.open_embeddings(config.embeddings_dir(run, "untuned_db"))
    untuned_q = embed.open_embeddings(config.embeddings_dir(run, "untuned_queries"))
    if untuned_db.ids != tuned_db.ids or untuned_q.ids != tuned_q.ids:
        raise ValueError("the untuned extraction holds other images than the tuned one; rerun 04_embed")
    for stored in (tuned_db, tuned_q):
        lacking = [n for n in attributes.NAMES if n not in stored.names]
        if lacking:
            raise ValueError(f"{stored.folder}: no image+text vectors for {lacking}; rerun 04_embed")
    vec = {"db_image": tuned_db.read("image"), "q_image": tuned_q.read("image"),
           "db_image_text": tuned_db, "q_image_text": tuned_q,
           "db_untuned": untuned_db.read("image"), "q_untuned": untuned_q.read("image"),
           "db_encoder": load_array(run, "encoder_db", np.float16),
           "q_encoder": load_array(run, "encoder_queries", np.float16),
           "db_multi": load_array(run, "multi_db", np.float16, ids=tuned_db.ids),
           "q_multi": load_array(run, "multi_queries", np.float16, ids=tuned_q.ids)}
    return list(tuned_db.ids), list(tuned_q.ids), vec


def accelerator():
    """The study's `accelerate.Accelerator`, on CPU when torch sees no GPU (as `finetune.run`):
    without cpu=True, `accelerate launch --multi_gpu --num_processes 2` on a CPU machine starts
    two processes that each see one process of one and both compute every shard."""
    from accelerate import Accelerator

    from . import model as models

    return Accelerator(cpu=models.default_device() == "cpu")


def free_memory() -> None:
    """Give back what dropped models held: Python's cycles first, then CUDA's cached blocks
    (PyTorch's caching allocator keeps a freed model's memory for itself otherwise)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def extract_all(cfg: dict, run, db_ids, q_ids, accelerator=None, progress: bool = True) -> dict:
    """Every vector the retrieval study needs, written under 04_embed/embeddings/: the fine-tuned
    model's h_im and 16 h_im,a (database and queries), the multi-attribute question's vector (f),
    and the untuned model's h_im. Each is a sharded `embed.extract` job: resumed where it
    stopped, found finished on a later run (a second run of stage 04 reads the stored vectors),
    and under `accelerate launch -m skinlib.study` split across the processes, each writing its own
    shards. One model is loaded at a time: the fine-tuned one for its jobs, dropped, then the
    untuned one (at the 7B, 16.6 GB of weights on the device, not two copies). The caller must not
    hold a model of its own meanwhile (notebook 04 drops its copy first). Returns seconds per
    extraction; one this call found finished (no shard written) has NaN."""
    from . import finetune, model as models, qa, slice3d

    e = cfg["embed"]
    device = accelerator.device if accelerator is not None else models.default_device()
    release = slice3d.Slice3D(*config.release_files(cfg, run), on_error=cfg["data"]["on_error"])
    multi = {MULTI: embed.multi_question(e["multi"])}

    def load(tag):
        if tag == "tuned":
            return models.load_finetuned(config.finetuned_dir(run), device=device)
        return models.load(finetune.base_model(cfg, run), device=device, min_pixels=cfg["model"]["min_pixels"],
                           max_pixels=cfg["model"]["max_pixels"])

    # (model, [(extraction, kinds, questions)]): the fine-tuned model's jobs together
    jobs = (("tuned", (("tuned", ("image", "image_text"), None), ("multi", ("image_text",), multi))),
            ("untuned", (("untuned", ("image",), None),)))
    timings = {}
    for model_key, extractions in jobs:
        loaded = load(model_key)
        for tag, kinds, questions in extractions:
            for part, ids in (("db", db_ids), ("queries", q_ids)):
                t0, wall0 = time.perf_counter(), time.time()
                folder = embed.extract(loaded.model, loaded.tokenizer, loaded.image_processor,
                                       qa.ImageCache(release, loaded.image_processor, keep=False), list(ids),
                                       config.embeddings_dir(run, f"{tag}_{part}"), kinds=kinds,
                                       shard_size=e["shard_size"], batch_size=e["batch_size"],
                                       model_key=model_key, accelerator=accelerator,
                                       progress=progress, questions=questions)
                if questions is not None and (accelerator is None or accelerator.is_main_process):
                    resumable.remove(folder.with_suffix(".npy"))   # the whole array an earlier layout kept
                # a job found finished (e.g. by `accelerate launch -m skinlib.study`) took no time
                # here; NaN, not ~0 s, so that a timing table does not read it as the cost of the work
                fresh = any(f.stat().st_mtime >= wall0 for f in Path(folder).glob(embed.SHARDS))
                timings[f"{tag}_{part}"] = time.perf_counter() - t0 if fresh else float("nan")
        del loaded
        free_memory()   # before the next model is loaded
    return timings


def main(argv=None) -> int:
    """`accelerate launch -m skinlib.study --profile paper --out runs/paper`: the extractions of
    04_embed split across processes (GPUs); then run the notebooks as usual."""
    import argparse

    from . import needs, split

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cfg = config.load_profile(a.profile)
    run = config.run_dir(cfg, a.out)
    needs.exit_if_missing(cfg, needs.from_stage("04_embed"), run)   # MONET, disk: before hours of work
    manifest = split.load_manifest(config.manifest_path(run))
    db = manifest[manifest.split == "train"]
    q = queries(manifest, cfg["embed"]["n_queries"], cfg["seed"])
    acc = accelerator()
    timings = extract_all(cfg, run, list(db.isic_id), list(q.isic_id), accelerator=acc)
    acc.print({k: round(v, 1) for k, v in timings.items()})
    return 0


def save_array(run, name: str, array: np.ndarray) -> Path:
    """One small array of vectors (float16 .npy, no pickle) next to the extracted shards, written
    whole and sealed (`resumable.commit`: bytes, sha256, rows) as job `name`."""
    path = config.embeddings_dir(run, name).with_suffix(".npy")
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array, dtype=np.float16)
    with open(resumable.partial_path(path), "wb") as f:  # a file object: np.save would add ".npy"
        np.save(f, array, allow_pickle=False)
    return resumable.commit(path, name, rows=len(array))


def load_array(run, name: str, dtype=np.float32, ids=None) -> np.ndarray:
    """The vectors stored as `name`, one row per image, as `dtype`: an `embed.extract` job of one
    question (method f's multi_db / multi_queries, sharded) where that folder exists, else an array
    `save_array` wrote (the encoders'). Missing, cut, altered or unsealed files are refused, named.
    ids: the images the rows must be (checked where the store names them: an extraction)."""
    folder = config.embeddings_dir(run, name)
    if (folder / embed.STAMP).exists():
        stored = embed.open_embeddings(folder)
        if len(stored.names) != 1:
            raise ValueError(f"{folder}: {len(stored.names)} questions stored; one expected for {name!r}")
        if ids is not None and list(stored.ids) != [str(i) for i in ids]:
            raise ValueError(f"{folder}: holds other images than the database/queries; rerun 04_embed")
        return stored.attribute(0, dtype=dtype)
    path = resumable.verified(folder.with_suffix(".npy"), name)
    return np.load(path, allow_pickle=False).astype(dtype, copy=False)


def value_gaps(results: dict, db: pd.DataFrame, q: pd.DataFrame, q_ids, name: str) -> pd.DataFrame:
    """Per query, the median |value difference| in attribute `name` between the query and its top-k,
    for image-only ("image") and image+text with Q(name) ("image_text"): what Fig. 3 shows."""
    a = attributes.get(name).name
    dbv = db.set_index("isic_id")[a]
    qv = q.set_index("isic_id")[a].reindex(list(q_ids)).to_numpy()
    out = {"isic_id": list(q_ids)}
    for method, key in (("image", ("image", None)), ("image_text", ("image_text", a))):
        top = np.asarray(results[key])
        vals = dbv.reindex(top.ravel()).to_numpy().reshape(top.shape)
        out[method] = np.nanmedian(np.abs(vals - qv[:, None]), axis=1)
    return pd.DataFrame(out)


def fig3_sentence(gaps: pd.DataFrame, name: str, k: int = 5) -> str:
    """One sentence: the median over queries of `value_gaps`, and how often image+text is closer."""
    att = attributes.get(name)
    g = gaps.dropna(subset=["image", "image_text"])
    closer = float((g.image_text < g.image).mean() * 100) if len(g) else float("nan")
    return (f"over all {len(g):,} queries, the top-{k}'s median |{att.name} difference| to the query is "
            f"{g.image_text.median():.2f} {att.unit} by image+text against {g.image.median():.2f} {att.unit} "
            f"by the image alone; image+text is closer for {closer:.0f}% of the queries.")


def example_queries(q: pd.DataFrame, name: str, n: int = 4, seed: int = 0) -> list[str]:
    """n query ids spread over the attribute's range (one from each of n quantile bins)."""
    v = q[["isic_id", name]].dropna()
    bins = pd.qcut(v[name].rank(method="first"), n, labels=False)
    return [v[bins == i].sample(1, random_state=seed + i).isic_id.iloc[0] for i in range(n)]


def cost_table(cost: pd.DataFrame, summary: pd.DataFrame, n_queries: int) -> pd.DataFrame:
    """Quality, memory and query time per method: the median over attributes of the median
    percentile, the index memory, and the search time per query (all attributes)."""
    quality = summary.groupby("method").median_percentile.median()
    out = cost.set_index("method").copy()
    out["median percentile (median over attributes)"] = quality.reindex(out.index).round(1)
    out["index memory (MB)"] = (out.pop("index_bytes") / 2 ** 20).round(2)
    out["ms per query"] = (1e3 * out.pop("seconds") / max(n_queries, 1)).round(2)
    return out.reset_index()


def baseline_encoder(cfg: dict, run, release, ids):
    """Method (e)'s encoder from the profile's embed.encoder: MONET from the hub (paper profile),
    or the contrastive stand-in trained on the database images without labels (loaded if this run
    already trained one with the same settings)."""
    from . import encoder

    spec = dict(cfg["embed"]["encoder"])
    # a profile inheriting another may carry both kinds' settings: keep the chosen kind's
    if spec.get("kind") == "monet":
        spec = {k: v for k, v in spec.items() if k in ("kind", "name", "dtype", "revision")}
    elif spec.get("kind") == "contrastive":
        spec = {k: v for k, v in spec.items() if k not in ("name", "dtype", "revision")}
        spec["path"] = str(config.encoder_dir(run))
    return encoder.load_encoder(spec, images=lambda: [release.image(i) for i in ids],
                                data_key=training_images_key(cfg, run, ids))


def training_images_key(cfg: dict, run, ids) -> str:
    """What names the images an encoder is trained on: their ids and the image file's name and size
    (a 100 GB release is not hashed: its size stands in for its contents)."""
    h5 = config.release_files(cfg, run)[0]
    return resumable.job_key({"ids": resumable.job_key([str(i) for i in ids]), "images": h5.name,
                              "bytes": h5.stat().st_size if h5.exists() else None})


if __name__ == "__main__":
    import sys
    sys.exit(main())
