"""Attribute prediction (paper §4.2): ask every test image all 16 questions, greedy, batched.

Replies are read with `Attribute.read_answer` (`replies.parse_number`, sign per the registry); a
reply that is not one clean number becomes NaN in `pred`, is kept in the table with its text, and
is counted per attribute by `metrics.r2_table` (never dropped silently, never a crash).

With `shapes` (`answer_format.shapes` of the training answers) decoding is format-constrained:
`reply`/`pred` are the constrained readings, and the rows where the constraint stepped in are asked
again without it, so `free_reply`/`free_pred` always hold the plain greedy readings as well.

`sample` asks the same questions k times, sampling from the model, and reads the k replies as their
median: a diagnostic of what greedy decoding leaves out, beside (never instead of) the greedy R².

`predict_sharded` writes sealed shards and resumes; under `accelerate launch -m skinlib.predict`
(`main`) the shards of chapter 3 are split across processes, and the notebook then only merges them.
"""
from __future__ import annotations

import contextlib
import json
from typing import Mapping

import numpy as np
import pandas as pd
import torch

from . import answer_format, attributes, resumable
from .config import READINGS   # the one list of the readings a profile may name
from .inputs import build_batch

SHARDS = "shard-*.csv"
FORMAT = 2  # bump when a stored reply's meaning changes (2: sealed, asked with `generation_config`)


def max_answer_tokens(tokenizer, names=None, margin: int = 2) -> int:
    """Tokens the longest typical answer takes (+ margin for an overflowing digit and <|im_end|>)."""
    longest = 0
    for a in attributes.resolve(names):
        text = a.format_answer(-(10 ** a.int_digits) + 10 ** -a.decimals)
        longest = max(longest, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return longest + margin


# Stop tokens of a reply: the chat turn's end (what the answers were trained to end with) and the
# pad token, as Qwen2-VL-Instruct's release stops.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def generation_config(tokenizer, max_new_tokens: int, sample: bool = False):
    """The project's whole generation config: plain greedy (or plain sampling: temperature 1, no
    top-k, top-p or other cut) and nothing else, so a checkpoint's own generation_config (the
    Qwen2-VL-7B-Instruct release sets repetition_penalty 1.05, which penalises repeated digits)
    cannot change the readings. Every setting that could touch a reply is written out."""
    from transformers import GenerationConfig

    stop = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    plain = dict(
        max_new_tokens=int(max_new_tokens), min_new_tokens=0, max_time=None, stop_strings=None,
        num_beams=1, num_return_sequences=1, use_cache=True,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0, length_penalty=1.0, exponential_decay_length_penalty=None,
        bad_words_ids=None, sequence_bias=None, suppress_tokens=None, begin_suppress_tokens=None,
        forced_bos_token_id=None, forced_eos_token_id=None, renormalize_logits=False,
        remove_invalid_values=False, guidance_scale=None, watermarking_config=None, token_healing=False,
        output_scores=False, output_logits=False, return_dict_in_generate=False,
        eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    if sample:
        plain.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_p=None, typical_p=1.0,
                     epsilon_cutoff=0.0, eta_cutoff=0.0)
    else:
        plain.update(do_sample=False)
    return GenerationConfig(**plain)


@contextlib.contextmanager
def _only(model, config):
    """Hold `config` as the model's own generation_config for the block: transformers fills every
    setting a passed config leaves unset from the model's, so the model's must be ours too."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    kept = target.generation_config
    target.generation_config = config
    try:
        yield
    finally:
        target.generation_config = kept


@torch.no_grad()
def generate(model, tokenizer, image_processor, images, questions, max_new_tokens: int,
             row_shapes=None, sample: bool = False) -> list[str] | tuple[list[str], list[bool]]:
    """Greedy replies, one per (image, question) row; left padding makes batching exact.

    With `row_shapes` (one `answer_format.Shape` per row) each reply is held to its shape, and
    (replies, overridden) is returned: overridden[i] when the constraint changed row i's reply.
    With `sample`, each row's reply is drawn from the model's own distribution instead (temperature
    1, no top-k or top-p cut; within the shape when constrained), with torch's random state.
    Decoding follows `generation_config` only, whatever the checkpoint's generation_config says."""
    from transformers import LogitsProcessorList

    batch = build_batch(tokenizer, image_processor, images, questions)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    extra = {}
    if row_shapes is not None:
        constraint = answer_format.FormatConstraint(tokenizer, row_shapes, batch["input_ids"].shape[1])
        extra["logits_processor"] = LogitsProcessorList([constraint])
    config = generation_config(tokenizer, max_new_tokens, sample)
    with _only(model, config):
        out = model.generate(**batch, generation_config=config, **extra)
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
    res = long.assign(pred=medians, samples=texts, parsed=parsed)[
        ["isic_id", "attribute", "true", "pred", "samples", "parsed"]]
    res.attrs["job"] = resumable.job_key({   # what the table depends on, for its seal (`save`)
        "format": FORMAT, "kind": "sample", "ids": resumable.job_key(list(truth.isic_id)),
        "weights": resumable.model_fingerprint(model), "k": k, "seed": seed, "batch_size": batch_size,
        "max_new_tokens": max_new_tokens, "attributes": attributes.fingerprint(names),
        "shapes": None if shapes is None else sorted((a, repr(v)) for a, v in shapes.items())})
    return res


def free_readings(pred: pd.DataFrame) -> pd.DataFrame:
    """The plain greedy readings of a prediction frame, as a frame of the same layout (reply and
    pred replaced by free_reply and free_pred): what `metrics.r2_table` scores unconstrained."""
    return pred.assign(reply=pred.free_reply, pred=pred.free_pred)


def _asked_rows(chunk: pd.DataFrame, names) -> int:
    """Rows `predict` gives for `chunk`: its (image, attribute) cells with a true value."""
    return int(chunk[[a.name for a in attributes.resolve(names)]].notna().to_numpy().sum())


def _read_shard(path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"reply": str, "free_reply": str})


