"""The retrieval study's glue on synthetic vectors whose neighbours are known: every method runs,
image+text beats image-only where the vectors say it should, and the summaries read right."""
import numpy as np
import pandas as pd
import pytest

from skinlib import attributes, percentiles, study


def synthetic(n_db=300, n_q=40, d=16, seed=0):
    """Database/query frames and vectors: the image vector encodes areaMM2 weakly, the image+text
    vector for areaMM2 encodes it strongly; other attributes' image+text vectors are noise."""
    rng = np.random.default_rng(seed)
    names = list(attributes.NAMES)

    def frame(n, prefix):
        f = pd.DataFrame({n_: rng.normal(10, 3, n) for n_ in names})
        f.insert(0, "isic_id", [f"{prefix}{i:04d}" for i in range(n)])
        return f

    db, q = frame(n_db, "D"), frame(n_q, "Q")

    def vecs(f):
        area = (f.areaMM2.to_numpy() - 10) / 3
        img = rng.normal(size=(len(f), d))
        img[:, 0] += 1.0 * area
        joint = rng.normal(size=(len(f), len(names), d))
        joint[:, 0, 0] += 6.0 * area
        joint[:, :, 1] += 5.0  # a shared offset: cosine must not be dominated by noise alone
        return img, joint

    db_img, db_joint = vecs(db)
    q_img, q_joint = vecs(q)
    vec = {"db_image": db_img, "q_image": q_img, "db_image_text": db_joint, "q_image_text": q_joint,
           "db_untuned": rng.normal(size=(n_db, d)), "q_untuned": rng.normal(size=(n_q, d)),
           "db_encoder": db_img, "q_encoder": q_img,
           "db_multi": db_joint[:, 0], "q_multi": q_joint[:, 0]}
    return db, q, vec


def test_every_method_runs_and_the_grounded_vectors_win_where_they_should():
    db, q, vec = synthetic()
    res, cost = study.run_methods(db.isic_id, q.isic_id, vec, k=5, b=50, multi_names=["areaMM2", "Bext"],
                                  progress=False)
    methods = {m for m, _ in res}
    assert methods == set(study.PAPER_METHODS) | set(study.EXTRA_METHODS)
    assert all(ids.shape == (len(q), 5) for ids in res.values())
    assert set(cost.method) == methods
    long = study.score(res, db, q)
    summ = percentiles.summary(long)
    med = summ.pivot(index="attribute", columns="method", values="median_percentile")
    assert med.loc["areaMM2", "image_text"] < med.loc["areaMM2", "image"] < med.loc["areaMM2", "image_untuned"]
    assert med.loc["areaMM2", "image_text"] < 25  # chance is 50
    # SQ8 keeps the ranking nearly intact at a quarter of the memory
    assert abs(med.loc["areaMM2", "image_text_sq8"] - med.loc["areaMM2", "image_text"]) < 5
    mem = cost.set_index("method").index_bytes
    assert mem["image_text_sq8"] < 0.35 * mem["image_text"]
    # hierarchical with b = the whole database is exactly image+text
    res_all, _ = study.run_methods(db.isic_id, q.isic_id, vec, k=5, b=len(db), progress=False)
    assert (res_all[("hierarchical", "areaMM2")] == res_all[("image_text", "areaMM2")]).all()


def test_candidates_can_come_from_a_function_and_are_computed_once_per_image_and_attribute():
    db, q, vec = synthetic(n_db=120, n_q=10)
    pos = {i: n for n, i in enumerate(db.isic_id)}
    calls = []

    def candidates(ids, attribute):
        calls.append(len(ids))
        return vec["db_image_text"][[pos[i] for i in ids], attributes.NAMES.index(attribute)]

    res, cost = study.run_methods(db.isic_id, q.isic_id, vec, k=3, b=30, candidates=candidates, progress=False)
    lookup, _ = study.run_methods(db.isic_id, q.isic_id, vec, k=3, b=30, progress=False)
    assert (res[("hierarchical", "A")] == lookup[("hierarchical", "A")]).all()
    done = cost.set_index("method").loc["hierarchical", "candidates_embedded"]
    assert done == sum(calls) <= 16 * len(db)


