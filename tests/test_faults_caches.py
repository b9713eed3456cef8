"""No damaged cache is ever reused (issue 27), and plain greedy is plain (issue 29).

Every stored artifact a later step trusts is damaged here on real files the real code wrote (the
real tiny Qwen2-VL, real CSV and safetensors shards, a real trained encoder, a real papermill
stage): cut at a line boundary, replaced by other contents of the same size, left unsealed,
deleted. Each must be named (file and what is wrong) and recomputed or refused, never read.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from skinlib import answer_format, attributes, config, embed, encoder, model as mdl, predict, qa, resumable, study

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def release(tmp_path_factory, phantom_release):
    return phantom_release(tmp_path_factory.mktemp("phantom"), 6, seed=7)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return mdl.load(mdl.build_tiny(tmp_path_factory.mktemp("tiny"), seed=0))


def _same_size_other_bytes(path: Path, start: int) -> None:
    """Rewrite `path` with the same length, every byte from `start` on changed (mtime moves)."""
    data = bytearray(path.read_bytes())
    for i in range(start, len(data)):
        data[i] ^= 0x01
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------ prediction shards
def _cut_at_a_line(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: len(lines) // 2]))   # still a valid CSV, half the rows


def _other_values_same_size(path: Path) -> None:
    """One digit of the first data row changed: a valid shard of the same size, other contents."""
    text = path.read_text()
    i = next(j for j in range(text.index("\n") + 1, len(text)) if text[j].isdigit())
    path.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])


def _unsealed_copy_in(path: Path) -> None:
    """A shard that someone copied in: other contents, and no seal (it was never finished here)."""
    _other_values_same_size(path)
    resumable.seal_path(path).unlink(missing_ok=True)


@pytest.mark.parametrize("damage, says", [(_cut_at_a_line, "cut short"), (_other_values_same_size, "sha256"),
                                          (_unsealed_copy_in, "not sealed")])
def test_a_damaged_prediction_shard_is_named_and_recomputed(release, tiny, tmp_path, capsys, damage, says):
    frame = release.attribute_frame().head(4)
    cache = qa.ImageCache(release, tiny.image_processor)
    args = (tiny.model, tiny.tokenizer, tiny.image_processor, cache, frame, tmp_path)
    shapes = {a.name: answer_format.Shape(1, 2, 1, True) for a in attributes.ATTRIBUTES}
    kw = dict(shard_images=2, key="m", progress=False, max_new_tokens=3, shapes=shapes)
    whole = predict.predict_sharded(*args, **kw)
    assert len(whole) == int(frame[list(attributes.NAMES)].notna().to_numpy().sum())
    shard = tmp_path / "shard-00001.csv"
    damage(shard)
    capsys.readouterr()
    again = predict.predict_sharded(*args, **kw)
    # the damaged shard was not read: every row is back, with the model's own replies
    pd.testing.assert_frame_equal(again, whole, check_dtype=False)
    said = capsys.readouterr().out
    assert "shard-00001.csv" in said and says in said, said
    assert resumable.check(shard) is None   # recomputed and sealed again


def test_sampled_and_scored_tables_are_sealed_and_a_damaged_one_is_refused(release, tiny, tmp_path):
    frame = release.attribute_frame().head(2)
    cache = qa.ImageCache(release, tiny.image_processor)
    sampled = predict.sample(tiny.model, tiny.tokenizer, tiny.image_processor, cache, frame, k=2,
                             max_new_tokens=3, progress=False)
    path = resumable.write_csv(sampled, tmp_path / "sampled.csv")
    assert resumable.check(path, sampled.attrs["job"], rows=len(sampled)) is None
    pd.testing.assert_frame_equal(pd.read_csv(resumable.verified(path)), pd.read_csv(path))
    _cut_at_a_line(path)
    with pytest.raises(resumable.Damaged, match=r"sampled\.csv.*cut short"):
        resumable.verified(path)


# ------------------------------------------------------------------------ embedding shards
def _other_vectors_same_header(out: Path) -> None:
    """shard-00001 replaced by shard-00000's vectors under shard-00001's own header (job and ids):
    a real safetensors file of the same size that names the job."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    one, zero = out / "shard-00001.safetensors", out / "shard-00000.safetensors"
    with safe_open(str(one), framework="np") as f:
        meta = f.metadata()
    with safe_open(str(zero), framework="np") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    size = one.stat().st_size
    save_file(arrays, str(one), metadata=meta)
    assert one.stat().st_size == size


def _unsealed_other_vectors(out: Path) -> None:
    _other_vectors_same_header(out)
    resumable.seal_path(out / "shard-00001.safetensors").unlink(missing_ok=True)


