"""Embeddings from the last decoder layer (paper §3.3), fast and exact, and sharded extraction.

- h_im(I): the mean of the last layer's states over the image tokens (<|image_pad|> positions) of
  the image-only prompt: system + a user turn holding only the image (its text is empty, built by
  `inputs.build_batch` with the question ""), then the generation prompt.
- h_im,a(I): the last layer's state at the final token of [system, image, Q(a)] + the generation
  prompt `<|im_start|>assistant\\n`: exactly the prompt the model answers at prediction time
  (`inputs.build_batch(..., questions)`). A multi-attribute question (`multi_question`) is one more
  such question.

"Last layer's state" is the language model's `last_hidden_state`, i.e. after the final RMSNorm, the
same tensor as `hidden_states[-1]` of the full model (the convention of GME / VLM2Vec). Nothing is
normalised here: retrieval does that.

Why there is a fast path: the 16 questions of an image share everything up to where the question
text begins ([system, user-turn start, <|vision_start|>, image tokens, <|vision_end|>]), and
attention is causal, so that prefix's states do not depend on the question. `embed` runs the prefix
once (one vision pass) with a KV cache, then all question suffixes from the repeated cache in one
batch. Two details make it exact, not approximate:
- positions: Qwen2-VL's M-RoPE gives the image 2-D positions, so text after it does not sit at its
  index. The suffix gets explicit 3-D position_ids: index + `rope_deltas` of `get_rope_index` on the
  prefix (the model's own rule). Left to the model, the continuation crashes or is silently wrong
  when its cached `rope_deltas` belong to another batch.
- padding: suffixes differ in length. They are RIGHT-padded (left padding would put pad tokens
  between prefix and question and shift the positions); each row's embedding is gathered at its
  last real token, and with causal attention the pads after it cannot touch it.
h_im comes from the same prefix pass: the image tokens' states only see what precedes them, so they
equal those of the image-only prompt. `embed_slow` is the plain reference (one full forward per
prompt, left-padded batches); the tests hold the two equal for every attribute.

Nothing here is specific to a tuned model: the untuned baseline is the same calls on the base
checkpoint (`model.load`), a tuned one on `model.load_finetuned` (peft wrappers work too).

Images are grouped by their image-token count (equal counts give identical prefix tokens, so a
group shares one prefix batch without padding); the tiny default's images all give 16 tokens.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from . import attributes, resumable
from .inputs import IMAGE_TOKEN, SYSTEM_PROMPT, VISION_END, EncodedImage, build_batch, encode_images, prefix_length

KINDS = ("image", "image_text")
IMAGE_ONLY_QUESTION = ""  # the image-only prompt: the user turn holds the image and no text
STAMP = "job.json"
SHARDS = "shard-*.safetensors"
FORMAT = 2  # bump when the meaning of a stored array changes (2: shards sealed by skinlib.resumable)


# ------------------------------------------------------------------------------------- questions
def attribute_questions(names=None) -> list[str]:
    """Q(a) for each attribute (registry order; None = all 16)."""
    return [a.question for a in attributes.resolve(names)]


def _phrase(a: attributes.Attribute) -> str:
    # "border jaggedness: perimeter squared over area" -> "border jaggedness"; commas would read as
    # list separators in the joined question.
    text = a.meaning.split(":")[0].replace(",", "")
    return f"the {text}" + (f" in {a.unit}" if a.unit else "")


def multi_question(names) -> str:
    """One question naming several attributes, from the registry's meanings and units, e.g.
    ["areaMM2", "A"] -> "What are the lesion area in mm² and the mean A* inside the lesion?"."""
    atts = attributes.resolve(names)
    if not atts:
        raise ValueError("multi_question needs at least one attribute name")
    if len({a.name for a in atts}) != len(atts):
        raise ValueError(f"multi_question: repeated attribute in {[a.name for a in atts]}")
    parts = [_phrase(a) for a in atts]
    if len(parts) == 1:
        return f"What is {parts[0]}?"
    return f"What are {', '.join(parts[:-1])} and {parts[-1]}?"


# ----------------------------------------------------------------------------------- the model
def _core(model):
    """The `Qwen2VLModel` (vision tower + language model, no LM head) inside `model`, which may be
    a Qwen2VLForConditionalGeneration, a peft wrapper of one, or a DDP-wrapped one."""
    m = getattr(model, "module", model)
    m = m.get_base_model() if hasattr(m, "get_base_model") else m
    core = getattr(m, "model", None)
    if core is None or not hasattr(core, "get_rope_index"):
        raise TypeError(f"{type(model).__name__}: expected a Qwen2VLForConditionalGeneration (or a peft/DDP "
                        "wrapper of one); found no Qwen2VLModel with get_rope_index under it")
    return core


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _evaluating(model):
    """eval() + inference_mode for the block; the caller's train/eval state comes back after."""
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was)


