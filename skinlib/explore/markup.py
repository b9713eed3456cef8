"""A pick as HTML: the grid of cards (query first), the malignancy panel beside it, thumbnails and
the one stylesheet; the live grid and the book's page draw the same markup."""
from __future__ import annotations

import base64
import html
import io

from skinlib.explore.explorer import Explorer
from skinlib.explore.picks import probe_panel

THUMB_PX = 112      # thumbnails: the embedded default's crops are 90-160 px, the model sees 112

# What the malignancy panel says about its numbers (the live grid and the book's show the same words).
PROBE_NOTE = ("from the 16 attributes the model reads in this image (its answers to the 16 questions), "
              "by chapter 6's logistic probe fitted on the training images' measured attributes; "
              "each bar is an attribute's standardised value × coefficient, and with the intercept "
              "they sum to the log-odds")


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
