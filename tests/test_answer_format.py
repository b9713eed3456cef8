"""Format-constrained greedy decoding: the answer shapes, the constraint on the real tiny Qwen2-VL
(every reply in shape; untouched replies equal the plain greedy ones; changed ones re-asked)."""
import re

import numpy as np
import pandas as pd
import pytest
import torch

from skinlib import answer_format, attributes, metrics, model as mdl, predict, qa, tuples
from skinlib.answer_format import END, Shape

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_shape_allows_exactly_the_answer_format():
    s = Shape(min_width=1, max_width=2, decimals=2, negative=True)
    assert set(s.allowed("")) == set("0123456789-")
    assert set(s.allowed("-")) == set("0123456789")
    assert set(s.allowed("7")) == set("0123456789.")
    assert s.allowed("71") == "." and s.allowed("-71") == "."
    assert set(s.allowed("7.")) == set("0123456789") and s.allowed("7.25") == END
    for ok in ("7.25", "-13.93", "00.10"):
        assert s.matches(ok), ok
    for bad in ("310.8", "7.2", "7.255", "7", "-", "", "1.2.3", "+1.00", ".25"):
        assert not s.matches(bad), bad
    whole = Shape(min_width=2, max_width=2, decimals=0, negative=False)
    assert whole.matches("42") and not whole.matches("42.") and not whole.matches("-42")
    assert whole.allowed("4") == "0123456789" and whole.allowed("42") == END


def test_shapes_follow_the_training_answers_and_name_a_bad_one():
    a = attributes.get("deltaB")
    tup = pd.DataFrame({"attribute": "deltaB", "answer": [a.format_answer(v) for v in (0.5, -3.25, 12.0)]})
    assert answer_format.shapes(tup) == {"deltaB": Shape(1, 2, a.decimals, True)}
    pos = pd.DataFrame({"attribute": "deltaB", "answer": [a.format_answer(v) for v in (0.5, 3.25)]})
    assert answer_format.shapes(pos)["deltaB"] == Shape(1, 1, a.decimals, False)
    with pytest.raises(ValueError, match="deltaB.*'3.2'"):
        answer_format.shapes(pd.DataFrame({"attribute": "deltaB", "answer": ["0.50", "3.2"]}))
    with pytest.raises(KeyError):
        answer_format.shapes(pd.DataFrame({"attribute": "nope", "answer": ["1.0"]}))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, phantom_release):
    torch.set_num_threads(1)
    release = phantom_release(tmp_path_factory.mktemp("phantom"), 8, seed=5)
    loaded = mdl.load(mdl.build_tiny(tmp_path_factory.mktemp("tiny"), seed=0))
    return release, loaded


def test_constrained_replies_are_in_shape_and_the_plain_ones_are_kept(setup):
    """A random-init model replies with junk; constrained, every reply is an answer of its
    attribute's shape. Rows the constraint did not touch equal the plain greedy replies, and for
    the changed rows the plain reply is what the model says unconstrained."""
    release, loaded = setup
    frame = release.attribute_frame().head(4)
    names = [n for n in attributes.NAMES if frame[n].notna().all()]
    shapes = {n: Shape(1, 2, attributes.get(n).decimals, n == "deltaB") for n in names}
    cache = qa.ImageCache(release, loaded.image_processor)
    args = (loaded.model, loaded.tokenizer, loaded.image_processor, cache, frame)
    plain = predict.predict(*args, names=names, progress=False, batch_size=16)
    got = predict.predict(*args, names=names, progress=False, batch_size=16, shapes=shapes)
    assert all(shapes[a].matches(r) for a, r in zip(got.attribute, got.reply)), got.reply.tolist()
    assert got.pred.notna().all()
    assert got.overridden.any(), "a random-init model should need the constraint somewhere"
    assert not plain.overridden.any()
    assert (got.free_reply == plain.reply).all()
    kept = ~got.overridden
    assert (got.reply[kept] == plain.reply[kept]).all() and (got.reply[~got.overridden] != "").all()
    assert (got.reply[got.overridden] != plain.reply[got.overridden]).all()
    np.testing.assert_array_equal(got.free_pred.to_numpy(), plain.pred.to_numpy())
    # the plain readings score as the unconstrained run does
    pd.testing.assert_frame_equal(metrics.r2_table(predict.free_readings(got)), metrics.r2_table(plain))


def test_constraint_needs_a_shape_for_every_asked_attribute(setup):
    release, loaded = setup
    frame = release.attribute_frame().head(1)
    cache = qa.ImageCache(release, loaded.image_processor)
    with pytest.raises(KeyError, match="no answer shape"):
        predict.predict(loaded.model, loaded.tokenizer, loaded.image_processor, cache, frame,
                        names=["areaMM2", "deltaB"], progress=False, shapes={"areaMM2": Shape(1, 3, 1, False)})


