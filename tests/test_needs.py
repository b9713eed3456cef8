"""skinlib.needs: every external need of a profile that is missing gives its own line, in seconds;
a complete tiny setup passes. Real folders (a tiny Qwen2-VL from build_tiny, a CLIP folder in
MONET's layout, a phantom release), a real Hugging Face cache layout read by huggingface_hub."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from skinlib import config, hubshape, model as models, needs, run

PAPER_HUB = "Qwen/Qwen2-VL-7B-Instruct"


@pytest.fixture(scope="module")
def parts(tmp_path_factory, phantom_release):
    """A tiny Qwen2-VL folder, a MONET-layout CLIP folder and a 20-image release."""
    tmp = tmp_path_factory.mktemp("needs")
    qwen = models.build_tiny(tmp / "qwen")
    monet = hubshape.write_monet(tmp / "monet")
    phantom_release(tmp / "release", 20, seed=0)
    return {"qwen": qwen, "monet": monet, "release": tmp / "release"}


def profile(tmp: Path, parts: dict, **over) -> Path:
    """A profile inheriting `paper` with the parts' paths; `over` replaces sections' keys."""
    body = {"name": "needs", "inherit": "paper",
            "data": {"image_h5": str(parts["release"] / "train-image.hdf5"),
                     "metadata_csv": str(parts["release"] / "train-metadata.csv")},
            "model": {"name": str(parts["qwen"])},
            "embed": {"encoder": {"name": str(parts["monet"])}}}
    for dotted, value in over.items():
        section, key = dotted.split("__")
        body.setdefault(section, {})[key] = value
    path = tmp / "needs.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_the_embedded_profiles_pass_at_once():
    for name in ("default", "smoke"):
        t = time.perf_counter()
        assert needs.missing(config.load_profile(name)) == []
        assert time.perf_counter() - t < 5


def test_a_complete_tiny_setup_passes(parts, tmp_path):
    cfg = config.load_profile(profile(tmp_path, parts))
    assert needs.missing(cfg, run=tmp_path / "run", gpus=0) == []
    needs.require(cfg, run=tmp_path / "run")


def test_the_paper_profile_as_shipped_names_each_missing_piece(tmp_path):
    """With an empty hub cache: the two data files and the two checkpoints, each on its own line
    with what to do, in seconds, exit code 2 (the command a user would run first)."""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "skinlib.needs", "--profile", "paper", "--out", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True)
    assert time.perf_counter() - t < 30
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("  - ")]
    if (config.REPO_ROOT / "data" / "isic-2024" / "train-image.hdf5").exists():
        pytest.fail("data/isic-2024/ holds a release here; this test expects the shipped repository")
    assert len(lines) == 4, done.stderr
    data_h5, data_csv, model, encoder = lines
    assert "data.image_h5" in data_h5 and "train-image.hdf5" in data_h5
    assert "data.metadata_csv" in data_csv and "train-metadata.csv" in data_csv
    assert f"`hf download {PAPER_HUB}`" in model and "model.name" in model and "config.json" in model
    assert "`hf download chanwkim/monet`" in encoder and "embed.encoder.name" in encoder
    assert "preprocessor_config.json" in encoder


def test_the_data_stage_needs_only_the_data(parts, tmp_path):
    """`--stages 00_phantom 01_data` (the README's first paper command) runs while the model is
    still downloading: only the release is checked."""
    cfg = config.load_profile(profile(tmp_path, parts, model__name="Qwen/not-downloaded"))
    assert needs.missing(cfg, ["00_phantom", "01_data"], gpus=0) == []
    assert len(needs.missing(cfg, needs.from_stage("02_finetune"), gpus=0)) == 1
    gone = config.load_profile(profile(tmp_path, parts, data__image_h5=str(tmp_path / "nope.hdf5")))
    [line] = needs.missing(gone, ["01_data"], gpus=0)
    assert line.startswith("data.image_h5") and str(tmp_path / "nope.hdf5") in line
    assert needs.missing(gone, ["00_phantom"]) == []


def test_a_folder_missing_a_file_names_it(parts, tmp_path):
    qwen = copy(parts["qwen"], tmp_path / "qwen")
    (qwen / "preprocessor_config.json").unlink()
    cfg = config.load_profile(profile(tmp_path, parts, model__name=str(qwen)))
    [line] = needs.missing(cfg, ["02_finetune"], gpus=0)
    assert line.startswith(f"model.name {str(qwen)!r}") and "no preprocessor_config.json" in line
    assert "A local folder needs config.json" in line   # the layout accepted, in words

    (qwen / "config.json").unlink()
    [line] = needs.missing(cfg, ["02_finetune"], gpus=0)
    assert "has no config.json" in line


def test_the_wrong_kind_of_checkpoint_is_named(parts, tmp_path):
    cfg = config.load_profile(profile(tmp_path, parts, model__name=str(parts["monet"]),
                                      embed__encoder={"kind": "monet", "name": str(parts["qwen"])}))
    model, encoder = needs.missing(cfg, gpus=0)
    assert "model_type 'clip'" in model and "Qwen2-VL" in model
    assert "model_type 'qwen2_vl'" in encoder and "CLIP" in encoder


def test_pickled_weights_are_refused_and_a_missing_shard_is_named(parts, tmp_path):
    monet = copy(parts["monet"], tmp_path / "monet")
    (monet / "model.safetensors").rename(monet / "pytorch_model.bin")   # only a .bin left
    cfg = config.load_profile(profile(tmp_path, parts, embed__encoder={"kind": "monet", "name": str(monet)}))
    [line] = needs.missing(cfg, ["04_embed"], gpus=0)
    assert "only PyTorch .bin weights" in line and "safetensors" in line and "embed.encoder.revision" in line

    qwen = hubshape.write_qwen2vl(tmp_path / "hubshaped", shards=2)
    (qwen / "model-00002-of-00002.safetensors").unlink()
    cfg = config.load_profile(profile(tmp_path, parts, model__name=str(qwen)))
    [line] = needs.missing(cfg, ["02_finetune"], gpus=0)
    assert "1 of its 2 safetensors shards are missing (first: model-00002-of-00002.safetensors)" in line


def hub_snapshot(cache: Path, repo_id: str, src: Path) -> Path:
    """`src`'s files as huggingface_hub stores a downloaded repository: blobs, a snapshot of
    links, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in src.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy2(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_a_hub_id_counts_when_it_is_in_the_cache_and_whole(parts, tmp_path):
    cache = tmp_path / "hub"
    hub_snapshot(cache, PAPER_HUB, parts["qwen"])
    snap = hub_snapshot(cache, "chanwkim/monet", parts["monet"])
    prof = profile(tmp_path, parts, model__name=PAPER_HUB, embed__encoder={"kind": "monet", "name": "chanwkim/monet"})
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "skinlib.needs", "--profile", str(prof), "--out", str(tmp_path / "run")]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "every external need is met" in done.stdout

    (snap / "model.safetensors").unlink()   # a download cut short
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert done.returncode == 2
    [line] = [ln for ln in done.stderr.splitlines() if ln.startswith("  - ")]
    assert "embed.encoder.name 'chanwkim/monet'" in line and "cached copy is incomplete" in line
    assert "`hf download chanwkim/monet`" in line


def test_gpus_are_counted_against_train_processes(parts, tmp_path):
    cfg = config.load_profile(profile(tmp_path, parts, train__processes=4))
    [line] = needs.missing(cfg, ["02_finetune"], gpus=2)
    assert "train.processes is 4 but torch sees 2 GPU(s)" in line and "set train.processes to 2" in line
    assert needs.missing(cfg, ["02_finetune"], gpus=4) == []
    # on CPU, processes are gloo processes on the cores (the embedded default runs two)
    assert needs.missing(cfg, ["02_finetune"], gpus=0) == []
    assert needs.missing(cfg, ["03_predict"], gpus=2) == []   # only training launches processes


def test_a_large_model_without_a_gpu_is_named(parts, tmp_path):
    qwen = copy(parts["qwen"], tmp_path / "big")
    # the 7B release's index states 16.6 GB; the check reads the index, not the shards' sizes
    weights = qwen / "model.safetensors"
    from safetensors import safe_open
    with safe_open(str(weights), "pt") as f:
        keys = list(f.keys())
    (qwen / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 16_582_751_232}, "weight_map": dict.fromkeys(keys, "model-00001-of-00001.safetensors")}))
    weights.rename(qwen / "model-00001-of-00001.safetensors")
    cfg = config.load_profile(profile(tmp_path, parts, model__name=str(qwen)))
    [line] = needs.missing(cfg, ["03_predict"], gpus=0)
    assert "16.6 GB of weights" in line and "no CUDA GPU" in line
    assert needs.missing(cfg, ["03_predict"], gpus=1) == []


