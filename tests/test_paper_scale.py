"""probes/paper_scale.py's arithmetic against the real libraries: the image processor's token
counts at the paper profile's pixel bounds, Qwen2-VL's parameter counts at the 7B's published
shapes (built on the meta device: no memory, no weights), peft's LoRA counts, and a measured tiny
LoRA training step on CPU (parameter, gradient and AdamW bytes exactly; the activations autograd
keeps for backward within a factor of the formula)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skinlib import attributes, config, inputs, loss, model as models

PROBE = Path(__file__).resolve().parents[1] / "probes" / "paper_scale.py"
spec = importlib.util.spec_from_file_location("paper_scale", PROBE)
ps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ps)

PAPER_PIXELS = (config.load_profile("paper")["model"]["min_pixels"], config.load_profile("paper")["model"]["max_pixels"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return models.build_tiny(tmp_path_factory.mktemp("paper_scale") / "tiny")


@pytest.mark.parametrize("bounds", [PAPER_PIXELS, (models.MIN_PIXELS, models.MAX_PIXELS)])
def test_image_tokens_follow_the_real_processor(tiny, bounds):
    _, processor = models.load_processors(tiny, *bounds)
    for h, w in [(133, 133), (90, 90), (41, 60), (100, 260), (160, 140), (224, 224), (300, 300), (500, 120)]:
        enc = inputs.encode_images(processor, [Image.fromarray(np.zeros((h, w, 3), np.uint8))])[0]
        patches, tokens = ps.image_tokens(h, w, *bounds)
        assert (patches, tokens) == (int(enc.grid_thw.prod()), enc.n_tokens(processor.merge_size)), (h, w, bounds)


def meta_model(shapes):
    from transformers import Qwen2VLForConditionalGeneration

    with torch.device("meta"):
        return Qwen2VLForConditionalGeneration(ps.hf_config(shapes))


def by_part(model) -> dict:
    parts = {"patch_embed": "visual.patch_embed", "vision_blocks": "visual.blocks", "merger": "visual.merger",
             "embed_tokens": "embed_tokens", "decoder": "language_model.", "lm_head": "lm_head"}
    got = dict.fromkeys(parts, 0)
    for name, p in model.named_parameters():
        part = next(k for k, v in parts.items() if v in name)
        got[part] += p.numel()
    return got


def test_parameter_and_lora_counts_at_the_7b_shapes():
    model = meta_model(ps.QWEN2VL_7B)
    assert ps.param_counts(ps.QWEN2VL_7B) == by_part(model)
    lora = models.apply_lora(model, rank=8)
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert ps.lora_params(ps.QWEN2VL_7B, 8) == trainable


def test_the_7b_shapes_round_trip_through_a_config():
    assert ps.shapes_of(ps.hf_config(ps.QWEN2VL_7B)) == ps.QWEN2VL_7B


def training_step(path, rows: int = 4):
    """One LoRA step of the tiny model on CPU (float32), 133 px crops at the paper's bounds:
    (model, optimizer, batch, bytes autograd saved for backward, excluding parameters)."""
    tokenizer, processor = models.load_processors(path, *PAPER_PIXELS)
    torch.manual_seed(0)
    model = models.apply_lora(models.load(path, min_pixels=PAPER_PIXELS[0], max_pixels=PAPER_PIXELS[1]).model, rank=8)
    model.train()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (133, 133, 3), dtype=np.uint8)) for _ in range(rows)]
    atts = attributes.ATTRIBUTES[:rows]
    batch = inputs.build_batch(tokenizer, processor, images, [a.question for a in atts],
                               [a.format_answer(12.5) for a in atts])
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()     # one count per storage (views share one)
        return t

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = loss.labelled_loss(model, batch)
    value.backward()
    opt.step()
    return model, opt, batch, sum(saved.values())


def test_training_state_bytes_are_exact_and_activations_within_a_factor(tiny):
    model, opt, batch, saved = training_step(tiny)
    shapes = ps.shapes_of(model.base_model.model.config)
    want = ps.state_bytes(shapes, rank=8, weight_bytes=4, adapter_bytes=4)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    adapters = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    adam = sum(s[k].numel() * s[k].element_size() for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    assert frozen + adapters == want["weights"] + want["adapters"]
    assert (adapters, grads, adam) == (want["adapters"], want["grads"], want["adam"])
    rows, length = batch["input_ids"].shape
    patches = int(batch["image_grid_thw"].prod(1)[0])
    scored = int((batch["labels"] != inputs.IGNORE_INDEX).sum())
    got = ps.activation_bytes(shapes, rows, length, rows, patches, scored, dtype_bytes=4, attention_probs=True)
    ratio = sum(got.values()) / saved
    assert 0.8 < ratio < 1.25, f"formula {sum(got.values()):,} B ({got}) vs {saved:,} B saved for backward"


def test_a_missing_bench_row_names_the_file_and_the_benchmark():
    with pytest.raises(LookupError, match=r"results\.csv.*no row 'x'"):
        ps.bench_row([{"benchmark": "y", "size": ""}], "x")
    with pytest.raises(ValueError, match=r"results\.csv.*paper X GiB"):
        ps.memory_paper_gb({"size": "stored: peaks 1 MiB"})
