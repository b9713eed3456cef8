"""The live explorer as a reader meets it: the README's command (`python -m skinlib.explore`) starts a
real JupyterLab on 127.0.0.1 with a notebook copy of the chapter; a real headless Chromium opens
it, runs all cells and works the controls; the tracked notebooks/07_explore.py is never written.

The browser test needs JupyterLab (the `live` extra); where it is not installed, pytest reports it
as skipped with that reason."""
from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import nbformat
import pytest

from skinlib import config, explore, study
from test_browser import FLAGS, chromium  # noqa: F401 (chromium: the fixture that finds or installs it)

REPO = config.REPO_ROOT
TRACKED = REPO / "notebooks" / "07_explore.py"


def test_the_live_copy_is_a_notebook_with_the_runs_parameters(tmp_path):
    path = explore.prepare_live("smoke", tmp_path / "run", tmp_path / "live")
    nb = nbformat.read(path, as_version=4)
    assert path.suffix == ".ipynb" and nb.metadata.kernelspec.name == "python3"
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    src = injected[0].source
    assert "live = True" in src and repr(str((tmp_path / "run").resolve())) in src
    assert "smoke.yaml" in src


def test_the_default_live_folder_is_ignored_by_git():
    """Autosave writes into the copy; the copy's folder must not show up in `git status`."""
    target = (explore.SCRATCH / "07_explore.ipynb").relative_to(REPO)
    got = subprocess.run(["git", "check-ignore", "-q", str(target)], cwd=REPO)
    assert got.returncode == 0, f"{target} is not ignored by git"


def test_the_command_refuses_a_run_that_is_not_there(tmp_path, capsys):
    assert explore.main(["--profile", "smoke", "--run", str(tmp_path / "none")]) == 1
    assert "make book" in capsys.readouterr().err


# ------------------------------------------------------------------ the browser test
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc, log: Path, seconds: float = 90) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"jupyter lab did not answer {url} in {seconds} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def lab(request, tmp_path):
    """The README's command on the smoke run, the copy in a scratch folder: (base URL, token, copy)."""
    pytest.importorskip("jupyterlab", reason="JupyterLab is not installed (pip install -e '.[live]')")
    smoke_run = request.getfixturevalue("smoke_run")  # after the skip: the chain takes minutes
    port, token = _free_port(), "skinlib-test"
    env = dict(os.environ)
    # the reader's own Jupyter settings neither help nor hurt the test
    for var, sub in (("JUPYTER_CONFIG_DIR", "cfg"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "ws"), ("JUPYTER_RUNTIME_DIR", "rt"), ("IPYTHONDIR", "ipy")):
        env[var] = str(tmp_path / sub)
    log = tmp_path / "lab.log"
    cmd = [sys.executable, "-m", "skinlib.explore", "--profile", "smoke", "--run", str(smoke_run[0]),
           "--dest", str(tmp_path / "live"), "--", "--no-browser", f"--port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}"] + (["--allow-root"] if os.geteuid() == 0 else [])  # CI containers
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_server(f"{base}/api/status?token={token}", proc, log)
        yield base, token, tmp_path / "live" / "07_explore.ipynb"
    finally:
        proc.terminate()  # the command exec'd jupyter lab: this is the server itself
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_jupyterlab_opens_the_readmes_page_runs_all_and_the_controls_answer(lab, chromium, smoke_run, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    base, token, copy = lab
    before = _digest(TRACKED)
    ex = explore.Explorer(config.load_profile("smoke"), smoke_run[0])
    off_machine: list[str] = []

    def route(r):
        if urlparse(r.request.url).hostname == "127.0.0.1" or r.request.url.startswith("data:"):
            r.continue_()
        else:
            off_machine.append(r.request.url)
            r.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=FLAGS, chromium_sandbox=False)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.route("**/*", route)
        page = context.new_page()
        try:
            page.goto(f"{base}/lab/tree/07_explore.ipynb?token={token}")
            # opened as a notebook (cells), not as text in the editor
            expect(page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first).to_be_visible(timeout=60_000)
            # Run All before the kernel is connected asks which kernel to start: wait for it
            expect(page.locator("#jp-main-statusbar")).to_contain_text("| Idle", timeout=60_000)
            page.locator(".lm-MenuBar-item").filter(has_text=re.compile(r"^Run$")).click()  # as a reader does
            page.locator(".lm-Menu-item").filter(has_text=re.compile(r"^Run All Cells")).click()
            page.wait_for_timeout(1000)
            if page.locator(".jp-Dialog").count():  # the kernel was still starting after all
                page.locator(".jp-Dialog .jp-mod-accept").click()
            pick = page.locator(".skx-pick")
            expect(pick).to_have_count(1, timeout=120_000)
            controls = page.locator(".jupyter-widgets.widget-vbox").first

            def dropdown(label: str):
                return controls.locator(".widget-dropdown select").and_(controls.get_by_label(label, exact=True))

            def shown() -> tuple[str, list[str]]:
                return pick.get_attribute("data-method"), pick.locator(".skx-hit").evaluate_all(
                    "cards => cards.map(c => c.dataset.id)")

            q = dropdown("query").input_value()
            assert shown() == ("image_text", list(ex.search(q, "image_text", "areaMM2", 5).isic_id))
            dropdown("method").select_option(label=study.LABELS["image"])
            expect(pick).to_have_attribute("data-method", "image", timeout=30_000)
            assert shown()[1] == list(ex.search(q, "image", "areaMM2", 5).isic_id)
            # a file that is no image: a message, not a traceback, and the controls keep answering
            with page.expect_file_chooser() as chooser:  # the upload button opens the file dialog
                controls.locator(".widget-upload").click()
            chooser.value.set_files(files=[{"name": "notes.txt", "mimeType": "text/plain",
                                           "buffer": b"not a picture\n"}])
            expect(controls.locator(".skx-error")).to_contain_text("notes.txt", timeout=30_000)
            assert "Traceback" not in page.content() and "UnidentifiedImageError" not in page.content()
            dropdown("attribute").select_option("Bext")
            expect(pick).to_have_attribute("data-attribute", "Bext", timeout=30_000)
            expect(controls.locator(".skx-error")).to_have_count(0)
            assert shown()[1] == list(ex.search(q, "image", "Bext", 5).isic_id)
            # saving writes the copy, never the tracked chapter
            page.locator(".jp-NotebookPanel").click()
            page.keyboard.press("Control+s")
            deadline = time.monotonic() + 30
            while "explorer ready in" not in copy.read_text() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert "explorer ready in" in copy.read_text(), "the notebook copy was not saved"
        except Exception:
            page.screenshot(path=str(tmp_path / "lab.png"))
            raise
        finally:
            browser.close()
    assert _digest(TRACKED) == before, "exploring wrote into the tracked notebooks/07_explore.py"
    assert not off_machine, off_machine
