"""The retrieval explorer behind notebooks/07_explore.py: pick a query, a method, an attribute, k.

`Explorer` loads a finished run's vectors once and answers each pick from in-memory flat indexes;
an uploaded image is embedded on the spot by the model(s) the method needs. `Controls` are the live
widgets (Jupyter). For the book, where there is no kernel, `write_static` precomputes every
(query, method, attribute) of a few dozen queries at the largest k into a data file and thumbnails,
and `static_page` is the plain-JavaScript explorer that reads them (no network, works from file://).

    python -m skinlib.explore --profile default     # the live explorer in JupyterLab

opens a fresh copy of the chapter in an ignored folder (`live/`), so exploring never writes into
the tracked notebooks/07_explore.py.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import re
import shutil
import sys
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from skinlib import attributes, config, embed, evaluate, malignancy, retrieval, split, study

METHODS = ("image_text", "hierarchical", "image", "image_untuned", "baseline_encoder", "multi_attribute")
# Methods whose ranking does not depend on the attribute asked (only values and percentiles do).
IMAGE_ONLY = ("image", "image_untuned", "baseline_encoder", "multi_attribute")
K_MAX = 10          # the live slider's and the static explorer's largest k
THUMB_PX = 112      # thumbnails: the embedded default's crops are 90-160 px, the model sees 112
# The kernel-free explorer's files (data.js + thumbnails) in the built book: queries are dropped
# from the end of the list until they fit (the embedded default's 40 fit with room to spare).
STATIC_BUDGET = 8_000_000
STATIC_QUERIES = 40
STATIC_NAME = "static"  # the folder in the 07_explore stage folder; the book serves it as _static/explore
NOTEBOOK = config.REPO_ROOT / "notebooks" / "07_explore.py"
SCRATCH = config.REPO_ROOT / "live"  # ignored by git: the live copy of the chapter


# What the malignancy panel says about its numbers (the live grid and the book's show the same words).
PROBE_NOTE = ("from the 16 attributes the model reads in this image (its answers to the 16 questions), "
              "by chapter 6's logistic probe fitted on the training images' measured attributes; "
              "each bar is an attribute's standardised value × coefficient, and with the intercept "
              "they sum to the log-odds")


class BadUpload(ValueError):
    """An uploaded file that is not an image the explorer can read."""


def read_upload(entry: dict):
    """(RGB image, file name) of one ipywidgets FileUpload entry; BadUpload when it is no image."""
    from PIL import Image, UnidentifiedImageError

    name = entry.get("name") or "the upload"
    try:
        with Image.open(io.BytesIO(bytes(entry["content"]))) as im:
            return im.convert("RGB"), name
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        why = "not an image format Pillow knows" if isinstance(e, UnidentifiedImageError) else str(e)
        raise BadUpload(f"{name!r} cannot be used as a query: {why}. Upload a PNG or JPEG crop of a "
                        "lesion, or pick a query from the list.") from None


class Explorer:
    def __init__(self, cfg: dict, run, device=None, probe_path=None):
        from skinlib import model as models, qa, slice3d

        self.cfg, self.run = cfg, run
        manifest = split.load_manifest(config.manifest_path(run))
        self.db_ids, tuned_db = study.load_vectors(run, "tuned_db")
        self.q_ids, tuned_q = study.load_vectors(run, "tuned_queries")
        self.values = manifest.set_index("isic_id")
        self.db = self.values.loc[self.db_ids].reset_index()
        self.vec = {"db_image": tuned_db["image"], "db_image_text": tuned_db["image_text"],
                    "q_image": tuned_q["image"], "q_image_text": tuned_q["image_text"],
                    "db_untuned": study.load_vectors(run, "untuned_db")[1]["image"],
                    "q_untuned": study.load_vectors(run, "untuned_queries")[1]["image"],
                    "db_encoder": study.load_array(run, "encoder_db"),
                    "q_encoder": study.load_array(run, "encoder_queries"),
                    "db_multi": study.load_array(run, "multi_db"), "q_multi": study.load_array(run, "multi_queries")}
        self.multi = list(cfg["embed"]["multi"])
        self.release = slice3d.Slice3D(*config.release_files(cfg, run), on_error=cfg["data"]["on_error"])
        self.tuned = models.load_finetuned(config.finetuned_dir(run), device=device or models.default_device())
        self.images = qa.ImageCache(self.release, self.tuned.image_processor, keep=False)
        # the replies are read as chapter 3 reads them: held to the training answers' shapes when
        # the profile constrains decoding
        self.shapes = None
        if cfg.get("predict", {}).get("constrain"):
            from skinlib import answer_format
            self.shapes = answer_format.shapes(pd.read_parquet(config.tuples_path(run)))
        self.names = list(attributes.NAMES)
        self._qpos = {i: n for n, i in enumerate(self.q_ids)}
        self._dbpos = {i: n for n, i in enumerate(self.db_ids)}
        self._indexes: dict = {}
        # chapter 6's attribute probe; a run without one (no labels to fit it on) still explores
        self.probe_path = Path(probe_path) if probe_path is not None else config.malignancy_probe_path(run)
        self.probe = malignancy.load_probe(self.probe_path) if self.probe_path.exists() else None
        shown = self.probe_path.relative_to(Path(run)) if self.probe_path.is_relative_to(Path(run)) else self.probe_path
        self.probe_missing = None if self.probe is not None else (   # the run's own folder is not the reader's
            f"No malignancy probe: stage 06 wrote none ({shown} is missing), so no probability is shown.")
        labels = self.release.labels()
        self.labels = None if labels is None else labels.set_index("isic_id")[slice3d.TARGET]

    # ---------------------------------------------------------------- vectors of queries
    def _index(self, key: str, j: int | None = None):
        if (key, j) not in self._indexes:
            x = self.vec[f"db_{key}"] if j is None else self.vec[f"db_{key}"][:, j]
            self._indexes[(key, j)] = study.flat(x, self.db_ids)
        return self._indexes[(key, j)]

    def _stored(self, ids, j: int) -> dict:
        """The stored vectors of query or database ids, one row per id."""
        rows = []
        for i in ids:
            if i in self._qpos:
                rows.append(("q", self._qpos[i]))
            elif i in self._dbpos:
                rows.append(("db", self._dbpos[i]))
            else:
                raise KeyError(f"{i!r} is neither a query nor a database image of this run")
        v = self.vec
        return {"image": np.stack([v[f"{s}_image"][n] for s, n in rows]),
                "image_text": np.stack([v[f"{s}_image_text"][n, j] for s, n in rows]),
                "untuned": np.stack([v[f"{s}_untuned"][n] for s, n in rows]),
                "encoder": np.stack([v[f"{s}_encoder"][n] for s, n in rows]),
                "multi": np.stack([v[f"{s}_multi"][n] for s, n in rows])}

    def _exclusions(self, ids):
        """A database image used as a query must not retrieve itself ("" excludes nothing)."""
        if not any(i in self._dbpos for i in ids):
            return None
        return np.array([i if i in self._dbpos else "" for i in ids])

    def _embed_image(self, image, method: str, j: int) -> dict:
        t = self.tuned
        if method in ("image_text", "hierarchical", "image"):
            got = embed.embed(t.model, t.tokenizer, t.image_processor, [image], [self.names_question(j)])
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

    def names_question(self, j: int) -> str:
        return attributes.get(self.names[j]).question

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
        """Top-k database ids and cosines, (Q, k) each, for the stacked query vectors `qv`."""
        if method == "image_text":
            return self._index("image_text", j).search(qv["image_text"], k, exclude)
        if method == "hierarchical":
            pos = self._dbpos

            def candidates(c, _a):
                return self.vec["db_image_text"][[pos[i] for i in c], j]
            return retrieval.hierarchical(self._index("image"), qv["image"], qv["image_text"], candidates,
                                          attribute, k=k, b=min(self.cfg["retrieval"]["b"], len(self.db_ids)),
                                          exclude=exclude)
        key = {"image": "image", "image_untuned": "untuned", "baseline_encoder": "encoder",
               "multi_attribute": "multi"}[method]
        return self._index(key).search(qv[key], k, exclude)

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
            qv, exclude = self._stored([query], j), self._exclusions([query])
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
        long = evaluate.percentile_frame(self.db, qrows, ids, names=list(names))
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


# -------------------------------------------------------------------- one pick, as data and as HTML
def _num(x) -> float | None:
    """A float for JSON (None for NaN: JSON has no NaN)."""
    x = float(x)
    return None if x != x else x


def pick(ex: Explorer, query, method: str, attribute: str, k: int = 5, name: str | None = None) -> dict:
    """One pick as plain data: the query (its id, or None for an upload named `name`), its measured
    value, the model's reply and the value it states, and the top-k with values and percentiles."""
    return as_pick(ex, query, ex.search(query, method, attribute, k), ex.ask(query, attribute), method,
                   attribute, name)