def test_free_disk_is_checked_against_the_shards_at_the_releases_size(parts, tmp_path):
    cfg = config.load_profile(profile(tmp_path, parts))
    d = json.loads((parts["qwen"] / "config.json").read_text())["text_config"]["hidden_size"]
    e = json.loads((parts["monet"] / "config.json").read_text())["projection_dim"]
    need = needs.shard_bytes(cfg, 20, d, e)
    assert need == (20 - 6 + 6) * 2 * (19 * d + e)   # test_fraction 0.295 of 20: 6 test images, all queries
    [line] = needs.missing(cfg, ["04_embed"], run=tmp_path / "run", gpus=0, free=need - 1)
    assert line.startswith("disk: the embedding shards of 20 images at width 128") and "--out" in line
    assert needs.missing(cfg, ["04_embed"], run=tmp_path / "run", gpus=0, free=need) == []
    # shards already written count as done
    done = config.stage_dir(tmp_path / "run", "04_embed") / "embeddings" / "tuned_db"
    done.mkdir(parents=True)
    (done / "shard-00000.safetensors").write_bytes(b"\0" * 1000)
    assert needs.missing(cfg, ["04_embed"], run=tmp_path / "run", gpus=0, free=need - 1000) == []
    # the paper's release: 401,059 images at Qwen2-VL-7B's width 3584 and MONET's 768
    paper = config.load_profile("paper")
    assert needs.shard_bytes(paper, 401_059, 3584, 768) / 1e9 == pytest.approx(55.2, abs=0.1)


def test_the_chain_stops_before_any_stage_with_one_line_per_missing_piece(parts, tmp_path, capsys):
    prof = profile(tmp_path, parts, model__name=str(tmp_path / "no-model"),
                   data__metadata_csv=str(tmp_path / "no.csv"))
    out = tmp_path / "run"
    t = time.perf_counter()
    assert run.main(["--profile", str(prof), "--out", str(out)]) == 2
    assert time.perf_counter() - t < 10
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("  - ")]
    assert len(lines) == 2 and "data.metadata_csv" in lines[0] and "model.name" in lines[1]
    assert not any(out.glob("0*")), "a stage ran"
    # one chapter by hand is checked the same way
    assert run.main(["--notebook", "notebooks/01_data.py", "--profile", str(prof), "--out", str(out)]) == 2
    assert "data.metadata_csv" in capsys.readouterr().err and not any(out.glob("0*"))
