"""Attribute prediction (paper §4.2): ask every test image all 16 questions, greedy, batched.

Replies are read with `Attribute.read_answer` (`answers.parse_number`, sign per the registry); a
reply that is not one clean number becomes NaN in `pred`, is kept in the table with its text, and
is counted per attribute by `metrics.r2_table` (never dropped silently, never a crash).

With `shapes` (`answer_format.shapes` of the training answers) decoding is format-constrained:
`reply`/`pred` are the constrained readings, and the rows where the constraint stepped in are asked
again without it, so `free_reply`/`free_pred` always hold the plain greedy readings as well.

`sample` asks the same questions k times, sampling from the model, and reads the k replies as their
median: a diagnostic of what greedy decoding leaves out, beside (never instead of) the greedy R².
"""
from __future__ import annotations

import json
from typing import Mapping

import numpy as np
import pandas as pd
import torch

from . import answer_format, attributes
from .inputs import build_batch


def max_answer_tokens(tokenizer, names=None, margin: int = 2) -> int:
    """Tokens the longest typical answer takes (+ margin for an overflowing digit and <|im_end|>)."""
    longest = 0
    for a in attributes.resolve(names):
        text = a.format_answer(-(10 ** a.int_digits) + 10 ** -a.decimals)
        longest = max(longest, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return longest + margin


@torch.no_grad()
def generate(model, tokenizer, image_processor, images, questions, max_new_tokens: int,
             row_shapes=None, sample: bool = False) -> list[str] | tuple[list[str], list[bool]]:
    """Greedy replies, one per (image, question) row; left padding makes batching exact.

    With `row_shapes` (one `answer_format.Shape` per row) each reply is held to its shape, and
    (replies, overridden) is returned: overridden[i] when the constraint changed row i's reply.
    With `sample`, each row's reply is drawn from the model's own distribution instead (temperature
    1, no top-k or top-p cut; within the shape when constrained), with torch's random state."""
    from transformers import LogitsProcessorList

    batch = build_batch(tokenizer, image_processor, images, questions)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    extra = {}
    if row_shapes is not None:
        constraint = answer_format.FormatConstraint(tokenizer, row_shapes, batch["input_ids"].shape[1])
        extra["logits_processor"] = LogitsProcessorList([constraint])
    if sample:   # explicit: a checkpoint's generation_config may carry other sampling defaults
        extra.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    else:
        extra.update(do_sample=False)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **extra)
    new = out[:, batch["input_ids"].shape[1]:]
    replies = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return (replies, constraint.overridden) if row_shapes is not None else replies


def _asked(tokenizer, truth: pd.DataFrame, atts, names, max_new_tokens, shapes):
    """The (image, attribute) rows to ask, image-major, with their questions and the reply budget.
    An attribute whose true value is NaN (excluded for that image) is not asked."""
    long = truth.melt(id_vars=["isic_id"], value_vars=[a.name for a in atts], var_name="attribute",
                      value_name="true").dropna(subset=["true"])
    # image-major order: consecutive rows share an image, so a batch touches few images
    order = {a.name: j for j, a in enumerate(atts)}
    ids = {i: j for j, i in enumerate(truth.isic_id)}
    long = long.assign(_i=long.isic_id.map(ids), _a=long.attribute.map(order)).sort_values(["_i", "_a"])
    long = long.drop(columns=["_i", "_a"]).reset_index(drop=True)
    questions = long.attribute.map({a.name: a.question for a in atts}).tolist()
    max_new_tokens = max_new_tokens or max_answer_tokens(tokenizer, names)
    if shapes is not None:
        missing = sorted(set(long.attribute) - set(shapes))
        if missing:
            raise KeyError(f"format constraint: no answer shape for attribute(s) {missing} "
                           "(no training answers of them?)")
        max_new_tokens = max(max_new_tokens, max(s.max_width + s.decimals + 3 for s in shapes.values()))
    return long, questions, max_new_tokens