class _Reads:
    def __init__(self, images):
        self.images, self.read = images, []

    def __call__(self, isic_id):
        self.read.append(isic_id)
        return self.images[isic_id]


@pytest.mark.parametrize("damage, says", [(_other_vectors_same_header, "sha256"),
                                          (_unsealed_other_vectors, "not sealed")])
def test_an_embedding_shard_holding_other_vectors_is_refused_and_recomputed(release, tiny, tmp_path, capsys,
                                                                            damage, says):
    images = {i: release.image(i) for i in release.ids[:4]}
    ids = list(images)

    def run():
        src = _Reads(images)
        embed.extract(tiny.model, tiny.tokenizer, tiny.image_processor, src, ids, tmp_path,
                      names=["areaMM2", "A"], shard_size=2, batch_size=2, model_key="tiny", progress=False)
        return src.read

    run()
    ref = embed.load_embeddings(tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError, match=rf"shard-00001\.safetensors.*{says}"):
        embed.load_embeddings(tmp_path)
    capsys.readouterr()
    assert run() == ids[2:4]   # only the damaged shard is embedded again
    said = capsys.readouterr().out
    assert "shard-00001.safetensors" in said and says in said, said
    got = embed.load_embeddings(tmp_path)
    assert got[0] == ref[0]
    for k in ref[1]:
        np.testing.assert_array_equal(got[1][k], ref[1][k])


def test_a_small_array_altered_in_place_is_refused(tmp_path):
    run = tmp_path / "run"
    study.save_array(run, "encoder_db", np.arange(24, dtype=np.float32).reshape(6, 4))
    path = config.embeddings_dir(run, "encoder_db").with_suffix(".npy")
    _same_size_other_bytes(path, start=path.stat().st_size - 8)   # the last values, header intact
    with pytest.raises(ValueError, match=r"encoder_db\.npy.*sha256"):
        study.load_array(run, "encoder_db")


# ------------------------------------------------------------------------ the baseline encoder
ARCH = {"image_size": 32, "channels": [8, 8, 8, 8]}
TRAIN = {"steps": 2, "batch_size": 4, "seed": 0, "arch": ARCH}


@pytest.fixture(scope="module")
def encoder_images(release):
    return [release.image(i) for i in release.ids]


def test_a_damaged_encoder_is_named_and_trained_again(encoder_images, tmp_path, capsys):
    spec = {"kind": "contrastive", "path": str(tmp_path / "enc"), **TRAIN}
    first = encoder.load_encoder(spec, images=encoder_images, progress=False, device="cpu")
    want = first.embed(encoder_images)
    weights = tmp_path / "enc" / encoder.WEIGHTS
    _same_size_other_bytes(weights, start=weights.stat().st_size - 64)   # the last weights
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*sha256"):
        encoder.load_encoder(spec, device="cpu")   # no images: refused, not loaded
    capsys.readouterr()
    again = encoder.load_encoder(spec, images=encoder_images, progress=False, device="cpu")
    assert "model.safetensors" in capsys.readouterr().out
    np.testing.assert_array_equal(again.embed(encoder_images), want)
    # a folder trained on other images is not this run's encoder, whatever its recipe
    with pytest.raises(FileNotFoundError, match="other images"):
        encoder.load_encoder(spec, device="cpu", data_key="another run's images")


# ------------------------------------------------------------------------ a stage's stamp
STAGE_SOURCE = '''# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% tags=["parameters"]
profile = "default"
out = None

# %%
from pathlib import Path

Path(out, "00_phantom").mkdir(parents=True, exist_ok=True)
Path(out, "00_phantom", "table.csv").write_text("a,b\\n" + "".join(f"{i},{i * i}\\n" for i in range(40)))
Path(out, "metrics").mkdir(exist_ok=True)
Path(out, "metrics", "fake.csv").write_text("x\\n1\\n2\\n")
'''


