"""The rendered book in a real headless Chromium (Debian's `chromium`, driven through Playwright's
Python client; no browser download): every page loads with no console error, every image loads, no
request leaves 127.0.0.1, every local link resolves, and the explorer's static selector changes
what is shown."""
from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium; installed here when missing (the test installs what it needs)."""
    if not Path(CHROMIUM).exists():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.fail(f"{CHROMIUM} missing and cannot be installed here: apt-get install chromium")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], check=True, env=env)
    return CHROMIUM


@pytest.fixture(scope="module")
def served(smoke_book):
    """The built book on http://127.0.0.1:<port>/."""
    handler = functools.partial(Quiet, directory=str(smoke_book))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield smoke_book, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=FLAGS, chromium_sandbox=False)
        yield b
        b.close()


def pages_of(html: Path) -> list[str]:
    return sorted(p.relative_to(html).as_posix() for p in html.rglob("*.html")
                  if not p.relative_to(html).parts[0].startswith("_"))


def visit(browser, url: str):
    """Load `url`; return the page and what went wrong: console errors, page errors, failed or
    non-local requests, images that did not load."""
    problems: list[str] = []
    context = browser.new_context()

    def route(r):
        host = urlparse(r.request.url).hostname
        if r.request.url.startswith("data:") or host == "127.0.0.1":
            r.continue_()
        else:
            problems.append(f"request leaves 127.0.0.1: {r.request.url}")
            r.abort()
    context.route("**/*", route)
    page = context.new_page()
    page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} ({r.failure})"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status}: {r.url}"))
    page.goto(url, wait_until="networkidle")
    broken = page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
                           ".map(i => i.currentSrc.slice(0, 80))")
    problems += [f"image not loaded: {b}" for b in broken]
    return page, problems


def test_every_page_loads_offline_with_no_error(served, browser):
    html, base = served
    pages = pages_of(html)
    assert "book/run/06_explore.html" in pages and len(pages) >= 12
    found = {}
    for rel in pages:
        page, problems = visit(browser, base + rel)
        # every link to a local file resolves to a file of the book
        for href in page.evaluate("Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"):
            u = urlparse(href)
            if u.hostname == "127.0.0.1" and u.path:
                target = html / unquote(u.path).lstrip("/")
                if target.is_dir():
                    target = target / "index.html"
                if not target.exists():
                    problems.append(f"broken link: {href}")
        page.context.close()
        if problems:
            found[rel] = problems
    assert not found, "\n".join(f"{p}: {x}" for p, xs in found.items() for x in xs[:5])


def test_the_static_explorer_switches_between_picks(served, browser):
    _, base = served
    page, problems = visit(browser, base + "book/run/06_explore.html")
    assert not problems, problems
    select = page.locator(".explore-static select")
    n = select.locator("option").count()
    assert n >= 2

    def shown():
        visible = page.locator(".explore-pick:visible")
        assert visible.count() == 1
        return visible.get_attribute("data-pick"), visible.locator("img").get_attribute("src")

    first = shown()
    assert first[0] == "0"
    select.select_option(str(n - 1))
    last = shown()
    assert last[0] == str(n - 1) and last[1] != first[1]
    page.context.close()