def test_example_queries_spread_over_the_range_and_pca_shape():
    q = pd.DataFrame({"isic_id": [f"Q{i}" for i in range(100)], "areaMM2": np.arange(100.0)})
    pick = study.example_queries(q, "areaMM2", n=4, seed=0)
    vals = sorted(q.set_index("isic_id").areaMM2[pick])
    assert [v // 25 for v in vals] == [0, 1, 2, 3]
    xy = study.pca2(np.random.default_rng(0).normal(size=(50, 8)))
    assert xy.shape == (50, 2)
    with pytest.raises(ValueError):
        study.example_queries(q.head(2), "areaMM2", n=4)


def test_value_gaps_are_the_median_distance_of_the_top_k_to_the_query():
    db = pd.DataFrame({"isic_id": ["a", "b", "c", "d"], "areaMM2": [1.0, 2.0, 10.0, 20.0]})
    q = pd.DataFrame({"isic_id": ["q1", "q2"], "areaMM2": [1.5, 18.0]})
    res = {("image", None): np.array([["c", "d"], ["a", "b"]]),
           ("image_text", "areaMM2"): np.array([["a", "b"], ["d", "c"]])}
    g = study.value_gaps(res, db, q, ["q1", "q2"], "areaMM2")
    assert g.image.tolist() == [13.5, 16.5]  # median(|10-1.5|, |20-1.5|), median(|1-18|, |2-18|)
    assert g.image_text.tolist() == [0.5, 5.0]
    text = study.fig3_sentence(g, "areaMM2", k=2)
    assert "2.75 mm²" in text and "15.00 mm²" in text and "100%" in text



def test_two_launched_cpu_processes_split_the_shards(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: with `study.accelerator()` the two
    processes know each other (gloo) and take disjoint shards between them, all of them."""
    import json
    import os
    import subprocess

    from skinlib import finetune

    script = tmp_path / "who.py"
    script.write_text(
        "import json, sys\n"
        "from skinlib import embed, study\n"
        "acc = study.accelerator()\n"
        "mine = embed.process_shards(7, acc.process_index, acc.num_processes)\n"
        "open(sys.argv[1] + f'/{acc.process_index}-{len(mine)}.json', 'a').write(json.dumps(\n"
        "    {'index': acc.process_index, 'of': acc.num_processes, 'device': acc.device.type, 'shards': mine}))\n"
        "acc.wait_for_everyone()\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(finetune.launch_command(2, [str(script), str(tmp_path)]), env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    assert sorted(s["index"] for s in seen) == [0, 1] and all(s["of"] == 2 for s in seen), seen
    assert all(s["device"] == "cpu" for s in seen)
    shards = [x for s in seen for x in s["shards"]]
    assert sorted(shards) == list(range(7)), seen  # every shard once, none twice


def bench_memory():
    """bench/memory.py as a module: its `write_extraction` writes the real shard format."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    return memory


def test_hierarchical_reads_the_stored_candidates_of_a_stored_extraction(tmp_path):
    """run_methods on `embed.StoredEmbeddings` (one attribute read at a time) gives what it gives
    on the whole arrays, every method, the hierarchical one re-ranking by the stored vectors."""
    from skinlib import embed

    memory = bench_memory()
    db, q, vec = synthetic(n_db=200, n_q=20)
    half = {k: v.astype(np.float16) for k, v in vec.items()}
    stored = {}
    for part, frame in (("db", db), ("q", q)):
        folder = memory.write_extraction(tmp_path / part, frame.isic_id,
                                         {"image_text": half[f"{part}_image_text"]}, attributes.NAMES, shard_size=64)
        stored[part] = embed.open_embeddings(folder)
    lazy = {**half, "db_image_text": stored["db"], "q_image_text": stored["q"]}
    a, _ = study.run_methods(db.isic_id, q.isic_id, half, k=5, b=40, multi_names=["areaMM2"], progress=False)
    b, cost = study.run_methods(db.isic_id, q.isic_id, lazy, k=5, b=40, multi_names=["areaMM2"], progress=False)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))
    assert cost.set_index("method").loc["hierarchical", "candidates_embedded"] > 0


