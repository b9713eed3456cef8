"""The 16 quantitative lesion attributes of the paper (Table 1): the one registry.

Everything else in the project (reader, phantom, tuples, evaluation, figures) reads this list;
no other module spells out an attribute's column, unit, question or number format.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from .replies import parse_number


@dataclass(frozen=True)
class Attribute:
    name: str  # short name used in file names, tables and figures (the paper's)
    column: str  # SLICE-3D metadata column
    unit: str  # "" for unitless scores
    meaning: str  # one line, from the paper's Table 1
    question: str  # Q(a), asked verbatim after the image
    decimals: int  # answer y_a(I) is the value written with this many decimals
    int_digits: int  # ... and its integer part zero-padded to at least this many digits
    zero_is_missing: bool = False  # the release writes 0 where the measure is undefined
    # -1: the question asks for the reverse difference, so the answer text is -value (read back by
    # `read_answer`). For an attribute of one sign (deltaL: negative in all 5,000 real metadata
    # rows of the fixtures) a leading "-" on every answer would leave the final prompt token, whose
    # state is h_im,a, nothing to predict but that constant sign; its retrieval lost to image-only.
    answer_sign: int = 1
    # The values the attribute can take at all, from its meaning (a size is > 0, a 0-10 score lies
    # in [0, 10], CIE L* in [0, 100], a* and b* within +-128): a value outside is a broken row, not
    # a lesion, and the reader counts it instead of scoring it. `low_open`: `low` itself is
    # impossible too (a lesion of area 0 is no lesion).
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False

    def in_range(self, values):
        """Boolean mask: which of `values` (finite numbers) the attribute can take."""
        v = np.asarray(values, dtype=float)
        above = v > self.low if self.low_open else v >= self.low
        return above & (v <= self.high)

    def range_text(self) -> str:
        """The possible values in words, e.g. "> 0" or "0 to 10"."""
        if math.isinf(self.high):
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{self.low:g} to {self.high:g}" + (f" (not {self.low:g})" if self.low_open else "")

    def format_answer(self, value: float) -> str:
        """The answer text y_a(I): digits as text, no unit; `decimals` after the point and the
        integer part zero-padded to `int_digits` (a sign, when negative, comes first). The number
        written is `answer_sign` x value.

        Why the padding: a small model trained on free-width numbers misses the digit count now
        and then ("5.5" for 50.67), and one such miss wrecks R². A fixed width makes every digit
        mean the same place. The width is the digit count of the attribute's typical values (not
        of its maximum), so the first digit still varies between lesions: the last prompt token,
        whose state is the embedding h_im,a, must predict something informative. Padding to a
        wider width (two integer digits for the diameters, "08.72") would end width slips but
        makes the first digit nearly constant, so h_im,a learns little from it; the default
        instead holds greedy replies to the training answers' shape (`answer_format`), which
        stops the slips that leave that shape."""
        if value is None or not math.isfinite(value):
            raise ValueError(f"attribute {self.name!r}: cannot write non-finite value {value!r} as an answer")
        value = self.answer_sign * value
        text = f"{abs(value):.{self.decimals}f}"
        whole, _, frac = text.partition(".")
        text = whole.zfill(self.int_digits) + ("." + frac if frac else "")
        return "-" + text if value < 0 and float(text) != 0 else text

    def read_answer(self, reply: str | None) -> float:
        """The attribute value a reply states (NaN when it holds no single number): the inverse
        of `format_answer`, sign included."""
        return self.answer_sign * parse_number(reply)


# Possible ranges shared by several attributes (see Attribute.low / high).
_SIZE = {"low": 0.0, "low_open": True}       # a length, area or ratio of them: > 0
_SCORE = {"low": 0.0, "high": 10.0}          # TBP's 0-10 scores
_STD = {"low": 0.0}                          # a standard deviation: >= 0
_AB = {"low": -128.0, "high": 128.0}         # CIE a* or b*
_DELTA_AB = {"low": -256.0, "high": 256.0}   # a difference of two a* / b* means
_DELTA_L = {"low": -100.0, "high": 100.0}    # a difference of two L* means (L* in 0-100)
_DELTA_LB = {"low": 0.0, "high": math.hypot(100.0, 256.0)}  # the length of a (delta L*, delta b*)
# A std of L* (0-100) is at most 50, but the released test metadata writes Lext there (fixtures'
# README: read columns as released), so the bound is L*'s own.
_STD_L = {"low": 0.0, "high": 100.0}

ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("areaMM2", "tbp_lv_areaMM2", "mm²", "lesion area",
              "What is the area of the lesion in mm²?", 1, 2, **_SIZE),
    Attribute("minorAxisMM", "tbp_lv_minorAxisMM", "mm", "smallest lesion diameter",
              "What is the smallest diameter of the lesion in mm?", 2, 1, **_SIZE),
    Attribute("norm_color", "tbp_lv_norm_color", "", "colour variation within the lesion (0-10)",
              "How much colour variation is there within the lesion, on a scale of 0 to 10?", 2, 1,
              zero_is_missing=True, **_SCORE),
    Attribute("radial_color_std_max", "tbp_lv_radial_color_std_max", "",
              "colour asymmetry within the lesion",
              "How asymmetric is the colour within the lesion?", 2, 1, zero_is_missing=True, **_STD),
    Attribute("deltaB", "tbp_lv_deltaB", "", "mean B* contrast, inside vs outside the lesion",
              "What is the B* contrast between the inside and the outside of the lesion?", 2, 1,
              **_DELTA_AB),
    Attribute("deltaL", "tbp_lv_deltaL", "", "mean L* contrast, inside vs outside the lesion",
              "How much higher is L* in the skin outside the lesion than inside it?", 2, 2, answer_sign=-1,
              **_DELTA_L),
    Attribute("deltaLB", "tbp_lv_deltaLB", "",
              "L*B* contrast between the lesion and its immediate surrounding skin",
              "What is the L*B* contrast between the lesion and its immediate surrounding skin?", 2, 2,
              **_DELTA_LB),
    Attribute("stdLExt", "tbp_lv_stdLExt", "", "standard deviation of L* outside the lesion",
              "What is the standard deviation of L* in the skin outside the lesion?", 2, 1, **_STD_L),
    Attribute("clin_size_long_diam_mm", "clin_size_long_diam_mm", "mm", "maximum lesion diameter",
              "What is the largest diameter of the lesion in mm?", 2, 1, **_SIZE),
    Attribute("perimeterMM", "tbp_lv_perimeterMM", "mm", "lesion perimeter",
              "What is the perimeter of the lesion in mm?", 1, 2, **_SIZE),
    Attribute("norm_border", "tbp_lv_norm_border", "", "border irregularity (0-10)",
              "How irregular is the border of the lesion, on a scale of 0 to 10?", 2, 1, **_SCORE),
    Attribute("area_perim_ratio", "tbp_lv_area_perim_ratio", "",
              "border jaggedness: perimeter squared over area",
              "What is the ratio of the squared perimeter to the area of the lesion?", 1, 2, **_SIZE),
    Attribute("A", "tbp_lv_A", "", "mean A* inside the lesion",
              "What is the mean A* inside the lesion?", 2, 2, **_AB),
    Attribute("Aext", "tbp_lv_Aext", "", "mean A* outside the lesion",
              "What is the mean A* of the skin outside the lesion?", 2, 2, **_AB),
    Attribute("B", "tbp_lv_B", "", "mean B* inside the lesion",
              "What is the mean B* inside the lesion?", 2, 2, **_AB),
    Attribute("Bext", "tbp_lv_Bext", "", "mean B* outside the lesion",
              "What is the mean B* of the skin outside the lesion?", 2, 2, **_AB),
)

RANGE_FIELDS = ("low", "high", "low_open")
NAMES: tuple[str, ...] = tuple(a.name for a in ATTRIBUTES)
COLUMNS: tuple[str, ...] = tuple(a.column for a in ATTRIBUTES)
_BY_NAME = {a.name: a for a in ATTRIBUTES}
_BY_COLUMN = {a.column: a for a in ATTRIBUTES}


def get(name: str) -> Attribute:
    """The attribute called `name` (short name or SLICE-3D column); a clear error otherwise."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    if name in _BY_COLUMN:
        return _BY_COLUMN[name]
    raise KeyError(f"unknown attribute {name!r}; known: {', '.join(NAMES)}")


