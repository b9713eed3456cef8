import pytest
import yaml

from skinlib import config


def test_profiles_load_and_inherit():
    default, smoke, paper = (config.load_profile(p) for p in ("default", "smoke", "paper"))
    assert smoke["data"]["n_images"] < default["data"]["n_images"]
    assert smoke["data"]["source"] == default["data"]["source"] == "phantom"  # inherited
    assert paper["data"]["source"] == "slice3d"
    assert paper["data"]["image_h5"].endswith("train-image.hdf5")


def test_the_paper_profile_trains_with_the_papers_recipe():
    # §3.2: W = 5 tuples per image, LoRA rank 8, cosine from 1e-4, batch 16, one tuple per sequence.
    # The embedded default departs from several (book: Fine-tuning); the paper profile inherits it,
    # so each of these must be set there, not inherited.
    t = config.load_profile("paper")["train"]
    assert (t["w"], t["method"], t["lora"]["rank"], t["lr"], t["batch_size"], t["packed"]) == (5, "lora", 8, 1e-4, 16, False)
    assert t["vision_warmup"]["steps"] == 0
    # §4.2: plain greedy replies (the default holds them to the answers' shape)
    assert config.load_profile("paper")["predict"]["constrain"] is False
    assert config.load_profile("default")["predict"]["constrain"] is True


def test_overrides_none_keeps_unknown_key_fails():
    sec = config.section("smoke", "data", n_images=None, split_seed=7)
    assert sec["n_images"] == config.load_profile("smoke")["data"]["n_images"]
    assert sec["split_seed"] == 7
    with pytest.raises(KeyError, match="n_imgs"):
        config.section("smoke", "data", n_imgs=3)


def test_unknown_profile_and_loop(tmp_path):
    with pytest.raises(KeyError, match="unknown profile 'nope'.*default"):
        config.load_profile("nope")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"name": "a", "inherit": str(b)}))
    b.write_text(yaml.safe_dump({"name": "b", "inherit": str(a)}))
    with pytest.raises(ValueError, match="loops"):
        config.load_profile(a)


def test_paths_are_derived_from_the_run_folder(tmp_path):
    assert config.run_dir("smoke").name == "smoke"
    assert config.manifest_path(tmp_path) == tmp_path / "01_data" / "manifest.parquet"
    assert config.resolve_path("x/y").is_absolute()
    with pytest.raises(KeyError, match="unknown stage"):
        config.stage_dir(tmp_path, "99_nothing")


def test_the_shipped_profiles_pass_the_schema_file_by_file():
    # load_profile checks each file as written (paper.yaml sets embed.encoder.name, smoke.yaml
    # embed.encoder.steps: keys the default does not have)
    for path in sorted(config.PROFILE_DIR.glob("*.yaml")):
        config.check_profile(yaml.safe_load(path.read_text()), path)
        config.load_profile(path)


def test_the_schema_knows_exactly_the_keys_the_code_reads():
    from dataclasses import fields

    from skinlib import encoder, finetune, model, train
    s = config.SCHEMA
    assert set(s["model"]["sizes"]) == set(model.TINY_SIZES)
    assert set(s["train"]) == {f.name for f in fields(train.Settings)} | finetune.STAGE_KEYS
    spec = s["embed"]["encoder"]
    assert set(spec) == {"kind", "name", "dtype", "revision", *encoder.TRAIN_KEYS}
    assert set(spec["arch"]) == set(encoder.ARCH_DEFAULTS)
    assert set(spec["augment_params"]) == set(encoder.AUGMENT_DEFAULTS)
    assert {name for name, _, _ in config.STAGES} == set(config.STAGE_NAMES)
    used = {sec for _, _, sections in config.STAGES for sec in sections}
    assert used <= set(s)


def test_each_schema_type_accepts_its_own_and_refuses_the_others(tmp_path):
    cases = {  # key: (a fitting value, a wrong one)
        "seed": (3, 3.5), "data.test_fraction": (0.25, "0.25"), "data.verify_images": (False, 0),
        "data.image_h5": (None, 5), "predict.n_images": (None, True), "model.sizes.mrope_section": ([4, 6, 6], [4, "6"]),
    }
    for dotted, (good, bad) in cases.items():
        for value, ok in ((good, True), (bad, False)):
            body = value
            for part in reversed(dotted.split(".")):
                body = {part: body}
            prof = tmp_path / "p.yaml"
            prof.write_text(yaml.safe_dump({"name": "p", "inherit": "smoke", **body}))
            if ok:
                config.load_profile(prof)
            else:
                with pytest.raises(config.ProfileError, match=dotted.replace(".", r"\.")):
                    config.load_profile(prof)


def test_shown_paths_are_relative_to_the_run_or_the_repository(tmp_path):
    run = tmp_path / "runs" / "x"
    assert config.shown(run / "03_predict" / "r2.csv", run) == "<run>/03_predict/r2.csv"
    assert config.shown(config.REPO_ROOT / "runs" / "default") == "runs/default"
    assert config.shown(run) == "x"                       # outside the repository: its name only
    assert config.shown("Qwen/Qwen2-VL-7B-Instruct", run) == "Qwen/Qwen2-VL-7B-Instruct"   # a hub id
    assert not config.shown(tmp_path / "elsewhere" / "f.csv", run).startswith("/")
