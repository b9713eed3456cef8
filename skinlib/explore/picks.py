"""One pick as plain data (JSON-ready, NaN as None), and the malignancy probe's reading rounded as
the panels show it, so that the live grid and the book's page agree digit for digit."""
from __future__ import annotations

import pandas as pd

from skinlib import attributes, study
from skinlib.explore.explorer import Explorer


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