def predict(model, tokenizer, image_processor, images: Mapping, truth: pd.DataFrame, names=None,
            batch_size: int = 64, max_new_tokens: int | None = None, progress: bool = True,
            shapes: Mapping | None = None) -> pd.DataFrame:
    """Ask every image of `truth` (isic_id + attribute short names) every attribute question.

    images: isic_id -> image (PIL, array or EncodedImage, e.g. a `qa.ImageCache`).
    shapes: {attribute: answer_format.Shape} to constrain the replies to (None: plain greedy).
    Returns one row per (image, attribute): isic_id, attribute, true, reply, pred, overridden,
    free_reply, free_pred (the last three: whether the constraint changed the reply, and the plain
    greedy reading; without `shapes`, False and copies of reply/pred). An attribute whose true value
    is NaN (excluded for that image) is not asked: it cannot be scored.
    """
    from tqdm.auto import tqdm

    atts = attributes.resolve(names)
    long, questions, max_new_tokens = _asked(tokenizer, truth, atts, names, max_new_tokens, shapes)
    was_training = model.training
    model.eval()
    replies: list[str] = []
    overridden: list[bool] = []
    try:
        for s in tqdm(range(0, len(long), batch_size), desc="predict", unit="batch", disable=not progress):
            rows = long.iloc[s:s + batch_size]
            got = generate(model, tokenizer, image_processor, [images[i] for i in rows.isic_id],
                           questions[s:s + batch_size], max_new_tokens,
                           row_shapes=None if shapes is None else [shapes[a] for a in rows.attribute])
            if shapes is not None:
                got, over = got
                overridden += over
            replies += got
        long["reply"] = replies
        long["overridden"] = overridden if shapes is not None else False
        long["free_reply"] = long["reply"]
        # where the constraint stepped in, the plain greedy reply: the same rows asked again
        # unconstrained (elsewhere the two decodings took the same tokens, so the reply is the same)
        redo = np.flatnonzero(long["overridden"].to_numpy(bool))
        for s in range(0, len(redo), batch_size):
            rows = long.iloc[redo[s:s + batch_size]]
            long.loc[rows.index, "free_reply"] = generate(
                model, tokenizer, image_processor, [images[i] for i in rows.isic_id],
                [questions[j] for j in redo[s:s + batch_size]], max_new_tokens)
    finally:
        model.train(was_training)
    read = {a.name: a.read_answer for a in atts}
    long["pred"] = [read[a](r) for a, r in zip(long.attribute, long.reply)]
    long["free_pred"] = [read[a](r) for a, r in zip(long.attribute, long.free_reply)]
    return long[["isic_id", "attribute", "true", "reply", "pred", "overridden", "free_reply", "free_pred"]]


def sample(model, tokenizer, image_processor, images: Mapping, truth: pd.DataFrame, k: int = 16,
           seed: int = 0, names=None, batch_size: int = 64, max_new_tokens: int | None = None,
           progress: bool = True, shapes: Mapping | None = None) -> pd.DataFrame:
    """`k` replies per (image, question) drawn from the model's own answer distribution, read
    together as their median: what the model's whole distribution says, where greedy decoding
    takes only its likeliest first character and then the likeliest continuation.

    Rows as in `predict` (with `shapes`, every sample is held to its attribute's shape). A batch
    holds `batch_size // k` questions, each repeated k times; batch b is drawn with torch seed
    `seed + b` and torch's own random state is left as it was, so the result depends on the seed
    and batch size only. Returns one row per (image, attribute): isic_id, attribute, true, pred
    (median of the samples that are a number; NaN when none is), samples (the k replies as a JSON
    list), parsed (samples that are a number, of k).
    """
    from tqdm.auto import tqdm

    if k < 1:
        raise ValueError(f"sample: k must be at least 1, got {k}")
    atts = attributes.resolve(names)
    long, questions, max_new_tokens = _asked(tokenizer, truth, atts, names, max_new_tokens, shapes)
    read = {a.name: a.read_answer for a in atts}
    per = max(1, batch_size // k)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    medians, texts, parsed = [], [], []
    try:
        for b, s in enumerate(tqdm(range(0, len(long), per), desc="sample", unit="batch", disable=not progress)):
            rows = long.iloc[s:s + per]
            imgs = [images[i] for i in rows.isic_id]   # each image read once, not k times
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed + b)
                got = generate(model, tokenizer, image_processor, [im for im in imgs for _ in range(k)],
                               [q for q in questions[s:s + per] for _ in range(k)], max_new_tokens,
                               row_shapes=None if shapes is None else [shapes[a] for a in rows.attribute for _ in range(k)],
                               sample=True)
            replies = got[0] if shapes is not None else got
            for j, att in enumerate(rows.attribute):
                mine = replies[j * k:(j + 1) * k]
                vals = np.array([read[att](r) for r in mine], float)
                ok = np.isfinite(vals)
                medians.append(float(np.median(vals[ok])) if ok.any() else float("nan"))
                texts.append(json.dumps(mine))
                parsed.append(int(ok.sum()))
    finally:
        model.train(was_training)
    return long.assign(pred=medians, samples=texts, parsed=parsed)[
        ["isic_id", "attribute", "true", "pred", "samples", "parsed"]]