# --------------------------------------------------------------------------------- the prompts
class Layout(NamedTuple):
    prefix: list[int]  # [system, user-turn start, <|vision_start|>, image pads, <|vision_end|>]
    suffixes: list[list[int]]  # per question: question text ... '<|im_start|>assistant\n'


class Prompts:
    """The prompts' token layout for one question set, cached per image-token count.

    Built from `inputs.build_batch` itself (so the fast path sees exactly the tokens the model gets
    at prediction time) and cut after <|vision_end|>; checked, not assumed, that every question's
    prompt and the image-only prompt share that prefix."""

    def __init__(self, tokenizer, image_processor, questions: Sequence[str], system: str | None = SYSTEM_PROMPT):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.questions, self.system = list(questions), system
        self._cache: dict[int, Layout] = {}
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.end_id = tokenizer.convert_tokens_to_ids(VISION_END)
        if self.end_id is None or self.end_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {VISION_END} token; is it a Qwen2-VL tokenizer?")

    def layout(self, enc: EncodedImage) -> Layout:
        merge = self.image_processor.merge_size
        n_img = enc.n_tokens(merge)
        if n_img not in self._cache:
            # Only the token ids matter here: an image stand-in with the real grid and no pixels.
            stand_in = EncodedImage(enc.pixel_values[:0], enc.grid_thw)
            qs = self.questions + [IMAGE_ONLY_QUESTION]
            batch = build_batch(self.tokenizer, self.image_processor, [stand_in] * len(qs), qs, system=self.system)
            rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
            cut = prefix_length(rows[-1], self.image_id, self.end_id)
            prefix = rows[-1][:cut]
            for q, row in zip(qs, rows):
                if row[:cut] != prefix:
                    raise ValueError(f"question {q!r}: its prompt does not start with the image prompt's "
                                     f"[system, image, {VISION_END}] tokens; cannot share the prefix")
            self._cache[n_img] = Layout(prefix, [row[cut:] for row in rows[:-1]])
        return self._cache[n_img]


# ------------------------------------------------------------------------------------ fast path
def _suffix_positions(prefix_len: int, suffix_len: int, deltas: torch.Tensor, repeats: int) -> torch.Tensor:
    """3-D M-RoPE positions of the suffix tokens: text continues from the prefix, i.e. index +
    rope_delta of the row's image (the rule of the model's own cached decoding). (3, rows, S)."""
    k = torch.arange(prefix_len, prefix_len + suffix_len, device=deltas.device)
    text = k[None, :] + deltas.reshape(-1, 1).repeat_interleave(repeats, dim=0)
    return text[None].expand(3, -1, -1)


