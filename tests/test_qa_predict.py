"""Training items (one tuple or all W per sequence), greedy prediction with counted non-numbers,
resumable sharded prediction, and saving/reloading fine-tuned models (full and LoRA); all on the
real tiny Qwen2-VL, a real phantom release, real peft."""
import numpy as np
import pandas as pd
import pytest
import torch

from skinlib import attributes, finetune, metrics, model as mdl, predict, qa, split, tuples

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def release(tmp_path_factory, phantom_release):
    return phantom_release(tmp_path_factory.mktemp("phantom"), 12, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return mdl.build_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


def test_image_cache_encodes_once_and_workers_start_empty(release, tiny):
    loaded = mdl.load(tiny)
    cache = qa.ImageCache(release, loaded.image_processor).fill(release.ids[:3], progress=False)
    assert len(cache) == 3 and cache[release.ids[0]] is cache[release.ids[0]]
    import pickle
    assert len(pickle.loads(pickle.dumps(cache))) == 0
    off = qa.ImageCache(release, loaded.image_processor, keep=False)
    off[release.ids[0]]
    assert len(off) == 0


def test_packed_items_hold_all_w_tuples_of_an_image_and_label_every_answer(release, tiny):
    loaded = mdl.load(tiny)
    frame = release.attribute_frame()
    tup = tuples.sample_tuples(frame, w=5, seed=0)
    cache = qa.ImageCache(release, loaded.image_processor)
    single, packed = qa.TupleDataset(tup, cache), qa.TupleDataset(tup, cache, packed=True)
    assert len(single) == len(tup) and len(packed) == tup.isic_id.nunique()
    img, qs, ans = packed[0]
    first = tup[tup.isic_id == tup.isic_id.iloc[0]]
    assert qs == list(first.question) and ans == list(first.answer)
    collate, count = qa.collate(loaded.tokenizer, loaded.image_processor), qa.tuple_counter(loaded.tokenizer)
    b_single = collate([single[i] for i in range(10)])
    b_packed = collate([packed[0], packed[1]])
    assert count(b_single) == 10
    assert count(b_packed) == len(packed[0][2]) + len(packed[1][2])
    # the labelled tokens of the packed rows are exactly the answers' tokens (+ one <|im_end|> each)
    answer_tokens = sum(len(loaded.tokenizer(a, add_special_tokens=False)["input_ids"]) + 1
                        for i in (0, 1) for a in packed[i][2])
    assert int((b_packed["labels"] != -100).sum()) == answer_tokens
    # one image per packed row: its tokens appear once per row, not once per tuple
    n_img = packed[0][0].n_tokens(2)
    assert int(b_packed["mm_token_type_ids"].sum()) == 2 * n_img


def test_prediction_asks_every_available_attribute_and_counts_non_numbers(release, tiny):
    loaded = mdl.load(tiny)
    frame = release.attribute_frame().head(3).copy()
    frame.loc[frame.index[0], "norm_color"] = np.nan  # excluded: not asked
    cache = qa.ImageCache(release, loaded.image_processor)
    pred = predict.predict(loaded.model, loaded.tokenizer, loaded.image_processor, cache, frame,
                           batch_size=16, progress=False)
    assert len(pred) == 3 * 16 - 1
    assert not ((pred.isic_id == frame.isic_id.iloc[0]) & (pred.attribute == "norm_color")).any()
    # a random-init model replies garbage: kept, NaN in pred, counted as unparsed per attribute
    assert pred.reply.map(lambda r: isinstance(r, str)).all()
    r2 = metrics.r2_table(pred)
    assert (r2.n + r2.unparsed).sum() == len(pred)
    assert r2.unparsed.sum() == pred.pred.isna().sum()
    # batching is exact: the same replies one row at a time
    one = predict.predict(loaded.model, loaded.tokenizer, loaded.image_processor, cache, frame.head(1),
                          batch_size=1, progress=False)
    assert one.reply.tolist() == pred[pred.isic_id == frame.isic_id.iloc[0]].reply.tolist()


def test_max_answer_tokens_covers_every_typical_answer(tiny):
    loaded = mdl.load(tiny)
    n = predict.max_answer_tokens(loaded.tokenizer, margin=0)
    for a in attributes.ATTRIBUTES:
        for v in (0.0, -(10 ** a.int_digits) + 0.01, 10 ** a.int_digits - 0.01):
            assert len(loaded.tokenizer(a.format_answer(v), add_special_tokens=False)["input_ids"]) <= n


def test_sharded_prediction_resumes_and_equals_one_pass(release, tiny, tmp_path):
    loaded = mdl.load(tiny)
    frame = release.attribute_frame().head(5)
    cache = qa.ImageCache(release, loaded.image_processor)
    args = (loaded.model, loaded.tokenizer, loaded.image_processor, cache)
    whole = predict.predict(*args, frame, progress=False, max_new_tokens=4)

    class Interrupt(Exception):
        pass

    calls = {"n": 0}
    real = predict.predict

    def flaky(*a, **k):  # the third shard is interrupted
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupt
        return real(*a, **k)

    predict.predict = flaky
    try:
        with pytest.raises(Interrupt):
            predict.predict_sharded(*args, frame, tmp_path, shard_images=2, key="m", progress=False,
                                    max_new_tokens=4)
    finally:
        predict.predict = real
    assert sorted(p.name for p in tmp_path.glob("shard-*.csv")) == ["shard-00000.csv", "shard-00001.csv"]
    resumed = predict.predict_sharded(*args, frame, tmp_path, shard_images=2, key="m", progress=False,
                                      max_new_tokens=4)
    pd.testing.assert_frame_equal(resumed, whole, check_dtype=False)
    # another job (different images) does not reuse these shards
    other = predict.predict_sharded(*args, frame.tail(2), tmp_path, shard_images=2, key="m",
                                    progress=False, max_new_tokens=4)
    assert other.isic_id.tolist() == whole[whole.isic_id.isin(frame.tail(2).isic_id)].isic_id.tolist()
    # nor does another model under the same key (a model retrained at the same path)
    predict.predict_sharded(*args, frame, tmp_path, shard_images=2, key="m", progress=False, max_new_tokens=4)
    job = (tmp_path / "job.json").read_text()
    changed = mdl.load(tiny).model
    torch.manual_seed(1)
    with torch.no_grad():
        for p in changed.parameters():
            p += 0.5 * torch.randn_like(p)
    args2 = (changed, loaded.tokenizer, loaded.image_processor, cache)
    again = predict.predict_sharded(*args2, frame, tmp_path, shard_images=2, key="m", progress=False,
                                    max_new_tokens=4)
    assert (tmp_path / "job.json").read_text() != job
    pd.testing.assert_frame_equal(again, predict.predict(*args2, frame, progress=False, max_new_tokens=4),
                                  check_dtype=False)


def _changed_registry(monkeypatch):
    """The registry with deltaL asked and written the other way round (a changed question and sign)."""
    import dataclasses
    changed = tuple(dataclasses.replace(a, question="What is dL?", answer_sign=-a.answer_sign)
                    if a.name == "deltaL" else a for a in attributes.ATTRIBUTES)
    monkeypatch.setattr(attributes, "ATTRIBUTES", changed)


def test_a_changed_registry_is_another_prediction_job_and_another_recipe(release, tiny, tmp_path, monkeypatch):
    from skinlib import config
    loaded = mdl.load(tiny)
    frame = release.attribute_frame().head(2)
    args = (loaded.model, loaded.tokenizer, loaded.image_processor, qa.ImageCache(release, loaded.image_processor))
    predict.predict_sharded(*args, frame, tmp_path / "p", key="m", progress=False, max_new_tokens=2)
    job = (tmp_path / "p" / "job.json").read_text()
    cfg = config.load_profile("smoke")
    before = finetune.recipe(cfg, tmp_path)
    _changed_registry(monkeypatch)
    after = finetune.recipe(cfg, tmp_path)
    changes = finetune._changes(before, after)
    assert changes and all(c.startswith("attributes ") for c in changes)
    again = predict.predict_sharded(*args, frame, tmp_path / "p", key="m", progress=False, max_new_tokens=2)
    assert (tmp_path / "p" / "job.json").read_text() != job
    assert len(again) == 2 * 16


def test_the_packing_layout_is_in_a_packed_recipe_only(tmp_path, monkeypatch):
    """A packed run trained on another row layout is another recipe; a run of one tuple per
    sequence (the paper profile) is not touched by a change of the packed layout."""
    from skinlib import config, inputs
    packed, single = config.load_profile("default"), config.load_profile("paper")
    assert packed["train"]["packed"] and not single["train"]["packed"]
    before = finetune.recipe(packed, tmp_path), finetune.recipe(single, tmp_path)
    monkeypatch.setattr(finetune, "PACKING", inputs.PACKING + "-changed")
    assert finetune._changes(before[0], finetune.recipe(packed, tmp_path)) == [
        f"packing {inputs.PACKING!r} -> {inputs.PACKING + '-changed'!r}"]
    assert finetune.recipe(single, tmp_path) == before[1]


def _logits(loaded, release):
    from skinlib.inputs import build_batch
    b = build_batch(loaded.tokenizer, loaded.image_processor, [release.image(release.ids[0])],
                    [attributes.ATTRIBUTES[0].question])
    with torch.no_grad():
        return loaded.model(**b).logits


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetuned_model_saves_and_reloads_to_identical_logits(tiny, release, tmp_path, method):
    loaded = mdl.load(tiny)
    net = loaded.model
    torch.manual_seed(0)
    if method == "lora":
        net = mdl.apply_lora(net, rank=4)
    for p in net.parameters():  # move the weights away from the base so equality means something
        if p.requires_grad:
            p.data += 0.05 * torch.randn_like(p)
    net.eval()
    want = _logits(mdl.Loaded(net, loaded.tokenizer, loaded.image_processor), release)
    mdl.save_finetuned(net, loaded.tokenizer, loaded.image_processor, tmp_path / "ft", base=str(tiny),
                       method=method)
    assert not list((tmp_path / "ft").glob("*.bin")) and list((tmp_path / "ft").glob("*.safetensors"))
    again = mdl.load_finetuned(tmp_path / "ft")
    got = _logits(again, release)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, _logits(mdl.load(tiny), release), atol=1e-3)


