"""Embedding extraction: all 17 vectors of an image (h_im + 16 h_im,a), prefix-shared vs naive.

    .venv/bin/python bench/extraction.py [--images 64]

Naive = 17 full forwards per image (the image-only prompt and one prompt per question, each its
own forward). Prefix-shared = `skinlib.embed.embed`: one forward of [system, image] with the KV
cache, then the 16 question suffixes from it in one batch. Both on the embedded default's tiny
Qwen2-VL (random weights: speed does not depend on the values) with phantom crops, in one run.
A second row gives the theoretical ratio for Qwen2-VL-7B at SLICE-3D image sizes from token counts.
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import torch

from common import append, row, show, side_by_side
from skinlib import embed, inputs, model as models, phantom, slice3d


def naive(loaded, encs, questions):
    """17 separate full forwards per image (batch size 1): what one would write without the cache."""
    out = []
    for e in encs:
        out.append(embed.embed_slow(loaded.model, loaded.tokenizer, loaded.image_processor, [e], [],
                                    image=True, batch_size=1)["image"])
        for q in questions:
            out.append(embed.embed_slow(loaded.model, loaded.tokenizer, loaded.image_processor, [e], [q],
                                        image=False, batch_size=1)["image_text"])
    return out


def theoretical_7b(tokenizer, image_tokens: int = 25) -> tuple[float, str]:
    """Token-count ratio for the 7B model: naive processes 17 prompts of (prefix + question) tokens
    and 17 vision passes; shared processes one prefix and one vision pass plus 16 suffixes. Decoder
    cost is ~linear in tokens at these lengths (attention over <200 tokens is small next to the
    MLPs of a 3,584-wide model); the 675M-parameter vision tower (32 blocks, 1,280 wide) runs on
    4 x image_tokens patches and costs about as much per patch as ~0.09 decoder tokens per layer-width
    ratio; we count it as 4 patches x (0.675 / 7.6) decoder-token equivalents each."""
    qs = embed.attribute_questions()
    lay = [len(tokenizer(inputs.SYSTEM_PROMPT)["input_ids"]) + 10]  # system + chat markup
    prefix = lay[0] + image_tokens
    suffixes = [len(tokenizer(q)["input_ids"]) + 5 for q in qs]
    vision = 4 * image_tokens * (0.675 / 7.6)
    naive_cost = (prefix + vision) + sum(prefix + vision + s for s in suffixes)
    shared = prefix + vision + sum(suffixes)
    return naive_cost / shared, (f"7B, {image_tokens} image tokens (a 133 px crop -> 140 px), prefix "
                                 f"{prefix} tokens, suffixes {min(suffixes)}-{max(suffixes)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        phantom.generate(a.images, f"{tmp}/ph", seed=0, workers=1, progress=False)
        ds = slice3d.Slice3D(f"{tmp}/ph/train-image.hdf5", f"{tmp}/ph/train-metadata.csv")
        loaded = models.load(models.build_tiny(f"{tmp}/tiny"))
        encs = inputs.encode_images(loaded.image_processor, [ds.image(i) for i in ds.ids])
        qs = embed.attribute_questions()
        prompts = embed.Prompts(loaded.tokenizer, loaded.image_processor, qs)
        base_s, ours_s, _, _ = side_by_side(
            lambda: naive(loaded, encs, qs),
            lambda: embed.embed(loaded.model, loaded.tokenizer, loaded.image_processor, encs, qs,
                                batch_size=8, prompts=prompts), repeat=2)
        rows = [row("extraction: 17 vectors per image, prefix-shared vs 17 full forwards",
                    f"{a.images} phantom images, tiny Qwen2-VL, 16 image tokens, CPU {a.threads} threads "
                    f"({1e3 * base_s / a.images:.0f} vs {1e3 * ours_s / a.images:.1f} ms per image)",
                    base_s, ours_s)]
        ratio, size = theoretical_7b(loaded.tokenizer)
        # theoretical: no time measured; written as seconds of one relative unit
        rows.append(row("extraction (theoretical, token counts): prefix-shared vs 17 full forwards", size,
                        ratio, 1.0))
    show(rows)
    append(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
