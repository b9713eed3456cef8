"""A rehearsal of the paper path, as its user runs it, at a tiny size.

Built in a scratch folder: a Qwen2-VL folder shaped like the `Qwen/Qwen2-VL-7B-Instruct` release
(its config layout and special-token ids, random weights in safetensors shards under the release's
names, the real Qwen2 tokenizer files, its preprocessor and generation configs), a CLIP folder in
MONET's layout, a release-format SLICE-3D folder (the phantom), and a profile that inherits
`paper` and changes only sizes and paths. Then the README's paper commands run in order, as
subprocesses (`accelerate config`, interactive and once per machine, is left out: with no config
file `accelerate launch` takes its defaults, one process), with an empty Hugging Face cache and the
hub offline. The checks are what a real run depends on (skinlib/hubshape.py has the layouts).
About 3-5 minutes on 2 cores, most of it the chain's nine notebooks.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from skinlib import config, hubshape, inputs, model as models, qa, slice3d

pytestmark = pytest.mark.slow

REPO = config.REPO_ROOT
# Phantom lesions in the release folder: 160 (seed 3) hold 7 training patients with a malignant
# lesion, which chapter 6's grouped 5-fold choice of C needs at least 5 of.
N_IMAGES, PHANTOM_SEED = 160, 3


def paper_commands(text: str) -> list[str]:
    """The command lines of the first bash block after the paper heading of README.md, or of
    real_data.md's "Commands" section, without their comments."""
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [ln.split("#")[0].strip() for ln in block.group(1).splitlines()]
    return [ln for ln in lines if ln]


def readme_section(path: Path, heading: str) -> str:
    text = path.read_text()
    at = text.index(heading)
    return text[at:]


def rehearsal_profile(tmp: Path, release: Path, qwen: Path, monet: Path) -> Path:
    """`inherit: paper`; only sizes (threads, images asked, sampled replies, candidates) and
    paths (the release, the two checkpoint folders) changed."""
    prof = {
        "name": "rehearsal", "inherit": "paper", "threads": 2,
        "data": {"image_h5": str(release / "train-image.hdf5"), "metadata_csv": str(release / "train-metadata.csv")},
        "model": {"name": str(qwen)},
        "train": {"checkpoint_every": 5},
        "predict": {"n_images": 8, "sample": {"k": 2, "n_images": 2}},
        "embed": {"n_queries": 16, "encoder": {"name": str(monet)}},
        "retrieval": {"b": 10},
    }
    path = tmp / "rehearsal.yaml"
    path.write_text(yaml.safe_dump(prof, sort_keys=False))
    return path


