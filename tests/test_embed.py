"""Embeddings (paper §3.3): the prefix-shared fast path equals plain full forwards for every
attribute, batching with mixed image sizes equals batch size 1, and sharded extraction resumes
without mixing jobs. Real tiny Qwen2-VL (random init), real phantom images.

Tolerance: the tiny model runs in float32; its last-layer states are O(1) (after RMSNorm, max
|value| ~3), and the fast and slow paths differ only in summation order (other batch shapes and
sequence lengths), measured at ~1e-6. 1e-4 leaves 100x headroom for other CPUs/BLAS while a real
error (a position off, a pad attended) moves states by >1e-2 (see test_wrong_positions_are_caught).
"""
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from skinlib import embed as E, inputs, model as mdl, resumable

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
TOL = 1e-4


@pytest.fixture(scope="module")
def release(tmp_path_factory, phantom_release):
    return phantom_release(tmp_path_factory.mktemp("phantom"), 6, seed=5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return mdl.load(mdl.build_tiny(tmp_path_factory.mktemp("tiny"), seed=0))


@pytest.fixture(scope="module")
def images(release):
    return {i: release.image(i) for i in release.ids}


def _maxdiff(a, b) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


def test_prompt_layout_is_the_prediction_prompt_cut_after_the_image(tiny, images):
    tok, ip = tiny.tokenizer, tiny.image_processor
    img = next(iter(images.values()))
    q = E.attribute_questions(["areaMM2"])[0]
    lay = E.Prompts(tok, ip, [q]).layout(inputs.encode_images(ip, [img])[0])
    ids = inputs.build_batch(tok, ip, [img], [q])["input_ids"][0].tolist()
    assert lay.prefix + lay.suffixes[0] == ids  # exactly the prompt the model answers
    assert lay.prefix[-1] == tok.convert_tokens_to_ids(E.VISION_END)
    assert tok.decode(lay.suffixes[0]).startswith(q) and tok.decode(lay.suffixes[0]).endswith("<|im_start|>assistant\n")
    assert E.multi_question(["areaMM2", "A"]) == "What are the lesion area in mm² and the mean A* inside the lesion?"
    assert E.multi_question(["areaMM2"]) == "What is the lesion area in mm²?"
    with pytest.raises(KeyError, match="nope"):
        E.multi_question(["areaMM2", "nope"])


def test_fast_equals_slow_for_every_attribute(tiny, images):
    m, tok, ip = tiny
    imgs = list(images.values())[:3]
    qs = E.attribute_questions() + [E.multi_question(["areaMM2", "A", "norm_border"])]
    fast = E.embed(m, tok, ip, imgs, qs, batch_size=3)
    slow = E.embed_slow(m, tok, ip, imgs, qs, batch_size=16)  # rows of two images share a batch
    assert fast["image_text"].shape == (3, 17, m.config.text_config.hidden_size)
    per_q = (fast["image_text"] - slow["image_text"]).abs().amax(dim=(0, 2))
    print("\nmax |fast - slow| per question:", " ".join(f"{d:.1e}" for d in per_q.tolist()),
          f"| h_im {_maxdiff(fast['image'], slow['image']):.1e}")
    assert (per_q < TOL).all(), per_q
    assert _maxdiff(fast["image"], slow["image"]) < TOL
    # the embeddings carry the question and the image: not a constant the comparison could miss
    assert (slow["image_text"][:, 0] - slow["image_text"][:, 1]).abs().max() > 1e-2
    assert (slow["image"][0] - slow["image"][1]).abs().max() > 1e-3


def test_wrong_positions_are_caught(tiny, images, monkeypatch):
    """The comparison can fail: continuing the suffix at its plain index (no rope_deltas) is off."""
    m, tok, ip = tiny
    img = list(images.values())[:1]
    qs = E.attribute_questions(["areaMM2", "A"])
    slow = E.embed_slow(m, tok, ip, img, qs)
    right = E._suffix_positions
    monkeypatch.setattr(E, "_suffix_positions", lambda P, S, d, r: right(P, S, torch.zeros_like(d), r))
    wrong = E.embed(m, tok, ip, img, qs)
    assert _maxdiff(wrong["image_text"], slow["image_text"]) > 1e-2


def test_mixed_image_sizes_batched_equal_batch_size_one(tiny, images):
    m, tok = tiny.model, tiny.tokenizer
    # A processor that keeps sizes (28-multiples stay as they are): 9, 16, 15 and 25 image tokens.
    ip = type(tiny.image_processor)(min_pixels=56 * 56, max_pixels=256 * 256)
    base = list(images.values())
    sizes = [(84, 84), (112, 112), (140, 84), (140, 140)]
    imgs = [base[k % len(base)].resize(wh) for k, wh in enumerate(sizes)]
    encs = inputs.encode_images(ip, imgs)
    assert [e.n_tokens(ip.merge_size) for e in encs] == [9, 16, 15, 25]
    padded = inputs.build_batch(tok, ip, encs, ["What?"] * 4)["attention_mask"]
    assert (padded[:, 0] == 0).sum() == 3  # the slow batch really is left-padded
    qs = E.attribute_questions(["areaMM2", "deltaLB", "A"])
    slow_b = E.embed_slow(m, tok, ip, encs, qs, batch_size=12)
    fast_b = E.embed(m, tok, ip, encs, qs, batch_size=4)
    worst = 0.0
    for i, e in enumerate(encs):
        slow_1 = E.embed_slow(m, tok, ip, [e], qs, batch_size=1)
        fast_1 = E.embed(m, tok, ip, [e], qs, batch_size=1)
        for kind in E.KINDS:
            assert _maxdiff(slow_b[kind][i], slow_1[kind][0]) < TOL, (i, kind)
            assert _maxdiff(fast_b[kind][i], fast_1[kind][0]) < TOL, (i, kind)
            assert _maxdiff(fast_1[kind][0], slow_1[kind][0]) < TOL, (i, kind)
            assert _maxdiff(fast_b[kind][i], slow_b[kind][i]) < TOL, (i, kind)
            worst = max(worst, _maxdiff(slow_b[kind][i], slow_1[kind][0]), _maxdiff(fast_b[kind][i], slow_1[kind][0]))
    print(f"\nmixed sizes: max |batched - batch size 1| {worst:.1e}")


# ------------------------------------------------------------------------------- extraction
class Source:
    """A callable images source that counts reads and can fail on its n-th read."""

    def __init__(self, images, fail_at=None):
        self.images, self.fail_at, self.read = images, fail_at, []

    def __call__(self, isic_id):
        if self.fail_at is not None and len(self.read) == self.fail_at:
            raise RuntimeError("disk went away")
        self.read.append(isic_id)
        return self.images[isic_id]


def _run(tiny, images, out, **kw):
    src = kw.pop("source", None) or Source(images)
    kw = {"shard_size": 2, "batch_size": 2, "progress": False, "model_key": "tiny", **kw}
    E.extract(tiny.model, tiny.tokenizer, tiny.image_processor, src, list(images), out, **kw)
    return src


@pytest.fixture(scope="module")
def reference(tiny, images, tmp_path_factory):
    """One uninterrupted run: 6 ids in 3 shards."""
    out = tmp_path_factory.mktemp("emb_ref")
    _run(tiny, images, out)
    return E.load_embeddings(out)


def test_extract_matches_embed_and_resumes_after_an_interruption(tiny, images, reference, tmp_path):
    ids, ref = reference
    d = tiny.model.config.text_config.hidden_size
    assert ids == list(images) and ref["image"].shape == (6, d) and ref["image_text"].shape == (6, 16, d)
    assert ref["image"].dtype == np.float16
    direct = E.embed(tiny.model, tiny.tokenizer, tiny.image_processor, list(images.values()))
    for kind in E.KINDS:  # float16 storage: relative error <= 2^-11
        np.testing.assert_allclose(ref[kind].astype(np.float32), direct[kind].numpy(), rtol=1e-3, atol=1e-3)

    with pytest.raises(RuntimeError, match="disk went away") as err:
        _run(tiny, images, tmp_path, source=Source(images, fail_at=3))
    assert repr(ids[3]) in "".join(getattr(err.value, "__notes__", []))
    assert [p.name for p in sorted(tmp_path.glob("shard-*.safetensors"))] == ["shard-00000.safetensors"]
    with pytest.raises(FileNotFoundError, match="2 of 3 shards missing"):
        E.load_embeddings(tmp_path)
    resumed = _run(tiny, images, tmp_path)
    assert resumed.read == ids[2:]  # the finished shard was skipped
    ids2, got = E.load_embeddings(tmp_path)
    assert ids2 == ids
    for kind in E.KINDS:
        np.testing.assert_array_equal(got[kind], ref[kind])


def test_shards_of_another_job_are_not_reused(tiny, images, reference, tmp_path):
    ids, ref = reference
    other = tmp_path / "other"
    _run(tiny, images, other, names=["areaMM2"], kinds=("image_text",))
    assert E.load_embeddings(other)[1]["image_text"].shape == (6, 1, tiny.model.config.text_config.hidden_size)
    mine = tmp_path / "mine"
    _run(tiny, images, mine)
    shutil.copy(other / "shard-00001.safetensors", mine / "shard-00001.safetensors")  # a stray shard
    with pytest.raises(ValueError, match="shard-00001.*cut short or replaced"):
        E.load_embeddings(mine)
    assert _run(tiny, images, mine).read == ids[2:4]  # only the foreign shard is redone
    np.testing.assert_array_equal(E.load_embeddings(mine)[1]["image_text"], ref["image_text"])
    for name in ("shard-00002.safetensors", "shard-00002.safetensors" + resumable.SEAL_SUFFIX):
        shutil.copy(other / name, mine / name)  # a stray shard with its own seal: another job's
    with pytest.raises(ValueError, match="shard-00002.*not by this job"):
        E.load_embeddings(mine)
    assert _run(tiny, images, mine).read == ids[4:6]
    # another model key is another job: everything is recomputed; so are other weights
    assert _run(tiny, images, mine, model_key="tuned").read == ids
    key = json.loads((mine / E.STAMP).read_text())["weights"]
    with torch.no_grad():
        p = tiny.model.lm_head.weight
        kept = p[0, 0].item()
        p[0, 0] = kept + 1.0
        try:
            assert resumable.model_fingerprint(tiny.model) != key
        finally:
            p[0, 0] = kept
    assert resumable.model_fingerprint(tiny.model) == key


def test_processes_split_the_shards(tiny, images, reference, tmp_path):
    assert E.process_shards(5, 0, 2) == [0, 2, 4] and E.process_shards(5, 1, 2) == [1, 3]
    assert E.process_shards(3) == [0, 1, 2]
    with pytest.raises(ValueError, match="process_index 2"):
        E.process_shards(5, 2, 2)
    ids, ref = reference
    reads = []
    for index in (0, 1):  # run one after the other; a real launch runs them side by side
        acc = SimpleNamespace(process_index=index, num_processes=2, wait_for_everyone=lambda: None)
        reads.append(_run(tiny, images, tmp_path, accelerator=acc).read)
    assert reads == [ids[0:2] + ids[4:6], ids[2:4]]
    got_ids, got = E.load_embeddings(tmp_path)
    assert got_ids == ids
    for kind in E.KINDS:
        np.testing.assert_array_equal(got[kind], ref[kind])


def test_a_free_question_is_extracted_as_its_own_job_and_found_finished_again(tiny, images, tmp_path):
    """Method (f)'s one multi-attribute question as an `extract` job: its vectors are `embed`'s for
    that question, labelled by the given name; a rerun reads no image; names and questions clash."""
    q = E.multi_question(["areaMM2", "Bext"])
    _run(tiny, images, tmp_path, kinds=("image_text",), questions={"multi": q})
    stored = E.open_embeddings(tmp_path)
    assert stored.names == ["multi"] and stored.ids == list(images)
    direct = E.embed(tiny.model, tiny.tokenizer, tiny.image_processor, list(images.values()), [q], image=False)
    np.testing.assert_allclose(stored.attribute(0, dtype=np.float32), direct["image_text"][:, 0].numpy(),
                               rtol=1e-3, atol=1e-3)
    assert _run(tiny, images, tmp_path, kinds=("image_text",), questions={"multi": q}).read == []
    # another question is another job
    assert _run(tiny, images, tmp_path, kinds=("image_text",), questions={"multi": q + " "}).read == list(images)
    for bad in (dict(names=["areaMM2"], kinds=("image_text",), questions={"multi": q}),   # both
                dict(kinds=("image",), questions={"multi": q}),   # no vectors of the question asked for
                dict(kinds=("image_text",), questions={})):       # no question
        with pytest.raises(ValueError, match="replaces `names`"):
            _run(tiny, images, tmp_path / "bad", **bad)