def as_pick(ex: Explorer, query, top: pd.DataFrame, reply: str, method: str, attribute: str,
            name: str | None = None) -> dict:
    """`pick`'s data from a `search` frame and a reply already at hand."""
    known = isinstance(query, str)
    return {"method": method, "label": study.LABELS[method], "attribute": attribute,
            "unit": attributes.get(attribute).unit, "k": len(top), "n_db": len(ex.db_ids),
            "query": {"id": query if known else None, "name": query if known else (name or "uploaded image"),
                      "value": _num(ex.values.loc[query, attribute]) if known else None,
                      "reply": reply, "said": _num(attributes.get(attribute).read_answer(reply))},
            "hits": [{"rank": int(r.rank), "id": r.isic_id, "value": _num(getattr(r, attribute)),
                      "percentile": _num(r.percentile)} for r in top.itertuples()]}


def _prob(p: float) -> float:
    """A probability as the panels show it (three decimals)."""
    return float(f"{p:.3f}")


def _contrib(c: float) -> float:
    """A contribution as the panels show it (two decimals; -0.00 shown as +0.00 by both)."""
    return float(f"{c:.2f}") + 0.0


def probe_panel(m: dict | None) -> dict | None:
    """`Explorer.malignancy`'s reading as the panels show it (rounded once, here, so that the live
    grid and the book's page agree digit for digit)."""
    if m is None:
        return None
    return {"p": _prob(m["probability"]), "label": m["label"], "contrib": [_contrib(c) for c in m["contributions"]],
            "intercept": _contrib(m["intercept"]), "n_imputed": m["n_imputed"]}


