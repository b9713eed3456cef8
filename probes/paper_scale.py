"""What the `paper` profile costs at the paper's sizes: peak host and GPU memory, GPU hours and disk
per stage of the chain, for Qwen2-VL-7B-Instruct, each figure with its basis and the command behind it.

    .venv/bin/python probes/paper_scale.py [--peak-tflops 989] [--utilisation 0.4] [--gpus 4] ...

Writes probes/results/paper_scale.csv (one row per stage, or per part of a stage). No GPU and no
weights are needed: GPU memory and FLOPs come from the model's published shapes (`QWEN2VL_7B`, the
release's config.json) and the token counts of this project's prompts (the real image processor's
rule at the profile's min/max pixels, the project's prompts through `embed.Prompts`); times from
FLOPs at an assumed GPU throughput (the arguments; H100 SXM bf16 dense by default) or from the
CPU rows of bench/results.csv where one was measured at this width; host memory of stage 05 from
bench/memory.py's fitted row. The arithmetic is in the small functions below, which
tests/test_paper_scale.py holds against the real transformers model (parameter counts at the 7B's
shapes on the meta device, LoRA counts, the image processor's token counts) and against a measured
tiny LoRA training step (parameter, gradient and AdamW bytes exactly; saved activations within a
factor).
"""
from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "probes" / "results" / "paper_scale.csv"
BENCH = REPO / "bench" / "results.csv"
GB = 1e9

# Qwen/Qwen2-VL-7B-Instruct's config.json (the published release): the shapes every figure uses.
QWEN2VL_7B = {
    "vocab": 152_064, "hidden": 3_584, "intermediate": 18_944, "layers": 28, "heads": 28, "kv_heads": 4,
    "tie_embeddings": False,
    "vision_depth": 32, "vision_embed": 1_280, "vision_heads": 16, "mlp_ratio": 4, "patch": 14,
    "merge": 2, "temporal_patch": 2, "channels": 3,
}
# The paper's sizes (paper §3; the profile's split reproduces them): images, database, queries.
N_DB, N_Q = 282_564, 118_495
N_IMAGES = N_DB + N_Q          # 401,059
CROP_PX = 133                  # SLICE-3D crops: 15 mm at about 133 x 133 px
MONET_PARAMS = 304e6           # MONET = CLIP ViT-L/14's image tower (about 304 M parameters)
MONET_TOKENS = 257             # 224 px / 14 = 16 x 16 patches + the class token
MONET_DIM = 768
COLUMNS = ["stage", "what", "peak_host_gb", "peak_gpu_gb", "gpu_hours", "cpu_hours", "disk_gb", "basis", "command"]


def hf_config(c: dict, mrope_section=(16, 24, 24)):
    """A `Qwen2VLConfig` of these shapes (the 7B's mrope_section by default), for counting the
    real model's parameters on the meta device."""
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        vision_config={"depth": c["vision_depth"], "embed_dim": c["vision_embed"], "num_heads": c["vision_heads"],
                       "hidden_size": c["hidden"], "mlp_ratio": c["mlp_ratio"], "patch_size": c["patch"],
                       "spatial_merge_size": c["merge"], "temporal_patch_size": c["temporal_patch"],
                       "in_channels": c["channels"]},
        text_config={"vocab_size": c["vocab"], "hidden_size": c["hidden"], "intermediate_size": c["intermediate"],
                     "num_hidden_layers": c["layers"], "num_attention_heads": c["heads"],
                     "num_key_value_heads": c["kv_heads"], "max_window_layers": c["layers"],
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(mrope_section)}},
        tie_word_embeddings=c["tie_embeddings"])


def shapes_of(config) -> dict:
    """The shapes of a `Qwen2VLConfig` (e.g. the tiny model's) in `QWEN2VL_7B`'s keys."""
    v, t = config.vision_config, config.text_config
    return {"vocab": t.vocab_size, "hidden": t.hidden_size, "intermediate": t.intermediate_size,
            "layers": t.num_hidden_layers, "heads": t.num_attention_heads, "kv_heads": t.num_key_value_heads,
            "tie_embeddings": bool(config.tie_word_embeddings), "vision_depth": v.depth, "vision_embed": v.embed_dim,
            "vision_heads": v.num_heads, "mlp_ratio": v.mlp_ratio, "patch": v.patch_size,
            "merge": v.spatial_merge_size, "temporal_patch": v.temporal_patch_size, "channels": v.in_channels}


