"""skinlib.tokenizer and skinlib.model with real tokenizers / transformers / peft / torch (no mocks)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from skinlib import inputs as I
from skinlib import model as M
from skinlib.attributes import ATTRIBUTES
from skinlib.tokenizer import QWEN2VL_CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return M.build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return M.load(tiny_dir, device="cpu")


def batch(loaded, n=4, answers=True):
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (130, 130, 3), dtype=np.uint8)) for _ in range(n)]
    attrs = ATTRIBUTES[:n]
    ans = [a.format_answer(v) for a, v in zip(attrs, rng.uniform(-50, 500, n))] if answers else None
    return I.build_batch(loaded.tokenizer, loaded.image_processor, ims, [a.question for a in attrs], ans)


# --- tokenizer -------------------------------------------------------------------------------------

def test_tokenizer_digits_one_by_one():
    tok = build_tokenizer()
    assert tok.tokenize("12345") == list("12345")
    assert tok.tokenize("-0.25") == ["-", "0", ".", "2", "5"]
    for a in ATTRIBUTES:  # every answer round-trips
        text = a.format_answer(-1234.5678)
        assert tok.decode(tok(text)["input_ids"]) == text
    assert 300 < len(tok) <= 1100  # small


def test_tokenizer_special_tokens_in_qwen2vl_order():
    tok = build_tokenizer()
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + 14))  # contiguous, in Qwen2-VL's order ...
    assert ids[-1] == len(tok) - 1  # ... right after the learned vocabulary
    assert (tok.eos_token, tok.pad_token, tok.padding_side) == ("<|im_end|>", "<|endoftext|>", "left")
    assert tok.eos_token_id == ids[2] and tok.pad_token_id == ids[0]
    # Special tokens are atomic in text; never split into bytes.
    assert tok("<|im_start|>user\n<|image_pad|><|image_pad|>")["input_ids"][:1] == [ids[1]]
    assert tok("<|image_pad|><|image_pad|>")["input_ids"] == [ids[12]] * 2
    assert tok.chat_template == QWEN2VL_CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_is_deterministic_across_processes():
    code = ("import hashlib; from skinlib.tokenizer import build_tokenizer; "
            "print(hashlib.sha256(build_tokenizer().backend_tokenizer.to_str().encode()).hexdigest())")
    here = hashlib.sha256(build_tokenizer().backend_tokenizer.to_str().encode()).hexdigest()
    # Another process with another hash seed (tokenizers' and Python's hash maps iterate differently).
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == here


# --- build_tiny / load ----------------------------------------------------------------------------

def test_build_tiny_folder_is_a_checkpoint(tiny_dir, tiny):
    files = set(os.listdir(tiny_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= files
    assert not any(f.endswith(".bin") for f in files)
    cfg = json.loads((tiny_dir / "config.json").read_text())
    tok = tiny.tokenizer
    assert cfg["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert tiny.model.config.text_config.vocab_size == len(tok)
    assert tiny.model.dtype == torch.float32 and tiny.tokenizer.padding_side == "left"
    assert 0.5e6 < sum(p.numel() for p in tiny.model.parameters()) < 1e6
    assert tiny.image_processor.size["shortest_edge"] == M.MIN_PIXELS
    assert tiny.image_processor.size["longest_edge"] == M.MAX_PIXELS


@torch.no_grad()
def test_build_then_load_gives_identical_logits(tiny):
    """The saved weights are the random init of build_tiny (same seed) and reload bit for bit."""
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    fresh = Qwen2VLForConditionalGeneration(M.tiny_config(build_tokenizer())).eval()
    M.patch_embed_as_linear(fresh)   # as load() runs it: the same products, bit for bit
    b = batch(tiny, n=2, answers=False)
    assert torch.equal(fresh(**b).logits, tiny.model(**b).logits)


def test_load_names_a_bad_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.load(tmp_path)


def test_sizes_are_checked():
    with pytest.raises(KeyError, match="unknown tiny-model size"):
        M.tiny_config(build_tokenizer(), {"layers": 3})
    with pytest.raises(ValueError, match="mrope_section"):
        M.tiny_config(build_tokenizer(), {"hidden_size": 256})


# --- LoRA ---------------------------------------------------------------------------------------------

def test_lora_reaches_both_towers_not_patch_embedding(tiny_dir):
    model = M.load(tiny_dir, device="cpu").model
    peft_model = M.apply_lora(model, rank=4)
    names = M.adapted_modules(peft_model)
    vision = [n for n in names if ".visual." in n]
    language = [n for n in names if ".language_model." in n]
    assert len(vision) == 2 * 4 + 2  # per block qkv, proj, fc1, fc2; merger mlp.0, mlp.2
    assert len(language) == 2 * 7  # per layer q, k, v, o, gate, up, down
    assert len(names) == len(vision) + len(language) == 24
    assert any(n.endswith("merger.mlp.0") for n in names)
    assert not any("patch_embed" in n or "lm_head" in n or "embed_tokens" in n for n in names)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    only_text = M.adapted_modules(M.apply_lora(M.load(tiny_dir, device="cpu").model, vision=False))
    assert len(only_text) == 14 and not any(".visual." in n for n in only_text)
    only_vision = M.adapted_modules(M.apply_lora(M.load(tiny_dir, device="cpu").model, language=False))
    assert len(only_vision) == 10 and all(".visual." in n for n in only_vision)


def test_lora_starts_as_the_base_model_and_trains(tiny_dir):
    loaded = M.load(tiny_dir, device="cpu")
    b = batch(loaded, n=2)
    with torch.no_grad():
        base = loaded.model(**b).logits
    peft_model = M.apply_lora(loaded.model, rank=4, dropout=0.0)
    peft_model.eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(**b).logits, base)  # LoRA B starts at zero
    peft_model.train()
    peft_model(**b).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".visual." in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".language_model." in n)


# --- training -------------------------------------------------------------------------------------

def test_full_fine_tuning_lowers_the_loss(tiny_dir):
    loaded = M.load(tiny_dir, device="cpu")
    model, b = loaded.model, batch(loaded, n=4)
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_the_patch_embedding_runs_as_a_linear_map_with_the_conv3d_result_and_weights(tmp_path):
    import torch

    from skinlib import model as models

    loaded = models.load(models.build_tiny(tmp_path / "tiny"))
    embed = loaded.model.model.visual.patch_embed
    assert "forward" in vars(embed), "load() replaces the Conv3d forward"
    x = torch.randn(64, embed.proj.weight[0].numel())
    stock = type(embed).forward(embed, x)           # the class's own Conv3d forward
    assert torch.allclose(embed(x), stock, atol=1e-5), (embed(x) - stock).abs().max()
    # gradients reach the Conv3d weight as before
    embed(x).sum().backward()
    g_linear = embed.proj.weight.grad.clone()
    embed.proj.weight.grad = None
    type(embed).forward(embed, x).sum().backward()
    assert torch.allclose(g_linear, embed.proj.weight.grad, atol=1e-4)
    # the saved weights are the Conv3d's: same names and shapes as a stock model's
    assert embed.proj.weight.ndim == 5 and "model.visual.patch_embed.proj.weight" in loaded.model.state_dict()
