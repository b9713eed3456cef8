"""The explorer's data model: `Explorer` answers each (query, method, attribute, k) from flat
indexes over a finished run's stored vectors (`RunVectors`); a query is a test or database id, or
an image, embedded on the spot by the model(s) the method needs."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from skinlib import attributes, config, embed, malignancy, percentiles, retrieval, split, study

METHODS = ("image_text", "hierarchical", "image", "image_untuned", "baseline_encoder", "multi_attribute")
# Methods whose ranking does not depend on the attribute asked (only values and percentiles do).
IMAGE_ONLY = ("image", "image_untuned", "baseline_encoder", "multi_attribute")
K_MAX = 10          # the live slider's and the static explorer's largest k
# the stored vectors each method's query needs (keys of RunVectors.columns)
NEEDS = {"image_text": ("image_text",), "hierarchical": ("image", "image_text"), "image": ("image",),
         "image_untuned": ("untuned",), "baseline_encoder": ("encoder",), "multi_attribute": ("multi",)}
INDEX_KEY = {"image": "image", "image_untuned": "untuned", "baseline_encoder": "encoder",
             "multi_attribute": "multi"}


class RunVectors:
    """A finished run's vectors as the explorer reads them: only what a pick shows, from the
    float16 shards (and the encoder's memory-mapped arrays), never every extraction whole.

    Held: the ids; a float32 flat index per image-only vector (h_im fine-tuned and untuned, the
    encoder's, method (f)'s), built from the database's stored column on its method's first pick
    and kept; of the per-attribute indexes of method (a) only the last attribute's (another
    attribute's rebuilds it, reading that attribute's column only). A query's vectors and the
    hierarchical method's b candidates are read row by row from the shards when a pick needs them.
    At the paper's size (282,564 database images, 3,584 wide) an index is 4.05 GB (the encoder's,
    768 wide, 0.87 GB): at most 17.1 GB of host memory with every method asked (on the GPU instead
    where faiss has one), plus one float16 column (2.0 GB) and two float32 chunks of it (1.9 GB)
    while an index is built: 21 GB (probes/paper_scale.py), against 109 GB for every extraction
    whole in float32."""

    def __init__(self, run):
        tuned = {s: study.open_vectors(run, f"tuned_{p}") for s, p in (("db", "db"), ("q", "queries"))}
        self.db_ids, self.q_ids = list(tuned["db"].ids), list(tuned["q"].ids)
        self.columns = {}
        for s, p in (("db", "db"), ("q", "queries")):
            ids = tuned[s].ids
            self.columns[s] = {"image": study.Column(tuned[s], "image"),
                               "image_text": study.Column(tuned[s], "image_text"),
                               "untuned": study.column(run, f"untuned_{p}", ids=ids),
                               "encoder": study.column(run, f"encoder_{p}", ids=ids),
                               "multi": study.column(run, f"multi_{p}", "image_text", ids=ids)}
        self.qpos = {i: n for n, i in enumerate(self.q_ids)}
        self.dbpos = {i: n for n, i in enumerate(self.db_ids)}
        self._indexes: dict = {}

    def index(self, key: str, j: int | None = None) -> retrieval.FlatIndex:
        """The flat index over the database's `key` vectors (attribute j of "image_text")."""
        if (key, j) not in self._indexes:
            if j is not None:   # one attribute's index at a time: 16 would be 16 copies
                for old in [k for k in self._indexes if k[1] is not None]:
                    del self._indexes[old]
            x = self.columns["db"][key].read(attribute=j)   # float16; the index holds float32
            self._indexes[(key, j)] = study.flat(x, self.db_ids)
        return self._indexes[(key, j)]

    def stored(self, ids, j: int, keys) -> dict:
        """The stored `keys` vectors (float32) of query or database ids, one row per id."""
        sides = []
        for i in ids:
            if i in self.qpos:
                sides.append("q")
            elif i in self.dbpos:
                sides.append("db")
            else:
                raise KeyError(f"{i!r} is neither a query nor a database image of this run")
        return {key: np.concatenate([
            self.columns[s][key].read([i], np.float32, attribute=j if key == "image_text" else None)
            for s, i in zip(sides, ids)]) for key in keys}

    def candidates(self, ids, j: int) -> np.ndarray:
        """h_im,a of attribute j of database ids (the hierarchical method's candidates)."""
        return self.columns["db"]["image_text"].read(list(ids), np.float32, attribute=j)

    def top(self, method: str, j: int, attribute: str, qv: dict, k: int, exclude=None, b: int = 200):
        """Top-k database ids and cosines, (Q, k) each, for the stacked query vectors `qv` (the
        keys NEEDS[method]; attribute `attribute`, position j, where the method asks one)."""
        if method == "image_text":
            return self.index("image_text", j).search(qv["image_text"], k, exclude)
        if method == "hierarchical":
            return retrieval.hierarchical(self.index("image"), qv["image"], qv["image_text"],
                                          lambda c, _a: self.candidates(c, j), attribute, k=k,
                                          b=min(b, len(self.db_ids)), exclude=exclude)
        if method not in INDEX_KEY:
            raise KeyError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        key = INDEX_KEY[method]
        return self.index(key).search(qv[key], k, exclude)


