"""The median of the model's own answer distribution, read from its token probabilities.

Greedy decoding takes the likeliest first character, then the likeliest continuation; sampling k
replies and taking their median (`predict.sample`) reads the whole distribution but costs k
generations. Here the distribution's median is read from the token probabilities of ONE decoding
pass per question (a few parallel rows where the answer's width is open), with no sampling.

The distribution is the one `predict.generate(..., sample=True, row_shapes=...)` draws from: at
each position the model's raw logits (temperature 1, no penalty, no top-k/top-p), softmax over the
characters the answer shape allows there (`answer_format.Shape.allowed`, the one description of a
reply). Nothing is read from `model.generation_config`: `model.generate` is not used at all.

How (the quantile descent). At a node whose children are ordered by value (every string under an
earlier child is numerically at most every string under a later one), take the child where the
cumulative mass crosses the target quantile q and continue in it with q' = (q - c)/p (c: the mass
of the children before it, p: its own). Where that order holds all the way down the result is the
exact q-quantile of the value distribution. It holds:
- at the sign: the '-' branch is below every non-negative reply; inside it the digit order is
  reversed (a larger magnitude is smaller);
- at every digit of a fixed-width integer part and of the decimals (lexicographic = numeric).
It does not hold over an integer part of open width (Shape min_width < max_width): the first digit
'1' holds both 1.x and 1x.x. There the integer part is enumerated breadth-first: every integer
prefix shorter than the maximum width is asked (one row each, in the same decoding steps), which
gives the exact distribution of the integer value, whatever its width. The value class that holds
q is chosen, and its decimals are descended over the mixture of all the strings that write that
value (leading zeros: "5.2" and "05.2" are one value). A reading is therefore exact, with one
exception: at most `beam` prefixes per question are asked at each enumerated depth (the likeliest);
the mass under the others is left out ("unresolved", reported per reading as eps). The reading is
then the median of the resolved part, which lies between the whole distribution's (q - eps) and
(q + eps) quantiles. The default beam enumerates integer parts of up to three digits fully. The
cost of an open width is one row per asked prefix, in the steps of the integer part: 10 rows for
1-2 digits, 10 + 100 for 2-3; a fixed-width question takes one row throughout.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pandas as pd
import torch

from . import answer_format, attributes
from .answer_format import DIGITS, END, Shape
from .embed import _core
from .inputs import build_batch

CHARS = DIGITS + "-." + END   # an answer's characters: the columns of a row's log-probabilities
_COL = {c: i for i, c in enumerate(CHARS)}
BEAM = 100   # prefixes asked per enumerated depth: 10**(max_width - 1) enumerates fully


class Unreadable(ValueError):
    """The model's probabilities at some position are not finite (e.g. NaN logits)."""


# ------------------------------------------------------------------------------------ the model
def _unwrap(model):
    """The Qwen2VLForConditionalGeneration inside a DDP or peft wrapper."""
    m = getattr(model, "module", model)
    return m.get_base_model() if hasattr(m, "get_base_model") else m