def predict_sharded(model, tokenizer, image_processor, images: Mapping, truth: pd.DataFrame, out_dir,
                    shard_images: int = 250, key: str = "", progress: bool = True, reading: str = "greedy",
                    accelerator=None, **kw) -> pd.DataFrame:
    """`predict` (reading "greedy") or `median_reading.predict` (reading "median"; `kw` then takes
    shapes, batch_size, beam) in shards of `shard_images` images, each written to `out_dir` as it
    finishes, so an interrupted run resumes where it stopped.

    The job (`resumable.Stamp`, job.json) is keyed by the image ids, `key` (e.g. the model's path),
    a fingerprint of the weights (a model retrained at the same path is another job), the registry's
    questions and answer format and the options: shards of another job are cleared, never mixed in.
    Each shard is sealed (`resumable.seal`: job, bytes, sha256, rows) once written; a shard that
    does not pass `resumable.check` (cut short, altered, unsealed, of another job) is named and
    recomputed, never read.

    accelerator: an `accelerate.Accelerator` (as `embed.extract`): process i computes shards i,
    i+P, ... and the main process owns the stamp; every process returns the whole merged table.
    A shard is computed the same way whichever process takes it, so the table does not depend on
    the number of processes; and a later call of one process (the notebook) finds the finished
    shards and only merges them. The table is always read back from the stored shards."""
    from pathlib import Path

    from tqdm.auto import tqdm

    from . import embed, median_reading

    if reading not in READINGS:
        raise ValueError(f"reading must be one of {READINGS}, not {reading!r}")
    ask = predict if reading == "greedy" else median_reading.predict
    out = Path(out_dir)
    options = sorted((k, sorted(v.items()) if isinstance(v, Mapping) else v) for k, v in kw.items())
    spec = {"format": FORMAT, "reading": reading, "ids": resumable.job_key(list(truth.isic_id)), "images": len(truth), "key": str(key),
            "weights": resumable.model_fingerprint(model), "shard_images": shard_images, "options": repr(options),
            "attributes": attributes.fingerprint(kw.get("names"))}
    stamp = resumable.Stamp(out, spec)
    index, num = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if index == 0:
        stale = len(list(out.glob(SHARDS))) if stamp.current() != stamp.key else 0
        stamp.begin([SHARDS])
        if stale:   # said, so that shards computed elsewhere under other options are not lost unseen
            print(f"predict: {out} held {stale} shards of another job (job.json differs); they were removed")
    if accelerator is not None:
        accelerator.wait_for_everyone()
        if stamp.current() != stamp.key:
            raise RuntimeError(f"process {index}: {stamp.path} holds job {stamp.current()}, this process computes "
                               f"job {stamp.key}; all processes must get the same images, model and options")
    starts = list(range(0, len(truth), shard_images))
    path = {s: out / f"shard-{s // shard_images:05d}.csv" for s in starts}
    chunks = {s: truth.iloc[s:s + shard_images] for s in starts}
    rows = {s: _asked_rows(chunks[s], kw.get("names")) for s in starts}
    mine = [starts[i] for i in embed.process_shards(len(starts), index, num)]
    problem = {s: resumable.check(path[s], stamp.key, rows=rows[s]) for s in mine}
    for s in mine:
        if problem[s] is not None and path[s].exists():   # a missing shard is only not done yet
            print(f"predict: recomputing a shard: {problem[s]}")
    todo = [s for s in mine if problem[s] is not None]
    bar = tqdm(total=sum(len(chunks[s]) for s in mine), desc="predict", unit="img", disable=not progress,
               initial=sum(len(chunks[s]) for s in mine if s not in todo), position=index)
    for s in todo:
        resumable.remove(path[s])
        part = ask(model, tokenizer, image_processor, images, chunks[s], progress=False, **kw)
        part.to_csv(resumable.partial_path(path[s]), index=False)
        resumable.commit(path[s], stamp.key, rows=len(part))
        bar.update(len(chunks[s]))
    bar.close()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    res = pd.concat([_read_shard(resumable.verified(path[s], stamp.key, rows=rows[s])) for s in starts],
                    ignore_index=True)
    for col in ("reply", "free_reply"):   # the median reading has no free_reply
        if col in res:
            res[col] = res[col].fillna("")
    res.attrs["job"] = stamp.key
    res.attrs["computed"] = [s // shard_images for s in todo]   # shards this process (re)computed
    return res


# ---------------------------------------------------------------------------- the stage's shards
def stage_predictions(cfg: dict, run, accelerator=None, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Chapter 3's predictions of a run, every reading the profile scores ({reading: table}), with
    the very calls of notebooks/03_predict.py: the same images, model key, options and folders,
    hence the same jobs, so shards written here are the notebook's finished shards.

    `run` is taken as `skinlib.run` hands it to the notebook (resolved): the model's path is part
    of the job key."""
    from . import config, model as models, qa, slice3d, split, study

    pcfg = cfg["predict"]
    readings = list(dict.fromkeys(["greedy", *pcfg["readings"], pcfg["reading"]]))   # greedy is always read
    manifest = split.load_manifest(config.manifest_path(run))
    test = study.queries(manifest, pcfg["n_images"], cfg["seed"])   # the notebook's seeded subset rule
    device = accelerator.device if accelerator is not None else models.default_device()
    loaded = models.load_finetuned(config.finetuned_dir(run), device=device)
    release = slice3d.Slice3D(*config.release_files(cfg, run), on_error=cfg["data"]["on_error"])
    images = qa.ImageCache(release, loaded.image_processor, keep=False)
    needs_shapes = pcfg["constrain"] or "median" in readings
    shapes = answer_format.shapes(pd.read_parquet(config.tuples_path(run))) if needs_shapes else None
    args = (loaded.model, loaded.tokenizer, loaded.image_processor, images, test)
    common = dict(key=str(config.finetuned_dir(run)), batch_size=pcfg["batch_size"], accelerator=accelerator,
                  progress=progress)
    frames = {"greedy": predict_sharded(*args, config.reply_shards_dir(run, "greedy"),
                                        shapes=shapes if pcfg["constrain"] else None, **common)}
    if "median" in readings:
        frames["median"] = predict_sharded(*args, config.reply_shards_dir(run, "median"), reading="median",
                                           shapes=shapes, beam=pcfg["beam"], **common)
    return frames


def main(argv=None) -> int:
    """`accelerate launch -m skinlib.predict --profile paper --out runs/paper`: chapter 3's
    prediction shards split across processes (GPUs); the notebook then finds them finished and
    only merges and scores them. An interrupted launch resumes from the finished shards."""
    import argparse
    import os

    from . import config, finetune, needs, study

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--out", default=None, help="run folder (default runs/<profile>)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    cfg = config.load_profile(a.profile)
    # under accelerate launch the profile's threads are shared by the processes on this machine
    config.set_threads(finetune.thread_share(cfg, os.environ.get("LOCAL_WORLD_SIZE", 1)))
    run = config.run_dir(cfg, a.out).resolve()   # as skinlib.run gives it to the notebook
    needs.exit_if_missing(cfg, needs.from_stage("03_predict"), run)
    acc = study.accelerator()
    frames = stage_predictions(cfg, run, accelerator=acc, progress=not a.quiet)
    for name, f in frames.items():   # every process says what it did: how the work was split
        print(f"predict {name}: process {acc.process_index} of {acc.num_processes} computed shards "
              f"{f.attrs['computed']}; {len(f):,} rows in {config.shown(config.reply_shards_dir(run, name), run)}",
              flush=True)
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