def free_readings(pred: pd.DataFrame) -> pd.DataFrame:
    """The plain greedy readings of a prediction frame, as a frame of the same layout (reply and
    pred replaced by free_reply and free_pred): what `metrics.r2_table` scores unconstrained."""
    return pred.assign(reply=pred.free_reply, pred=pred.free_pred)


def scatter_limits(frame: pd.DataFrame, q: float = 0.005) -> tuple[float, float]:
    """Axis limits for a predicted-vs-true panel: the true values' central range, so one wild
    reply does not squash the cloud (points beyond are clipped to the edge and marked)."""
    lo, hi = np.nanquantile(frame["true"], [q, 1 - q])
    pad = 0.05 * (hi - lo or 1.0)
    return float(lo - pad), float(hi + pad)


def predict_sharded(model, tokenizer, image_processor, images: Mapping, truth: pd.DataFrame, out_dir,
                    shard_images: int = 250, key: str = "", progress: bool = True, **kw) -> pd.DataFrame:
    """`predict` in shards of `shard_images` images, each written to `out_dir` as it finishes, so an
    interrupted run resumes where it stopped. `key` (e.g. the model's path) plus the image ids
    identify the job with a fingerprint of the weights (a model retrained at the same path is
    another job) and of the registry's questions and answer format: shards of a different job are cleared, never mixed in."""
    import hashlib
    import json
    from pathlib import Path

    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from .embed import model_fingerprint

    options = sorted((k, sorted(v.items()) if isinstance(v, Mapping) else v) for k, v in kw.items())
    job = hashlib.sha256(("\n".join(truth.isic_id) + f"|{key}|{model_fingerprint(model)}|{shard_images}"
                          f"|{options}|{attributes.fingerprint(kw.get('names'))}")
                         .encode()).hexdigest()[:16]
    stamp = out / "job.json"
    if not stamp.exists() or json.loads(stamp.read_text()).get("job") != job:
        for old in out.glob("shard-*.csv"):
            old.unlink()
        stamp.write_text(json.dumps({"job": job, "images": len(truth), "key": key}))
    parts = []
    starts = range(0, len(truth), shard_images)
    done = sum((out / f"shard-{s // shard_images:05d}.csv").exists() for s in starts)
    bar = tqdm(total=len(truth), desc="predict", unit="img", disable=not progress,
               initial=min(len(truth), done * shard_images))
    for s in starts:
        path = out / f"shard-{s // shard_images:05d}.csv"
        if path.exists():
            parts.append(pd.read_csv(path, keep_default_na=False, na_values=[""],
                                     dtype={"reply": str, "free_reply": str}))
            continue
        chunk = truth.iloc[s:s + shard_images]
        part = predict(model, tokenizer, image_processor, images, chunk, progress=False, **kw)
        tmp = path.with_suffix(".partial")
        part.to_csv(tmp, index=False)
        tmp.replace(path)
        parts.append(part)
        bar.update(len(chunk))
    bar.close()
    res = pd.concat(parts, ignore_index=True)
    res["reply"] = res["reply"].fillna("")
    res["free_reply"] = res["free_reply"].fillna("")
    return res