def _embed_group(core, layout: Layout, encs: list[EncodedImage], want_image: bool, image_id: int, pad_id: int,
                 device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """h_im (G, d) and h_im,a (G, Q, d) of G images with the same image-token count."""
    G, P, Q = len(encs), len(layout.prefix), len(layout.suffixes)
    ids = torch.tensor(layout.prefix, device=device).repeat(G, 1)
    mm = (ids == image_id).long()
    mask = torch.ones_like(ids)
    grid = torch.stack([e.grid_thw for e in encs]).to(device)
    pos, deltas = core.get_rope_index(ids, mm, image_grid_thw=grid, attention_mask=mask)
    out = core(input_ids=ids, attention_mask=mask, position_ids=pos, mm_token_type_ids=mm, image_grid_thw=grid,
               pixel_values=torch.cat([e.pixel_values for e in encs]).to(device), use_cache=Q > 0)
    h = out.last_hidden_state
    h_im = None
    if want_image:
        w = mm.to(h.dtype)[..., None]
        h_im = (h * w).sum(1) / w.sum(1)
    if Q == 0:
        return h_im, None
    lens = torch.tensor([len(s) for s in layout.suffixes], device=device)
    S = int(lens.max())
    suffix = torch.full((Q, S), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((Q, S), dtype=torch.long, device=device)
    for q, s in enumerate(layout.suffixes):  # right padding: a row's pads come after its last token
        suffix[q, :len(s)] = torch.tensor(s, device=device)
        real[q, :len(s)] = 1
    cache = out.past_key_values
    cache.batch_repeat_interleave(Q)  # row g*Q + q: image g, question q
    attention = torch.cat([torch.ones((G * Q, P), dtype=torch.long, device=device), real.repeat(G, 1)], dim=1)
    out2 = core(input_ids=suffix.repeat(G, 1), attention_mask=attention, past_key_values=cache, use_cache=True,
                position_ids=_suffix_positions(P, S, deltas, Q))
    last = (lens - 1).repeat(G)
    h_q = out2.last_hidden_state[torch.arange(G * Q, device=device), last]
    return h_im, h_q.reshape(G, Q, -1)


def _group_by_tokens(encs: Sequence[EncodedImage], merge: int) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(encs):
        groups.setdefault(e.n_tokens(merge), []).append(i)
    return groups


def embed(model, tokenizer, image_processor, images: Sequence, questions: Sequence[str] | None = None,
          image: bool = True, batch_size: int = 8, prompts: Prompts | None = None) -> dict[str, torch.Tensor]:
    """Fast, exact embeddings: one prefix pass per image (batched by image-token count), then all
    questions from its KV cache.

    images: PIL images, HxWx3 arrays or `EncodedImage`s. questions: None = the 16 attribute
    questions; [] = none. batch_size: images per prefix batch (the suffix batch is batch_size x Q).
    Returns float32 CPU tensors: "image" (n, d) h_im if `image`, "image_text" (n, Q, d) h_im,a (Q
    in the order of `questions`) if there are questions.
    """
    qs = attribute_questions() if questions is None else list(questions)
    prompts = prompts or Prompts(tokenizer, image_processor, qs)
    if prompts.questions != qs:
        raise ValueError("embed: `prompts` was built for other questions than `questions`")
    encs = encode_images(image_processor, images)
    core, device = _core(model), _device(model)
    him: list = [None] * len(encs)
    hq: list = [None] * len(encs)
    with _evaluating(model):
        for n_img, idx in _group_by_tokens(encs, image_processor.merge_size).items():
            for s in range(0, len(idx), batch_size):
                chunk = idx[s:s + batch_size]
                layout = prompts.layout(encs[chunk[0]])
                a, b = _embed_group(core, layout, [encs[i] for i in chunk], image, prompts.image_id,
                                    tokenizer.pad_token_id, device)
                for j, i in enumerate(chunk):
                    him[i] = None if a is None else a[j].float().cpu()
                    hq[i] = None if b is None else b[j].float().cpu()
    out = {}
    if image:
        out["image"] = torch.stack(him) if encs else torch.empty(0)
    if qs:
        out["image_text"] = torch.stack(hq) if encs else torch.empty(0)
    return out


# ------------------------------------------------------------------------------------ slow path
def embed_slow(model, tokenizer, image_processor, images: Sequence, questions: Sequence[str] | None = None,
               image: bool = True, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """The reference: every prompt is a full forward of the full model (vision pass included) on
    `build_batch`'s left-padded rows; h_im,a = `hidden_states[-1]` at position -1, h_im = the mean
    over the image-only prompt's image tokens. Same returns as `embed`; ~17x the vision work."""
    qs = attribute_questions() if questions is None else list(questions)
    encs = encode_images(image_processor, images)
    device = _device(model)

    def last_layer(imgs, texts):
        batch = {k: v.to(device) for k, v in build_batch(tokenizer, image_processor, imgs, texts).items()}
        out = model(**batch, output_hidden_states=True, logits_to_keep=1, use_cache=False)
        return out.hidden_states[-1], batch

    out = {}
    with _evaluating(model):
        if qs:
            rows = [(i, q) for i in range(len(encs)) for q in qs]  # image-major
            hs = []
            for s in range(0, len(rows), batch_size):
                chunk = rows[s:s + batch_size]
                h, _ = last_layer([encs[i] for i, _ in chunk], [q for _, q in chunk])
                hs.append(h[:, -1].float().cpu())
            out["image_text"] = torch.cat(hs).reshape(len(encs), len(qs), -1)
        if image:
            hs = []
            for s in range(0, len(encs), batch_size):
                chunk = encs[s:s + batch_size]
                h, batch = last_layer(chunk, [IMAGE_ONLY_QUESTION] * len(chunk))
                w = batch["mm_token_type_ids"].to(h.dtype)[..., None]
                hs.append(((h * w).sum(1) / w.sum(1)).float().cpu())
            out["image"] = torch.cat(hs)
    return out


# ---------------------------------------------------------------------- sharded, resumable jobs
def process_shards(n_shards: int, process_index: int = 0, num_processes: int = 1) -> list[int]:
    """The shards one process writes under `accelerate launch`: i, i+P, i+2P, ..."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} outside [0, {num_processes})")
    return list(range(process_index, n_shards, num_processes))


def _shard_path(out: Path, s: int) -> Path:
    return out / f"shard-{s:05d}.safetensors"


def _fetch(get: Callable, isic_id: str):
    try:
        return get(isic_id)
    except Exception as e:
        e.add_note(f"while reading image {isic_id!r} for embedding")
        raise


def _spans(spec: dict) -> list[int]:
    """Images per shard of a job (the last may be short)."""
    n, size = spec["n_ids"], spec["shard_size"]
    return [min(size, n - s) for s in range(0, n, size)]


def extract(model, tokenizer, image_processor, images: Mapping | Callable, ids: Sequence[str], out_dir,
            names=None, kinds: Sequence[str] = KINDS, shard_size: int = 256, batch_size: int = 8,
            model_key: str = "", accelerator=None, progress: bool = True,
            questions: Mapping[str, str] | None = None) -> Path:
    """Embed `ids` into `out_dir` in shards of `shard_size` images; resumable; bounded memory.

    images: isic_id -> image (PIL, array or EncodedImage): a mapping (e.g. `qa.ImageCache`) or a
        callable. kinds: "image" (h_im, (n, d)) and/or "image_text" (h_im,a, (n, Q, d), Q = len(names)).
    questions: other questions than the attributes' ({label: question}, e.g. method (f)'s one
        multi-attribute question); their labels stand where `names` would (`StoredEmbeddings.names`).
    Each shard is one safetensors file, float16 arrays keyed by kind, with the shard's ids and the
    job id in its header, written under `resumable.partial_path` and committed with its seal (job,
    bytes, sha256, rows). The job (hash of ids, names + their questions, kinds, shard size,
    `model_key`, and the weights' `resumable.model_fingerprint`) is a `resumable.Stamp` (job.json):
    shards of another job are deleted, never mixed in. A rerun skips the shards that pass
    `resumable.check`; one that does not (cut, altered, unsealed, another job's) is named and
    recomputed. Only one shard's embeddings are held at a time.
    accelerator: an `accelerate.Accelerator` (or anything with process_index, num_processes,
    wait_for_everyone): process i writes shards i, i+P, ...; the main process owns the stamp.
    """
    from safetensors.numpy import save_file
    from tqdm.auto import tqdm

    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        dup = next(i for k, i in enumerate(ids) if i in ids[:k])
        raise ValueError(f"ids contain {dup!r} more than once; every image is embedded once")
    kinds = tuple(kinds)
    if not kinds or set(kinds) - set(KINDS) or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds {kinds!r}: choose one or both of {KINDS}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size ({shard_size}) and batch_size ({batch_size}) must be >= 1")
    if questions is not None:
        if names is not None or "image_text" not in kinds or not questions:
            raise ValueError("extract: `questions` (label -> question) replaces `names`, needs kind 'image_text' "
                             "and at least one question")
        atts, qs = [str(k) for k in questions], [str(v) for v in questions.values()]
    else:
        atts = [a.name for a in attributes.resolve(names)]
        qs = attribute_questions(atts) if "image_text" in kinds else []
    out = Path(out_dir)
    n_shards = -(-len(ids) // shard_size)
    spec = {"format": FORMAT, "ids": hashlib.sha256("\n".join(ids).encode()).hexdigest(), "n_ids": len(ids),
            "n_shards": n_shards, "names": atts, "questions": qs, "system": SYSTEM_PROMPT, "kinds": list(kinds),
            "shard_size": shard_size, "model_key": str(model_key), "weights": resumable.model_fingerprint(model)}
    stamp = resumable.Stamp(out, spec, STAMP)
    index, num = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if index == 0:
        stamp.begin([SHARDS])
    if accelerator is not None:
        accelerator.wait_for_everyone()
        current = stamp.current()
        if current != stamp.key:
            raise RuntimeError(f"process {index}: {stamp.path} holds job {current}, this process computes job "
                               f"{stamp.key}; all processes must get the same ids, names, kinds and model")
    job = stamp.key

    mine = process_shards(n_shards, index, num)
    span = lambda s: ids[s * shard_size:(s + 1) * shard_size]
    todo = []
    for s in mine:
        path = _shard_path(out, s)
        problem = resumable.check(path, job, rows=len(span(s)))
        if problem is None:
            continue
        if path.exists():  # cut, altered, unsealed or another job's: never reused
            print(f"embed: recomputing a shard: {problem}")
        resumable.remove(path)
        todo.append(s)
    get = images.__getitem__ if hasattr(images, "__getitem__") else images
    if not callable(get):
        raise TypeError(f"images must be a mapping or a callable isic_id -> image, not {type(images).__name__}")
    prompts = Prompts(tokenizer, image_processor, qs)
    total = sum(len(span(s)) for s in mine)
    bar = tqdm(total=total, initial=total - sum(len(span(s)) for s in todo), desc="embed", unit="img",
               disable=not progress)
    try:
        for s in todo:
            shard_ids = span(s)
            parts: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
            for b in range(0, len(shard_ids), batch_size):
                batch_ids = shard_ids[b:b + batch_size]
                got = embed(model, tokenizer, image_processor, [_fetch(get, i) for i in batch_ids], qs,
                            image="image" in kinds, batch_size=batch_size, prompts=prompts)
                for k in kinds:
                    parts[k].append(got[k].numpy())
                bar.update(len(batch_ids))
            arrays = {}
            for k in kinds:
                full = np.concatenate(parts[k])
                half = full.astype(np.float16)
                bad = ~np.isfinite(half).reshape(len(half), -1).all(1)
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    raise OverflowError(f"{k} embedding of {shard_ids[i]!r} does not fit float16 "
                                        f"(max |value| {np.abs(full[i]).max():.4g})")
                arrays[k] = half
            path = _shard_path(out, s)
            save_file(arrays, str(resumable.partial_path(path)), metadata={"job": job, "ids": json.dumps(shard_ids)})
            resumable.commit(path, job, rows=len(shard_ids))
    finally:
        bar.close()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return out


def load_embeddings(out_dir, dtype=np.float16) -> tuple[list[str], dict[str, np.ndarray]]:
    """(ids, kind -> array) of a finished `extract` job, shards in id order. Every shard must be
    there, sealed for the stamped job, whole and unaltered (`resumable.check`); otherwise the error
    names the shards and what is wrong with them (nothing is half-read).

    Each kind is read shard by shard into one preallocated array of `dtype`: the peak is that
    array plus one shard, not the shards, their concatenation and a converted copy. At the paper's
    size a whole image+text array is still 16 attributes wide; `open_embeddings` reads one
    attribute at a time."""
    stored = open_embeddings(out_dir)
    return list(stored.ids), {k: stored.read(k, dtype=dtype) for k in stored.kinds}


class StoredEmbeddings:
    """A finished `extract` job, checked once when opened, read in pieces from its float16 shards.

    `read(kind)` gives a whole kind; `read("image_text", attribute=j)` (or `attribute(j)`) gives the
    (n, d) vectors of attribute j, sliced out of each shard by safetensors (memory-mapped, only
    that attribute's rows copied), so the caller holds 1/Q of the image+text array at a time;
    `read(kind, ids=...)` gives only some images' rows (a query's, a few candidates'), and
    reading "image" never touches the image+text block of a shard."""

    def __init__(self, folder: Path, spec: dict, rows: list[int]):
        from safetensors import safe_open

        self.folder, self.spec, self.rows = folder, spec, rows
        self.kinds = tuple(spec["kinds"])
        self.names = list(spec["names"]) if "image_text" in self.kinds else []
        ids: list[str] = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        for s, n in enumerate(rows):
            path = _shard_path(folder, s)
            with safe_open(str(path), framework="np") as f:
                got = json.loads((f.metadata() or {})["ids"])
                if len(got) != n:  # sealed, so only a writer's bug could get here
                    raise ValueError(f"{path}: {len(got)} ids, the job gives it {n}")
                for k in self.kinds:
                    shape = tuple(f.get_slice(k).get_shape())
                    if shape[0] != n or self._shapes.setdefault(k, shape[1:]) != shape[1:]:
                        raise ValueError(f"{path}: {k} has shape {shape}, expected ({n}, *{self._shapes[k]})")
            ids += got
        self.ids = ids
        self.n = len(ids)

    def shape(self, kind: str, attribute: int | None = None) -> tuple[int, ...]:
        inner = self._shapes[kind]
        return (self.n, *(inner if attribute is None else inner[1:]))

    def position(self, ids) -> np.ndarray:
        """Positions in `ids` order of these images; one this job does not hold is named."""
        if not hasattr(self, "_pos"):
            self._pos = {i: n for n, i in enumerate(self.ids)}
        ids = [str(i) for i in ids]
        lacking = [i for i in ids if i not in self._pos]
        if lacking:
            raise KeyError(f"{self.folder}: no vectors for {len(lacking)} image(s), e.g. {lacking[:3]}")
        return np.fromiter((self._pos[i] for i in ids), dtype=np.int64, count=len(ids))

    def read(self, kind: str, attribute: int | None = None, dtype=np.float16, ids=None) -> np.ndarray:
        """All n rows of `kind` (or of one image+text attribute, by position in `names`) as one
        array of `dtype`, filled shard by shard; with `ids`, only those images' rows, in that
        order (only the shards that hold them are opened, and in each only the span they lie in
        is copied). Either way the peak is the result plus one shard's span."""
        from safetensors import safe_open

        if kind not in self.kinds:
            raise KeyError(f"{self.folder}: no {kind!r} vectors (this job stored {list(self.kinds)})")
        if attribute is not None:
            if kind != "image_text":
                raise ValueError(f"{kind!r} vectors have no attribute axis")
            if not 0 <= attribute < len(self.names):
                raise IndexError(f"attribute {attribute} outside the job's {len(self.names)} attributes")
        pick = (lambda part, lo, hi: part[lo:hi]) if attribute is None else \
            (lambda part, lo, hi: part[lo:hi, attribute])
        if ids is None:
            out = np.empty(self.shape(kind, attribute), dtype=dtype)
            at = 0
            for s, n in enumerate(self.rows):
                with safe_open(str(_shard_path(self.folder, s)), framework="np") as f:
                    out[at:at + n] = pick(f.get_slice(kind), 0, n)
                at += n
            return out
        want = self.position(ids)
        out = np.empty((len(want), *self.shape(kind, attribute)[1:]), dtype=dtype)
        order = np.argsort(want, kind="stable")
        starts = np.cumsum([0, *self.rows])
        cuts = np.searchsorted(want[order], starts)
        for s in np.flatnonzero(np.diff(cuts)):   # the shards holding a wanted row
            dest = order[cuts[s]:cuts[s + 1]]
            local = want[dest] - starts[s]
            lo, hi = int(local.min()), int(local.max()) + 1
            with safe_open(str(_shard_path(self.folder, int(s))), framework="np") as f:
                out[dest] = pick(f.get_slice(kind), lo, hi)[local - lo]
        return out

    def attribute(self, j: int, dtype=np.float16, ids=None) -> np.ndarray:
        """h_im,a of attribute j (position in `names`) for every image, (n, d), or for `ids`."""
        return self.read("image_text", attribute=j, dtype=dtype, ids=ids)


def open_embeddings(out_dir) -> StoredEmbeddings:
    """A finished `extract` job for reading in pieces (`StoredEmbeddings`). Every shard must be
    there, sealed for the stamped job, whole and unaltered (`resumable.check`); otherwise the error
    names the shards and what is wrong with them."""
    out = Path(out_dir)
    spec = resumable.read_json(out / STAMP)
    if spec is None or "job" not in spec:
        raise FileNotFoundError(f"{out} has no readable {STAMP}: not an extract() output folder")
    if spec.get("format") != FORMAT:
        raise ValueError(f"{out / STAMP}: format {spec.get('format')}, this code reads {FORMAT}; "
                         "run extract() again")
    job, n = spec["job"], spec["n_shards"]
    rows = _spans(spec)
    missing = [s for s in range(n) if not _shard_path(out, s).exists()]
    if missing:
        raise FileNotFoundError(f"{out}: {len(missing)} of {n} shards missing (first: {missing[:5]}); "
                                "run extract() again to finish the job")
    damaged = [p for p in (resumable.check(_shard_path(out, s), job, rows=rows[s]) for s in range(n)) if p]
    if damaged:
        raise resumable.Damaged(f"{out}: {len(damaged)} of {n} shards cannot be used; run extract() again to "
                                "redo them. " + "; ".join(damaged[:3]))
    return StoredEmbeddings(out, spec, rows)