# ------------------------------------------------- the long stages across processes, resumed, cached
@pytest.fixture(scope="module")
def mini_run(tmp_path_factory, phantom_release):
    """A run folder as stage 02 leaves it, at a tiny size: a 12-image phantom, its split, training
    tuples asking all 16 attributes (so every answer shape is known), the tiny base model, and
    that model saved as the fine-tuned one; with a profile (`mini.yaml`) for it."""
    import torch
    import yaml

    from skinlib import config, finetune, model as mdl, split, tuples

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mini")
    run = (root / "run").resolve()
    release = phantom_release(config.phantom_dir(run), 12, seed=3)
    split.save_manifest(split.build_manifest(release.attribute_frame(), test_fraction=0.5, seed=0),
                        config.manifest_path(run))
    finetune.save_tuples(tuples.sample_tuples(release.attribute_frame(), w=16, seed=0), config.tuples_path(run), "t")
    profile = root / "mini.yaml"
    profile.write_text(yaml.safe_dump({
        "name": "mini", "inherit": "smoke",
        "predict": {"n_images": None, "batch_size": 16, "beam": 5},
        "embed": {"n_queries": None, "shard_size": 2, "batch_size": 2, "multi": ["areaMM2", "Bext"]}}))
    cfg = config.load_profile(profile)
    base = finetune.base_model(cfg, run)
    loaded = mdl.load(base)
    mdl.save_finetuned(loaded.model, loaded.tokenizer, loaded.image_processor, config.finetuned_dir(run),
                       base=base, method="full")
    return run, profile, cfg


