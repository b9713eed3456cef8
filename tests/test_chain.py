"""The chain on the smoke profile: papermill executes every notebook, stages cache, a failure names
its cell, and Jupyter Book renders the executed copies (real papermill, real jupyter-book)."""
import json
import re
import shutil

import nbformat
import numpy as np
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


def test_r2_holds_the_headline_reading_and_every_reading_sits_beside_it(smoke_run):
    import pandas as pd
    from skinlib import metrics
    out, _ = smoke_run
    pcfg = config.load_profile("smoke")["predict"]
    r2 = pd.read_csv(config.r2_path(out))
    assert set(r2.reading) == {pcfg["reading"]} and len(r2) == 16
    ok = r2.r2.notna()
    assert ((r2.r2_lo <= r2.r2) & (r2.r2 <= r2.r2_hi))[ok].all()
    every = pd.read_csv(config.r2_readings_path(out))
    assert set(every.reading) == {"greedy", *pcfg["readings"]}
    for name, g in every.groupby("reading"):
        # each reading's R² is that of its own predictions file
        frame = pd.read_csv(config.reading_path(out, name), keep_default_na=False, na_values=[""])
        np.testing.assert_allclose(g.r2.to_numpy(), metrics.r2_table(frame).r2.to_numpy(), equal_nan=True)


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
    # on a copy: the changed profile below reruns the chain, and the session's other tests (and its
    # book) read the shared smoke run as it was made
    out = tmp_path / "smoke"
    shutil.copytree(smoke_run[0], out)
    assert run.run_chain("smoke", out=out) == {s: "cached" for s in config.STAGE_NAMES}
    assert "cached" in capsys.readouterr().out
    # A profile that changes only the split seed: the phantom page is reused, the data stage reruns.
    prof = tmp_path / "smoke2.yaml"
    prof.write_text(yaml.safe_dump({"name": "smoke2", "inherit": "smoke", "data": {"split_seed": 5}}))
    status = run.run_chain(str(prof), out=out)
    assert status["00_phantom"] == "cached" and status["01_data"] == "ran"
    stamp = json.loads(config.stage_stamp_path(out, "01_data").read_text())
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
    assert not config.stage_stamp_path(tmp_path / "run", "01_data").exists()


def test_the_book_builds_from_the_executed_notebooks(smoke_book, smoke_run):
    html = smoke_book
    pages = {p.relative_to(html).as_posix() for p in html.rglob("*.html")}
    for page in ("index.html", "book/intro.html", "book/references.html",
                 *(f"book/run/{s}.html" for s in config.STAGE_NAMES)):
        assert page in pages, f"{page} missing from the built book"
    data_page = (html / "book/run/01_data.html").read_text()
    assert data_page.count("<img") >= 3  # sample crops, fixtures comparison, distributions
    assert "injected-parameters" not in data_page  # papermill's cell is hidden
    # no page, and no page's source copy, shows a path of the machine that built the book
    machine = [str(smoke_run[0].resolve()), str(config.REPO_ROOT.resolve()), "site-packages"]
    for page in [*html.rglob("*.html"), *(html / "_sources").rglob("*.ipynb")]:
        text = page.read_text(errors="replace")
        shown = [m for m in machine if m in text]
        assert not shown, f"{page.relative_to(html)} shows {shown}"
    assert "Torop" in (html / "book/references.html").read_text()


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


def test_the_batched_picks_the_book_precomputes_are_the_single_picks(smoke_run):
    """The book's explorer is filled by `table` and `ask_rows` (all queries at once, largest k):
    each row, cut to any k, is what one `search` / `ask` gives, a database image as query included."""
    from skinlib import explore
    out, _ = smoke_run
    ex = explore.Explorer(config.load_profile("smoke"), out)
    queries = [*ex.q_ids[:6], ex.db_ids[3]]
    for method in explore.METHODS:
        for attribute in ("areaMM2", "deltaLB"):
            ids, pct = ex.table(queries, method, attribute, explore.K_MAX)
            for qi, q in enumerate(queries):
                for k in (1, 4, explore.K_MAX):
                    top = ex.search(q, method, attribute, k)
                    assert list(top.isic_id) == list(ids[qi, :k]), (method, attribute, q, k)
                    assert top.percentile.to_numpy() == pytest.approx(pct[qi, :k], nan_ok=True)
    rows = [(q, a) for q in ex.q_ids[:4] for a in ("areaMM2", "deltaB", "norm_border")]
    assert ex.ask_rows(rows) == [ex.ask(q, a) for q, a in rows]  # batched as asked one by one


def _upload(name: str, content: bytes):
    import datetime as dt
    return ({"name": name, "type": "", "size": len(content), "content": memoryview(content),
             "last_modified": dt.datetime.now(dt.timezone.utc)},)