def resolve(names) -> tuple[Attribute, ...]:
    """Attributes for a list of names; None or "all" means all 16, in registry order."""
    if names is None or names == "all":
        return ATTRIBUTES
    if isinstance(names, str):
        names = [names]
    return tuple(get(n) for n in names)


def fingerprint(names=None) -> str:
    """A short hash of everything the model is taught and read with for these attributes
    (question, number format, sign, columns): a stage that trained or asked with another registry
    must not be reused (the fine-tuning recipe and the prediction job carry it)."""
    # the possible ranges decide which values are read (the manifest's hash covers that), not
    # what the model is taught: a stage trained before they existed is still this registry's
    rows = [{k: v for k, v in asdict(a).items() if k not in RANGE_FIELDS} for a in resolve(names)]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def named(frame, keep=("isic_id", "patient_id")):
    """A metadata frame with the 16 attribute columns renamed to the short names (registry order),
    plus the `keep` columns that exist. A missing attribute column is an error naming it."""
    missing = [a.column for a in ATTRIBUTES if a.column not in frame.columns]
    if missing:
        raise KeyError(f"metadata lacks attribute columns: {', '.join(missing)}")
    cols = [c for c in keep if c in frame.columns]
    out = frame[cols + list(COLUMNS)].copy()
    out.columns = cols + list(NAMES)
    return out


def zeros_as_missing(frame):
    """A copy of a short-name frame with 0 set to NaN for the attributes whose release value 0
    means "not measured" (the rule the reader applies, for comparing raw rows with it)."""
    out = frame.copy()
    for a in ATTRIBUTES:
        if a.zero_is_missing and a.name in out.columns:
            out[a.name] = out[a.name].mask(out[a.name] == 0)
    return out