def as_run(command: str, profile: Path, run: Path) -> list[str]:
    """One README command as argv for this machine: the venv's python and accelerate, the
    rehearsal's profile and run folder for `--profile paper --out runs/paper`. `make book
    PROFILE=paper` is the Makefile's chain step; its book step (`skinlib.book`, which builds in the
    repository) is done by the fixture in a scratch folder."""
    argv = shlex.split(command)
    if argv[:2] == ["make", "book"]:
        return [sys.executable, "-m", "skinlib.run", "--profile", str(profile), "--out", str(run)]
    if argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0] == "accelerate":
        argv[0] = str(Path(sys.executable).parent / "accelerate")
    return [str(profile) if prev == "--profile" else str(run) if prev == "--out" else a
            for prev, a in zip([""] + argv, argv)]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, phantom_release):
    tmp = tmp_path_factory.mktemp("rehearsal")
    t0 = time.perf_counter()
    qwen = hubshape.write_qwen2vl(tmp / "Qwen2-VL-7B-Instruct")
    monet = hubshape.write_monet(tmp / "monet")
    release = tmp / "isic-2024"
    phantom_release(release, N_IMAGES, seed=PHANTOM_SEED)
    profile = rehearsal_profile(tmp, release, qwen, monet)
    run = tmp / "runs" / "paper"
    # no accelerate config and an empty hub cache: accelerate launch takes its defaults (one
    # process here), and nothing can reach the network
    env = {**os.environ, "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    commands = paper_commands(readme_section(REPO / "README.md", "## The paper profile"))
    log, seconds, started = [], {"setup": time.perf_counter() - t0}, {}
    for command in commands:
        if command == "accelerate config":   # interactive, once per machine; defaults apply here
            continue
        t, started[command] = time.perf_counter(), time.time()
        done = subprocess.run(as_run(command, profile, run), cwd=REPO, env=env, capture_output=True, text=True)
        seconds[command] = time.perf_counter() - t
        log.append((command, done))
        assert done.returncode == 0, (f"`{command}` failed (exit {done.returncode}):\n"
                                      f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    from skinlib import book
    t = time.perf_counter()
    html = book.build(run, root=tmp / "book")
    seconds["book"] = time.perf_counter() - t
    print("\nrehearsal seconds: " + ", ".join(f"{k}: {v:.0f}" for k, v in seconds.items()))
    return {"tmp": tmp, "qwen": qwen, "monet": monet, "release": release, "profile": profile, "run": run,
            "commands": commands, "log": log, "started": started, "html": html, "cfg": config.load_profile(profile)}


def test_the_profile_changes_only_sizes_and_paths(rehearsal):
    paper, cfg = config.load_profile("paper"), rehearsal["cfg"]
    assert cfg["train"]["method"] == "lora" and cfg["train"]["processes"] == 1
    for section in ("train", "predict", "embed"):
        changed = {k for k in paper[section] if paper[section][k] != cfg[section][k]}
        assert changed <= {"checkpoint_every", "n_images", "n_queries", "sample", "encoder"}, (section, changed)
    assert cfg["model"] == {**paper["model"], "name": str(rehearsal["qwen"])}
    assert cfg["embed"]["encoder"] == {**paper["embed"]["encoder"], "name": str(rehearsal["monet"])}


def test_the_readme_and_the_real_data_page_give_the_same_commands(rehearsal):
    page = paper_commands(readme_section(REPO / "book" / "real_data.md", "## Commands"))
    readme = rehearsal["commands"]
    assert [c for c in page if c != "accelerate config"] == [c for c in readme if c != "accelerate config"]
    ran = [c for c, _ in rehearsal["log"]]
    assert ran == [c for c in readme if c != "accelerate config"]
    assert any(c.startswith("accelerate launch -m skinlib.finetune") for c in ran)
    assert any(c.startswith("accelerate launch -m skinlib.study") for c in ran)


def test_special_token_ids_are_the_configs(rehearsal):
    cfg = json.loads((rehearsal["qwen"] / "config.json").read_text())
    ids = {"<|endoftext|>": cfg["bos_token_id"], "<|im_end|>": cfg["eos_token_id"],
           "<|vision_start|>": cfg["vision_start_token_id"], "<|vision_end|>": cfg["vision_end_token_id"],
           "<|vision_pad|>": cfg["vision_token_id"], "<|image_pad|>": cfg["image_token_id"],
           "<|video_pad|>": cfg["video_token_id"]}
    assert cfg["image_token_id"] == 151655 and cfg["vocab_size"] == 152064
    # the base's tokenizer and the one saved with the fine-tuned adapter (what chapters 3-7 load)
    for folder in (rehearsal["qwen"], config.finetuned_dir(rehearsal["run"])):
        tok, _ = models.load_processors(folder)
        assert {t: tok.convert_tokens_to_ids(t) for t in ids} == ids, folder
        assert (tok.eos_token, tok.pad_token, tok.padding_side) == ("<|im_end|>", "<|endoftext|>", "left")
        assert len(tok) <= cfg["vocab_size"]
        # the real vocabulary: digits one by one, the answers' characters as single tokens
        assert tok.tokenize("05.80") == ["0", "5", ".", "8", "0"]
    # the model read the release's flat layout: its ids and its widths, not transformers' defaults
    base = models.load(rehearsal["qwen"], device="cpu")
    assert base.model.config.image_token_id == cfg["image_token_id"]
    assert base.model.config.text_config.hidden_size == cfg["hidden_size"]
    assert base.model.config.text_config.vocab_size == cfg["vocab_size"]


def smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule as published with the model (qwen_vl_utils / the image processor):
    each side to a multiple of `factor`, the area within [min_pixels, max_pixels]."""
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def test_image_pad_count_is_the_processors_rule_at_real_crop_sizes(rehearsal, fixtures_dir):
    paper = config.load_profile("paper")["model"]
    tok, ip = models.load_processors(rehearsal["qwen"], paper["min_pixels"], paper["max_pixels"])
    prep = json.loads((rehearsal["qwen"] / "preprocessor_config.json").read_text())
    factor = prep["patch_size"] * prep["merge_size"]
    # the eight real crops (91-157 px), then sizes around the release's: ~133 px, up to ~250
    real = [slice3d.Slice3D(fixtures_dir / "isic2024-test-image.hdf5", fixtures_dir / "isic2024-test-metadata.csv"),
            slice3d.Slice3D(fixtures_dir / "isic2024-train-sample" / "train-image.hdf5",
                            fixtures_dir / "isic2024-train-sample" / "train-metadata.csv")]
    images = [np.asarray(ds.image(i)) for ds in real for i in ds.ids]
    rng = np.random.default_rng(0)
    images += [rng.integers(0, 256, (s, s + d, 3), dtype=np.uint8) for s in (50, 90, 113, 133, 160, 200, 224, 250)
               for d in (0, 7)]
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    counts = []
    for im in images:
        batch = inputs.build_batch(tok, ip, [im], ["What is the area in mm²?"])
        hb, wb = smart_resize(im.shape[0], im.shape[1], factor, paper["min_pixels"], paper["max_pixels"])
        want = (hb // factor) * (wb // factor)
        got = int((batch["input_ids"] == image_id).sum())
        assert got == want, (im.shape, got, want)
        assert batch["image_grid_thw"][0].tolist() == [1, hb // prep["patch_size"], wb // prep["patch_size"]]
        counts.append(got)
    by_shape = dict(zip((im.shape[:2] for im in images), counts))
    assert by_shape[(133, 133)] == 25     # the release's typical crop: 140 x 140 px, 10 x 10 patches
    assert by_shape[(50, 50)] == 4        # below min_pixels: up to 56 x 56
    assert by_shape[(250, 250)] == 64     # above max_pixels: down to 224 x 224


def test_lora_wraps_both_towers_and_not_the_patch_embedding(rehearsal):
    from safetensors import safe_open
    folder = config.finetuned_dir(rehearsal["run"])
    cfg = json.loads((rehearsal["qwen"] / "config.json").read_text())
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    wrapped = sorted({re.sub(r"\.lora_[AB].*$", "", k) for k in keys if ".lora_" in k})
    vision = [w for w in wrapped if ".visual." in w]
    language = [w for w in wrapped if ".layers." in w and ".visual." not in w]
    depth, layers = cfg["vision_config"]["depth"], cfg["num_hidden_layers"]
    assert len(vision) == 4 * depth + 2 and len(language) == 7 * layers and len(wrapped) == len(vision) + len(language)
    assert any(w.endswith("merger.mlp.0") for w in vision) and any(w.endswith("blocks.0.attn.qkv") for w in vision)
    assert not any(p in w for w in wrapped for p in ("patch_embed", "lm_head", "embed_tokens"))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["method"] == "lora" and 0 < summary["trainable_parameters"] < summary["parameters"] / 10
    assert summary["base"] == str(rehearsal["qwen"])


def test_the_loss_covers_only_answer_tokens(rehearsal):
    run = rehearsal["run"]
    tok, ip = models.load_processors(config.finetuned_dir(run))
    tup = pd.read_parquet(config.tuples_path(run)).head(6)
    release = slice3d.Slice3D(rehearsal["release"] / "train-image.hdf5", rehearsal["release"] / "train-metadata.csv")
    data = qa.TupleDataset(tup, qa.ImageCache(release, ip), packed=rehearsal["cfg"]["train"]["packed"])
    batch = qa.collate(tok, ip)([data[i] for i in range(len(data))])
    n_labelled = 0
    for row, answer in zip(batch["labels"], tup.answer):
        labelled = row[row != inputs.IGNORE_INDEX].tolist()
        assert tok.decode(labelled) == answer + "<|im_end|>"
        n_labelled += len(labelled)
    # the training loop's loss (train.py: loss.labelled_loss) is the mean cross-entropy over
    # exactly those tokens, each predicted from the position before it
    import torch
    from skinlib.loss import labelled_loss
    net = models.load(rehearsal["qwen"], device="cpu").model
    with torch.no_grad():
        got = labelled_loss(net, batch)
        fwd = {k: v for k, v in batch.items() if k != "labels"}
        logits = net(**fwd).logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    keep = target != inputs.IGNORE_INDEX
    want = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    assert int(keep.sum()) == n_labelled
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_replies_of_a_random_model_are_counted_as_unparsed(rehearsal):
    run = rehearsal["run"]
    pred = pd.read_csv(config.predictions_path(run), keep_default_na=False, na_values=[""])
    r2 = pd.read_csv(config.r2_path(run))
    assert len(pred) == 8 * 16 and pred.pred.isna().any()
    assert r2.unparsed.sum() == pred.pred.isna().sum()
    assert (r2.set_index("attribute").unparsed == pred.groupby("attribute").pred.apply(lambda s: s.isna().sum())
            .reindex(r2.attribute)).all()
    sampled = pd.read_csv(config.sampled_path(run))
    assert sampled.isic_id.nunique() == 2


def test_every_chapter_renders(rehearsal):
    import nbformat
    run, html = rehearsal["run"], rehearsal["html"]
    for stage in config.STAGE_NAMES:
        nb = nbformat.read(config.stage_dir(run, stage) / f"{stage}.ipynb", as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, f"{stage}: {errors[:1]}"
        page = html / "book" / "run" / f"{stage}.html"
        assert page.exists(), page
    # method (e) is MONET from the local folder, not the offline stand-in
    text = (html / "book" / "run" / "04_embed.html").read_text()
    assert "MONET" in text
    retrieval = pd.read_csv(config.retrieval_path(run))
    assert "baseline_encoder" in set(retrieval.method)


def test_the_book_command_finds_the_launched_training_and_extractions(rehearsal):
    """What `accelerate launch` wrote (the model, every shard) is what the chapters read: the
    chain after it retrains nothing and extracts nothing again."""
    run, started = rehearsal["run"], rehearsal["started"]
    book_at = started[next(c for c in started if c.startswith("make book"))]
    finetune_at = started[next(c for c in started if "skinlib.finetune" in c)]
    model = config.finetuned_dir(run) / "adapter_model.safetensors"
    assert finetune_at < model.stat().st_mtime < book_at
    shards = [p for p in (config.stage_dir(run, "04_embed") / "embeddings").rglob("shard-*")]
    assert {p.parent.name for p in shards} >= {"tuned_db", "tuned_queries", "untuned_db", "untuned_queries"}
    assert all(p.stat().st_mtime < book_at for p in shards)
    history = pd.read_csv(config.checkpoint_dir(run) / "history.csv")
    assert history.step.is_unique and history.step.max() == json.loads(
        (config.finetuned_dir(run) / "summary.json").read_text())["steps"]
