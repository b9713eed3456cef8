"""The chain on the smoke profile: papermill executes every notebook, stages cache, a failure names
its cell, and Jupyter Book renders the executed copies (real papermill, real jupyter-book)."""
import json
import re

import nbformat
import pytest
import yaml

from skinlib import config, run, split

pytestmark = pytest.mark.slow


def test_every_stage_executes_and_leaves_its_artifacts(smoke_run):
    out, status = smoke_run
    assert status == {s: "ran" for s in config.STAGE_NAMES}
    for stage in config.STAGE_NAMES:
        nb = nbformat.read(config.stage_dir(out, stage) / f"{stage}.ipynb", as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, f"{stage}: {errors[:1]}"
        # papermill injected the run's parameters
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    manifest = split.load_manifest(config.manifest_path(out))
    assert len(manifest) == config.load_profile("smoke")["data"]["n_images"]
    assert set(manifest.split) == {"train", "test"}
    assert config.exclusions_path(out).exists()
    # chapter 3's sampled reading: k replies per question on the profile's first test images
    import pandas as pd
    scfg = config.load_profile("smoke")["predict"]["sample"]
    sampled = pd.read_csv(config.stage_dir(out, "03_predict") / "sampled.csv")
    assert sampled.isic_id.nunique() == scfg["n_images"]
    assert sampled.samples.map(lambda s: len(json.loads(s)) == scfg["k"]).all()


def test_retrieval_medians_and_the_ordering_carry_their_intervals(smoke_run):
    import pandas as pd
    from skinlib import intervals
    out, _ = smoke_run
    summary = pd.read_csv(config.retrieval_path(out))
    assert (summary.median_lo <= summary.median_percentile).all()
    assert (summary.median_percentile <= summary.median_hi).all()
    order = pd.read_csv(config.ordering_path(out))
    assert list(order.columns) == ["attribute", "comparison", "difference", "lo", "hi", "verdict"]
    assert set(order.comparison) == {c[0] for c in intervals.COMPARISONS}
    assert set(order.verdict) <= set(intervals.VERDICTS)
    assert ((order.lo <= order.difference) & (order.difference <= order.hi)).all()
    # each difference is that of the two medians in retrieval.csv
    med = summary.set_index(["method", "attribute"]).median_percentile
    for _, r in order.iterrows():
        _, a, b, _ = next(c for c in intervals.COMPARISONS if c[0] == r.comparison)
        assert r.difference == pytest.approx(med[(a, r.attribute)] - med[(b, r.attribute)])


def test_fine_tuning_ran_as_two_accelerate_processes(smoke_run):
    # the smoke profile inherits the default's train.processes: 2, so the stage went through
    # `accelerate launch` with two gloo processes, each taking half of every batch
    out, _ = smoke_run
    cfg = config.load_profile("smoke")
    assert cfg["train"]["processes"] == 2
    summary = json.loads((config.finetuned_dir(out) / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["device"].startswith("cpu")
    launched = yaml.safe_load((config.stage_dir(out, "02_finetune") / "launched-profile.yaml").read_text())
    assert launched["name"] == "smoke" and launched["train"] == cfg["train"]
    hist = (config.checkpoint_dir(out) / "history.csv").read_text().splitlines()
    assert len(hist) - 1 == summary["steps"]
    # the launched processes' progress is kept in the notebook as a terminal would show it at the
    # end: one line per bar, not one per redraw (the book's chapter 2 had thousands of them)
    nb = nbformat.read(config.stage_dir(out, "02_finetune") / "02_finetune.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "finetune.run(cfg, run)" in c.source)
    shown = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in cell.outputs)
    assert "\r" not in shown
    train_lines = [ln for ln in shown.splitlines() if ln.startswith("train:")]
    assert len(train_lines) == 1 and f"{summary['steps']}/{summary['steps']}" in train_lines[0], train_lines[:3]
    assert sum(ln.startswith("vision warm-up:") for ln in shown.splitlines()) == 1


def test_unchanged_stages_are_reused_and_a_changed_parameter_reruns(smoke_run, tmp_path, capsys):
    out, _ = smoke_run
    assert run.run_chain("smoke", out=out) == {s: "cached" for s in config.STAGE_NAMES}
    assert "cached" in capsys.readouterr().out
    # A profile that changes only the split seed: the phantom page is reused, the data stage reruns.
    prof = tmp_path / "smoke2.yaml"
    prof.write_text(yaml.safe_dump({"name": "smoke2", "inherit": "smoke", "data": {"split_seed": 5}}))
    status = run.run_chain(str(prof), out=out)
    assert status["00_phantom"] == "cached" and status["01_data"] == "ran"
    stamp = json.loads((config.stage_dir(out, "01_data") / ".stage.json").read_text())
    assert stamp["profile"] == "smoke2"


def test_a_failing_stage_names_notebook_and_cell_and_keeps_the_traceback(tmp_path):
    prof = tmp_path / "broken.yaml"
    prof.write_text(yaml.safe_dump({"name": "broken", "inherit": "smoke", "data": {"source": "nowhere"}}))
    with pytest.raises(run.StageFailed) as e:
        run.run_chain(str(prof), out=tmp_path / "run", stages=["01_data"])
    msg = str(e.value)
    assert "01_data" in msg and "notebooks/01_data.py" in msg and "nowhere" in msg
    assert re.search(r"execution count \d+", msg)
    executed = nbformat.read(e.value.executed, as_version=4)
    assert any(o.get("output_type") == "error" for c in executed.cells if c.cell_type == "code"
               for o in c.get("outputs", []))
    assert not (tmp_path / "run" / "01_data" / ".stage.json").exists()


def test_the_book_builds_from_the_executed_notebooks(smoke_book):
    html = smoke_book
    pages = {p.relative_to(html).as_posix() for p in html.rglob("*.html")}
    for page in ("index.html", "book/intro.html", "book/references.html",
                 *(f"book/run/{s}.html" for s in config.STAGE_NAMES)):
        assert page in pages, f"{page} missing from the built book"
    data_page = (html / "book/run/01_data.html").read_text()
    assert data_page.count("<img") >= 3  # sample crops, fixtures comparison, distributions
    assert "injected-parameters" not in data_page  # papermill's cell is hidden
    assert "Torop" in (html / "book/references.html").read_text()
    explore_page = (html / "book/run/06_explore.html").read_text()
    assert "explore-static" in explore_page and explore_page.count("<option") >= 2
    assert "data:image/png;base64" in explore_page  # the precomputed picks are in the page itself


def test_the_explorer_answers_ids_and_uploaded_images(smoke_run):
    from PIL import Image

    from skinlib import explore
    out, _ = smoke_run
    ex = explore.Explorer(config.load_profile("smoke"), out)
    q = ex.q_ids[0]
    for method in explore.METHODS:
        top = ex.search(q, method, "areaMM2", k=3)
        assert len(top) == 3 and top.isic_id.isin(ex.db_ids).all()
        assert top.percentile.between(0, 100).all()
    upload = ex.image(ex.db_ids[0]).copy()  # as if uploaded: an image, not an id
    assert isinstance(upload, Image.Image)
    for method in explore.METHODS:
        top = ex.search(upload, method, "Bext", k=2)
        assert len(top) == 2 and top.percentile.isna().all()
    # an uploaded copy of a database image finds itself first by the image-only vector
    assert ex.search(ex.image(ex.db_ids[0]), "image", "A", k=1).isic_id[0] == ex.db_ids[0]
    # a database image used as a query does not retrieve itself
    assert ex.db_ids[0] not in set(ex.search(ex.db_ids[0], "image", "A", k=3).isic_id)
    # the smoke profile constrains decoding, so the explorer's reply has the training answers' shape
    # (the barely trained smoke model's plain replies mostly do not: chapter 3's smoke page shows them)
    assert ex.shapes is not None
    for name in ("areaMM2", "deltaB", "norm_border"):
        assert ex.shapes[name].matches(ex.ask(q, name)), name


def test_the_live_controls_redraw_on_every_change(smoke_run):
    import datetime as dt
    import io

    from skinlib import explore
    out, _ = smoke_run
    ex = explore.Explorer(config.load_profile("smoke"), out)
    c = explore.Controls(ex)
    first = c.show()
    q = c.query.value

    def pd_eq(a, b):
        return list(a.isic_id) == list(b.isic_id)
    assert pd_eq(first, ex.search(q, "image_text", "areaMM2", 5))
    assert c.reply == ex.ask(q, "areaMM2")  # the smoke model may answer with nothing
    c.method.value = "image"  # the observer redraws
    assert pd_eq(c.result, ex.search(q, "image", "areaMM2", 5))
    c.k.value = 2
    assert len(c.result) == 2
    c.attribute.value = "Bext"
    assert "Bext" in c.result.columns and "areaMM2" not in c.result.columns
    c.query.value = ex.q_ids[1]
    assert pd_eq(c.result, ex.search(ex.q_ids[1], "image", "Bext", 2))
    buf = io.BytesIO()
    ex.image(ex.db_ids[0]).save(buf, format="PNG")
    c.upload.value = ({"name": "mine.png", "type": "image/png", "size": buf.tell(),
                       "content": memoryview(buf.getvalue()),
                       "last_modified": dt.datetime.now(dt.timezone.utc)},)
    assert list(c.result.isic_id) == [ex.db_ids[0], *c.result.isic_id[1:]]  # finds its own copy
    assert c.result.percentile.isna().all() and c.seconds > 0