def _png(image) -> bytes:
    import io
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_the_live_controls_redraw_on_every_change(smoke_run):
    from skinlib import explore, study
    out, _ = smoke_run
    ex = explore.Explorer(config.load_profile("smoke"), out)
    c = explore.Controls(ex)
    assert list(c.query.options) == list(ex.q_ids)  # every query of the run, not the first 200
    first = c.show()
    q = c.query.value

    def same(a, b):
        return list(a.isic_id) == list(b.isic_id)
    assert same(first, ex.search(q, "image_text", "areaMM2", 5))
    assert c.reply == ex.ask(q, "areaMM2")  # the smoke model may answer with nothing
    assert study.LABELS["image_text"] in c.grid.value  # the grid names its method
    c.method.value = "image"  # the observer redraws
    assert same(c.result, ex.search(q, "image", "areaMM2", 5))
    assert study.LABELS["image"] in c.grid.value and study.LABELS["image_text"] not in c.grid.value
    c.k.value = 2
    assert len(c.result) == 2 and c.grid.value.count('class="skx-card skx-hit"') == 2
    c.attribute.value = "Bext"
    assert "Bext" in c.result.columns and "areaMM2" not in c.result.columns
    c.query.value = ex.q_ids[1]
    assert same(c.result, ex.search(ex.q_ids[1], "image", "Bext", 2))
    c.k.value = explore.K_MAX  # every card keeps a text caption of its own (no shrinking figure)
    assert c.grid.value.count("<figcaption>") == explore.K_MAX + 1


def test_an_upload_is_the_query_until_a_query_is_picked_or_it_is_cleared(smoke_run):
    from skinlib import explore
    out, _ = smoke_run
    ex = explore.Explorer(config.load_profile("smoke"), out)
    c = explore.Controls(ex)
    c.show()
    c.method.value = "image"
    c.upload.value = _upload("mine.png", _png(ex.image(ex.db_ids[0])))
    assert list(c.result.isic_id[:1]) == [ex.db_ids[0]]  # finds its own copy
    assert c.result.percentile.isna().all() and c.seconds > 0
    # no measured value: the captions say so instead of "percentile nan"
    assert not re.search(r"\bnan\b", c.grid.value) and "no measured value" in c.grid.value
    assert "mine.png" in c.status.value and not c.clear.disabled
    c.attribute.value = "Bext"  # other controls keep the upload
    assert c.result.percentile.isna().all()
    c.query.value = ex.q_ids[2]  # picking a query drops the upload
    assert not c.upload.value and c.clear.disabled
    assert list(c.result.isic_id) == list(ex.search(ex.q_ids[2], "image", "Bext", 5).isic_id)
    assert c.result.percentile.notna().all() and ex.q_ids[2] in c.status.value
    c.upload.value = _upload("again.png", _png(ex.image(ex.db_ids[1])))
    assert c.result.percentile.isna().all()
    c.clear.click()  # so does the clear button, without touching the list
    assert not c.upload.value and c.query.value == ex.q_ids[2]
    assert list(c.result.isic_id) == list(ex.search(ex.q_ids[2], "image", "Bext", 5).isic_id)


def test_a_non_image_upload_gets_a_message_and_the_controls_keep_working(smoke_run):
    from skinlib import explore
    out, _ = smoke_run
    ex = explore.Explorer(config.load_profile("smoke"), out)
    c = explore.Controls(ex)
    c.show()
    c.upload.value = _upload("notes.txt", b"not a picture\n")  # raises nothing
    assert "notes.txt" in c.message and "PNG or JPEG" in c.message and "Error" not in c.message
    assert "notes.txt" in c.status.value
    assert not c.upload.value  # dropped: the list's query is shown again
    assert list(c.result.isic_id) == list(ex.search(c.query.value, "image_text", "areaMM2", 5).isic_id)
    c.k.value = 3  # a later change neither repeats the message nor fails
    assert c.message == "" and len(c.result) == 3 and "notes.txt" not in c.status.value
    with pytest.raises(explore.BadUpload, match="truncated|cannot"):
        explore.read_upload(_upload("cut.png", _png(ex.image(ex.db_ids[0]))[:200])[0])


