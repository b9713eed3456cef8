"""The one protocol for stored job parts: atomic writes, seals, folder seals, job stamps."""
from __future__ import annotations

import pytest

from skinlib import resumable


def test_job_key_is_order_free_and_content_bound():
    assert resumable.job_key({"a": 1, "b": [1, 2]}) == resumable.job_key({"b": [1, 2], "a": 1})
    assert resumable.job_key({"a": 1}) != resumable.job_key({"a": 2})


def test_sealed_file_passes_and_every_damage_is_named(tmp_path):
    f = resumable.write_text(tmp_path / "shard-00000.csv", "id,v\na,1\nb,2\n")
    assert "not sealed" in resumable.check(f, "j1")
    resumable.seal(f, "j1", rows=2)
    assert resumable.check(f, "j1", rows=2) is None
    assert resumable.sealed_rows(f) == 2
    assert "job" in resumable.check(f, "j2")
    assert "rows" in resumable.check(f, "j1", rows=3)
    # cut at a line boundary: still a valid CSV, but not the sealed one
    f.write_text("id,v\na,1\n")
    assert "cut short" in resumable.check(f, "j1")
    # same size, other contents
    f.write_text("id,v\na,7\nb,2\n")
    assert "sha256" in resumable.check(f, "j1")
    resumable.remove(f)
    assert "missing" in resumable.check(f)
    assert not resumable.seal_path(f).exists()


def test_atomic_write_leaves_no_partial_and_commit_seals(tmp_path):
    target = tmp_path / "x.bin"
    resumable.partial_path(target).write_bytes(b"abc")
    resumable.commit(target, "j", rows=1)
    assert target.read_bytes() == b"abc" and resumable.check(target, "j", rows=1) is None
    resumable.write_json(tmp_path / "s.json", {"k": 1})
    assert resumable.read_json(tmp_path / "s.json") == {"k": 1}
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
    (tmp_path / "half.json").write_text('{"k": ')
    assert resumable.read_json(tmp_path / "half.json") is None


def test_folder_seal_detects_missing_extra_cut_and_changed_files(tmp_path):
    d = tmp_path / "step-0000010"
    (d / "sub").mkdir(parents=True)
    (d / "a.safetensors").write_bytes(b"0123456789")
    (d / "sub" / "b.json").write_text("{}")
    assert "not sealed" in resumable.check_dir(d)
    resumable.seal_dir(d, "train")
    assert resumable.check_dir(d, "train") is None
    assert "not by this job" in resumable.check_dir(d, "other")
    (d / "a.safetensors").write_bytes(b"01234")
    assert "a.safetensors" in resumable.check_dir(d) and "cut short" in resumable.check_dir(d)
    (d / "a.safetensors").write_bytes(b"9876543210")
    assert "sha256" in resumable.check_dir(d)
    (d / "a.safetensors").write_bytes(b"0123456789")
    (d / "extra.txt").write_text("x")
    assert "extra.txt" in resumable.check_dir(d)
    (d / "extra.txt").unlink()
    (d / "sub" / "b.json").unlink()
    assert "missing" in resumable.check_dir(d)


@pytest.mark.parametrize("same", [True, False])
def test_stamp_clears_another_jobs_parts_only(tmp_path, same):
    first = resumable.Stamp(tmp_path, {"ids": [1, 2]})
    assert first.begin(["shard-*.csv"]) is False
    part = resumable.write_text(tmp_path / "shard-00000.csv", "x\n")
    resumable.seal(part, first.key)
    (tmp_path / "notes.txt").write_text("kept")
    again = resumable.Stamp(tmp_path, {"ids": [1, 2] if same else [1, 3]})
    assert again.begin(["shard-*.csv"]) is same
    assert part.exists() is same and resumable.seal_path(part).exists() is same
    assert (tmp_path / "notes.txt").exists()
    assert again.current() == again.key
