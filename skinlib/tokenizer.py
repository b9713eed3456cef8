"""A small offline tokenizer for the embedded default: Qwen2's rules, the project's own vocabulary.

The real Qwen2-VL tokenizer has 151k tokens; on a tiny CPU model that makes the output layer the
largest cost. This one keeps everything that matters for the answers and the inputs:

* byte-level BPE (any text encodes; nothing is ever <unk>),
* Qwen2's pre-tokenisation regex, so digits are split one by one ("12.5" -> "1", "2", ".", "5"),
* Qwen2-VL's special tokens in Qwen2-VL's order, eos <|im_end|>, pad <|endoftext|>, left padding,
* Qwen2-VL's chat template verbatim,

and learns its merges from the project's own text (the registry's questions, the system prompt,
answers written with each attribute's `format_answer`, the chat-template pieces). The training is
deterministic: the corpus is fixed, and the vocabulary is rebuilt in a canonical order from the
learned merges (see `_canonical`).
"""
from __future__ import annotations

import functools
import json

import numpy as np

# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2 / Qwen2-VL): `\p{N}` alone -> one digit per piece.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2-VL's added tokens in id order (151643 ... 151656 in the real vocabulary).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Qwen2-VL-7B-Instruct's chat template (chat_template.json of the release), verbatim.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

VOCAB_SIZE = 768  # upper bound; the small corpus runs out of merges first (see build_tokenizer)


def corpus(n_answers: int = 200, seed: int = 0) -> list[str]:
    """The training text: registry questions, the system prompt, chat pieces, sample answers."""
    from .attributes import ATTRIBUTES
    from .inputs import SYSTEM_PROMPT  # the one system prompt (inputs.py holds it)

    prose = [SYSTEM_PROMPT, "You are a helpful assistant.", "system", "user", "assistant",
             "Picture 1: ", "Video 1: "]
    for a in ATTRIBUTES:
        prose += [a.question, a.meaning, a.name, a.unit]
    # Twice: the trainer merges only pairs seen at least twice, and a word that occurs once would
    # stay split into single bytes ("d e r m at ol o g y"): long sequences for nothing.
    lines = prose + prose
    rng = np.random.default_rng(seed)
    for a in ATTRIBUTES:
        # Answers over several magnitudes and both signs: digits, '.', '-' all get seen.
        scale = 10.0 ** rng.uniform(-1, 3, size=n_answers)
        values = scale * rng.choice([-1.0, 1.0], size=n_answers)
        lines += [a.format_answer(float(v)) for v in values]
    return [ln for ln in lines if ln]


def _canonical(raw) -> tuple[dict, list]:
    """A vocabulary in a fixed order: the 256 byte symbols in GPT-2 byte order, then one token per
    merge in merge order. The trainer's own ids for equal-count symbols can vary between runs."""
    from tokenizers import pre_tokenizers

    model = json.loads(raw.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_order)
    vocab = {s: i for i, s in enumerate(alphabet)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab, merges


def _byte_order(symbol: str) -> int:
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, others to 256 + k.
    return _BYTE_OF[symbol]


def _bytes_to_unicode() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_OF = _bytes_to_unicode()


def _pipeline(tok) -> None:
    """Qwen2's normaliser, pre-tokeniser and decoder on a `tokenizers.Tokenizer`."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()


@functools.lru_cache(maxsize=1)
def _trained() -> str:
    """The trained `tokenizers` JSON (cached: training takes a fraction of a second, but once is enough)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    _pipeline(raw)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    raw.train_from_iterator(corpus(), trainer=trainer)
    vocab, merges = _canonical(raw)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    _pipeline(tok)
    # Special tokens get the ids right after the vocabulary, in Qwen2-VL's order.
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok.to_str()


def build_tokenizer():
    """The project's tokenizer as a `transformers.PreTrainedTokenizerFast` (same vocab every time)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained()), padding_side="left",
                                   clean_up_tokenization_spaces=False)
    # Set eos/pad only now: passing eos_token to the constructor registers it before the others
    # and shifts the special-token ids away from Qwen2-VL's order.
    fast.eos_token = EOS_TOKEN
    fast.pad_token = PAD_TOKEN
    fast.chat_template = QWEN2VL_CHAT_TEMPLATE
    ids = fast.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if ids != list(range(ids[0], ids[0] + len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special-token ids are not contiguous in Qwen2-VL order: {dict(zip(SPECIAL_TOKENS, ids))}")
    return fast