def test_finetuned_folder_and_method_errors(tiny, tmp_path):
    loaded = mdl.load(tiny)
    with pytest.raises(ValueError, match="not a peft model"):
        mdl.save_finetuned(loaded.model, loaded.tokenizer, loaded.image_processor, tmp_path, str(tiny), "lora")
    with pytest.raises(FileNotFoundError, match="finetune.json"):
        mdl.load_finetuned(tmp_path / "nothing")
    with pytest.raises(KeyError, match="learning_rate"):
        finetune.settings({"learning_rate": 1e-3})


def test_finetune_stage_trains_saves_and_is_reused(release, tmp_path, monkeypatch, capsys):
    from skinlib import config
    cfg = config.load_profile("smoke")
    # in this process (the monkeypatched release would not reach launched workers; the chain test
    # covers the launched path)
    cfg["train"].update(epochs=1.0, batch_size=4, warmup_steps=1, checkpoint_every=3, processes=1)
    run = tmp_path / "run"
    manifest = split.build_manifest(release.attribute_frame(), test_fraction=0.3, seed=0)
    split.save_manifest(manifest, config.manifest_path(run))
    monkeypatch.setattr(config, "release_files", lambda cfg, run: (release.image_path, release.metadata_path))
    first = finetune.run(cfg, run, device="cpu", progress=False)
    assert first["finished"] and not first["reused"] and first["method"] == "full"
    assert (config.finetuned_dir(run) / "model.safetensors").exists()
    hist = pd.read_csv(config.checkpoint_dir(run) / "history.csv")
    assert len(hist) == first["steps"]
    again = finetune.run(cfg, run, device="cpu", progress=False)
    assert again["reused"] and again["steps"] == first["steps"]
    # a key that cannot change the weights keeps the model; a changed recipe trains a new one and
    # says what changed, never resuming from or reusing the other recipe's files
    cfg["train"]["compare_steps"] = 7
    assert finetune.run(cfg, run, device="cpu", progress=False)["reused"]
    cfg["train"]["epochs"] = 2.0
    capsys.readouterr()
    longer = finetune.run(cfg, run, device="cpu", progress=False)
    assert "train.epochs 1.0 -> 2.0" in capsys.readouterr().err
    assert not longer["reused"] and longer["resumed_from"] is None and longer["steps"] == 2 * first["steps"]
    assert len(pd.read_csv(config.checkpoint_dir(run) / "history.csv")) == longer["steps"]
