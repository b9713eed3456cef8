import numpy as np
import pytest

from skinlib import retrieval


def _clustered(rng, n, d, centres=40, spread=0.3):
    c = rng.normal(size=(centres, d))
    return (c[rng.integers(0, centres, n)] + spread * rng.normal(size=(n, d))).astype(np.float32)


def _ids(n, prefix="ISIC_"):
    return np.array([f"{prefix}{i:07d}" for i in range(n)])


def _reference_topk(db, q, k):
    """Independent: cosine as dot/(|a||b|) in float64, full argsort."""
    sims = (q @ db.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(db, axis=1)[None, :]
    order = np.argsort(-sims, axis=1)[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def test_flat_search_equals_numpy_topk():
    rng = np.random.default_rng(0)
    db, q = rng.normal(size=(800, 24)), rng.normal(size=(50, 24))
    index = retrieval.FlatIndex(24, device="cpu")
    index.add(db, _ids(800))
    ids, scores = index.search(q, 7)
    pos, ref = _reference_topk(db, q, 7)
    np.testing.assert_array_equal(ids, _ids(800)[pos])
    np.testing.assert_allclose(scores, ref, atol=1e-5)
    p2, s2 = retrieval.flat_topk(db, q, 7)
    np.testing.assert_array_equal(p2, pos)
    np.testing.assert_allclose(s2, ref, atol=1e-5)
    assert index.nbytes == 800 * 24 * 4


def test_scale_does_not_matter_cosine():
    rng = np.random.default_rng(1)
    db, q = rng.normal(size=(300, 8)), rng.normal(size=(10, 8))
    a = retrieval.FlatIndex(8, device="cpu")
    a.add(db, np.arange(300))
    b = retrieval.FlatIndex(8, device="cpu")
    b.add(db * rng.uniform(0.1, 50, size=(300, 1)), np.arange(300))
    np.testing.assert_array_equal(a.search(q, 5)[0], b.search(q * 3, 5)[0])


@pytest.mark.parametrize("make", [lambda: retrieval.FlatIndex(16, device="cpu"),
                                  lambda: retrieval.CompressedIndex(16, "sq8"),
                                  lambda: retrieval.CompressedIndex(16, "pq", m=4, nbits=6)])
@pytest.mark.parametrize("ints", [False, True])
def test_save_load_round_trip(tmp_path, make, ints):
    rng = np.random.default_rng(2)
    db, q = _clustered(rng, 1000, 16), _clustered(rng, 30, 16)
    ids = np.arange(1000) * 7 if ints else _ids(1000)
    index = make()
    index.add(db, ids)
    before = index.search(q, 5)
    index.save(tmp_path / "idx")
    np.load(tmp_path / "idx" / "ids.npy", allow_pickle=False)  # no pickle in the file
    loaded = retrieval.load(tmp_path / "idx")
    assert type(loaded) is type(index) and loaded.kind == index.kind
    after = loaded.search(q, 5)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert loaded.ids.dtype.kind == ("i" if ints else "U")
    assert loaded.nbytes == index.nbytes


def test_sq8_recall_and_memory():
    rng = np.random.default_rng(3)
    db, q = _clustered(rng, 5000, 64), _clustered(rng, 200, 64)
    flat = retrieval.FlatIndex(64, device="cpu")
    flat.add(db, _ids(5000))
    sq8 = retrieval.CompressedIndex(64, "sq8")
    sq8.add(db, _ids(5000))
    truth, _ = flat.search(q, 5)
    got, _ = sq8.search(q, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(truth, got)])
    assert recall > 0.9
    assert sq8.nbytes * 4 == flat.nbytes
    pq = retrieval.CompressedIndex(64, "pq", m=8, nbits=8)
    pq.add(db, _ids(5000))
    assert pq.nbytes == 5000 * 8


def test_exclude_self_and_search_by_id():
    rng = np.random.default_rng(4)
    db = rng.normal(size=(400, 12))
    ids = _ids(400)
    index = retrieval.FlatIndex(12, device="cpu")
    index.add(db, ids)
    pick = np.array([3, 77, 250])
    got, scores = index.search_by_id(ids[pick], 5)
    pos, ref = _reference_topk(db, db[pick], 6)
    assert (pos[:, 0] == pick).all()  # without exclusion the query finds itself first
    np.testing.assert_array_equal(got, ids[pos[:, 1:]])
    np.testing.assert_allclose(scores, ref[:, 1:], atol=1e-5)
    # a query that is not in the database keeps its full top k
    q = rng.normal(size=(2, 12))
    full, _ = index.search(q, 5)
    excl, _ = index.search(q, 5, exclude=np.array(["nobody", full[1, 2]]))
    np.testing.assert_array_equal(excl[0], full[0])
    assert full[1, 2] not in excl[1] and list(excl[1][:2]) == list(full[1][:2])
    with pytest.raises(KeyError, match="ISIC_unknown"):
        index.search_by_id(["ISIC_unknown"], 5)


def test_hierarchical_with_all_candidates_is_flat_joint_search():
    rng = np.random.default_rng(5)
    n, nq = 600, 40
    img, joint = _clustered(rng, n, 16), _clustered(rng, n, 20)
    ids = _ids(n)
    q_img, q_joint = _clustered(rng, nq, 16), _clustered(rng, nq, 20)
    image_index = retrieval.FlatIndex(16, device="cpu")
    image_index.add(img, ids)
    lookup = {v: i for i, v in enumerate(ids)}
    embed = lambda cand, attribute: joint[[lookup[c] for c in cand]]  # noqa: E731
    got, scores = retrieval.hierarchical(image_index, q_img, q_joint, embed, "areaMM2", k=5, b=n,
                                         chunk=16)
    joint_index = retrieval.FlatIndex(20, device="cpu")
    joint_index.add(joint, ids)
    want, want_scores = joint_index.search(q_joint, 5)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    # with a small b the result is the re-ranked image-only shortlist
    small, _ = retrieval.hierarchical(image_index, q_img, q_joint, embed, "areaMM2", k=5, b=20)
    short, _ = image_index.search(q_img, 20)
    assert all(set(s) <= set(c) for s, c in zip(small, short))


def test_hierarchical_embeds_each_candidate_once_per_attribute():
    rng = np.random.default_rng(6)
    n = 300
    img, joint = _clustered(rng, n, 8, centres=5), _clustered(rng, n, 8)
    ids = _ids(n)
    lookup = {v: i for i, v in enumerate(ids)}
    seen = []

    def embed(cand, attribute):
        seen.append((attribute, list(cand)))
        return joint[[lookup[c] for c in cand]]

    index = retrieval.FlatIndex(8, device="cpu")
    index.add(img, ids)
    cache = retrieval.EmbedCache(embed)
    q_img, q_joint = img[:30], joint[:30]
    a, _ = retrieval.hierarchical(index, q_img, q_joint, cache, "deltaL", k=5, b=50, chunk=8,
                                  exclude=ids[:30])
    computed = [c for _, cs in seen for c in cs]
    assert len(computed) == len(set(computed)) == cache.computed  # each candidate once
    assert cache.calls == len(seen) <= 4  # one batch per chunk at most
    assert not any(i in row for i, row in zip(ids[:30], a))  # self excluded
    before = cache.calls
    b, _ = retrieval.hierarchical(index, q_img, q_joint, cache, "deltaL", k=5, b=50,
                                  exclude=ids[:30])
    assert cache.calls == before  # all cached: no new embedding
    np.testing.assert_array_equal(a, b)
    retrieval.hierarchical(index, q_img[:2], q_joint[:2], cache, "B", k=5, b=50)
    assert cache.calls == before + 1 and seen[-1][0] == "B"  # another attribute: computed anew


def test_errors_are_clear():
    index = retrieval.FlatIndex(4, device="cpu")
    with pytest.raises(ValueError, match=r"shape \(2, 3\), index has dimension 4"):
        index.add(np.ones((2, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="zero vector.*first row 1"):
        index.add(np.array([[1, 0, 0, 0], [0, 0, 0, 0.0]]), ["a", "b"])
    with pytest.raises(ValueError, match="duplicated id.*'a'"):
        index.add(np.eye(4), ["a", "b", "c", "a"])
    index.add(np.eye(4), ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="duplicated id.*'b'"):
        index.add(np.ones((1, 4)), ["b"])
    with pytest.raises(ValueError, match="query vectors: dimension 3, index has 4"):
        index.search(np.ones((1, 3)), 1)
    with pytest.raises(ValueError, match="k=5"):
        index.search(np.ones((1, 4)), 5)
    with pytest.raises(ValueError, match="k=4.*one excluded"):
        index.search(np.ones((1, 4)), 4, exclude=np.array(["a"]))
    with pytest.raises(ValueError, match="kind must be"):
        retrieval.CompressedIndex(4, "ivf")
    with pytest.raises(FileNotFoundError, match="index.faiss"):
        retrieval.load("/nonexistent/folder")


def test_chunked_add_is_the_same_and_all_or_nothing():
    rng = np.random.default_rng(7)
    db, q = rng.normal(size=(1000, 10)), rng.normal(size=(20, 10))
    whole = retrieval.FlatIndex(10, device="cpu")
    whole.add(db, np.arange(1000))
    parts = retrieval.FlatIndex(10, device="cpu")
    parts.add(db, np.arange(1000), chunk=64)
    np.testing.assert_array_equal(whole.search(q, 5)[0], parts.search(q, 5)[0])
    np.testing.assert_array_equal(whole.vectors_of([5, 999]), parts.vectors_of([5, 999]))
    bad = db.copy()
    bad[700] = np.nan
    empty = retrieval.FlatIndex(10, device="cpu")
    with pytest.raises(ValueError, match="first row 700"):
        empty.add(bad, np.arange(1000), chunk=64)
    assert empty.ntotal == 0 and len(empty.ids) == 0
