"""chapter.open: the opening the chapter notebooks share, on a small real phantom release."""
import pytest
import torch

from skinlib import chapter, config, split


@pytest.fixture(scope="module")
def run(tmp_path_factory, phantom_release):
    """A run folder as 01_data leaves it: a phantom release and its patient split."""
    run = tmp_path_factory.mktemp("run")
    ds = phantom_release(config.phantom_dir(run), 16, seed=3)
    frame = ds.attribute_frame()
    sp = split.patient_split(frame, test_fraction=0.5, seed=0)
    split.save_manifest(frame.merge(sp[["isic_id", "split"]], on="isic_id"), config.manifest_path(run))
    return run


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_open_applies_the_notebooks_overrides_to_their_sections(run, threads):
    profile = config.load_profile("smoke")
    torch.set_num_threads(1)
    ch = chapter.open("smoke", run, "03_predict",
                      predict={"n_images": 5, "batch_size": None}, embed={"n_queries": 7})
    assert ch.stage == "03_predict" and ch.run == run
    assert ch.cfg["predict"] == {**profile["predict"], "n_images": 5}   # None keeps the profile's
    assert ch.cfg["embed"] == {**profile["embed"], "n_queries": 7}
    assert {k: v for k, v in ch.cfg.items() if k not in ("predict", "embed")} == \
        {k: v for k, v in profile.items() if k not in ("predict", "embed")}
    assert torch.get_num_threads() == profile["threads"]   # pinned, as every chapter needs
    # without `out`, the profile's own run folder
    assert chapter.open("smoke", None, "00_phantom").run == config.run_dir("smoke")


def test_the_split_and_the_release_are_the_ones_01_data_wrote(run, threads):
    ch = chapter.open("smoke", run, "04_embed")
    saved = split.load_manifest(config.manifest_path(run))
    assert ch.manifest.equals(saved)
    assert list(ch.train.isic_id) == list(saved[saved.split == "train"].isic_id)
    assert list(ch.test.isic_id) == list(saved[saved.split == "test"].isic_id)
    assert len(ch.train) and len(ch.test)
    assert not set(ch.train.patient_id) & set(ch.test.patient_id)   # split by patient
    assert ch.release_files == config.release_files(ch.cfg, run)
    assert sorted(ch.release.ids) == sorted(saved.isic_id)
    assert ch.fixtures == config.resolve_path(ch.cfg["reference"]["fixtures_dir"])


def test_bad_openings_say_what_is_wrong(run, tmp_path, threads):
    with pytest.raises(KeyError, match="unknown stage '03_predic'"):
        chapter.open("smoke", run, "03_predic")
    with pytest.raises(config.ProfileError, match="'n_image' is not a key of profile section 'predict'"):
        chapter.open("smoke", run, "03_predict", predict={"n_image": 5})
    with pytest.raises(config.ProfileError, match="predict.batch_size"):
        chapter.open("smoke", run, "03_predict", predict={"batch_size": "eight"})
    # a run folder without 01_data's manifest: the error names the file, when it is first read
    empty = chapter.open("smoke", tmp_path, "05_retrieval")
    with pytest.raises(FileNotFoundError, match=str(config.manifest_path(tmp_path))):
        empty.train