def _sorted_contributions(panel: dict, names) -> list[tuple[str, float]]:
    """(attribute, contribution), largest |contribution| first, ties in registry order (the page's
    JavaScript sorts the same way: its sort is stable)."""
    pairs = list(zip(names, panel["contrib"]))
    return sorted(pairs, key=lambda t: -abs(t[1]))


def malignancy_html(panel: dict | None, names, missing: str | None = None) -> str:
    """The malignancy panel beside a pick's grid: the probability, the label where known, and each
    attribute's contribution as a bar; `missing` (one line) when the run has no probe."""
    e = html.escape
    if panel is None:
        return f'<div class="skx-malig skx-none"><p class="skx-note">{e(missing or "No malignancy probe.")}</p></div>'
    pairs = _sorted_contributions(panel, names)
    top = max([abs(c) for _, c in pairs] + [1e-9])
    rows = "".join(
        f'<tr data-attribute="{e(n)}"><td>{e(n)}</td><td><span class="skx-bar {"skx-pos" if c > 0 else "skx-neg"}" '
        f'style="width:{round(80 * abs(c) / top)}px"></span></td><td>{c:+.2f}</td></tr>' for n, c in pairs)
    rows += f'<tr class="skx-intercept"><td>intercept</td><td></td><td>{panel["intercept"]:+.2f}</td></tr>'
    label = ("" if panel["label"] is None else
             f'<div class="skx-label">label: {"malignant" if panel["label"] else "benign"}</div>')
    filled = (f' {panel["n_imputed"]} of {len(pairs)} replies held no number and were filled with the training '
              'median.' if panel["n_imputed"] else "")
    return (f'<div class="skx-malig" data-probability="{panel["p"]:.3f}">'
            f'<div class="skx-title">malignancy probe: P(malignant) {panel["p"]:.3f}</div>{label}'
            f'<p class="skx-note">{e(PROBE_NOTE)}.{e(filled)}</p>'
            f'<table class="skx-contrib">{rows}</table></div>')


def thumbnail(image) -> bytes:
    """A JPEG of at most THUMB_PX a side (never enlarged)."""
    im = image.convert("RGB")
    im.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85, optimize=True)
    return buf.getvalue()


# One look for the live grid and the book's: text captions at a fixed size whatever k is, cards
# that wrap instead of shrinking.
CSS = """<style>
.skx-title{font-weight:600;margin:.4em 0}
.skx-grid{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.skx-card{margin:0;width:128px;font-size:12px;line-height:1.35;color:#222}
.skx-card img{width:120px;height:120px;object-fit:contain;display:block;border:1px solid #bbb}
.skx-query img{border:3px solid #c0392b;width:116px;height:116px}
.skx-controls label{margin-right:1.2em;white-space:nowrap}
.skx-note{font-size:90%;color:#555}
.skx-error{color:#a00;font-weight:600}
.skx-body{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.skx-body .skx-grid{flex:1 1 420px}
.skx-malig{flex:0 0 300px;font-size:12px}
.skx-malig .skx-note{margin:.3em 0}
.skx-contrib{border-collapse:collapse}
.skx-contrib td{padding:1px 4px;white-space:nowrap}
.skx-contrib td:last-child{text-align:right;font-variant-numeric:tabular-nums}
.skx-bar{display:inline-block;height:9px}
.skx-pos{background:#c0392b}.skx-neg{background:#2e86c1}
</style>"""


