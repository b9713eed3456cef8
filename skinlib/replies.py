"""Reading a number out of a model's reply, and counting the replies that hold none.

The model is trained to answer with digits only (the registry's number format), but a reply can
still be empty, truncated or hold junk; it is then counted as unparsed, never crashes a run and is
never dropped from a denominator without being reported.
"""
from __future__ import annotations

import math
import re

import pandas as pd

# A run of digits and dots with an optional sign; exactly one such run, with at most one dot, is a
# number. Surrounding words and a unit are allowed ("about 4", "12.3 mm²"); "1.2.3" is not a number.
_NUMBER = re.compile(r"[-+−]?(?:\d+(?:\.\d*)*|\.\d+)")


def parse_number(reply: str | None) -> float:
    """The single number in `reply`, or NaN when there is none or more than one reading.

    "12.3 mm²" → 12.3, "about 4" → 4, "-7.25" → -7.25, "" → NaN, "1.2.3" → NaN (malformed),
    "3 or 4" → NaN (ambiguous).
    """
    if reply is None:
        return math.nan
    text = str(reply).strip()
    if not text:
        return math.nan
    found = _NUMBER.findall(text)
    if len(found) != 1 or found[0].count(".") > 1:
        return math.nan
    return float(found[0].replace("−", "-"))


def unparsed_report(frame: pd.DataFrame, reply: str = "reply", value: str = "pred",
                    by: str = "attribute") -> pd.DataFrame:
    """Per group: how many replies, how many held no number, and a few examples of those."""
    bad = frame[value].isna()
    rows = []
    for key, g in frame.groupby(by, sort=False):
        b = g[bad.loc[g.index]]
        rows.append({by: key, "n": len(g), "unparsed": int(len(b)),
                     "examples": "; ".join(repr(r) for r in b[reply].head(3))})
    return pd.DataFrame(rows)
