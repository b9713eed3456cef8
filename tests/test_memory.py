"""Stage 05's vector work (load, every method, scoring) in bounded memory, on a synthetic run in the
real shard format: its peak RSS is held to a bound made of one attribute's database array, which
holding all 16 attributes' vectors at once (the float32 arrays stage 05 used to load) breaks."""
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