def _fmt(v, unit: str) -> str:
    return "no value" if v is None else f"{v:.2f} {unit}".rstrip()


def pick_html(p: dict, src, panel: str = "") -> str:
    """The HTML of a `pick`: a titled grid, the query first, and beside it `panel` (the malignancy
    panel's HTML, `malignancy_html`). `src(id)` gives an image's URL (None: the uploaded image).
    The static explorer's JavaScript draws the same markup."""
    e, q, unit = html.escape, p["query"], p["unit"]
    said = _fmt(q["said"], unit) if q["said"] is not None else f"no number ({q['reply']!r})"
    measured = (f"{p['attribute']} {_fmt(q['value'], unit)}" if q["id"] is not None
                else "no measured value (an upload)")
    cards = [f'<figure class="skx-card skx-query" data-id="{e(q["id"] or "")}">'
             f'<img alt="query" src="{e(src(q["id"]))}"/><figcaption><b>query</b> {e(q["name"])}<br>'
             f'{e(measured)}<br>model says {e(said)}</figcaption></figure>']
    for h in p["hits"]:
        pct = "no percentile (no measured value)" if h["percentile"] is None else f"percentile {h['percentile']:.0f}"
        cards.append(f'<figure class="skx-card skx-hit" data-rank="{h["rank"]}" data-id="{e(h["id"])}">'
                     f'<img alt="#{h["rank"]}" src="{e(src(h["id"]))}"/><figcaption>#{h["rank"]} {e(h["id"])}<br>'
                     f'{e(_fmt(h["value"], unit))}<br>{pct}</figcaption></figure>')
    title = f"{p['label']} · {p['attribute']} · top {p['k']} of {p['n_db']:,} database images"
    return (f'<div class="skx-pick" data-method="{e(p["method"])}" data-attribute="{e(p["attribute"])}" '
            f'data-k="{p["k"]}" data-query="{e(q["id"] or "")}"><div class="skx-title">{e(title)}</div>'
            f'<div class="skx-body"><div class="skx-grid">{"".join(cards)}</div>{panel}</div></div>')


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def grid_html(ex: Explorer, p: dict, upload=None, reading: dict | None = None) -> str:
    """The live grid of a pick: `pick_html` with its thumbnails inline (`upload`: the query image
    when the query is an upload) and the malignancy panel of `reading` (`Explorer.malignancy`;
    without it, or without a probe, the panel's one line)."""
    def src(i):
        return data_uri(thumbnail(upload if i is None else ex.image(i)))
    missing = ex.probe_missing or "The malignancy probe was not asked for this pick."
    return CSS + pick_html(p, src, malignancy_html(probe_panel(reading), ex.names, missing))


