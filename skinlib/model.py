"""Qwen2-VL: the tiny random-init default, loading (local folder or hub id), and LoRA in one place.

`build_tiny` writes a folder that loads exactly like a hub checkpoint (config + safetensors weights,
tokenizer, image processor), so the rest of the project only ever calls `load(name_or_path)`.
"""
from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

# The tiny default: ~0.7 M parameters with the small tokenizer.
TINY_SIZES: dict = {
    "vision_depth": 2,
    "vision_embed_dim": 64,
    "vision_heads": 4,
    "hidden_size": 128,  # text hidden size = the merger's output size
    "text_layers": 2,
    "text_heads": 4,
    "text_kv_heads": 2,
    "intermediate_size": 256,
    "mrope_section": [4, 6, 6],  # must sum to head_dim / 2 = hidden_size / text_heads / 2
    "max_position_embeddings": 2048,
}
# Images here are 90-160 px. smart_resize rounds each side to a multiple of 28 and then keeps the
# pixel count within [min_pixels, max_pixels]: with 100² and 128² every square crop of 90-160 px
# becomes 112 x 112 = 8 x 8 patches = 16 image tokens (a 130 px crop: 140² > 128² -> 112²).
# The bounds sit between the 28-multiples on purpose: 112² exactly would let float rounding in
# smart_resize drop a side to 84 or lift it to 140.
MIN_PIXELS = 100 * 100
MAX_PIXELS = 128 * 128

# LoRA targets, one regex (peft full-matches it against module names). Names repeat across the two
# towers (`proj`, `mlp.0`...), and a bare `proj` also wraps the Conv3d patch embedding
# (`visual.patch_embed.proj`), so each tower is spelled out with its path:
#   vision blocks: attn.qkv, attn.proj, mlp.fc1, mlp.fc2; merger: mlp.0, mlp.2 (Linear layers)
#   language model (its decoder layers are `layers.N`, the vision tower's are `blocks.N`):
#   q/k/v/o_proj, gate/up/down_proj.
VISION_TARGETS = (r"(?:.*\.)?visual\.(?:blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:fc1|fc2))"
                  r"|merger\.mlp\.(?:0|2))")
LANGUAGE_TARGETS = (r"(?:.*\.)?layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|o_proj)"
                    r"|mlp\.(?:gate_proj|up_proj|down_proj))")
LORA_TARGETS = f"(?:{VISION_TARGETS})|(?:{LANGUAGE_TARGETS})"


class Loaded(NamedTuple):
    model: torch.nn.Module
    tokenizer: object
    image_processor: object


def _image_processor_class():
    # Without torchvision, transformers falls back to the PIL variant with a warning; pick it directly.
    if importlib.util.find_spec("torchvision") is None:
        from transformers import Qwen2VLImageProcessorPil
        return Qwen2VLImageProcessorPil
    from transformers import Qwen2VLImageProcessor
    return Qwen2VLImageProcessor


