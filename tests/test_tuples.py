import numpy as np
import pandas as pd
import pytest

from skinlib import attributes, tuples


def frame(n=200, seed=0):
    rng = np.random.default_rng(seed)
    f = pd.DataFrame({a: rng.random(n) * 10 for a in attributes.NAMES})
    f.insert(0, "isic_id", [f"I{i:04d}" for i in range(n)])
    return f


def test_w_distinct_attributes_per_image_seeded():
    f = frame()
    t = tuples.sample_tuples(f, w=5, seed=1)
    assert (t.groupby("isic_id").size() == 5).all()
    assert not t.duplicated(["isic_id", "attribute"]).any()        # without replacement
    pd.testing.assert_frame_equal(t, tuples.sample_tuples(f, w=5, seed=1))
    assert not t.attribute.equals(tuples.sample_tuples(f, w=5, seed=2).attribute)


def test_draws_are_uniform_over_attributes():
    t = tuples.sample_tuples(frame(4000), w=5, seed=0)
    share = t.attribute.value_counts(normalize=True)
    assert len(share) == 16
    # each attribute expected 1/16 = 0.0625 of 20,000 draws; binomial sd ~0.0017
    assert (share - 1 / 16).abs().max() < 0.008


def test_answers_use_the_registry_format_and_questions_its_text():
    f = frame(5)
    t = tuples.sample_tuples(f, w=16, seed=0)
    for r in t.itertuples():
        a = attributes.get(r.attribute)
        assert r.question == a.question
        assert r.answer == a.format_answer(f.set_index("isic_id").loc[r.isic_id, r.attribute])


def test_excluded_values_are_never_asked():
    f = frame(50)
    f.loc[:, "norm_color"] = np.nan
    f.loc[3, attributes.NAMES[:14]] = np.nan          # image 3 has only two values left
    t = tuples.sample_tuples(f, w=5, seed=0)
    assert "norm_color" not in set(t.attribute)
    assert (t.isic_id == "I0003").sum() == 2


def test_bad_w_and_missing_columns():
    with pytest.raises(ValueError, match="W must be"):
        tuples.sample_tuples(frame(3), w=0)
    with pytest.raises(KeyError, match="areaMM2"):
        tuples.sample_tuples(frame(3).drop(columns="areaMM2"))


def test_asked_rows_mark_where_each_attribute_was_asked():
    f = frame(30)
    tup = tuples.sample_tuples(f, w=5, seed=2)
    ids = list(f.isic_id[::-1]) + ["ISIC_unseen"]
    rows = tuples.asked_rows(tup, ids)
    assert list(rows) == list(attributes.NAMES)
    for name, m in rows.items():
        assert m.dtype == bool and len(m) == len(ids) and not m[-1]
        want = {(i, name) for i in ids} & set(zip(tup.isic_id, tup.attribute))
        assert {i for i, x in zip(ids, m) if x} == {i for i, _ in want}
    assert sum(m.sum() for m in rows.values()) == len(tup)
    with pytest.raises(KeyError, match="nope"):
        tuples.asked_rows(tup.assign(attribute="nope"), ids)