def test_the_book_carries_the_kernel_free_explorer_within_its_budget(smoke_run, smoke_book):
    """The page loads its picks from the book's own static files, and they fit the stated budget."""
    from skinlib import explore
    html = smoke_book
    page = (html / "book/run/07_explore.html").read_text()
    assert "skx-static" in page and "_static/explore/" in page
    assert "cdn" not in page.split("skx-static", 1)[1].lower()  # nothing of the explorer from a CDN
    files = [p for p in (html / "_static" / "explore").rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    assert (html / "_static/explore/data.js") in files and 0 < size <= explore.STATIC_BUDGET
    # what the explorer adds to the book besides its files: the page and its source copy stay small
    assert len(page.encode()) < 300_000
    assert (html / "_sources/book/run/07_explore.ipynb").stat().st_size < 300_000
    data = json.loads((html / "_static/explore/data.js").read_text().split("=", 1)[1].rstrip().rstrip(";"))
    ex_q = set(explore.Explorer(config.load_profile("smoke"), smoke_run[0]).q_ids)
    assert len(data["queries"]) == min(len(ex_q), explore.STATIC_QUERIES) and {q["id"] for q in data["queries"]} <= ex_q
    thumbs = {p.stem for p in files if p.suffix == ".jpg"}
    assert {d["id"] for d in data["db"]} | {q["id"] for q in data["queries"]} == thumbs


def _probe_rows(contributions) -> list[tuple[str, str]]:
    """The panel's rows as it must list them: attribute and contribution to two decimals, largest
    |contribution| first (ties in registry order)."""
    from skinlib import attributes
    shown = [(n, float(f"{c:.2f}") + 0.0) for n, c in zip(attributes.NAMES, contributions)]
    return [(n, f"{c:+.2f}") for n, c in sorted(shown, key=lambda t: -abs(t[1]))]


def _panel_rows(grid: str) -> list[tuple[str, str]]:
    return re.findall(r'<tr data-attribute="([^"]+)"><td>[^<]*</td><td>.*?</td><td>([+-]\d+\.\d\d)</td></tr>', grid)


def test_the_explorer_shows_the_malignancy_probe_of_the_attributes_the_model_reads(smoke_run, tmp_path):
    """Stage 06 keeps its attribute probe; the live explorer applies it to the 16 values the model
    reads in the query (an id or an upload) and shows the probability, each attribute's contribution
    and, for a stored query, its label. A run without a probe says so in one line."""
    import pandas as pd

    from skinlib import attributes, explore, malignancy
    out, _ = smoke_run
    cfg = config.load_profile("smoke")
    probe = malignancy.load_probe(config.malignancy_probe_path(out))   # sealed, the 16 names
    # it is the chapter's probe: on the true attributes it gives the scores chapter 6 wrote
    scores = pd.read_csv(config.malignancy_scores_path(out))
    true = scores[scores.features == "true attributes"]
    manifest = split.load_manifest(config.manifest_path(out)).set_index("isic_id")
    x = manifest.loc[true.isic_id, list(attributes.NAMES)].to_numpy(dtype=float)
    np.testing.assert_allclose(probe.score(x), true.score, rtol=0, atol=1e-12)

    ex = explore.Explorer(cfg, out)
    c = explore.Controls(ex)
    c.show()
    labels = pd.read_csv(config.release_files(cfg, out)[1], usecols=["isic_id", "target"]).set_index("isic_id").target
    for q in (ex.q_ids[0], ex.q_ids[3]):
        c.query.value = q
        read = [attributes.get(a).read_answer(ex.ask(q, a)) for a in ex.names]
        want = malignancy.explain(probe, read)
        assert c.reading["probability"] == want["probability"] and c.reading["label"] == labels[q]
        assert f"malignancy probe: P(malignant) {want['probability']:.3f}" in c.grid.value
        assert ("label: malignant" if labels[q] else "label: benign") in c.grid.value
        assert "the 16 attributes the model reads" in c.grid.value
        assert _panel_rows(c.grid.value) == _probe_rows(want["contributions"])
        assert f"<td>intercept</td><td></td><td>{probe.intercept:+.2f}</td>" in c.grid.value
    before = c.reading
    c.k.value = 2   # other controls redraw the same reading, not a new one
    assert c.reading is before and "P(malignant)" in c.grid.value
    # an uploaded crop: the same probe on what the model reads in it, and no label (none is known)
    c.upload.value = _upload("mine.png", _png(ex.image(ex.db_ids[2])))
    image = c.uploaded[0]
    want = malignancy.explain(probe, [attributes.get(a).read_answer(r) for a, r in
                                      zip(ex.names, ex.ask_rows([(image, a) for a in ex.names]))])
    assert c.reading["probability"] == want["probability"] and c.reading["label"] is None
    assert f"P(malignant) {want['probability']:.3f}" in c.grid.value and "label:" not in c.grid.value
    assert _panel_rows(c.grid.value) == _probe_rows(want["contributions"])
    # a run whose stage 06 wrote no probe: one line, and the explorer works on
    bare = explore.Explorer(cfg, out, probe_path=tmp_path / "attribute_probe.json")
    c = explore.Controls(bare, upload=False)
    top = c.show()
    assert c.reading is None and "P(malignant)" not in c.grid.value
    assert "No malignancy probe: stage 06 wrote none" in c.grid.value and len(top) == 5
    data = explore.static_data(bare, bare.q_ids[:1], k=2)
    assert data["queries"][0]["malignancy"] is None and data["probe"]["missing"] == bare.probe_missing