def tiny_config(tokenizer, sizes: dict | None = None):
    """A tiny `Qwen2VLConfig`; vocabulary and every special-token id come from `tokenizer`."""
    from transformers import Qwen2VLConfig

    unknown = set(sizes or {}) - set(TINY_SIZES)
    if unknown:
        raise KeyError(f"unknown tiny-model size keys {sorted(unknown)}; known: {', '.join(TINY_SIZES)}")
    s = {**TINY_SIZES, **(sizes or {})}
    head_dim = s["hidden_size"] // s["text_heads"]
    if sum(s["mrope_section"]) * 2 != head_dim:
        raise ValueError(f"mrope_section {s['mrope_section']} must sum to head_dim/2 = {head_dim // 2} "
                         f"(hidden_size {s['hidden_size']} / text_heads {s['text_heads']} / 2)")
    tid = tokenizer.convert_tokens_to_ids
    return Qwen2VLConfig(
        vision_config={
            "depth": s["vision_depth"], "embed_dim": s["vision_embed_dim"], "num_heads": s["vision_heads"],
            "hidden_size": s["hidden_size"], "mlp_ratio": 4, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "in_channels": 3,
        },
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": s["hidden_size"],
            "intermediate_size": s["intermediate_size"], "num_hidden_layers": s["text_layers"],
            "num_attention_heads": s["text_heads"], "num_key_value_heads": s["text_kv_heads"],
            "max_position_embeddings": s["max_position_embeddings"], "max_window_layers": s["text_layers"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(s["mrope_section"])},
            "bos_token_id": tid("<|endoftext|>"), "eos_token_id": tid("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id,
        },
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def build_tiny(out_dir, sizes: dict | None = None, seed: int = 0, min_pixels: int = MIN_PIXELS,
               max_pixels: int = MAX_PIXELS) -> Path:
    """Random-init tiny Qwen2-VL + the project tokenizer + image processor, saved to `out_dir`."""
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    from .tokenizer import build_tokenizer

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer, sizes)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    # As Qwen2-VL-Instruct's generation_config: stop at <|im_end|> (or <|endoftext|>), greedy.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id], do_sample=False)
    image_processor = _image_processor_class()(min_pixels=min_pixels, max_pixels=max_pixels)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors (the default)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    return out


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(name_or_path, dtype=None, device=None, attn_implementation=None,
         min_pixels: int | None = None, max_pixels: int | None = None) -> Loaded:
    """A Qwen2-VL checkpoint: a local folder (e.g. from `build_tiny`) or a hub id such as
    "Qwen/Qwen2-VL-7B-Instruct". Weights only from safetensors, never remote code.

    GPU: bfloat16 and flash_attention_2 when flash-attn is installed, else sdpa. CPU: float32, sdpa.
    `min_pixels`/`max_pixels` override the saved image processor's bounds (the hub default's
    max_pixels is huge; set them for the real model too). The tokenizer pads on the left.
    """
    from transformers import Qwen2VLForConditionalGeneration

    device = torch.device(device or default_device())
    on_gpu = device.type == "cuda"
    if dtype is None:
        dtype = torch.bfloat16 if on_gpu else torch.float32
    elif isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r} (e.g. 'bfloat16', 'float32')")
        dtype = getattr(torch, dtype)
    if attn_implementation is None:
        flash = on_gpu and importlib.util.find_spec("flash_attn") is not None and dtype in (torch.bfloat16, torch.float16)
        attn_implementation = "flash_attention_2" if flash else "sdpa"
    local = Path(name_or_path)
    if local.exists() and not (local / "config.json").exists():
        raise FileNotFoundError(f"{local} has no config.json: not a saved model folder (build one with build_tiny)")

    model = Qwen2VLForConditionalGeneration.from_pretrained(
        str(name_or_path), dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True,
        trust_remote_code=False)
    model.to(device).eval()
    patch_embed_as_linear(model)
    tokenizer, image_processor = load_processors(name_or_path, min_pixels, max_pixels)
    return Loaded(model, tokenizer, image_processor)


def patch_embed_as_linear(model) -> None:
    """Run the vision tower's patch embedding as the matrix product it is, in place.

    Qwen2-VL embeds each flattened patch (channels x 2 frames x 14 x 14 values) with a Conv3d whose
    kernel equals its stride: one output per patch, i.e. a linear map of the flattened patch. On the
    CPU, oneDNN's Conv3d takes several times as long as the same product (bench/patch_embed.py),
    and the embedding runs for every image of every training step and generate call. The weights
    stay the Conv3d's own (saved, loaded and excluded from LoRA as before); only the forward
    changes, to `F.linear` over the same numbers in the same order (float rounding aside)."""
    visual = getattr(getattr(model, "model", model), "visual", None)
    embed = getattr(visual, "patch_embed", None)
    conv = getattr(embed, "proj", None)
    if not isinstance(conv, torch.nn.Conv3d) or tuple(conv.kernel_size) != tuple(conv.stride) \
            or conv.groups != 1 or tuple(conv.padding) != (0, 0, 0):
        return   # another layout: leave it as it is

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        w = conv.weight
        return torch.nn.functional.linear(hidden_states.to(w.dtype).reshape(-1, w[0].numel()),
                                          w.reshape(w.shape[0], -1), conv.bias)

    embed.forward = forward


def load_processors(name_or_path, min_pixels: int | None = None, max_pixels: int | None = None):
    """(tokenizer padding on the left, image processor) of a checkpoint folder or hub id."""
    from transformers import AutoTokenizer

    from .tokenizer import QWEN2VL_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=False)
    tokenizer.padding_side = "left"  # last position = last real token (generation, embeddings)
    if tokenizer.chat_template is None:  # older hub repos keep it only in chat_template.json
        tokenizer.chat_template = QWEN2VL_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    image_processor = _image_processor_class().from_pretrained(str(name_or_path))
    if min_pixels is not None:
        image_processor.size["shortest_edge"] = int(min_pixels)
    if max_pixels is not None:
        image_processor.size["longest_edge"] = int(max_pixels)
    return tokenizer, image_processor


