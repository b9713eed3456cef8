"""Format-constrained greedy decoding: a reply is held to the shape of the training answers.

Every training answer of an attribute is written in the registry's number format: an optional
sign, a few integer digits, a point, a fixed count of decimals, then `<|im_end|>`. A small model
still slips now and then: "310.8" for a perimeter whose training answers never had three integer
digits, and one such reply turns a usable R² into a large negative one. With a constraint, greedy
decoding picks the most likely token *among those that keep the reply in that shape* (the widths,
sign and decimals seen in the training answers), so a reply is always one number of a shape the
model was taught.

Greedy decoding is otherwise unchanged: wherever the model's own top token fits the shape, it is
taken, so a reply the constraint never touched is exactly the unconstrained reply. Where it had to
step in, the row is flagged (`FormatConstraint.overridden`); `predict.predict` then asks those rows
again without it, so every run reports both readings side by side and nothing is hidden.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from . import attributes

DIGITS = "0123456789"
END = "$"   # the reply's end: <|im_end|>


@dataclass(frozen=True)
class Shape:
    """The answers of one attribute: integer digits from `min_width` to `max_width`, `decimals`
    after the point, and a leading minus sign allowed when `negative`."""
    min_width: int
    max_width: int
    decimals: int
    negative: bool

    def allowed(self, text: str) -> str:
        """The characters that may follow the reply so far (`END` for the end of the reply)."""
        body = text[1:] if text.startswith("-") else text
        if text == "":
            return DIGITS + ("-" if self.negative else "")
        whole, point, frac = body.partition(".")
        if not point:
            nxt = DIGITS if len(whole) < self.max_width else ""
            if len(whole) >= max(self.min_width, 1):
                nxt += "." if self.decimals else END
            return nxt
        return DIGITS if len(frac) < self.decimals else END

    def matches(self, reply: str) -> bool:
        """True when `reply` is a complete answer of this shape."""
        text = ""
        for ch in reply + END:
            if ch not in self.allowed(text):
                return False
            text += ch
        return True


def shapes(answers: pd.DataFrame) -> dict[str, Shape]:
    """{attribute: Shape} from training answers (a tuples frame: `attribute`, `answer`), one per
    attribute that has any. An answer that is not in the registry's format is an error naming it."""
    out = {}
    for name, g in answers.groupby("attribute", sort=False):
        a = attributes.get(name)
        text = g.answer.astype(str)
        bad = ~text.str.fullmatch(rf"-?\d+\.\d{{{a.decimals}}}" if a.decimals else r"-?\d+")
        if bad.any():
            raise ValueError(f"training answers of {name!r} not in the registry's format "
                             f"({a.decimals} decimals), e.g. {text[bad].iloc[0]!r}")
        width = text.str.lstrip("-").str.partition(".")[0].str.len()
        out[name] = Shape(int(width.min()), int(width.max()), a.decimals, bool(text.str.startswith("-").any()))
    return out


def character_ids(tokenizer) -> dict[str, int]:
    """Token id of each character an answer is made of, and of its end (`<|im_end|>`). Raises
    when the tokenizer does not write an answer one character per token (the constraint would
    then be wrong): Qwen2's pre-tokenisation splits digits one by one, so both profiles' do."""
    ids = {}
    for ch in DIGITS + "-.":
        got = tokenizer(ch, add_special_tokens=False)["input_ids"]
        if len(got) != 1:
            raise ValueError(f"format constraint: the tokenizer writes {ch!r} as {len(got)} tokens, not one")
        ids[ch] = got[0]
    probe = tokenizer("-12.5", add_special_tokens=False)["input_ids"]
    if probe != [ids[c] for c in "-12.5"]:
        raise ValueError("format constraint: the tokenizer merges an answer's characters "
                         f"('-12.5' -> {tokenizer.convert_ids_to_tokens(probe)})")
    ids[END] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return ids


class FormatConstraint:
    """A `LogitsProcessor` for `model.generate`: row i's reply is held to `row_shapes[i]`.

    `prompt_length` is the width of the (left-padded) prompt batch; what follows it is the reply.
    After generation, `overridden[i]` is True when the model's own top token was outside the
    shape at some step of row i (the reply then differs from the unconstrained one)."""

    def __init__(self, tokenizer, row_shapes: list[Shape], prompt_length: int):
        self.ids = character_ids(tokenizer)
        self.chars = {v: k for k, v in self.ids.items()}
        self.row_shapes, self.prompt_length = row_shapes, prompt_length
        self.overridden = [False] * len(row_shapes)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != len(self.row_shapes):
            raise ValueError(f"format constraint: {input_ids.shape[0]} rows, {len(self.row_shapes)} shapes "
                             "(greedy decoding, one sequence per row)")
        mask = torch.full_like(scores, float("-inf"))
        top = scores.argmax(-1)
        for i, new in enumerate(input_ids[:, self.prompt_length:].tolist()):
            text = "".join(self.chars.get(t, "?") for t in new)
            if END in text or "?" in text:   # finished (generate pads it from here on)
                mask[i] = 0
                continue
            ok = [self.ids[c] for c in self.row_shapes[i].allowed(text)]
            mask[i, ok] = 0
            if int(top[i]) not in ok:
                self.overridden[i] = True
        return scores + mask