class Explorer:
    """Picks over a finished run (`RunVectors` holds its vectors; see there what that costs).
    The fine-tuned model is loaded on the first reply or upload (at the 7B, 16.6 GB of weights on
    the device), the untuned one only for an upload searched by method (d) (another 16.6 GB) and
    the baseline encoder only for an upload searched by method (e)."""

    def __init__(self, cfg: dict, run, device=None, probe_path=None):
        from skinlib import slice3d

        self.cfg, self.run, self._device = cfg, run, device
        manifest = split.load_manifest(config.manifest_path(run))
        self.vectors = RunVectors(run)
        self.db_ids, self.q_ids = self.vectors.db_ids, self.vectors.q_ids
        self.values = manifest.set_index("isic_id")
        self.db = self.values.loc[self.db_ids].reset_index()
        self.multi = list(cfg["embed"]["multi"])
        self.release = slice3d.Slice3D(*config.release_files(cfg, run), on_error=cfg["data"]["on_error"])
        # the replies are read as chapter 3 reads them: held to the training answers' shapes when
        # the profile constrains decoding
        self.shapes = None
        if cfg.get("predict", {}).get("constrain"):
            from skinlib import answer_format
            self.shapes = answer_format.shapes(pd.read_parquet(config.tuples_path(run)))
        self.names = list(attributes.NAMES)
        # chapter 6's attribute probe; a run without one (no labels to fit it on) still explores
        self.probe_path = Path(probe_path) if probe_path is not None else config.malignancy_probe_path(run)
        self.probe = malignancy.load_probe(self.probe_path) if self.probe_path.exists() else None
        shown = self.probe_path.relative_to(Path(run)) if self.probe_path.is_relative_to(Path(run)) else self.probe_path
        self.probe_missing = None if self.probe is not None else (   # the run's own folder is not the reader's
            f"No malignancy probe: stage 06 wrote none ({shown} is missing), so no probability is shown.")
        labels = self.release.labels()
        self.labels = None if labels is None else labels.set_index("isic_id")[slice3d.TARGET]

    @cached_property
    def tuned(self):
        """The fine-tuned model, for the replies and uploads (loaded on the first one)."""
        from skinlib import model as models
        return models.load_finetuned(config.finetuned_dir(self.run), device=self._device or models.default_device())

    @cached_property
    def images(self):
        from skinlib import qa
        return qa.ImageCache(self.release, self.tuned.image_processor, keep=False)

    # ---------------------------------------------------------------- vectors of queries
    def _exclusions(self, ids):
        """A database image used as a query must not retrieve itself ("" excludes nothing)."""
        if not any(i in self.vectors.dbpos for i in ids):
            return None
        return np.array([i if i in self.vectors.dbpos else "" for i in ids])

    def _embed_image(self, image, method: str, j: int) -> dict:
        t = self.tuned
        if method in ("image_text", "hierarchical", "image"):
            question = attributes.get(self.names[j]).question
            got = embed.embed(t.model, t.tokenizer, t.image_processor, [image], [question])
            return {"image": got["image"].numpy(), "image_text": got["image_text"][:, 0].numpy()}
        if method == "multi_attribute":
            q = embed.multi_question(self.multi)
            got = embed.embed(t.model, t.tokenizer, t.image_processor, [image], [q], image=False)
            return {"multi": got["image_text"][:, 0].numpy()}
        if method == "image_untuned":
            return {"untuned": self.untuned_embed(image)[None]}
        if method == "baseline_encoder":
            return {"encoder": self.encoder.embed([image])}
        raise KeyError(f"unknown method {method!r}; known: {', '.join(METHODS)}")

    @cached_property
    def encoder(self):
        """Method (e)'s encoder: the one 04_embed trained or loaded (found, not retrained)."""
        return study.baseline_encoder(self.cfg, self.run, self.release, self.db_ids)

    @cached_property
    def untuned(self):
        """Method (d)'s model, the base model before fine-tuning (loaded on the first upload)."""
        from skinlib import finetune, model as models
        m = self.cfg["model"]
        return models.load(finetune.base_model(self.cfg, self.run), min_pixels=m["min_pixels"],
                           max_pixels=m["max_pixels"])

    def untuned_embed(self, image) -> np.ndarray:
        u = self.untuned
        return embed.embed(u.model, u.tokenizer, u.image_processor, [image], [])["image"][0].numpy()

    # ---------------------------------------------------------------- picks
    def _top(self, method: str, j: int, attribute: str, qv: dict, k: int, exclude):
        return self.vectors.top(method, j, attribute, qv, k, exclude, b=self.cfg["retrieval"]["b"])

    def _check(self, method: str, attribute: str) -> int:
        if method not in METHODS:
            raise KeyError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        return self.names.index(attributes.get(attribute).name)

    def _ranked(self, query, method: str, j: int, attribute: str, k: int):
        """Top-k ids and cosines of one query, (k,) each. Always ranked one query at a time and to
        at least K_MAX, then cut to k: faiss scores a batch of queries with BLAS and a single one
        without, and near-ties can then swap places; this way every k's list is the first k of
        the same ranking, whether asked live or precomputed for the book."""
        depth = max(k, min(K_MAX, len(self.db_ids) - 1))
        if isinstance(query, str):
            qv, exclude = self.vectors.stored([query], j, NEEDS[method]), self._exclusions([query])
        else:
            qv, exclude = self._embed_image(query, method, j), None
        ids, scores = self._top(method, j, attribute, qv, depth, exclude)
        return ids[0, :k], scores[0, :k]

    def search(self, query, method: str, attribute: str, k: int = 5) -> pd.DataFrame:
        """Top-k database images for a query id (or an image) by `method`, with each image's value of
        `attribute` and its percentile (paper §4.2; NaN for an uploaded image: no measured value)."""
        j = self._check(method, attribute)
        ids, scores = self._ranked(query, method, j, attribute, k)
        out = pd.DataFrame({"rank": np.arange(1, len(ids) + 1), "isic_id": ids, "cosine": scores,
                            attribute: self.values.loc[ids, attribute].to_numpy()})
        out["percentile"] = self._percentiles([query], ids[None], attribute)[0] if isinstance(query, str) \
            else np.nan
        return out

    def percentiles(self, query_ids, ids, names) -> np.ndarray:
        """(Q, k, A) percentiles of the retrieved ids (Q, k) for the attributes `names`."""
        qrows = self.values.loc[list(query_ids)].reset_index()
        long = percentiles.percentile_frame(self.db, qrows, ids, names=list(names))
        return long.percentile.to_numpy().reshape(*ids.shape, len(names))  # rows: (query, rank, attribute)

    def _percentiles(self, query_ids, ids, attribute: str) -> np.ndarray:
        return self.percentiles(query_ids, ids, [attribute])[..., 0]

    def ranked_ids(self, query_ids, method: str, attribute: str, k: int) -> np.ndarray:
        """`search`'s ids for many query ids, (Q, k)."""
        j = self._check(method, attribute)
        return np.stack([self._ranked(q, method, j, attribute, k)[0] for q in query_ids])

    def table(self, query_ids, method: str, attribute: str, k: int):
        """`search` for many query ids: (ids, percentiles), (Q, k) each."""
        ids = self.ranked_ids(query_ids, method, attribute, k)
        return ids, self._percentiles(query_ids, ids, attribute)

    def ask_rows(self, rows, batch_size: int = 64) -> list[str]:
        """The fine-tuned model's greedy replies, one per (query, attribute) row (a query is an id or
        an image), held to each attribute's answer shape when the profile constrains decoding (as
        chapter 3 asks). Each query image is read and encoded once for all its rows."""
        from skinlib.predict import generate, max_answer_tokens
        t = self.tuned
        if self.shapes is not None:
            missing = sorted({a for _, a in rows} - set(self.shapes))
            if missing:
                raise KeyError(f"explorer: no training answers of {missing} to take their answer shapes from")
        encoded = {q: self.images[q] for q in dict.fromkeys(q for q, _ in rows if isinstance(q, str))}
        replies: list[str] = []
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            args = (t.model, t.tokenizer, t.image_processor,
                    [encoded[q] if isinstance(q, str) else q for q, _ in chunk],
                    [attributes.get(a).question for _, a in chunk], max_answer_tokens(t.tokenizer))
            if self.shapes is None:
                replies += generate(*args)
            else:
                replies += generate(*args, row_shapes=[self.shapes[a] for _, a in chunk])[0]
        return replies

    def ask(self, query, attribute: str) -> str:
        return self.ask_rows([(query, attribute)])[0]

    def image(self, isic_id: str):
        return self.release.image(isic_id)

    def malignancy(self, query, replies: list[str] | None = None) -> dict | None:
        """The probe's reading of a query (an id or an image) from the 16 values the model states
        (`replies`, one per attribute in `names` order; asked when not given): `malignancy.explain`'s
        probability, log_odds, intercept, contributions and n_imputed, plus `read` (the stated
        values, NaN where a reply holds no number) and `label` (1 malignant, 0 benign; None for an
        upload or a release without labels). None when the run has no probe."""
        if self.probe is None:
            return None
        replies = self.ask_rows([(query, a) for a in self.names]) if replies is None else replies
        read = [attributes.get(a).read_answer(r) for a, r in zip(self.names, replies, strict=True)]
        label = None
        if isinstance(query, str) and self.labels is not None and query in self.labels.index:
            label = int(self.labels.loc[query])
        return {**malignancy.explain(self.probe, read), "read": read, "label": label}
