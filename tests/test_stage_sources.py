"""A stage's cache key covers the skinlib sources its notebook can run, not the whole package."""
from __future__ import annotations

from skinlib import config, run

PKG = config.REPO_ROOT / "skinlib"


def names(paths):
    return {str(p.relative_to(PKG)) for p in paths}


def test_a_notebook_covers_what_it_imports_transitively_and_nothing_else(tmp_path):
    nb = tmp_path / "nb.py"
    nb.write_text("# %%\nfrom skinlib import split\n\n\ndef late():\n    from skinlib.phantom import release\n")
    got = names(run.package_sources(nb))
    # split's own imports come along; importing phantom.release runs the package's __init__ first
    assert {"__init__.py", "split.py", "config.py", "phantom/__init__.py", "phantom/release.py"} <= got
    assert "predict.py" not in got and "finetune.py" not in got
    # the transitive closure is closed: every file's skinlib imports are in the set
    for rel in got:
        path = PKG / rel
        pkg = "skinlib." + rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        pkg = pkg.removesuffix(".__init__")
        package = pkg if path.name == "__init__.py" else pkg.rpartition(".")[0]
        for dep in run._imports(path, package):
            assert str(run._module_file(dep).relative_to(PKG)) in got, (rel, dep)


def test_the_data_stage_does_not_depend_on_the_model_code():
    got = names(run.package_sources(config.REPO_ROOT / "notebooks" / "01_data.py"))
    assert {"slice3d.py", "split.py", "phantom/release.py"} <= got
    assert not {"predict.py", "finetune.py", "train.py", "embed.py"} & got
    later = names(run.package_sources(config.REPO_ROOT / "notebooks" / "03_predict.py"))
    assert {"predict.py", "median_reading.py", "answer_format.py"} <= later