def test_a_tokenizer_that_merges_answer_characters_is_refused(setup):
    _, loaded = setup
    ids = answer_format.character_ids(loaded.tokenizer)
    assert len(set(ids.values())) == 13

    # a real word-level tokenizer that keeps a whole number as one token
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(list("0123456789-.") + ["-12.5", "<unk>", "<|im_end|>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with pytest.raises(ValueError, match="merges"):
        answer_format.character_ids(PreTrainedTokenizerFast(tokenizer_object=tok))


def test_shapes_of_real_training_tuples_match_every_answer(setup):
    release, _ = setup
    tup = tuples.sample_tuples(release.attribute_frame(), w=5, seed=0)
    shapes = answer_format.shapes(tup)
    assert set(shapes) == set(tup.attribute)
    assert all(shapes[a].matches(t) for a, t in zip(tup.attribute, tup.answer))
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", t) for t in tup.answer)


def test_sampled_replies_are_in_shape_seeded_and_read_as_their_median(setup):
    """k replies per question drawn from the model, held to the shape; `pred` is the median of
    their readings; a seed gives the same draws, another seed others; torch's state is untouched."""
    import json
    release, loaded = setup
    frame = release.attribute_frame().head(2)
    names = ["areaMM2", "deltaB"]
    shapes = {n: Shape(1, 2, attributes.get(n).decimals, n == "deltaB") for n in names}
    cache = qa.ImageCache(release, loaded.image_processor)
    args = (loaded.model, loaded.tokenizer, loaded.image_processor, cache, frame)
    state = torch.get_rng_state()
    got = predict.sample(*args, k=8, seed=0, names=names, batch_size=16, shapes=shapes, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(got) == 4 and list(got.columns) == ["isic_id", "attribute", "true", "pred", "samples", "parsed"]
    for r in got.itertuples():
        replies = json.loads(r.samples)
        assert len(replies) == 8 and all(shapes[r.attribute].matches(x) for x in replies), replies
        vals = [attributes.get(r.attribute).read_answer(x) for x in replies]
        assert r.parsed == 8 and r.pred == pytest.approx(float(np.median(vals)))
        assert r.true == frame.set_index("isic_id").loc[r.isic_id, r.attribute]
    assert got.samples.map(lambda s: len(set(json.loads(s))) > 1).any(), "sampling, not greedy"
    again = predict.sample(*args, k=8, seed=0, names=names, batch_size=16, shapes=shapes, progress=False)
    pd.testing.assert_frame_equal(got, again)
    other = predict.sample(*args, k=8, seed=1, names=names, batch_size=16, shapes=shapes, progress=False)
    assert (other.samples != got.samples).any()
    with pytest.raises(ValueError, match="k must be"):
        predict.sample(*args, k=0, names=names, progress=False)


def test_samples_follow_the_models_own_first_character_probabilities(setup):
    """Temperature 1 and no top-k/top-p cut: the first characters of many samples of one question
    come with the probabilities the model gives them within the shape (softmax over the allowed
    characters of its logits at the reply's first position). The random-init model's head is
    scaled by 10 so that those probabilities differ clearly (0.47 down to 0.001): a sampler with
    another temperature or a top-p cut would then miss them."""
    import copy
    import json
    from skinlib.inputs import build_batch
    release, loaded = setup
    net = copy.deepcopy(loaded.model)
    with torch.no_grad():
        net.lm_head.weight.mul_(10.0)
    frame = release.attribute_frame().head(1)
    att = attributes.get("deltaB")
    shape = Shape(1, 2, att.decimals, True)
    cache = qa.ImageCache(release, loaded.image_processor)
    k = 600
    got = predict.sample(net, loaded.tokenizer, loaded.image_processor, cache, frame, k=k,
                         names=[att.name], batch_size=k, shapes={att.name: shape}, progress=False)
    first = pd.Series([r[0] for r in json.loads(got.samples.iloc[0])]).value_counts(normalize=True)
    ids = answer_format.character_ids(loaded.tokenizer)
    chars = shape.allowed("")
    batch = build_batch(loaded.tokenizer, loaded.image_processor, [cache[frame.isic_id.iloc[0]]], [att.question])
    with torch.no_grad():
        logits = net(**batch).logits[0, -1]
    probs = torch.softmax(logits[[ids[c] for c in chars]], -1).numpy()
    freq = first.reindex(list(chars)).fillna(0).to_numpy()
    assert probs.max() > 0.3 and (probs > 0.05).sum() >= 3, f"the test needs a spread of probabilities: {probs}"
    np.testing.assert_allclose(freq, probs, atol=0.05)


def test_unparsed_samples_are_counted_and_an_unread_question_is_nan(setup):
    """Unconstrained, a random-init model's samples are mostly not numbers: they are counted in
    `parsed`, and a question none of whose samples is a number has pred NaN, which r2_table reports
    as unparsed."""
    release, loaded = setup
    frame = release.attribute_frame().head(2)
    cache = qa.ImageCache(release, loaded.image_processor)
    got = predict.sample(loaded.model, loaded.tokenizer, loaded.image_processor, cache, frame, k=3,
                         names=["areaMM2", "B"], batch_size=6, progress=False)
    assert (got.parsed < 3).any()
    assert got.pred.isna().equals(got.parsed == 0)
    r2 = metrics.r2_table(got)
    assert r2.unparsed.sum() == int((got.parsed == 0).sum())
