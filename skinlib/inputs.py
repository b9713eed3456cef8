"""The one place that turns (images, questions, optional answers) into Qwen2-VL model inputs.

Both profiles go through `build_batch`: the tiny embedded default and the real Qwen2-VL. The text is
Qwen2-VL's chat template (system prompt, then the image and the question as the user turn, the
answer as the assistant turn); each image's single <|image_pad|> is expanded to one token per
merged patch, exactly as `Qwen2VLProcessor` does (grid_thw.prod() // merge_size**2). Sequences are
padded on the LEFT, so the last position is the last real token of every row (generation and the
last-token embedding h_im,a). `labels` are -100 everywhere except the answer tokens and the
<|im_end|> that closes each answer: the loss is on the answers only.

Several (question, answer) tuples can share one image in one sequence (packing): pass
`questions[i]` and `answers[i]` as lists. A packed row is NOT a multi-turn chat: it is the shared
prefix [system, user-turn start, <|vision_start|>, image tokens, <|vision_end|>] followed by each
tuple's own single-tuple continuation (question, generation prompt, answer, <|im_end|>), and every
continuation sees the prefix and itself only, at the positions it has in its own single-tuple row.
So each tuple is trained exactly as the paper's one-tuple sequence (the one the model is asked at
prediction time), and the image is encoded once. (A multi-turn chat would let the 2nd..W-th answers
read the earlier answers of correlated attributes, a crutch that no prediction prompt offers.)
Packed batches therefore carry their own `position_ids` (Qwen2-VL's 3-D M-RoPE, `mrope_positions`)
and a 4-D boolean `attention_mask` (rows, 1, L, L), which SDPA reads as it should
(`check_packed_attention` says so where the model would not).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

SYSTEM_PROMPT = ("You are a dermatology assistant. You look at a skin lesion image and answer each "
                 "question with a number only.")
IGNORE_INDEX = -100
IMAGE_TOKEN = "<|image_pad|>"
VISION_END = "<|vision_end|>"
END_TOKEN = "<|im_end|>"
# How packed rows are laid out; part of the fine-tuning recipe, so that a model trained on another
# layout (before: one multi-turn chat per image) is not reused.
PACKING = "prefix-shared"


class EncodedImage(NamedTuple):
    """One image after the image processor: its patches and its (t, h, w) patch grid."""
    pixel_values: torch.Tensor  # (t*h*w, channels * temporal_patch * patch**2)
    grid_thw: torch.Tensor  # (3,) long

    def n_tokens(self, merge_size: int) -> int:
        """How many <|image_pad|> tokens the image takes (the Qwen2VLProcessor rule)."""
        return int(self.grid_thw.prod()) // merge_size ** 2


def encode_images(image_processor, images: Sequence) -> list[EncodedImage]:
    """Run the image processor once per image (PIL images or HxWx3 uint8 arrays).

    Pre-encode a data set once with this and pass the results to `build_batch` to skip the PIL
    work in every training step."""
    out = []
    for i, im in enumerate(images):
        if isinstance(im, EncodedImage):
            out.append(im)
            continue
        if isinstance(im, np.ndarray) and (im.ndim != 3 or im.shape[-1] != 3):
            raise ValueError(f"image {i}: expected an HxWx3 array, got shape {im.shape}")
        enc = image_processor(images=[im], return_tensors="pt")
        out.append(EncodedImage(enc["pixel_values"], enc["image_grid_thw"][0].long()))
    return out


def _turns(questions, answers, n: int) -> tuple[list[list[str]], list[list[str]] | None]:
    """Normalise to one list of questions (and answers) per image; check the shapes."""
    if len(questions) != n:
        raise ValueError(f"{len(questions)} questions for {n} images; give one question (or one list) per image")
    qs = [[q] if isinstance(q, str) else list(q) for q in questions]
    if answers is None:
        for i, q in enumerate(qs):
            if len(q) != 1:
                raise ValueError(f"image {i}: {len(q)} questions but no answers; a prompt without answers "
                                 "takes one question (packing needs the answers)")
        return qs, None
    if len(answers) != n:
        raise ValueError(f"{len(answers)} answers for {n} images; give one answer (or one list) per image")
    ans = [[a] if isinstance(a, str) else list(a) for a in answers]
    for i, (q, a) in enumerate(zip(qs, ans)):
        if len(q) != len(a) or not q:
            raise ValueError(f"image {i}: {len(q)} questions but {len(a)} answers")
        for s in a:
            if not isinstance(s, str):
                raise TypeError(f"image {i}: answers must be text (use Attribute.format_answer), got {s!r}")
    return qs, ans


def messages(questions: Sequence[str], answers: Sequence[str] | None = None,
             system: str | None = SYSTEM_PROMPT) -> list[dict]:
    """The chat for one image: the image goes with the first question."""
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for k, q in enumerate(questions):
        content = ([{"type": "image"}] if k == 0 else []) + [{"type": "text", "text": q}]
        msgs.append({"role": "user", "content": content})
        if answers is not None:
            msgs.append({"role": "assistant", "content": answers[k]})
    return msgs


def _segments(tokenizer, msgs: list[dict], n_answers: int, add_generation_prompt: bool) -> list[tuple[str, bool]]:
    """The chat text cut into (piece, is_answer) pieces. Rendering the chat up to each answer with
    add_generation_prompt=True gives the text before that answer; the answer piece is the answer
    text plus its closing <|im_end|>."""
    render = lambda m, gen: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)
    full = render(msgs, add_generation_prompt and n_answers == 0)
    pieces, at = [], 0
    assistant_idx = [j for j, m in enumerate(msgs) if m["role"] == "assistant"]
    for j in assistant_idx:
        before = render(msgs[:j], True)
        answer = msgs[j]["content"] + END_TOKEN
        if not full.startswith(before) or full[len(before):len(before) + len(answer)] != answer:
            raise ValueError("chat template does not render an answer as '<|im_start|>assistant\\n' + answer + "
                             f"'{END_TOKEN}' (template of {type(tokenizer).__name__}); cannot place the labels")
        pieces.append((full[at:len(before)], False))
        pieces.append((answer, True))
        at = len(before) + len(answer)
    rest = full[at:]
    if n_answers and rest == "\n":
        rest = ""  # a training row ends with the last answer's <|im_end|>, as generation does
    pieces.append((rest, False))
    return [(p, lab) for p, lab in pieces if p]


def _row(tokenizer, msgs: list[dict], n_answers: int, add_generation_prompt: bool, n_img: int,
         image_id: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of one chat (the image placeholder expanded to `n_img` pads)."""
    pieces = _segments(tokenizer, msgs, n_answers, add_generation_prompt)
    ids, labels = [], []
    for text, is_answer in pieces:
        # Expand the image placeholder as Qwen2VLProcessor does (one pad per merged patch).
        text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * n_img)
        piece_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece_ids
        labels += piece_ids if is_answer else [IGNORE_INDEX] * len(piece_ids)
    # Cutting the text into pieces must not change its tokens (pieces end at special tokens or
    # right after '\n', where Qwen2's pre-tokeniser splits anyway); checked, not assumed.
    whole = tokenizer("".join(t for t, _ in pieces).replace(IMAGE_TOKEN, IMAGE_TOKEN * n_img),
                      add_special_tokens=False)["input_ids"]
    if whole != ids:
        raise ValueError("tokenising the chat piecewise differs from tokenising it whole; an answer or "
                         "question merges with the chat markup around it")
    if ids.count(image_id) != n_img:
        raise ValueError(f"row has {ids.count(image_id)} {IMAGE_TOKEN} tokens, image needs {n_img}; "
                         "a question or answer must not contain image tokens")
    return ids, labels