# -------------------------------------------------------------------- the live widgets
class Controls:
    """The live explorer (ipywidgets): a query from the test set or an uploaded image, a method, an
    attribute and k; every change redraws the pick. Picking a query (or "clear upload") drops the
    upload. Beside the grid, the malignancy probe's reading of the query from the 16 attributes the
    model reads (asked once per query or upload, then kept while other controls change). The last
    pick is kept in `result` (the top-k frame), `reply` (the model's answer), `reading`
    (`Explorer.malignancy`, None without a probe), `message` (what went wrong with an upload, else
    "") and `seconds`, so it can be checked without a browser."""

    def __init__(self, ex: Explorer, upload: bool = True):
        import ipywidgets as W

        self.ex = ex
        self.query = W.Dropdown(options=list(ex.q_ids), description="query")
        # FileUpload only where a frontend exists: its comm hangs a kernel that has none (papermill).
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="or upload") if upload else None
        self.clear = W.Button(description="clear upload", disabled=True) if upload else None
        self.method = W.Dropdown(options=[(study.LABELS[m], m) for m in METHODS], value="image_text",
                                 description="method")
        self.attribute = W.Dropdown(options=list(attributes.NAMES), value="areaMM2", description="attribute")
        self.k = W.IntSlider(value=5, min=1, max=K_MAX, description="k")
        self.status = W.HTML()
        self.grid = W.HTML()
        self.uploaded = None  # (image, name) while an upload is the query
        self.result, self.reply, self.message, self.seconds = None, None, "", None
        self.reading = None
        self._readings: dict = {}  # query id (or the upload's name) -> Explorer.malignancy
        top = [self.query] + ([self.upload, self.clear] if upload else [])
        self.widget = W.VBox([W.HBox(top), W.HBox([self.method, self.attribute, self.k]), self.status, self.grid])
        self.query.observe(self._on_query, names="value")
        for w in (self.method, self.attribute, self.k):
            w.observe(self.show, names="value")
        if upload:
            self.upload.observe(self._on_upload, names="value")
            self.clear.on_click(lambda _b: self._drop_upload(redraw=True))

    def _drop_upload(self, redraw: bool) -> None:
        self.uploaded = None
        self._readings.pop(("upload",), None)
        if self.upload is not None and self.upload.value:
            self.upload.value = ()  # observed as an empty value, which draws nothing
            self.clear.disabled = True
        if redraw:
            self.show()

    def _on_query(self, _change) -> None:
        self._drop_upload(redraw=False)
        self.show()

    def _on_upload(self, change) -> None:
        if not change["new"]:
            return
        self._readings.pop(("upload",), None)
        try:
            self.uploaded = read_upload(change["new"][0])
        except BadUpload as e:
            self._drop_upload(redraw=False)
            self.show(message=str(e))  # the list's query is shown again, with the reason
            return
        self.clear.disabled = False
        self.show()

    def query_value(self):
        """The uploaded image while there is one, else the chosen query id."""
        return self.uploaded[0] if self.uploaded else self.query.value

    def show(self, *_, message: str = ""):
        import time

        t = time.perf_counter()
        query, name = self.query_value(), (self.uploaded[1] if self.uploaded else None)
        method, attribute = self.method.value, self.attribute.value
        self.result = self.ex.search(query, method, attribute, self.k.value)
        self.reply = self.ex.ask(query, attribute)
        key = ("upload",) if name else query   # a new upload drops the old one's reading first
        if key not in self._readings:
            self._readings[key] = self.ex.malignancy(query)
        self.reading = self._readings[key]
        p = as_pick(self.ex, query, self.result, self.reply, method, attribute, name)
        self.grid.value = grid_html(self.ex, p, query if name else None, self.reading)
        self.message, self.seconds = message, time.perf_counter() - t
        shown = f"uploaded image {name}" if name else f"query {query}"
        err = f'<div class="skx-error">{html.escape(message)}</div>' if message else ""
        self.status.value = f"{err}showing {html.escape(shown)} ({self.seconds:.2f} s)"
        return self.result


# -------------------------------------------------------------------- the book's kernel-free explorer
def static_dir(run) -> Path:
    """Where 07_explore writes the kernel-free explorer's files (the book serves them as _static/explore)."""
    return config.stage_dir(run, "07_explore") / STATIC_NAME


def static_queries(ex: Explorer, n: int = STATIC_QUERIES, seed: int = 0) -> list[str]:
    """n query ids spread over areaMM2 (every query when there are no more than n)."""
    if len(ex.q_ids) <= n:
        return list(ex.q_ids)
    return study.example_queries(ex.values.loc[ex.q_ids].reset_index(), "areaMM2", n=n, seed=seed)


def _shown(v) -> float | None:
    """A value as the page shows it (two decimals), so the page and the live grid agree digit for digit."""
    return None if v != v else float(f"{v:.2f}")


def _pct(v) -> int | None:
    return None if v != v else int(f"{v:.0f}")


def static_data(ex: Explorer, query_ids, k: int = K_MAX) -> dict:
    """Every (query, method, attribute)'s top-k (database positions into `db`), percentiles and the
    model's replies, as the data file's dict. Top-k for a smaller k is the first k of these."""
    names, qids, nq = ex.names, list(query_ids), len(query_ids)
    top, pct = {}, {}
    for m in METHODS:
        if m in IMAGE_ONLY:  # one ranking for every attribute: kept once, its percentiles in one pass
            ids = ex.ranked_ids(qids, m, names[0], k)
            p = ex.percentiles(qids, ids, names)  # (Q, k, A)
            top[m] = [list(ids[qi]) for qi in range(nq)]
        else:
            per = [ex.table(qids, m, a, k) for a in names]
            p = np.stack([pa for _, pa in per], axis=-1)
            top[m] = [[list(per[a][0][qi]) for a in range(len(names))] for qi in range(nq)]
        pct[m] = [[[_pct(v) for v in p[qi, :, a]] for a in range(len(names))] for qi in range(nq)]
    asked = ex.ask_rows([(q, a) for q in qids for a in names])
    values = ex.values.loc[qids, names].to_numpy(dtype=float)
    queries = []
    for qi, q in enumerate(qids):
        replies = asked[qi * len(names):(qi + 1) * len(names)]
        said = [attributes.get(a).read_answer(r) for a, r in zip(names, replies)]
        queries.append({"id": q, "values": [_shown(v) for v in values[qi]], "replies": replies,
                        "said": [_shown(s) for s in said],
                        "malignancy": probe_panel(ex.malignancy(q, replies))})  # from the same replies
    return {"k": k, "n_db": len(ex.db_ids), "queries": queries,
            "probe": {"note": PROBE_NOTE, "missing": ex.probe_missing},
            "methods": [{"key": m, "label": study.LABELS[m], "per_attribute": m not in IMAGE_ONLY} for m in METHODS],
            "attributes": [{"name": a, "unit": attributes.get(a).unit} for a in names],
            "top": top, "pct": pct}