class _Decoder:
    """A left-padded prompt batch run once with a KV cache, then one token per live row per step.

    Rows can be copied (a prefix that branches) and dropped (`select`). A row with nothing to feed
    in a step gets a pad token that no later position attends to (mask 0) and no position number,
    so a row that waits for others stays exactly what it was."""

    def __init__(self, model, batch: dict, char_ids: list[int], pad_id: int):
        self.core = _core(model)
        self.head = _unwrap(model).get_output_embeddings()
        self.cols, self.pad = torch.tensor(char_ids), pad_id
        ids, mask = batch["input_ids"], batch["attention_mask"]
        self.device = ids.device
        pos, _ = self.core.get_rope_index(ids, batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
                                          attention_mask=mask)
        out = self.core(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=batch["pixel_values"],
                        image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=batch["mm_token_type_ids"],
                        use_cache=True)
        self.cache, self.mask = out.past_key_values, mask
        # generate's rule (M-RoPE): a reply token sits one past the largest position of its prompt
        self.next_pos = pos.amax(dim=(0, 2)) + 1
        self.first = self._logp(out.last_hidden_state[:, -1])

    def _logp(self, hidden: torch.Tensor) -> np.ndarray:
        """Log-softmax of the raw logits over the whole vocabulary (temperature 1), at the answer
        characters' columns: (rows, len(CHARS)). The full normaliser keeps the in-shape mass."""
        logp = torch.log_softmax(self.head(hidden).float(), dim=-1)
        return logp[:, self.cols.to(logp.device)].double().cpu().numpy()

    def select(self, slots: list[int]) -> None:
        if slots == list(range(self.mask.shape[0])):
            return
        idx = torch.tensor(slots, device=self.device)
        self.cache.reorder_cache(idx)
        self.mask, self.next_pos = self.mask[idx], self.next_pos[idx]

    def step(self, tokens: list[int | None]) -> np.ndarray:
        """Feed one token per row (None: the row waits); the log-probabilities after it."""
        active = torch.tensor([t is not None for t in tokens], device=self.device)
        ids = torch.tensor([self.pad if t is None else t for t in tokens], device=self.device)[:, None]
        self.mask = torch.cat([self.mask, active.long()[:, None]], dim=1)
        pos = self.next_pos.view(1, -1, 1).expand(3, -1, 1)
        out = self.core(input_ids=ids, attention_mask=self.mask, position_ids=pos, past_key_values=self.cache,
                        use_cache=True)
        self.next_pos = self.next_pos + active.long()
        return self._logp(out.last_hidden_state[:, -1])


# ---------------------------------------------------------------------------- the quantile steps
def _cross(items, q: float):
    """(key, mass) pairs in ascending value order -> (the key where the cumulative mass crosses the
    fraction q of the total, q within that key's own mass)."""
    total = sum(m for _, m in items)
    if not (total > 0 and math.isfinite(total)):
        raise Unreadable("no finite probability mass to read")
    target, below, last = q * total, 0.0, None
    for key, m in items:
        if m <= 0:
            continue
        last = (key, m, below)
        if below + m >= target:
            break
        below += m
    key, m, below = last
    return key, min(max((target - below) / m, 0.0), 1.0)


def _ordered(mass: Mapping[str, float], sign: int):
    """Digits in ascending value order: reversed under a minus sign (larger magnitude, smaller)."""
    return sorted(mass.items(), reverse=sign < 0)


def _fixed_width(shape: Shape) -> bool:
    """One integer width: the digits' lexicographic order is their numeric order."""
    return max(shape.min_width, 1) == shape.max_width


@dataclass(eq=False)
class _Row:
    text: str                     # the reply so far, as fed to the model
    weight: float                 # its probability under the shape-held distribution
    slot: int                     # its row in the decoder batch
    queue: list = field(default_factory=list)   # characters still to feed
    logp: np.ndarray | None = None  # after `text`: log-probabilities of CHARS