def test_a_stage_whose_files_changed_is_rerun_and_says_which(tmp_path, monkeypatch, capsys):
    """A tiny real stage (a jupytext notebook executed by papermill) in the place of 00_phantom."""
    from skinlib import run

    nb = tmp_path / "fake_stage.py"
    nb.write_text(STAGE_SOURCE)
    monkeypatch.setattr(config, "STAGES", (("00_phantom", str(nb), ()),))
    out = tmp_path / "run"
    table, metric = out / "00_phantom" / "table.csv", out / "metrics" / "fake.csv"

    def chain():
        capsys.readouterr()
        status = run.run_chain("smoke", out=out)["00_phantom"]
        return status, capsys.readouterr().out

    assert chain()[0] == "ran"
    assert chain()[0] == "cached"
    _cut_at_a_line(table)                       # cut at a line boundary: still a valid table
    status, said = chain()
    assert status == "ran" and "table.csv" in said and "cut short" in said, said
    _same_size_other_bytes(table, start=10)     # same size, other contents
    status, said = chain()
    assert status == "ran" and "table.csv" in said and "sha256" in said, said
    metric.unlink()                             # a file it wrote outside its folder
    status, said = chain()
    assert status == "ran" and "fake.csv" in said and "missing" in said, said
    st = table.stat()                           # touched only (a copy): the contents vouch for it
    os.utime(table, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert chain()[0] == "cached"


# ------------------------------------------------------------------------ plain greedy (issue 29)
STOP = ("<|im_end|>", "<|endoftext|>")


def _argmax_replies(loaded, images, questions, steps: int) -> tuple[list[str], list[list[int]]]:
    """Plain greedy by hand: a full forward per step, the likeliest token, until a stop token.
    Returns the replies and their tokens."""
    from skinlib.inputs import build_batch

    tok = loaded.tokenizer
    stop = {tok.convert_tokens_to_ids(t) for t in STOP}
    replies, tokens = [], []
    with torch.no_grad():
        for img, q in zip(images, questions):
            b = build_batch(tok, loaded.image_processor, [img], [q])
            new = []
            for _ in range(steps):
                t = int(loaded.model(**b, use_cache=False).logits[0, -1].argmax())
                if t in stop:
                    break
                new.append(t)
                one = torch.tensor([[t]])
                b["input_ids"] = torch.cat([b["input_ids"], one], 1)
                b["attention_mask"] = torch.cat([b["attention_mask"], torch.ones_like(one)], 1)
                b["mm_token_type_ids"] = torch.cat([b["mm_token_type_ids"], torch.zeros_like(one)], 1)
            replies.append(tok.decode(new, skip_special_tokens=True).strip())
            tokens.append(new)
    return replies, tokens


@pytest.fixture(scope="module")
def asked(release):
    atts = attributes.ATTRIBUTES[:3]
    return [release.image(i) for i in release.ids[:2] for _ in atts], [a.question for _ in range(2) for a in atts]


@pytest.fixture(scope="module")
def argmax(tiny, asked):
    return _argmax_replies(tiny, *asked, steps=6)


@pytest.fixture
def restore_generation_config(tiny):
    kept = copy.deepcopy(tiny.model.generation_config)
    yield tiny.model.generation_config
    tiny.model.generation_config = kept


# Settings a checkpoint's generation_config may carry, each of which changes the tiny model's
# greedy replies when honoured (`first`: the first token greedy decoding takes).
PENALISING = {
    "repetition_penalty": lambda first: {"repetition_penalty": 5.0},   # the 7B Instruct release: 1.05
    "no_repeat_ngram_size": lambda first: {"no_repeat_ngram_size": 1},
    "num_beams": lambda first: {"num_beams": 3},
    "bad_words_ids": lambda first: {"bad_words_ids": [[first]]},
    "suppress_tokens": lambda first: {"suppress_tokens": [first]},
    "return_dict_in_generate": lambda first: {"return_dict_in_generate": True, "output_scores": True},
}


@pytest.mark.parametrize("setting", list(PENALISING))
def test_greedy_replies_are_the_argmax_whatever_the_checkpoints_generation_config(tiny, asked, argmax,
                                                                                 restore_generation_config, setting):
    images, questions = asked
    want, tokens = argmax
    assert tokens[0], "the first greedy reply is empty: no token to ban"
    for k, v in PENALISING[setting](tokens[0][0]).items():
        setattr(restore_generation_config, k, v)
    got = predict.generate(tiny.model, tiny.tokenizer, tiny.image_processor, images, questions, 6)
    assert got == want


def test_sampling_and_the_shape_constraint_ignore_the_checkpoints_penalties(release, tiny, asked,
                                                                           restore_generation_config):
    images, questions = asked
    shapes = [answer_format.Shape(1, 2, 1, False)] * len(questions)

    def both():
        torch.manual_seed(0)
        sampled = predict.generate(tiny.model, tiny.tokenizer, tiny.image_processor, images, questions, 6,
                                   sample=True)
        held = predict.generate(tiny.model, tiny.tokenizer, tiny.image_processor, images, questions, 6,
                                row_shapes=shapes)
        return sampled, held

    plain = both()
    restore_generation_config.repetition_penalty = 5.0
    restore_generation_config.no_repeat_ngram_size = 1
    restore_generation_config.top_k = 2
    assert both() == plain