def _used(data: dict, qi: int) -> list[str]:
    """The database ids query qi shows under any method and attribute."""
    out = []
    for m in data["methods"]:
        t = data["top"][m["key"]][qi]
        out += [i for row in t for i in row] if m["per_attribute"] else list(t)
    return list(dict.fromkeys(out))


def _payload(ex: Explorer, data: dict, n: int) -> dict:
    """The data file of the first n queries: database ids replaced by positions into its `db` list,
    which holds each shown database image's values."""
    db = list(dict.fromkeys(i for qi in range(n) for i in _used(data, qi)))
    pos = {i: p for p, i in enumerate(db)}

    def ix(t, per):
        return [[pos[i] for i in row] for row in t] if per else [pos[i] for i in t]
    return {**data, "queries": data["queries"][:n],
            "top": [[ix(t, m["per_attribute"]) for t in data["top"][m["key"]][:n]] for m in data["methods"]],
            "pct": [data["pct"][m["key"]][:n] for m in data["methods"]],
            "db": [{"id": i, "values": [_shown(v) for v in row]}
                   for i, row in zip(db, ex.values.loc[db, ex.names].to_numpy(dtype=float))]}


def _js(data: dict) -> bytes:
    return ("window.SKINLIB_EXPLORE=" + json.dumps(data, separators=(",", ":"), allow_nan=False) + ";\n").encode()