def _launch(processes: int, target: list[str]):
    import os
    import subprocess

    from skinlib import finetune

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(finetune.launch_command(processes, target), env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


def sharded_readings(run, out, accelerator=None) -> dict:
    """Greedy (format-constrained) and median readings of the run's test images in shards of one
    image: the calls the launched processes make, and the single process repeats."""
    import pandas as pd

    from skinlib import answer_format, config, model as mdl, predict, qa, slice3d, split

    device = accelerator.device if accelerator is not None else "cpu"
    loaded = mdl.load_finetuned(config.finetuned_dir(run), device=device)
    release = slice3d.Slice3D(*config.release_files(config.load_profile("smoke"), run))   # the run's phantom
    manifest = split.load_manifest(config.manifest_path(run))
    test = manifest[manifest.split == "test"]
    shapes = answer_format.shapes(pd.read_parquet(config.tuples_path(run)))
    args = (loaded.model, loaded.tokenizer, loaded.image_processor,
            qa.ImageCache(release, loaded.image_processor, keep=False), test)
    kw = dict(shard_images=1, key="mini", progress=False, batch_size=8, shapes=shapes, accelerator=accelerator)
    return {"greedy": predict.predict_sharded(*args, out / "greedy", **kw),
            "median": predict.predict_sharded(*args, out / "median", reading="median", beam=5, **kw)}


def test_two_launched_processes_predict_what_one_does_and_an_interrupted_run_redoes_only_its_shards(
        mini_run, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: each process computes its own
    prediction shards (both readings), the merged tables equal one process's row for row; then one
    shard missing and one altered are redone, and only they, by a later single-process call."""
    import json
    from pathlib import Path

    import pandas as pd

    from skinlib import resumable

    run, _, _ = mini_run
    script = tmp_path / "predict_both.py"
    script.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from pathlib import Path\n"
        "from skinlib import study\n"
        "from test_study import sharded_readings\n"
        "acc = study.accelerator()\n"
        "got = sharded_readings(Path(sys.argv[1]), Path(sys.argv[2]), acc)\n"
        # a file per process: two processes printing to one pipe can interleave their lines
        "Path(sys.argv[3], f'result-{acc.process_index}.json').write_text(json.dumps(\n"
        "    {'index': acc.process_index, 'of': acc.num_processes,\n"
        "     **{k: f.attrs['computed'] for k, f in got.items()}}))\n")
    _launch(2, [str(script), str(run), str(tmp_path / "two"), str(tmp_path)])
    said = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("result-*.json"))]
    one = sharded_readings(run, tmp_path / "one")
    n = len(one["greedy"].isic_id.unique())
    assert n >= 4 and sorted(s["index"] for s in said) == [0, 1] and all(s["of"] == 2 for s in said), said
    for reading in ("greedy", "median"):
        split_ = [s[reading] for s in sorted(said, key=lambda s: s["index"])]
        assert split_ == [list(range(0, n, 2)), list(range(1, n, 2))], said   # disjoint, every shard once
    assert one["greedy"].attrs["computed"] == list(range(n))

    folder = tmp_path / "two" / "greedy"
    shards = sorted(folder.glob("shard-*.csv"))
    merged = sharded_readings(run, tmp_path / "two")   # one process finds every shard finished
    assert merged["greedy"].attrs["computed"] == [] and merged["median"].attrs["computed"] == []
    for reading in ("greedy", "median"):
        pd.testing.assert_frame_equal(merged[reading], one[reading])   # row for row, exactly
    assert len(merged["median"]) == len(one["greedy"]) and set(merged["median"].columns) >= {"in_shape", "unresolved"}

    resumable.remove(shards[0])   # interrupted before shard 0 was written
    text = shards[2].read_text()   # and shard 2 altered: one digit of its data changed
    i = next(j for j in range(text.index("\n") + 1, len(text)) if text[j].isdigit())
    shards[2].write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])
    before = {p.name: p.stat().st_mtime_ns for p in shards if p.exists()}
    again = sharded_readings(run, tmp_path / "two")
    assert again["greedy"].attrs["computed"] == [0, 2] and again["median"].attrs["computed"] == []
    after = {p.name: p.stat().st_mtime_ns for p in shards}
    assert [p.name for p in shards if after[p.name] != before.get(p.name)] == [shards[0].name, shards[2].name]
    assert all(resumable.check(p) is None for p in shards)
    pd.testing.assert_frame_equal(again["greedy"], one["greedy"])


def test_the_launched_stages_leave_what_the_notebooks_then_only_read(mini_run):
    """`accelerate launch -m skinlib.predict` and `-m skinlib.study` (2 CPU processes) on a run:
    afterwards chapter 3's predictions and every vector of chapter 4, method (f)'s included, are
    found finished by the calls the notebooks make (nothing recomputed: a second run of stage 04
    reads method (f)'s stored vectors), and (f)'s vectors are the model's for that question."""
    import numpy as np

    from skinlib import config, embed, model as mdl, predict, slice3d, split

    run, profile, cfg = mini_run
    said = _launch(2, ["-m", "skinlib.predict", "--profile", str(profile), "--out", str(run), "--quiet"])
    for reading in ("greedy", "median"):   # one shard of 250 images: process 0 takes it
        assert f"predict {reading}: process 0 of 2 computed shards [0]" in said, said
        assert f"predict {reading}: process 1 of 2 computed shards []" in said, said
    frames = predict.stage_predictions(cfg, run, progress=False)
    assert all(f.attrs["computed"] == [] for f in frames.values())
    assert list(frames) == ["greedy", "median"] and len(frames["greedy"]) == len(frames["median"]) > 0

    _launch(2, ["-m", "skinlib.study", "--profile", str(profile), "--out", str(run)])
    manifest = split.load_manifest(config.manifest_path(run))
    db, q = manifest[manifest.split == "train"], manifest[manifest.split == "test"]
    timings = study.extract_all(cfg, run, list(db.isic_id), list(q.isic_id), progress=False)
    assert set(timings) == {f"{t}_{p}" for t in ("tuned", "untuned", "multi") for p in ("db", "queries")}
    assert all(np.isnan(v) for v in timings.values()), timings   # every extraction found finished
    tuned = mdl.load_finetuned(config.finetuned_dir(run))
    release = slice3d.Slice3D(*config.release_files(cfg, run))
    question = embed.multi_question(cfg["embed"]["multi"])
    direct = embed.embed(tuned.model, tuned.tokenizer, tuned.image_processor, [release.image(i) for i in q.isic_id],
                         [question], image=False)
    stored = study.load_array(run, "multi_queries", ids=q.isic_id)
    np.testing.assert_allclose(stored, direct["image_text"][:, 0].numpy(), rtol=1e-3, atol=1e-3)  # float16
    with pytest.raises(ValueError, match="other images"):
        study.load_array(run, "multi_db", ids=q.isic_id)



def test_extraction_holds_one_model_at_a_time(mini_run, tmp_path, monkeypatch):
    """At the 7B every model is 16.6 GB on the device: `extract_all` loads the fine-tuned model for
    its extractions and drops it before the untuned one is loaded (watched with weak references
    to every model the real loaders returned), keeps none after, and still stores every vector."""
    import gc
    import shutil
    import weakref

    import numpy as np

    from skinlib import config, embed, finetune, model as mdl, slice3d, split

    run0, _, cfg = mini_run
    run = tmp_path / "run"
    shutil.copytree(run0, run, ignore=shutil.ignore_patterns("04_embed"))
    loaded, alive_at_load = [], []

    def watched(real):
        def load(*a, **kw):
            gc.collect()
            alive_at_load.append(sum(r() is not None for r in loaded))
            got = real(*a, **kw)
            loaded.append(weakref.ref(got.model))
            return got
        return load

    # load_finetuned calls load itself: its inner load is watched too, which only adds checks
    monkeypatch.setattr(mdl, "load", watched(mdl.load))
    monkeypatch.setattr(mdl, "load_finetuned", watched(mdl.load_finetuned))
    manifest = split.load_manifest(config.manifest_path(run))
    db, q = manifest[manifest.split == "train"], manifest[manifest.split == "test"]
    timings = study.extract_all(cfg, run, list(db.isic_id), list(q.isic_id), progress=False)
    monkeypatch.undo()
    assert len(alive_at_load) >= 2, alive_at_load
    assert alive_at_load[-1] == 0, f"models alive at each load (the untuned one last): {alive_at_load}"
    gc.collect()
    assert all(r() is None for r in loaded)   # nothing kept after the call either
    assert set(timings) == {f"{t}_{p}" for t in ("tuned", "untuned", "multi") for p in ("db", "queries")}
    assert not any(np.isnan(v) for v in timings.values()), timings   # every extraction done here
    base = mdl.load(finetune.base_model(cfg, run))
    release = slice3d.Slice3D(*config.release_files(cfg, run))
    ids = list(q.isic_id[:2])
    direct = embed.embed(base.model, base.tokenizer, base.image_processor, [release.image(i) for i in ids],
                         [])["image"].numpy()
    stored = study.open_vectors(run, "untuned_queries").read("image", dtype=np.float32, ids=ids)
    np.testing.assert_allclose(stored, direct, rtol=1e-3, atol=1e-3)   # float16


def test_readouts_read_one_attribute_at_a_time_from_the_shards_and_match_the_whole_arrays(tmp_path):
    """Chapter 4's ridge read-outs on `study.PerAttribute` (attribute j read from the shards when
    indexed) equal those on the whole (n, 16, d) arrays."""
    from skinlib import embed, metrics

    memory = bench_memory()
    db, q, vec = synthetic(n_db=200, n_q=40)
    whole, lazy = {}, {}
    for part, frame in (("db", db), ("q", q)):
        half = vec[f"{part}_image_text"].astype(np.float16)
        folder = memory.write_extraction(tmp_path / part, frame.isic_id, {"image_text": half}, attributes.NAMES,
                                         shard_size=64)
        whole[part] = half.astype(np.float32)
        lazy[part] = study.PerAttribute(embed.open_embeddings(folder))
    a = metrics.readout_table({"image_text": whole["db"]}, db, {"image_text": whole["q"]}, q)
    b = metrics.readout_table({"image_text": lazy["db"]}, db, {"image_text": lazy["q"]}, q)
    pd.testing.assert_frame_equal(a, b)
    assert len(lazy["db"]) == len(db) and lazy["db"][:, 3].shape == (len(db), whole["db"].shape[-1])
    with pytest.raises(IndexError, match=r"\[:, j\]"):
        lazy["db"][:10, 3]


def test_pca2_in_chunks_gives_the_svd_components_up_to_sign():
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(500, 10)) * np.arange(10, 0, -1)).astype(np.float32) + 3
    c = x.astype(np.float64) - x.mean(0, dtype=np.float64)
    want = c @ np.linalg.svd(c, full_matrices=False)[2][:2].T
    for chunk in (33, 8192):
        got = study.pca2(x, chunk=chunk)
        np.testing.assert_allclose(np.abs(got), np.abs(want), rtol=1e-6, atol=1e-6)
        assert np.allclose(got / want, np.sign(got / want)[0])   # a whole component flips, or none
