"""The retrieval explorer behind notebooks/06_explore.py: pick a query, a method, an attribute, k.

`Explorer` loads a finished run's vectors once and answers each pick from in-memory flat indexes
(well under a second on 2 cores); an uploaded image is embedded on the spot by the model(s) the
method needs. `static_page` renders a few precomputed picks as one HTML block with a <select>, for
the book, where there is no kernel.
"""
from __future__ import annotations

import base64
import html
import io
from functools import cached_property

import numpy as np
import pandas as pd

from . import attributes, config, embed, evaluate, retrieval, split, study

METHODS = ("image_text", "hierarchical", "image", "image_untuned", "baseline_encoder", "multi_attribute")


class Explorer:
    def __init__(self, cfg: dict, run, device=None):
        from . import model as models, qa, slice3d

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
            from . import answer_format
            self.shapes = answer_format.shapes(pd.read_parquet(config.tuples_path(run)))
        self.names = list(attributes.NAMES)
        self._qpos = {i: n for n, i in enumerate(self.q_ids)}
        self._dbpos = {i: n for n, i in enumerate(self.db_ids)}
        self._indexes: dict = {}

    # ---------------------------------------------------------------- vectors of a query
    def _index(self, key: str, j: int | None = None):
        if (key, j) not in self._indexes:
            x = self.vec[f"db_{key}"] if j is None else self.vec[f"db_{key}"][:, j]
            self._indexes[(key, j)] = study.flat(x, self.db_ids)
        return self._indexes[(key, j)]

    def _query_vectors(self, query, method: str, j: int) -> dict:
        """The query's vectors that `method` needs: stored for a query id, computed for an image."""
        if isinstance(query, str):
            if query in self._qpos:
                n, side = self._qpos[query], "q"
            elif query in self._dbpos:
                n, side = self._dbpos[query], "db"
            else:
                raise KeyError(f"{query!r} is neither a query nor a database image of this run")
            v = self.vec
            return {"image": v[f"{side}_image"][n], "image_text": v[f"{side}_image_text"][n, j],
                    "untuned": v[f"{side}_untuned"][n], "encoder": v[f"{side}_encoder"][n],
                    "multi": v[f"{side}_multi"][n]}
        return self._embed_image(query, method, j)

    def _embed_image(self, image, method: str, j: int) -> dict:
        t = self.tuned
        if method in ("image_text", "hierarchical", "image"):
            got = embed.embed(t.model, t.tokenizer, t.image_processor, [image], [self.names_question(j)])
            return {"image": got["image"][0].numpy(), "image_text": got["image_text"][0, 0].numpy()}
        if method == "multi_attribute":
            q = embed.multi_question(self.multi)
            got = embed.embed(t.model, t.tokenizer, t.image_processor, [image], [q], image=False)
            return {"multi": got["image_text"][0, 0].numpy()}
        if method == "image_untuned":
            return {"untuned": self.untuned_embed(image)}
        if method == "baseline_encoder":
            return {"encoder": self.encoder.embed([image])[0]}
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
        from . import finetune, model as models
        m = self.cfg["model"]
        return models.load(finetune.base_model(self.cfg, self.run), min_pixels=m["min_pixels"],
                           max_pixels=m["max_pixels"])

    def untuned_embed(self, image) -> np.ndarray:
        u = self.untuned
        return embed.embed(u.model, u.tokenizer, u.image_processor, [image], [])["image"][0].numpy()

    # ---------------------------------------------------------------- one pick
    def search(self, query, method: str, attribute: str, k: int = 5) -> pd.DataFrame:
        """Top-k database images for a query id (or an image) by `method`, with each image's value of
        `attribute` and its percentile (paper §4.2; NaN for an uploaded image: no measured value)."""
        if method not in METHODS:
            raise KeyError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        j = self.names.index(attributes.get(attribute).name)
        qv = self._query_vectors(query, method, j)
        exclude = np.array([query]) if isinstance(query, str) and query in self._dbpos else None
        if method == "image_text":
            ids, scores = self._index("image_text", j).search(qv["image_text"][None], k, exclude)
        elif method == "hierarchical":
            pos = self._dbpos

            def candidates(c, _a):
                return self.vec["db_image_text"][[pos[i] for i in c], j]
            ids, scores = retrieval.hierarchical(self._index("image"), qv["image"][None], qv["image_text"][None],
                                                 candidates, attribute, k=k,
                                                 b=min(self.cfg["retrieval"]["b"], len(self.db_ids)), exclude=exclude)
        else:
            key = {"image": "image", "image_untuned": "untuned", "baseline_encoder": "encoder",
                   "multi_attribute": "multi"}[method]
            ids, scores = self._index(key).search(qv[key][None], k, exclude)
        ids, scores = ids[0], scores[0]
        out = pd.DataFrame({"rank": np.arange(1, len(ids) + 1), "isic_id": ids, "cosine": scores,
                            attribute: self.values.loc[ids, attribute].to_numpy()})
        if isinstance(query, str):
            qrow = self.values.loc[[query]].reset_index()
            pct = evaluate.percentile_frame(self.db, qrow, ids[None], names=[attribute])
            out["percentile"] = pct.percentile.to_numpy()
        else:
            out["percentile"] = np.nan
        return out

    def ask(self, query, attribute: str) -> str:
        """The fine-tuned model's greedy reply to Q(attribute) about the query image, held to the
        attribute's answer shape when the profile constrains decoding (as chapter 3 asks)."""
        from .predict import generate, max_answer_tokens
        t = self.tuned
        image = self.images[query] if isinstance(query, str) else query
        args = (t.model, t.tokenizer, t.image_processor, [image], [attributes.get(attribute).question],
                max_answer_tokens(t.tokenizer))
        if self.shapes is None:
            return generate(*args)[0]
        if attribute not in self.shapes:
            raise KeyError(f"explorer: no training answers of {attribute!r} to take its answer shape from")
        return generate(*args, row_shapes=[self.shapes[attribute]])[0][0]

    def image(self, isic_id: str):
        return self.release.image(isic_id)