class _Reading:
    """One question's descent: a chain of stages, each run when all its rows have been fed.
    A stage returns the next stage (None when done) and leaves characters to feed in row queues."""

    def __init__(self, shape: Shape, q: float, beam: int, slot: int, logp: np.ndarray):
        if not 0 < q < 1:
            raise ValueError(f"quantile must be in (0, 1), got {q}")
        self.shape, self.q, self.beam, self.sign = shape, q, beam, 1
        self.rows = [_Row("", 1.0, slot, [], logp)]
        self.seen = {"": logp}            # log-probabilities after each prefix asked (for in_shape)
        self.classes: list = []           # enumerated integer values: (value, weight, row, last digit)
        self.kept: list[_Row] = []        # asked prefixes that may write (or be the parent of) a value
        self.unresolved = 0.0
        self.text, self.in_shape = None, float("nan")
        self.stage = self._root

    def advance(self) -> None:
        try:
            while self.stage is not None and not any(r.queue for r in self.rows):
                self.stage = self.stage()
        except Unreadable:
            self.text, self.in_shape, self.unresolved, self.rows, self.stage = "", float("nan"), float("nan"), [], None

    def _probs(self, row: _Row, only: str | None = None) -> dict[str, float]:
        """The allowed next characters' probabilities (renormalised over those allowed, and over
        `only` among them when given: the distribution conditional on that choice)."""
        allowed = [c for c in self.shape.allowed(row.text) if only is None or c in only]
        lp = row.logp[[_COL[c] for c in allowed]]
        if np.isnan(lp).any() or not np.isfinite(lp).any():
            raise Unreadable(f"non-finite probabilities after {row.text!r}")
        p = np.exp(lp - lp.max())
        return dict(zip(allowed, p / p.sum()))

    # the stages
    def _root(self):
        row = self.rows[0]
        neg = self._probs(row).get("-", 0.0)
        side, self.q = _cross([("-", neg), ("+", 1.0 - neg)], self.q)
        if side == "-":
            self.sign, row.weight, row.queue = -1, neg, ["-"]
        else:
            row.weight = 1.0 - neg       # the root itself is the '+' branch: read it at once
        return self._branch

    def _branch(self):
        if _fixed_width(self.shape):
            return self._digit()
        return self._expand([self.rows[0]])

    def _digit(self):
        """Fixed width: descend the integer digits one path, then the decimals."""
        row = self.rows[0]
        if len(row.text.lstrip("-")) < self.shape.max_width:
            p = self._probs(row, DIGITS)   # at the root: conditional on '+'
            d, self.q = _cross(_ordered(p, self.sign), self.q)
            row.weight *= p[d]
            row.queue = [d]
            return self._digit
        return self._point([row])

    def _expand(self, nodes: list[_Row]):
        """Open width: `nodes` are asked prefixes of one integer depth. Each one's stop ('.' or the
        end) is a value class, and so is each digit child at the maximum width (nothing to ask
        there); the other children are the next depth's prefixes, the `beam` likeliest asked."""
        lo, hi = max(self.shape.min_width, 1), self.shape.max_width
        stop = "." if self.shape.decimals else END
        children = []
        for node in nodes:
            digits = node.text.lstrip("-")
            p = self._probs(node, DIGITS + stop)   # at the root: conditional on '+'
            if len(digits) >= lo:
                self.classes.append((int(digits), node.weight * p.get(stop, 0.0), node, ""))
                self.kept.append(node)   # it may write the chosen value (or be its parent)
            for d in DIGITS:
                if d not in p:
                    continue
                if len(digits) + 1 == hi:
                    self.classes.append((int(digits + d), node.weight * p[d], node, d))
                else:
                    children.append(_Row(node.text, node.weight * p[d], node.slot, [d]))
        children.sort(key=lambda r: -r.weight)
        asked = children[:self.beam]
        self.unresolved += sum(r.weight for r in children[self.beam:])
        self.rows = self.kept + asked
        if asked:
            return lambda: self._expand(asked)
        return self._choose()

    def _choose(self):
        """The integer value where the resolved mass crosses q; every string writing it goes on."""
        by_value = defaultdict(list)
        for value, w, node, d in self.classes:
            if w > 0:
                by_value[value].append((w, node, d))
        order = sorted(by_value, reverse=self.sign < 0)
        value, self.q = _cross([(v, sum(w for w, _, _ in by_value[v])) for v in order], self.q)
        reps = [_Row(node.text, w, node.slot, [d] if d else [], node.logp) for w, node, d in by_value[value]]
        self.classes, self.kept = [], []
        return self._point(reps)

    def _point(self, reps: list[_Row]):
        self.rows = reps
        if not self.shape.decimals:
            return self._finish()
        for r in reps:
            r.queue.append(".")
        return self._fraction

    def _fraction(self):
        """Decimals: one descent over the mixture of the strings that write the chosen value."""
        if len(self.rows[0].text.partition(".")[2]) == self.shape.decimals:
            return self._finish()
        probs = [self._probs(r) for r in self.rows]
        mix = {d: sum(r.weight * p[d] for r, p in zip(self.rows, probs)) for d in DIGITS}
        d, self.q = _cross(_ordered(mix, self.sign), self.q)
        for r, p in zip(self.rows, probs):
            r.weight *= p[d]
            r.queue = [d]
        self.rows = [r for r in self.rows if r.weight > 0]
        return self._fraction

    def _finish(self):
        """The likeliest spelling of the reading; asked once more for its end probability."""
        best = max(self.rows, key=lambda r: r.weight)
        self.rows = [best]
        if best.queue:
            return self._finish
        self.text, self.rows = best.text, []
        self.in_shape = self._in_shape(best.text)
        return None

    def _in_shape(self, text: str) -> float:
        """The unconstrained model's probability of staying in shape along the reading: the product,
        over the reading's positions and its end, of the mass on the allowed characters."""
        log = 0.0
        for t in range(len(text) + 1):
            lp = self.seen[text[:t]][[_COL[c] for c in self.shape.allowed(text[:t])]]
            log += float(np.logaddexp.reduce(lp))
        return math.exp(log)