def prefix_length(ids: Sequence[int], image_id: int, end_id: int) -> int:
    """Tokens of a row's image prefix [system, user-turn start, <|vision_start|>, image tokens,
    <|vision_end|>]: what every question about that image shares."""
    return list(ids).index(end_id, list(ids).index(image_id)) + 1


def mrope_positions(ids: Sequence[int], image_id: int, grid_thw, merge: int) -> torch.Tensor:
    """Qwen2-VL's 3-D M-RoPE positions (3, len(ids)) of one row holding one image: text counts up
    by one in all three; the image's tokens sit at start + (t, row, column) of the merged grid; the
    text after it resumes at start + max(rows, columns). The model's `get_rope_index` rule for a
    still image (t = 1), written out so that packed rows can be given positions before any model
    is at hand; tests hold the two equal."""
    t, h, w = (int(x) for x in grid_thw)
    h, w = h // merge, w // merge
    if t != 1:
        raise ValueError(f"mrope_positions: a still image has a temporal grid of 1, got grid {tuple(grid_thw.tolist())}")
    at = [i for i, x in enumerate(ids) if x == image_id]
    if not at or at != list(range(at[0], at[0] + h * w)):
        raise ValueError(f"mrope_positions: row must hold one image of {h * w} consecutive {IMAGE_TOKEN} tokens")
    a, n = at[0], len(ids)
    pos = torch.empty((3, n), dtype=torch.long)
    pos[:, :a] = torch.arange(a)
    pos[0, a:a + h * w] = a
    pos[1, a:a + h * w] = a + torch.arange(h).repeat_interleave(w)
    pos[2, a:a + h * w] = a + torch.arange(w).repeat(h)
    pos[:, a + h * w:] = a + max(h, w) + torch.arange(n - a - h * w)
    return pos


