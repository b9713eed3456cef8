"""Attribute prediction (paper §4.2): ask every test image all 16 questions, greedy, batched.

Replies are read with `Attribute.read_answer` (`answers.parse_number`, sign per the registry); a
reply that is not one clean number becomes NaN in `pred`, is kept in the table with its text, and
is counted per attribute by `metrics.r2_table` (never dropped silently, never a crash).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
import torch

from . import attributes
from .inputs import build_batch


def max_answer_tokens(tokenizer, names=None, margin: int = 2) -> int:
    """Tokens the longest typical answer takes (+ margin for an overflowing digit and <|im_end|>)."""
    longest = 0
    for a in attributes.resolve(names):
        text = a.format_answer(-(10 ** a.int_digits) + 10 ** -a.decimals)
        longest = max(longest, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return longest + margin


@torch.no_grad()
def generate(model, tokenizer, image_processor, images, questions, max_new_tokens: int) -> list[str]:
    """Greedy replies, one per (image, question) row; left padding makes batching exact."""
    batch = build_batch(tokenizer, image_processor, images, questions)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    new = out[:, batch["input_ids"].shape[1]:]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def predict(model, tokenizer, image_processor, images: Mapping, truth: pd.DataFrame, names=None,
            batch_size: int = 64, max_new_tokens: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Ask every image of `truth` (isic_id + attribute short names) every attribute question.

    images: isic_id -> image (PIL, array or EncodedImage, e.g. a `qa.ImageCache`).
    Returns one row per (image, attribute): isic_id, attribute, true, reply, pred. An attribute whose
    true value is NaN (excluded for that image) is not asked: it cannot be scored.
    """
    from tqdm.auto import tqdm

    atts = attributes.resolve(names)
    long = truth.melt(id_vars=["isic_id"], value_vars=[a.name for a in atts], var_name="attribute",
                      value_name="true").dropna(subset=["true"])
    # image-major order: consecutive rows share an image, so a batch touches few images
    order = {a.name: j for j, a in enumerate(atts)}
    ids = {i: j for j, i in enumerate(truth.isic_id)}
    long = long.assign(_i=long.isic_id.map(ids), _a=long.attribute.map(order)).sort_values(["_i", "_a"])
    long = long.drop(columns=["_i", "_a"]).reset_index(drop=True)
    questions = long.attribute.map({a.name: a.question for a in atts}).tolist()
    max_new_tokens = max_new_tokens or max_answer_tokens(tokenizer, names)
    was_training = model.training
    model.eval()
    replies: list[str] = []
    try:
        for s in tqdm(range(0, len(long), batch_size), desc="predict", unit="batch", disable=not progress):
            rows = long.iloc[s:s + batch_size]
            replies += generate(model, tokenizer, image_processor, [images[i] for i in rows.isic_id],
                                questions[s:s + batch_size], max_new_tokens)
    finally:
        model.train(was_training)
    long["reply"] = replies
    read = {a.name: a.read_answer for a in atts}
    long["pred"] = [read[a](r) for a, r in zip(long.attribute, replies)]
    return long[["isic_id", "attribute", "true", "reply", "pred"]]


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

    job = hashlib.sha256(("\n".join(truth.isic_id) + f"|{key}|{model_fingerprint(model)}|{shard_images}"
                          f"|{sorted(kw.items())}|{attributes.fingerprint(kw.get('names'))}")
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
                                     dtype={"reply": str}))
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
    return res
