"""The vector work of stage 05 (load, every method, scoring), chapter 6 (its embedding features)
and the explorer (a stored query through every method and attribute) in bounded memory, on a
synthetic run in the real shard format: each peak RSS is held to a bound of a few vector widths
per image, which holding all 16 attributes' vectors at once (the float32 arrays every extraction
whole gives, as these readers loaded before) breaks."""
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "memory.py"
spec = importlib.util.spec_from_file_location("bench_memory", BENCH)
memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory)

N_DB, N_Q, WIDTH = 6000, 100, 384


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("memory") / "run"
    run.mkdir()
    memory.write_run(run, N_DB, N_Q, WIDTH, encoder_width=64)
    return run


def bound() -> int:
    # one attribute's database vectors in float32: the flat index holds them; reading the float16
    # column, sq8's normalised float32 training copy and its codes and the hierarchical method's
    # candidate cache come to a few more of them. Everything else (image-only arrays, queries)
    # is one vector per image, a 16th of the image+text array each.
    one_attribute = N_DB * WIDTH * 4
    return 6 * one_attribute + 24 * 2**20  # + allocator and library slack


def test_streaming_stays_within_a_few_attributes_and_the_whole_arrays_do_not(run):
    import numpy as np

    # the measuring process is forked from this one: a large parent (a whole test session) must not
    # count (getrusage's maxrss keeps the forking parent's size across exec; VmHWM does not)
    ballast = np.ones(2**26)   # 512 MiB held here while the child runs
    got = memory.measure(run, "stored", k=5, b=50)
    del ballast
    assert got["n_db"] == N_DB and got["n_results"] > 0
    assert got["peak"] < bound(), (f"stage 05 peaked {got['peak'] / 2**20:.0f} MiB above its imports, bound "
                                   f"{bound() / 2**20:.0f} MiB")
    # the bound can fail: the same work on every extraction loaded whole in float32 breaks it
    whole = memory.measure(run, "whole", k=5, b=50)
    assert whole["peak"] > bound(), whole


def test_the_synthetic_extraction_reads_back_through_the_real_reader(run):
    import numpy as np

    from skinlib import attributes, config, embed

    stored = embed.open_embeddings(config.embeddings_dir(run, "tuned_db"))
    ids, whole = embed.load_embeddings(config.embeddings_dir(run, "tuned_db"))
    assert stored.ids == ids and len(ids) == N_DB and stored.names == list(attributes.NAMES)
    for j in (0, 7, 15):
        np.testing.assert_array_equal(stored.attribute(j), whole["image_text"][:, j])
    np.testing.assert_array_equal(stored.read("image"), whole["image"])



def feature_bound() -> int:
    # chapter 6 holds h_im fine-tuned and untuned in float32 for every database and query image,
    # and the encoder's (64 wide here): 2 + 1/6 widths per image; reading adds one shard
    return 3 * (N_DB + N_Q) * WIDTH * 4 + 24 * 2**20


def test_chapter_6_reads_its_features_in_a_few_widths_and_the_whole_extractions_do_not(run):
    got = memory.measure(run, "features")
    assert got["n_db"] == N_DB and got["n_results"] == 3 * (N_DB + N_Q)
    assert got["peak"] < feature_bound(), (f"chapter 6's features peaked {got['peak'] / 2**20:.0f} MiB, bound "
                                           f"{feature_bound() / 2**20:.0f} MiB")
    # as the chapter read them before: every extraction whole in float32, its 16 image+text vectors too
    whole = memory.measure(run, "features_whole")
    assert whole["peak"] > feature_bound(), whole


def explore_bound() -> int:
    # the explorer keeps a float32 index per image-only vector (h_im fine-tuned and untuned,
    # method (f)'s: one width each; the encoder's, 1/6) and the last attribute's (one); building
    # one adds its float16 column and two float32 chunks (FlatIndex.add's check and add passes;
    # at this size a chunk is the whole column), and the allocator keeps some freed blocks of
    # this size: about 8.6 widths measured. None of it grows with the 16 image+text vectors.
    return 10 * N_DB * WIDTH * 4 + 24 * 2**20


def test_the_explorer_searches_every_method_and_attribute_in_a_few_widths_and_whole_arrays_do_not(run):
    got = memory.measure(run, "explore", k=5, b=50)
    assert got["n_db"] == N_DB and got["n_results"] > 0
    assert got["peak"] < explore_bound(), (f"the explorer peaked {got['peak'] / 2**20:.0f} MiB, bound "
                                           f"{explore_bound() / 2**20:.0f} MiB")
    # as it held them before: every extraction whole in float32, and every index it built
    whole = memory.measure(run, "explore_whole", k=5, b=50)
    assert whole["peak"] > explore_bound(), whole


def test_the_readers_give_the_rows_asked_for_in_their_order(run):
    """What chapter 6 and the explorer read is what the whole arrays hold, row for row."""
    import numpy as np

    from skinlib import config, embed, study

    ids, whole = study.load_vectors(run, "tuned_db")
    q_ids, q_whole = study.load_vectors(run, "tuned_queries")
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(ids))[:700]   # across shards, out of order, with a repeat
    pick[5] = pick[0]
    want = [ids[p] for p in pick]
    stored = embed.open_embeddings(config.embeddings_dir(run, "tuned_db"))
    got = stored.read("image", dtype=np.float32, ids=want)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, whole["image"][pick])
    np.testing.assert_array_equal(stored.attribute(9, ids=want[:3]), whole["image_text"][pick[:3], 9])
    np.testing.assert_array_equal(stored.read("image_text", ids=want[:2]), whole["image_text"][pick[:2]])
    with pytest.raises(KeyError, match="tuned_db.*Q0000000"):
        stored.read("image", ids=[ids[0], "Q0000000"])

    feats = study.image_features(run, want, q_ids[::-1])
    np.testing.assert_array_equal(feats["tuned"][0], whole["image"][pick])
    np.testing.assert_array_equal(feats["tuned"][1], q_whole["image"][::-1])
    untuned = study.load_vectors(run, "untuned_db")[1]["image"]
    np.testing.assert_array_equal(feats["untuned"][0], untuned[pick])
    encoder = study.load_array(run, "encoder_db")   # a save_array .npy, rows in the database's order
    np.testing.assert_array_equal(feats["encoder"][0], encoder[pick])
    with pytest.raises(ValueError, match="encoder_db.npy"):
        study.column(run, "encoder_db", ids=ids[:-1])   # not as many rows as images