def build_batch(tokenizer, image_processor, images: Sequence, questions: Sequence, answers: Sequence | None = None,
                add_generation_prompt: bool = True, system: str | None = SYSTEM_PROMPT,
                merge_size: int | None = None) -> dict[str, torch.Tensor]:
    """Model inputs for one image per row.

    images: PIL images, HxWx3 arrays, or `EncodedImage`s from `encode_images`.
    questions: per image a question, or a list of questions (packing; needs `answers`).
    answers: None for prompts (ends with '<|im_start|>assistant\\n' if add_generation_prompt), else
        per image an answer text or a list of them; labels then cover every answer + its <|im_end|>,
        and a tuple ends with its <|im_end|> (the template's trailing newline is dropped).
    Returns input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw, and labels
    when answers are given; all left-padded with the tokenizer's pad token. When any row packs
    several tuples (see the module doc), also position_ids (3, rows, L), and attention_mask is the
    4-D boolean (rows, 1, L, L) mask of which token sees which.
    """
    encoded = encode_images(image_processor, images)
    qs, ans = _turns(questions, answers, len(encoded))
    merge = merge_size or getattr(image_processor, "merge_size", None)
    if not merge:
        raise ValueError(f"{type(image_processor).__name__} has no merge_size; pass merge_size=")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id is None or image_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {IMAGE_TOKEN} token; is it a Qwen2-VL tokenizer?")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token (Qwen2-VL uses <|endoftext|>)")
    packed = ans is not None and any(len(a) > 1 for a in ans)
    end_id = tokenizer.convert_tokens_to_ids(VISION_END)

    rows_ids, rows_labels, rows_seg, rows_pos = [], [], [], []
    for enc, q, a in zip(encoded, qs, ans if ans is not None else [None] * len(qs)):
        n_img = enc.n_tokens(merge)
        if not packed:
            ids, labels = _row(tokenizer, messages(q, a, system), 0 if a is None else len(a),
                               add_generation_prompt, n_img, image_id)
            rows_ids.append(ids)
            rows_labels.append(labels)
            continue
        # Packed: each tuple's own single-tuple row, cut after <|vision_end|>; the rows must share
        # that prefix (they do: the question comes after the image), checked, not assumed.
        ids, labels, seg, pos = [], [], [], []
        for k, (qk, ak) in enumerate(zip(q, a)):
            one, lab = _row(tokenizer, messages([qk], [ak], system), 1, add_generation_prompt, n_img, image_id)
            cut = prefix_length(one, image_id, end_id)
            p = mrope_positions(one, image_id, enc.grid_thw, merge)
            if k == 0:
                prefix = one[:cut]
                ids, labels, seg, pos = list(prefix), lab[:cut], [0] * cut, [p[:, :cut]]
            elif one[:cut] != prefix:
                raise ValueError(f"question {qk!r}: its row does not start with the shared [system, image, "
                                 f"{VISION_END}] prefix; cannot pack it")
            ids += one[cut:]
            labels += lab[cut:]
            seg += [k + 1] * (len(one) - cut)
            pos.append(p[:, cut:])
        rows_ids.append(ids)
        rows_labels.append(labels)
        rows_seg.append(seg)
        rows_pos.append(torch.cat(pos, dim=1))

    width = max(map(len, rows_ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows_ids), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows_ids), width), dtype=torch.long)
    labels = torch.full((len(rows_ids), width), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, lab) in enumerate(zip(rows_ids, rows_labels)):  # left padding
        input_ids[r, width - len(ids):] = torch.tensor(ids)
        attention[r, width - len(ids):] = 1
        labels[r, width - len(ids):] = torch.tensor(lab)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention,
        # text 0, image 1: the model needs it with image_grid_thw for its 3-D (M-RoPE) positions.
        "mm_token_type_ids": (input_ids == image_id).long() * attention,
        "pixel_values": torch.cat([e.pixel_values for e in encoded]),
        "image_grid_thw": torch.stack([e.grid_thw for e in encoded]),
    }
    if packed:
        seg = torch.full((len(rows_ids), width), -1, dtype=torch.long)   # -1: padding
        positions = torch.zeros((3, len(rows_ids), width), dtype=torch.long)
        for r, (s, p) in enumerate(zip(rows_seg, rows_pos)):
            seg[r, width - len(s):] = torch.tensor(s)
            positions[:, r, width - len(s):] = p
        key, query = seg[:, None, :], seg[:, :, None]
        sees = (key >= 0) & ((key == 0) | (key == query))      # the prefix, or its own tuple
        sees &= torch.ones((width, width), dtype=torch.bool).tril()     # causal
        sees |= torch.eye(width, dtype=torch.bool)   # a pad sees itself: no row of the softmax is empty
        batch["attention_mask"] = sees[:, None]
        batch["position_ids"] = positions
    if ans is not None:
        batch["labels"] = labels
    return batch


def check_packed_attention(model) -> None:
    """Packed rows carry a 4-D boolean mask, which SDPA reads as 'may attend'; eager attention would
    add it as numbers and FlashAttention-2 takes no 4-D mask. A clear error instead of a silent one."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl not in (None, "sdpa"):
        raise ValueError(f"packed training needs attn_implementation 'sdpa' (the model uses {impl!r}); "
                         "set train.packed: false or model.attn_implementation: sdpa")