def write_static(ex: Explorer, folder, query_ids, k: int = K_MAX, budget: int = STATIC_BUDGET) -> dict:
    """Write the kernel-free explorer into `folder`: data.js and thumbs/<id>.jpg. Queries are kept in
    order while data and thumbnails fit in `budget` bytes. Returns what was written."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "thumbs").mkdir(parents=True)
    data = static_data(ex, list(query_ids), k)
    ids = [q["id"] for q in data["queries"]]
    for i in set(ids) | set(ex.db_ids):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", i):
            raise ValueError(f"explorer: id {i!r} cannot name a thumbnail file")
    room = budget - len(_js({**_payload(ex, data, len(ids)), "budget": budget}))  # bounds the kept file
    thumbs: dict[str, bytes] = {}
    n = 0
    for qi, q in enumerate(ids):
        new = {i: thumbnail(ex.image(i)) for i in [q, *_used(data, qi)] if i not in thumbs}
        if sum(map(len, thumbs.values())) + sum(map(len, new.values())) > room:
            break
        thumbs.update(new)
        n = qi + 1
    if n == 0:
        raise ValueError(f"explorer: not even one query's pictures fit in {budget:,} bytes")
    (folder / "data.js").write_bytes(_js({**_payload(ex, data, n), "budget": budget}))
    for i, b in thumbs.items():
        (folder / "thumbs" / f"{i}.jpg").write_bytes(b)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    if size > budget:  # cannot happen unless the reserve above is wrong: say so rather than ship it
        raise RuntimeError(f"explorer: {size:,} bytes written, over the budget of {budget:,}")
    return {"queries": n, "of": len(ids), "images": len(thumbs), "bytes": size, "budget": budget}


# Draws `pick_html`'s markup from data.js. data.js is loaded by a <script> element, not fetch():
# a book opened from the disk (file://) may load scripts and images but not read files.
STATIC_JS = r"""
(function () {
  var box = document.currentScript.parentNode.querySelector(".skx-static");
  var view = box.querySelector(".skx-view");
  var base = (document.documentElement.dataset.content_root || "") + "_static/explore/";
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmt(v, unit) { return v === null ? "no value" : (v.toFixed(2) + (unit ? " " + unit : "")); }
  function card(cls, id, src, lines) {
    var f = el("figure", "skx-card " + cls), img = el("img"), cap = el("figcaption");
    f.dataset.id = id; img.src = src; img.alt = cls === "skx-query" ? "query" : lines[0].split(" ")[0];
    lines.forEach(function (t, i) { if (i) cap.appendChild(el("br")); cap.appendChild(document.createTextNode(t)); });
    f.appendChild(img); f.appendChild(cap);
    return f;
  }
  function sign(v) { return (v >= 0 ? "+" : "") + v.toFixed(2); }
  function panel(m) {
    // the same markup as malignancy_html
    if (m === null) {
      var none = el("div", "skx-malig skx-none");
      none.appendChild(el("p", "skx-note", D0.probe.missing || "No malignancy probe."));
      return none;
    }
    var box = el("div", "skx-malig"), t = el("table", "skx-contrib");
    box.dataset.probability = m.p.toFixed(3);
    box.appendChild(el("div", "skx-title", "malignancy probe: P(malignant) " + m.p.toFixed(3)));
    if (m.label !== null) box.appendChild(el("div", "skx-label", "label: " + (m.label ? "malignant" : "benign")));
    var filled = m.n_imputed ? " " + m.n_imputed + " of " + m.contrib.length +
      " replies held no number and were filled with the training median." : "";
    box.appendChild(el("p", "skx-note", D0.probe.note + "." + filled));
    var pairs = D0.attributes.map(function (a, i) { return [a.name, m.contrib[i]]; });
    pairs.sort(function (x, y) { return Math.abs(y[1]) - Math.abs(x[1]); });   // stable: ties keep their order
    var top = Math.max.apply(null, pairs.map(function (x) { return Math.abs(x[1]); }).concat([1e-9]));
    pairs.forEach(function (x) {
      var tr = el("tr"), bar = el("span", "skx-bar " + (x[1] > 0 ? "skx-pos" : "skx-neg")), cell = el("td");
      tr.dataset.attribute = x[0];
      bar.style.width = Math.round(80 * Math.abs(x[1]) / top) + "px";
      cell.appendChild(bar);
      tr.appendChild(el("td", "", x[0])); tr.appendChild(cell); tr.appendChild(el("td", "", sign(x[1])));
      t.appendChild(tr);
    });
    var ti = el("tr", "skx-intercept");
    ti.appendChild(el("td", "", "intercept")); ti.appendChild(el("td")); ti.appendChild(el("td", "", sign(m.intercept)));
    t.appendChild(ti);
    box.appendChild(t);
    return box;
  }
  var D0;
  function start(D) {
    D0 = D;
    var c = {};
    box.querySelectorAll("[data-control]").forEach(function (x) { c[x.dataset.control] = x; });
    D.queries.forEach(function (q, i) { c.query.add(new Option(q.id, i)); });
    D.methods.forEach(function (m, i) { c.method.add(new Option(m.label, i)); });
    D.attributes.forEach(function (a, i) { c.attribute.add(new Option(a.name, i, a.name === "areaMM2", a.name === "areaMM2")); });
    c.k.max = D.k;
    function draw() {
      var qi = +c.query.value, mi = +c.method.value, ai = +c.attribute.value, k = +c.k.value;
      var m = D.methods[mi], a = D.attributes[ai], q = D.queries[qi];
      var top = m.per_attribute ? D.top[mi][qi][ai] : D.top[mi][qi], pct = D.pct[mi][qi][ai];
      c.kout.textContent = k;
      var pick = el("div", "skx-pick"), grid = el("div", "skx-grid");
      pick.dataset.method = m.key; pick.dataset.attribute = a.name; pick.dataset.k = k; pick.dataset.query = q.id;
      pick.appendChild(el("div", "skx-title", m.label + " \u00b7 " + a.name + " \u00b7 top " + k + " of " +
                                               D.n_db.toLocaleString("en") + " database images"));
      var said = q.said[ai] === null ? "no number ('" + q.replies[ai] + "')" : fmt(q.said[ai], a.unit);
      grid.appendChild(card("skx-query", q.id, base + "thumbs/" + q.id + ".jpg",
                            ["query " + q.id, a.name + " " + fmt(q.values[ai], a.unit), "model says " + said]));
      for (var r = 0; r < k; r++) {
        var d = D.db[top[r]];
        var h = card("skx-hit", d.id, base + "thumbs/" + d.id + ".jpg",
                     ["#" + (r + 1) + " " + d.id, fmt(d.values[ai], a.unit),
                      pct[r] === null ? "no percentile (no measured value)" : "percentile " + pct[r]]);
        h.dataset.rank = r + 1;
        grid.appendChild(h);
      }
      var body = el("div", "skx-body");
      body.appendChild(grid);
      body.appendChild(panel(q.malignancy));
      pick.appendChild(body);
      view.replaceChildren(pick);
    }
    [c.query, c.method, c.attribute, c.k].forEach(function (x) { x.addEventListener("input", draw); });
    draw();
  }
  var s = document.createElement("script");
  s.src = base + "data.js";
  s.onload = function () { start(window.SKINLIB_EXPLORE); };
  s.onerror = function () {
    view.replaceChildren(el("p", "skx-error", "The precomputed picks (" + s.src + ") did not load."));
  };
  document.head.appendChild(s);
})();
"""


def static_page(written: dict) -> str:
    """The book's explorer: controls, the view `STATIC_JS` draws from the files `write_static`
    wrote (its summary is `written`), and a line saying what was precomputed."""
    n, of = written["queries"], written["of"]
    dropped = f" ({of - n} more did not fit the budget)" if n < of else ""
    note = (f"Precomputed when the book was built: {n} test lesions{dropped} × {len(METHODS)} methods × "
            f"{len(attributes.NAMES)} attributes, top 1–{K_MAX}; {written['images']:,} thumbnails and the data file "
            f"take {written['bytes'] / 1e6:.1f} MB of the explorer's {written['budget'] / 1e6:.0f} MB budget.")
    controls = ('<label>query <select data-control="query"></select></label>'
                '<label>method <select data-control="method"></select></label>'
                '<label>attribute <select data-control="attribute"></select></label>'
                f'<label>k <input type="range" min="1" max="{K_MAX}" value="5" data-control="k"/> '
                '<output data-control="kout">5</output></label>')
    return (f'{CSS}<div class="skx-static"><div class="skx-controls">{controls}</div>'
            f'<div class="skx-view"><p class="skx-note">Loading the precomputed picks…</p></div>'
            f'<p class="skx-note">{html.escape(note)}</p></div><script>{STATIC_JS}</script>')


# -------------------------------------------------------------------- the live explorer's command
def prepare_live(profile: str, run, dest=SCRATCH) -> Path:
    """A fresh notebook copy of the chapter in `dest` with the run's parameters and live=True.

    JupyterLab opens an .ipynb as a notebook (a jupytext .py opens in the text editor), and its
    autosave writes into this copy: the tracked notebooks/07_explore.py is only read."""
    import jupytext
    import nbformat

    nb = jupytext.read(NOTEBOOK)
    params = {"profile": str(config.profile_path(profile).resolve()), "out": str(Path(run).resolve()), "live": True}
    # as papermill does: the values in a tagged cell right after the parameters cell
    cell = nbformat.v4.new_code_cell("# Parameters (python -m skinlib.explore)\n" +
                                     "\n".join(f"{k} = {v!r}" for k, v in params.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    at = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if not at:
        raise ValueError(f"{NOTEBOOK} has no cell tagged 'parameters'")
    nb.cells.insert(at[0] + 1, cell)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "07_explore.ipynb"
    jupytext.write(nb, path)
    return path


# Server settings for a reader's machine: nothing fetched from the internet (news, update checks,
# the PyPI extension manager), bound to this machine only.
LAB_ARGS = ("--ServerApp.ip=127.0.0.1", "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly")


def missing_run_files(run) -> list[str]:
    """The artifacts the explorer reads that `run` lacks (empty when it can start)."""
    need = [config.manifest_path(run), config.finetuned_dir(run), config.stage_dir(run, "04_embed")]
    return [str(p) for p in need if not Path(p).exists()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Open the live retrieval explorer in JupyterLab: a fresh notebook copy of "
                    "notebooks/07_explore.py in an ignored folder, run against a finished run. "
                    "Arguments after -- go to `jupyter lab` (e.g. -- --no-browser --port 8890).")
    ap.add_argument("--profile", default="default", help="profile name or YAML (default: default)")
    ap.add_argument("--run", default=None, help="run folder (default runs/<profile>)")
    ap.add_argument("--dest", default=str(SCRATCH), help=f"folder for the notebook copy (default {SCRATCH})")
    ap.add_argument("lab_args", nargs=argparse.REMAINDER, help="passed on to jupyter lab")
    a = ap.parse_args(argv)
    run = config.run_dir(a.profile, a.run)
    missing = missing_run_files(run)
    if missing:
        print(f"error: {run} is not a finished run (missing {', '.join(missing)}); run `make book` "
              f"(or python -m skinlib.run --profile {a.profile}) first", file=sys.stderr)
        return 1
    lab = Path(sys.executable).with_name("jupyter-lab")
    if not lab.exists():
        print("error: JupyterLab is not installed in this environment: .venv/bin/pip install -e '.[live]'",
              file=sys.stderr)
        return 1
    path = prepare_live(a.profile, run, a.dest)
    print(f"explorer: {path} (a copy; the tracked notebooks/07_explore.py is not written)", flush=True)
    extra = [x for x in a.lab_args if x != "--"]
    # replaced by jupyter lab (not a child): Ctrl-C and signals reach the server directly
    os.execv(lab, [str(lab), str(path), *LAB_ARGS, *extra])


if __name__ == "__main__":
    sys.exit(main())