# ---- shapes -> counts ---------------------------------------------------------------------------
def smart_resize(h: int, w: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """Qwen2-VL's image resize rule (transformers' `smart_resize`): both sides to multiples of
    patch x merge, the area then brought within [min_pixels, max_pixels] keeping the aspect."""
    if max(h, w) / min(h, w) > 200:
        raise ValueError(f"aspect ratio of {h} x {w} above 200")
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = max(factor, math.floor(h / beta / factor) * factor), max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def image_tokens(h: int, w: int, min_pixels: int, max_pixels: int, patch: int = 14, merge: int = 2) -> tuple[int, int]:
    """(vision-tower patches, merged image tokens in the text) of an h x w crop."""
    hb, wb = smart_resize(h, w, min_pixels, max_pixels, patch * merge)
    patches = (hb // patch) * (wb // patch)
    return patches, patches // merge ** 2


def param_counts(c: dict) -> dict:
    """Parameters of Qwen2VLForConditionalGeneration by part, from the config's shapes."""
    e, h, i, v = c["vision_embed"], c["hidden"], c["intermediate"], c["vocab"]
    kv = c["kv_heads"] * h // c["heads"]
    m = e * c["merge"] ** 2
    block = 2 * 2 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * c["mlp_ratio"] * e + c["mlp_ratio"] * e) \
        + (c["mlp_ratio"] * e * e + e)                                    # 2 LayerNorms, qkv, proj, fc1, fc2
    layer = 2 * h + (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i  # 2 RMSNorms, q k v (biased), o, MLP
    return {
        "patch_embed": c["channels"] * c["temporal_patch"] * c["patch"] ** 2 * e,   # Conv3d, no bias
        "vision_blocks": c["vision_depth"] * block,
        "merger": 2 * e + (m * m + m) + (m * h + h),                               # ln_q, mlp.0, mlp.2
        "embed_tokens": v * h,
        "decoder": c["layers"] * layer + h,                                         # + the final norm
        "lm_head": 0 if c["tie_embeddings"] else v * h,
    }


def lora_params(c: dict, rank: int) -> int:
    """LoRA parameters (A: r x in, B: out x r) on skinlib.model.LORA_TARGETS: the vision blocks'
    qkv, proj, fc1, fc2, the merger's two Linears, every decoder layer's q k v o gate up down."""
    e, h, i = c["vision_embed"], c["hidden"], c["intermediate"]
    kv = c["kv_heads"] * h // c["heads"]
    f, m = c["mlp_ratio"] * e, e * c["merge"] ** 2
    vision = c["vision_depth"] * ((e + 3 * e) + (e + e) + (e + f) + (f + e)) + (m + m) + (m + h)
    text = c["layers"] * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    return rank * (vision + text)


def state_bytes(c: dict, rank: int, weight_bytes: int, adapter_bytes: int = 4) -> dict:
    """Bytes of the training state: frozen weights, LoRA weights, their gradients and AdamW's two
    moments (kept in the adapters' dtype: peft keeps adapters in float32 on a bfloat16 base)."""
    lora = lora_params(c, rank)
    return {"weights": sum(param_counts(c).values()) * weight_bytes, "adapters": lora * adapter_bytes,
            "grads": lora * adapter_bytes, "adam": 2 * lora * adapter_bytes}


# Saved activations per token and layer, in elements, with LoRA on every Linear and no gradient
# checkpointing (what train.py does). Decoder layer: the residual input and the two RMSNorms' in
# and out, q k v after rotary, the attention output, LoRA's dropout copies of the inputs of
# q/k/v, o and gate/up, the MLP's gate, up, activation, product and down's dropout copy: about 11
# widths of `hidden` and 5 of `intermediate`. A vision block likewise with its width and 4x MLP.
TEXT_H, TEXT_I, VISION_E, VISION_F = 11, 5, 11, 5


def activation_bytes(c: dict, rows: int, tokens: int, images: int, patches: int, scored: int,
                     dtype_bytes: int, attention_probs: bool) -> dict:
    """Activations a training step keeps for backward: `rows` sequences of `tokens`, `images` of
    `patches` each, `scored` labelled tokens (the head and its float32 logits only there,
    skinlib.loss.labelled_loss). attention_probs: the attention matrices are kept (PyTorch's
    math attention, as on CPU); flash / memory-efficient attention on GPUs keeps none."""
    e, h, i = c["vision_embed"], c["hidden"], c["intermediate"]
    f = c["mlp_ratio"] * e
    text = rows * tokens * c["layers"] * (TEXT_H * h + TEXT_I * i)
    vision = images * patches * c["vision_depth"] * (VISION_E * e + VISION_F * f)
    merger = images * patches * e * 3          # merger input, its MLP's hidden and activation
    attn = 0
    if attention_probs:
        attn = 2 * (rows * c["heads"] * tokens ** 2 * c["layers"] + images * c["vision_heads"] * patches ** 2 * c["vision_depth"])
    return {"text": text * dtype_bytes, "vision": (vision + merger) * dtype_bytes, "attention": attn * dtype_bytes,
            "logits": scored * (c["vocab"] * (dtype_bytes + 4) + h * dtype_bytes)}


def kv_cache_bytes(c: dict, rows: int, tokens: int, dtype_bytes: int = 2) -> int:
    return 2 * c["layers"] * c["kv_heads"] * (c["hidden"] // c["heads"]) * rows * tokens * dtype_bytes


def forward_flops(c: dict, tokens: int, patches: int, head_tokens: int, rows: int = 1) -> float:
    """Multiply-adds x 2 of one forward: the decoder on `tokens` per row, the vision tower on
    `patches` per image (one image per row), the LM head on `head_tokens`, attention's two
    matrix products over each row's sequence."""
    p = param_counts(c)
    h, e = c["hidden"], c["vision_embed"]
    linear = 2 * (p["decoder"] * tokens + (p["vision_blocks"] + p["patch_embed"]) * patches
                  + p["merger"] * patches // c["merge"] ** 2 + p["lm_head"] * head_tokens)
    attention = 4 * (c["layers"] * tokens ** 2 * h + c["vision_depth"] * patches ** 2 * e)
    return rows * (linear + attention)


# LoRA training: the backward computes the activations' gradients (about one forward's work) but
# not the frozen weights' gradients (another forward's worth in full fine-tuning): 2 x the forward.
LORA_TRAIN_FACTOR = 2


def gpu_hours(flops: float, peak_tflops: float, utilisation: float) -> float:
    return flops / (peak_tflops * 1e12 * utilisation) / 3600


def decode_hours(steps: int, weight_bytes: float, bandwidth_tbs: float, utilisation: float) -> float:
    """Decoding steps of a batch are bound by reading every weight once per step."""
    return steps * weight_bytes / (bandwidth_tbs * 1e12 * utilisation) / 3600


# ---- token counts of this project's prompts -------------------------------------------------------
def prompt_layout(min_pixels: int, max_pixels: int, crop: int = CROP_PX):
    """(patches, image tokens, prefix tokens, per-question suffix tokens, per-attribute answer
    tokens + <|im_end|>, max_new_tokens) of a crop, from the project's tokenizer and prompts
    (embed.Prompts over inputs.build_batch) and the real image processor's grid."""
    import tempfile

    import numpy as np
    from PIL import Image

    from skinlib import attributes, embed, inputs, model as models, predict

    with tempfile.TemporaryDirectory() as tmp:
        path = models.build_tiny(Path(tmp) / "m")
        tokenizer, processor = models.load_processors(path, min_pixels, max_pixels)
    img = Image.fromarray(np.zeros((crop, crop, 3), np.uint8))
    enc = inputs.encode_images(processor, [img])[0]
    patches = int(enc.grid_thw.prod())
    layout = embed.Prompts(tokenizer, processor, embed.attribute_questions()).layout(enc)
    answers = [len(tokenizer(a.format_answer(-(10 ** a.int_digits) + 10 ** -a.decimals),
                             add_special_tokens=False)["input_ids"]) + 1 for a in attributes.ATTRIBUTES]
    return {"patches": patches, "image_tokens": enc.n_tokens(processor.merge_size), "prefix": len(layout.prefix),
            "suffixes": [len(s) for s in layout.suffixes], "answers": answers,
            "max_new_tokens": predict.max_answer_tokens(tokenizer)}


# ---- bench rows ------------------------------------------------------------------------------------
def bench_row(rows: list[dict], benchmark: str, size_pattern: str = "", path: Path = BENCH) -> dict:
    """The latest row of `benchmark` whose size matches `size_pattern` (a regex); a clear error
    naming the file and the command to run when there is none."""
    got = [r for r in rows if r["benchmark"] == benchmark and re.search(size_pattern, r["size"])]
    if not got:
        raise LookupError(f"{path}: no row {benchmark!r} with size matching {size_pattern!r}; run its bench script")
    return got[-1]


def memory_paper_gb(row: dict) -> float:
    """bench/memory.py's extrapolated peak of stage 05's streaming reading at the paper's sizes
    (GiB above the imports, in its size column) in GB."""
    m = re.search(r"stored: .*?paper ([\d.]+) GiB", row["size"])
    if not m:
        raise ValueError(f"{BENCH}: the memory row's size has no 'stored: ... paper X GiB': {row['size'][:200]}")
    return float(m.group(1)) * 2**30 / GB


# ---- the table --------------------------------------------------------------------------------------
def table(a, lay: dict, bench: list[dict]) -> list[dict]:
    from skinlib import config

    cfg = config.load_profile("paper")
    c, t, p = QWEN2VL_7B, cfg["train"], cfg["predict"]
    rank = 8   # skinlib.model.apply_lora's default, the paper's rank
    me = "python probes/paper_scale.py " + " ".join(
        f"--{k.replace('_', '-')} {getattr(a, k)}" for k in ("peak_tflops", "utilisation", "bandwidth_tbs", "bandwidth_utilisation"))
    fl = lambda x: gpu_hours(x, a.peak_tflops, a.utilisation)
    weights = sum(param_counts(c).values()) * 2
    n_params = sum(param_counts(c).values())
    q_mean = sum(lay["suffixes"]) / len(lay["suffixes"])
    ans_mean = sum(lay["answers"]) / len(lay["answers"])
    prompt = lay["prefix"] + q_mean
    rows = []

    def add(stage, what, host=None, gpu=None, hours=None, disk=None, basis="", command=me, cpu=None):
        r = lambda x, d=1: "" if x is None else f"{x:.{d}f}"
        rows.append({"stage": stage, "what": what, "peak_host_gb": r(host), "peak_gpu_gb": r(gpu),
                     "gpu_hours": r(hours, 2), "cpu_hours": r(cpu, 2), "disk_gb": r(disk), "basis": basis,
                     "command": command})

    add("00_phantom", "the phantom chapter: a few demonstration crops beside the real fixture crops (CPU)",
        basis="independent of the release's size: the same work as on the embedded default",
        command="python -m skinlib.run --profile paper --out runs/paper --stages 00_phantom")
    # 01: the metadata frame, from the real 5,000-row fixture's in-memory size per row
    per_row = metadata_bytes_per_row()
    add("01_data", f"read and validate {N_IMAGES:,} rows and crops, split by patient (CPU)",
        host=3 * per_row * N_IMAGES / GB,
        basis=f"derived from the real fixture rows: {per_row:,.0f} B per row in pandas, x3 for the "
              "parse and the validated copy; the HDF5 is streamed",
        command=me)
    # 02: LoRA training, one tuple per sequence, batch 16 per process
    seq = round(lay["prefix"] + max(lay["suffixes"]) + max(lay["answers"]))
    state = state_bytes(c, rank, 2)
    act = activation_bytes(c, t["batch_size"], seq, t["batch_size"], lay["patches"], t["batch_size"] * max(lay["answers"]),
                           2, attention_probs=False)
    tuples = N_DB * t["w"]
    flops = LORA_TRAIN_FACTOR * tuples * forward_flops(c, round(prompt + ans_mean), lay["patches"], round(ans_mean))
    add("02_finetune", f"LoRA r={rank}, {tuples:,} tuples, batch {t['batch_size']} per GPU, one epoch "
        f"({math.ceil(tuples / t['batch_size']):,} steps on one GPU, {fl(flops) * 3600 / math.ceil(tuples / t['batch_size']):.2f} s each); "
        f"rows of up to {seq} tokens, {lay['patches']} patches",
        gpu=(sum(state.values()) + sum(act.values())) / GB, hours=fl(flops),
        disk=2 * 3 * state["adapters"] / GB,
        basis=f"derived from shapes: {n_params / 1e9:.2f} B parameters in bf16 {state['weights'] / GB:.1f} GB + "
              f"LoRA {lora_params(c, rank) / 1e6:.1f} M (float32 weights, grads, AdamW) {(state['adapters'] + state['grads'] + state['adam']) / GB:.2f} GB + "
              f"activations {sum(act.values()) / GB:.1f} GB (no checkpointing, flash attention); time 2 x forward FLOPs; "
              "disk: the 2 kept checkpoints (adapters + AdamW)")
    # 03: greedy prediction of every test image's 16 questions (one image per row, no prefix sharing)
    questions = N_Q * 16
    batches = math.ceil(questions / p["batch_size"])
    new = lay["max_new_tokens"]
    pf = questions * forward_flops(c, round(prompt), lay["patches"], 1)
    kv = kv_cache_bytes(c, p["batch_size"], round(lay["prefix"] + max(lay["suffixes"]) + new))
    peak_prefill = p["batch_size"] * (lay["prefix"] + max(lay["suffixes"])) * c["intermediate"] * 2 * 3
    add("03_predict", f"greedy: {questions:,} questions in {batches:,} generate calls of {p['batch_size']}, up to {new} new tokens",
        gpu=(weights + kv + peak_prefill) / GB,
        hours=fl(pf) + decode_hours(batches * new, weights, a.bandwidth_tbs, a.bandwidth_utilisation),
        disk=questions * 60 / GB,
        basis=f"derived from shapes: weights {weights / GB:.1f} GB + KV cache {kv / GB:.2f} GB + the MLP's transient; "
              f"prefill FLOPs + {batches * new:,} decoding steps each reading every weight; disk ~60 B per reply row")
    s = p["sample"]
    if s["k"]:
        sq = s["n_images"] * 16 * s["k"]
        sb = math.ceil(sq / s["batch_size"])
        add("03_predict", f"sampled check: {s['n_images']:,} images x 16 questions x k={s['k']} in {sb:,} calls",
            gpu=(weights + kv + peak_prefill) / GB,
            hours=fl(sq * forward_flops(c, round(prompt), lay["patches"], 1))
            + decode_hours(sb * new, weights, a.bandwidth_tbs, a.bandwidth_utilisation),
            basis="derived from shapes, as greedy")
    # 04: every extraction of the retrieval study
    e_batch = cfg["embed"]["batch_size"]
    full = forward_flops(c, lay["prefix"], lay["patches"], 0) + sum(forward_flops(c, n, 0, 0) for n in lay["suffixes"])
    image_only = forward_flops(c, lay["prefix"], lay["patches"], 0)
    multi = forward_flops(c, round(prompt), lay["patches"], 0)
    kv4 = kv_cache_bytes(c, e_batch * 16, lay["prefix"] + max(lay["suffixes"]))
    transient = e_batch * 16 * max(lay["suffixes"]) * c["intermediate"] * 2 * 3
    shard = lambda n, k: n * k * c["hidden"] * 2 / GB
    add("04_embed", f"fine-tuned h_im + 16 h_im,a, prefix-shared: {N_IMAGES:,} images ({e_batch} per pass x 16 suffixes)",
        gpu=(weights + kv4 + transient) / GB, hours=fl(N_IMAGES * full), disk=shard(N_IMAGES, 17),
        basis=f"derived from shapes: one vision pass + a {lay['prefix']}-token prefix + 16 suffixes of "
              f"{min(lay['suffixes'])}-{max(lay['suffixes'])} tokens per image; float16 shards")
    add("04_embed", f"untuned h_im: {N_IMAGES:,} images", gpu=(weights + kv4) / GB, hours=fl(N_IMAGES * image_only),
        disk=shard(N_IMAGES, 1), basis="derived from shapes: vision pass + prefix per image")
    add("04_embed", f"method (f), one multi-attribute question: {N_IMAGES:,} images (not prefix-shared; sharded and cached)",
        gpu=(weights + kv4) / GB, hours=fl(N_IMAGES * multi), disk=shard(N_IMAGES, 1),
        basis="derived from shapes: a full forward per image, sharded across processes like the other extractions")
    add("04_embed", f"MONET (CLIP ViT-L/14 image tower): {N_IMAGES:,} images",
        gpu=MONET_PARAMS * 4 / GB + 1, hours=fl(N_IMAGES * 2 * MONET_PARAMS * MONET_TOKENS),
        disk=N_IMAGES * MONET_DIM * 2 / GB, basis="derived from shapes: 304 M parameters, 257 tokens at 224 px")
    add("04_embed", "peak GPU memory of the stage: one 7B at a time",
        gpu=(weights + kv4 + transient) / GB,
        basis="derived from shapes, as the fine-tuned extraction: notebook 04 drops its prefix check's copy "
              "and study.extract_all loads the fine-tuned model, then the untuned one in its place "
              "(tests/test_study.py::test_extraction_holds_one_model_at_a_time)")
    add("04_embed", "the map and the linear read-outs (host): h_im whole, one attribute's h_im,a at a time",
        host=(2 * N_IMAGES * c["hidden"] * 4 + c["hidden"] ** 2 * 8 + 3 * 8192 * c["hidden"] * 8) / GB,
        basis="derived from shapes: h_im of the database and queries and one attribute's image+text "
              "vectors in float32 (study.PerAttribute), the d x d normal equations and three 8,192-row "
              "float64 blocks (metrics.ridge_readout_r2 and study.pca2 read in chunks)")
    # 05: host memory from the memory bench, search times from the search bench (CPU) and FLOPs (GPU)
    mem = bench_row(bench, "stage 05 peak memory: whole float32 arrays vs per-attribute streaming")
    d = c["hidden"]
    flat = bench_row(bench, "search d=3584: faiss flat vs numpy matmul+argpartition", r"db=282564 ")
    sq8 = bench_row(bench, "search d=3584: faiss SQ8 vs faiss flat", r"db=282564 ")
    q_flat = int(re.search(r"q=(\d+)", flat["size"]).group(1))
    q_sq8 = int(re.search(r"q=(\d+)", sq8["size"]).group(1))
    train_sq8 = float(re.search(r"train\+add ([\d.]+) s", sq8["size"]).group(1))
    searches = 16 + 16 + 3     # image+text and hierarchical per attribute, 3 image-only methods (+ MONET's d=768)
    cpu_flat = searches * float(flat["ours_s"]) / q_flat * N_Q / 3600
    cpu_sq8 = 16 * (float(sq8["ours_s"]) / q_sq8 * N_Q + train_sq8) / 3600
    gpu_flat = searches * 2 * N_DB * N_Q * d / (a.fp32_tflops * 1e12 * a.utilisation) / 3600
    one_index = N_DB * d * 4 / GB
    add("05_retrieval", "vectors read one attribute at a time, every method, scoring (host memory)",
        host=memory_paper_gb(mem),
        basis=f"measured at {mem['size'].split(';')[0]} and extrapolated per database and query vector "
              f"({mem['date']}); above the process's imports",
        command="python bench/memory.py --n 2000 6000 --queries 200 --more-queries 1000")
    add("05_retrieval", f"{searches} flat searches of {N_Q:,} queries over {N_DB:,} x {d} on a GPU (faiss-gpu)",
        gpu=one_index + N_Q * d * 4 / GB, hours=gpu_flat,
        basis=f"derived from shapes: 2 N Q d FLOPs each in float32 at {a.fp32_tflops} TFLOP/s x {a.utilisation}; "
              "one attribute's float32 index at a time")
    add("05_retrieval", f"the same {searches} flat searches on this machine's CPU (no GPU)",
        basis=f"derived from bench row: faiss flat {flat['ours_s']} s for {q_flat} queries at db=282,564 "
              f"on {flat['machine'].split(',')[0]} ({flat['date']}), scaled by queries", cpu=cpu_flat,
        command="python bench/search.py")
    add("05_retrieval", "method (a) with SQ8 indexes: 16 trainings and searches on the CPU (faiss SQ8 has no GPU path here)",
        basis=f"derived from bench row: SQ8 search {sq8['ours_s']} s for {q_sq8} queries, train+add {train_sq8} s "
              f"on {sq8['machine'].split(',')[0]} ({sq8['date']}), scaled by queries", cpu=cpu_sq8,
        command="python bench/search.py")
    pct = bench_row(bench, "percentile ranks: sorted+searchsorted vs naive scan", r"db=282564 ")
    add("05_retrieval", "percentile scoring of every method (CPU)",
        basis=f"derived from bench row: {pct['ours_s']} s per method at the paper's sizes "
              f"({pct['machine'].split(',')[0]}, {pct['date']}) x 7 methods", cpu=7 * float(pct["ours_s"]) / 3600,
        command="python bench/percentile.py")
    features = 2 * N_IMAGES * d * 4 + N_IMAGES * MONET_DIM * 4
    add("06_malignancy", "the probes' features: h_im fine-tuned and untuned and MONET's vector, float32 (host)",
        host=(features + 256 * 17 * d * 2) / GB,
        basis="derived from shapes: study.image_features reads them shard by shard (never the 16 image+text "
              "vectors) into float32 arrays for every training and scored test image, + one shard; "
              "tests/test_memory.py holds it to a few widths per image. The probes' fitting copies "
              "(folds, scaling) of one set at a time come on top")
    indexes = 3 * N_DB * d * 4 + N_DB * MONET_DIM * 4 + one_index * GB
    add("07_explore", "explore.RunVectors: float32 indexes of every image-only vector and of one attribute; "
        "the fine-tuned model once asked",
        host=(indexes + N_DB * d * 2 + 2 * 65_536 * d * 4) / GB, gpu=weights / GB,
        basis="derived from shapes: the indexes are built from the float16 shards on a method's first pick "
              "(+ one float16 column and two float32 chunks of 65,536 rows while one is built, FlatIndex.add's "
              "check and add passes; on the GPU instead where faiss "
              "has one); a query's vectors and the candidates are read from the shards; the untuned model "
              "(another 16.6 GB) only for an upload searched by method (d); tests/test_memory.py holds the "
              "searches to a few widths per database image")
    add("08_performance", "reads bench/results.csv", basis="independent of the release's size")
    total_disk = sum(float(r["disk_gb"]) for r in rows if r["disk_gb"])
    total_hours = sum(float(r["gpu_hours"]) for r in rows if r["gpu_hours"] and not r["stage"].startswith("05"))
    add("all", f"GPU hours of stages 02-04 on one GPU ({total_hours / a.gpus:.1f} h on {a.gpus} GPUs sharding them); "
        "disk written", hours=total_hours, disk=total_disk, basis="sums of the rows above")
    return rows


def metadata_bytes_per_row() -> float:
    """In-memory bytes per row of the real metadata (the 5,000-row fixture from the release)."""
    import pandas as pd

    from skinlib import config

    fixtures = Path(config.load_profile("paper")["reference"]["fixtures_dir"])
    path = (fixtures if fixtures.is_absolute() else REPO / fixtures) / "isic2024-metadata-sample5k.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the real metadata fixture (reference.fixtures_dir of the paper profile)")
    frame = pd.read_csv(path, low_memory=False)
    return frame.memory_usage(deep=True).sum() / len(frame)


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU's dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--utilisation", type=float, default=0.4, help="fraction of the peak the FLOP-bound work reaches")
    ap.add_argument("--bandwidth-tbs", type=float, default=3.35, help="GPU memory bandwidth, TB/s (H100 SXM: 3.35)")
    ap.add_argument("--bandwidth-utilisation", type=float, default=0.6, help="fraction of it decoding reaches")
    ap.add_argument("--fp32-tflops", type=float, default=67.0, help="float32 peak for faiss-gpu search (H100 SXM: 67)")
    ap.add_argument("--gpus", type=int, default=4, help="GPUs sharding stages 02-04 (the paper: 4)")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    from skinlib import config

    m = config.load_profile("paper")["model"]
    lay = prompt_layout(m["min_pixels"], m["max_pixels"])
    with BENCH.open(newline="") as f:
        bench = list(csv.DictReader(f))
    rows = table(a, lay, bench)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(f"a {CROP_PX} px crop: {lay['patches']} patches, {lay['image_tokens']} image tokens; prefix {lay['prefix']} "
          f"tokens, questions {min(lay['suffixes'])}-{max(lay['suffixes'])}, answers {min(lay['answers'])}-{max(lay['answers'])}")
    for r in rows:
        print(f"{r['stage']:15s} host {r['peak_host_gb']:>6s}  gpu {r['peak_gpu_gb']:>6s}  gpu h {r['gpu_hours']:>6s}  "
              f"cpu h {r['cpu_hours']:>6s}  "
              f"disk {r['disk_gb']:>6s}  {r['what'][:70]}")
    print(f"wrote {a.out.relative_to(REPO) if a.out.is_relative_to(REPO) else a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