def panel(ex: Explorer, query, method: str, attribute: str, k: int = 5):
    """The figure for one pick: the query (true value when it is a known id, and the model's reply)
    and its top-k. `query` is a query id or an image (an upload). The reply is in `top.attrs["reply"]`."""
    from . import figures

    top = ex.search(query, method, attribute, k)
    unit = attributes.get(attribute).unit
    reply = top.attrs["reply"] = ex.ask(query, attribute)
    if isinstance(query, str):
        head, image = f"query {query}\n{attribute} {ex.values.loc[query, attribute]:.2f} {unit}", ex.image(query)
    else:
        head, image = "uploaded image\n(no measured value)", query
    said = attributes.get(attribute).read_answer(reply)  # the value, sign per the registry
    caps = [f"{head}\nmodel says " + (f"{said:.2f} {unit}" if said == said else repr(reply))]
    caps += [f"#{r.rank}  {getattr(r, attribute):.2f} {unit}\npercentile {r.percentile:.0f}"
             for r in top.itertuples()]
    return figures.image_grid([image] + [ex.image(i) for i in top.isic_id], caps,
                              ncols=k + 1, size=1.9), top


class Controls:
    """The live explorer (ipywidgets): a query from the test set or an uploaded image, a method, an
    attribute and k; every change redraws the pick into `out`. The last pick is kept in `result`
    (the top-k frame), `reply` (the model's answer) and `seconds`, so it can be checked without a
    browser."""

    def __init__(self, ex: Explorer, n_queries: int = 200, upload: bool = True):
        import ipywidgets as W

        self.ex = ex
        self.query = W.Dropdown(options=list(ex.q_ids[:n_queries]), description="query")
        # FileUpload only where a frontend exists: its comm hangs a kernel that has none (papermill).
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="or upload") if upload else None
        self.method = W.Dropdown(options=[(study.LABELS[m], m) for m in METHODS], value="image_text",
                                 description="method")
        self.attribute = W.Dropdown(options=list(attributes.NAMES), value="areaMM2", description="attribute")
        self.k = W.IntSlider(value=5, min=1, max=10, description="k")
        self.out = W.Output()
        self.result, self.reply, self.seconds = None, None, None
        top = [self.query] + ([self.upload] if self.upload is not None else [])
        self.widget = W.VBox([W.HBox(top), W.HBox([self.method, self.attribute, self.k]), self.out])
        for w in top + [self.method, self.attribute, self.k]:
            w.observe(self.show, names="value")

    def query_value(self):
        """The uploaded image if there is one (it wins until cleared), else the chosen query id."""
        if self.upload is not None and self.upload.value:
            from PIL import Image
            return Image.open(io.BytesIO(bytes(self.upload.value[0]["content"]))).convert("RGB")
        return self.query.value

    def show(self, *_):
        import time

        import matplotlib.pyplot as plt
        from IPython.display import display

        with self.out:
            self.out.clear_output(wait=True)
            t = time.perf_counter()
            fig, self.result = panel(self.ex, self.query_value(), self.method.value, self.attribute.value,
                                     self.k.value)
            self.reply = self.result.attrs["reply"]
            display(fig)
            plt.close(fig)
            self.seconds = time.perf_counter() - t
            print(f"({self.seconds:.2f} s)")
        return self.result


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def static_page(ex: Explorer, picks, k: int = 5) -> str:
    """One HTML block for the book: a <select> over `picks` ((query, method, attribute) triples) and a
    pre-rendered panel per pick; a one-line onchange shows the chosen one. No kernel, no network."""
    opts, divs = [], []
    for n, (q, m, a) in enumerate(picks):
        fig, _ = panel(ex, q, m, a, k)
        label = f"{q} · {study.LABELS.get(m, m)} · {a}"
        opts.append(f'<option value="{n}">{html.escape(label)}</option>')
        style = "" if n == 0 else ' style="display:none"'
        divs.append(f'<div class="explore-pick" data-pick="{n}"{style}>'
                    f'<img alt="{html.escape(label)}" src="data:image/png;base64,{_png(fig)}"/></div>')
    onchange = ("var v=this.value;this.closest('.explore-static').querySelectorAll('.explore-pick').forEach("
                "function(d){d.style.display=d.dataset.pick===v?'':'none';});")
    return (f'<div class="explore-static"><label>query · method · attribute: '
            f'<select onchange="{onchange}">{"".join(opts)}</select></label>{"".join(divs)}</div>')
