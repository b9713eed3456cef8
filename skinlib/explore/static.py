"""The book's kernel-free explorer: `write_static` precomputes every (query, method, attribute) of a
few dozen queries at the largest k into data.js and thumbnails, kept within a byte budget, and
`static_page` is the plain-JavaScript page that reads them (no network, works from file://)."""
from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import numpy as np

from skinlib import attributes, config, study
from skinlib.explore.explorer import IMAGE_ONLY, K_MAX, METHODS, Explorer
from skinlib.explore.markup import CSS, PROBE_NOTE, thumbnail
from skinlib.explore.picks import probe_panel

# The kernel-free explorer's files (data.js + thumbnails) in the built book: queries are dropped
# from the end of the list until they fit (the embedded default's 40 fit with room to spare).
STATIC_BUDGET = 8_000_000
STATIC_QUERIES = 40
STATIC_NAME = "static"  # the folder in the 07_explore stage folder; the book serves it as _static/explore


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