def apply_lora(model, rank: int = 8, alpha: int = 16, dropout: float = 0.05, vision: bool = True,
               language: bool = True):
    """Wrap the model's Linear layers in LoRA adapters (peft); returns the PeftModel.

    vision: the vision blocks and the merger; language: the language model's decoder layers. The
    Conv3d patch embedding, the embeddings and lm_head stay frozen (LORA_TARGETS)."""
    from peft import LoraConfig, get_peft_model

    parts = ([VISION_TARGETS] if vision else []) + ([LANGUAGE_TARGETS] if language else [])
    if not parts:
        raise ValueError("apply_lora: vision and language are both False; nothing to adapt")
    targets = "|".join(f"(?:{p})" for p in parts)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated alias is_gradient_checkpointing; the warning
        # is about their two versions, nothing a reader of the book can act on
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    if not adapted_modules(peft_model):
        raise RuntimeError(f"LoRA matched no module of {type(model).__name__} with {targets!r}")
    return peft_model


def adapted_modules(model) -> list[str]:
    """Names (without peft's `base_model.model.` prefix) of the modules that carry LoRA adapters."""
    from peft.tuners.lora import LoraLayer

    names = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    return [re.sub(r"^base_model\.model\.", "", n) for n in names]


# ---------------------------------------------------------------------------- fine-tuned models
FINETUNE_NOTE = "finetune.json"


def save_finetuned(model, tokenizer, image_processor, out_dir, base: str, method: str, job: str = "finetuned",
                   notes: dict | None = None) -> Path:
    """Save a fine-tuned model so `load_finetuned` can rebuild it; safetensors only.

    method "full": the whole model (like a hub checkpoint). method "lora": only the adapter (a few
    MB for the 7B model), plus a note naming the base it goes on (hub id or folder). `notes`: more
    JSON files to keep in the folder ({file name: object}, e.g. a summary). The folder is written
    beside `out_dir`, sealed as `job` (`resumable.seal_dir`) and then renamed over it: a reader
    finds the old folder, the whole new one, or none, never part of one."""
    import os
    import shutil

    from . import resumable

    if method not in ("full", "lora"):
        raise ValueError(f"method must be 'full' or 'lora', not {method!r}")
    out = Path(out_dir)
    is_peft = hasattr(model, "peft_config")
    if (method == "lora") != is_peft:
        raise ValueError(f"method {method!r} but the model {'is' if is_peft else 'is not'} a peft model")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    resumable.write_json(tmp / FINETUNE_NOTE, {"method": method, "base": str(base)})
    for name, obj in (notes or {}).items():
        resumable.write_json(tmp / name, obj)
    resumable.seal_dir(tmp, job)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def check_finetuned(path, job: str | None = None) -> str | None:
    """None when `path` is a whole, unaltered folder written by `save_finetuned` (of `job`, where
    given); else what is wrong, naming the folder and the file."""
    from . import resumable

    path = Path(path)
    if not (path / FINETUNE_NOTE).exists() and not (path / resumable.DIR_SEAL).exists():
        return f"{path} has no {FINETUNE_NOTE}: not a folder written by save_finetuned"
    return resumable.check_dir(path, job)


def load_finetuned(path, merge: bool = True, **load_kw) -> Loaded:
    """A folder written by `save_finetuned`, checked against its seal first. LoRA adapters are put
    on their base and, with `merge`, folded into its weights (same outputs, no adapter overhead at
    inference)."""
    import json

    path = Path(path)
    note = path / FINETUNE_NOTE
    if not path.is_dir():
        raise FileNotFoundError(f"{path} has no {FINETUNE_NOTE}: not a folder written by save_finetuned")
    problem = check_finetuned(path)   # reads every file once: seconds for a 7B model's full weights
    if problem is not None:
        raise ValueError(f"fine-tuned model refused: {problem}. Run the fine-tuning stage (02_finetune) "
                         "again: it saves the model anew from its last checkpoint")
    info = json.loads(note.read_text())
    if info["method"] == "full":
        return load(path, **load_kw)
    from peft import PeftModel

    base = load(info["base"], **load_kw)
    peft_model = PeftModel.from_pretrained(base.model, str(path), is_trainable=False)
    m = peft_model.merge_and_unload() if merge else peft_model
    # the tokenizer and image processor saved with the adapter: the pixel bounds used in training
    tokenizer, image_processor = load_processors(path)
    return Loaded(m.eval(), tokenizer, image_processor)