def _descend(readings: list[_Reading], decoder, ids: Mapping[str, int]) -> None:
    """Run every reading to its end: advance the readings whose rows are all fed, then feed each
    live row its next character in one decoder step (`decoder.select(slots)`, then
    `decoder.step(token ids or None)` -> log-probabilities of CHARS per row)."""
    while True:
        for r in readings:
            r.advance()
        live = [(r, row) for r in readings for row in r.rows]
        if not any(row.queue for _, row in live):
            return
        decoder.select([row.slot for _, row in live])
        logp = decoder.step([ids[row.queue[0]] if row.queue else None for _, row in live])
        for i, (r, row) in enumerate(live):
            row.slot = i
            if row.queue:
                row.text += row.queue.pop(0)
                row.logp = r.seen[row.text] = logp[i]


# ------------------------------------------------------------------------------------ the API
@torch.no_grad()
def replies(model, tokenizer, image_processor, images, questions, row_shapes, quantile: float = 0.5,
            beam: int = BEAM) -> list[tuple[str, float, float]]:
    """The q-quantile reading of each (image, question) row under its `row_shapes[i]`: per row
    (text, in_shape, unresolved). Batched as `predict.generate` (left-padded, one forward over the
    prompt, then one step per answer position with the KV cache); each row follows its own path.
    text "" (with NaNs) where the model's probabilities were not finite."""
    if beam < 1:
        raise ValueError(f"beam must be at least 1, got {beam}")
    ids = answer_format.character_ids(tokenizer)
    batch = build_batch(tokenizer, image_processor, images, questions)
    device = next(model.parameters()).device
    dec = _Decoder(model, {k: v.to(device) for k, v in batch.items()}, [ids[c] for c in CHARS],
                   tokenizer.pad_token_id)
    readings = [_Reading(s, quantile, beam, i, dec.first[i]) for i, s in enumerate(row_shapes)]
    _descend(readings, dec, ids)
    return [(r.text, r.in_shape, r.unresolved) for r in readings]


def predict(model, tokenizer, image_processor, images: Mapping, truth: pd.DataFrame, shapes: Mapping,
            names=None, batch_size: int = 64, progress: bool = True, quantile: float = 0.5,
            beam: int = BEAM) -> pd.DataFrame:
    """`predict.predict`'s rows (every image of `truth` asked every attribute with a true value,
    image-major), each read as the q-quantile of the model's answer distribution in its attribute's
    shape (`shapes`: {attribute: answer_format.Shape}). Returns isic_id, attribute, true, reply (the
    reading's text), pred (`Attribute.read_answer` of it: NaN when unreadable, counted by
    `metrics.r2_table`), in_shape (the unconstrained model's probability of staying in shape along
    the reading) and unresolved (eps: the reading lies between the q - eps and q + eps quantiles)."""
    from tqdm.auto import tqdm

    from .predict import _asked   # here, not at the top: predict may import this module

    if shapes is None:
        raise ValueError("the median reading needs answer shapes (answer_format.shapes of the training answers)")
    atts = attributes.resolve(names)
    long, questions, _ = _asked(tokenizer, truth, atts, names, None, shapes)
    was_training = model.training
    model.eval()
    got = []
    try:
        for s in tqdm(range(0, len(long), batch_size), desc="median", unit="batch", disable=not progress):
            rows = long.iloc[s:s + batch_size]
            got += replies(model, tokenizer, image_processor, [images[i] for i in rows.isic_id],
                           questions[s:s + batch_size], [shapes[a] for a in rows.attribute], quantile, beam)
    finally:
        model.train(was_training)
    read = {a.name: a.read_answer for a in atts}
    long["reply"] = [t for t, _, _ in got]
    long["pred"] = [read[a](t) for a, (t, _, _) in zip(long.attribute, got)]
    long["in_shape"] = [c for _, c, _ in got]
    long["unresolved"] = [u for _, _, u in got]
    return long[["isic_id", "attribute", "true", "reply", "pred", "in_shape", "unresolved"]]
