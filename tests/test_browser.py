"""The rendered book in a real headless Chromium (Debian's `chromium`, driven through Playwright's
Python client; no browser download): every page loads with no console error, every image loads, no
request leaves 127.0.0.1, every local link resolves, the explorer's static selector changes what is
shown, and at a 1300 px window an 88-character code line shows whole."""
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
    assert "book/run/07_explore.html" in pages and len(pages) >= 12
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


def _caption(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _expected_pick(ex, q: str, method: str, attribute: str, k: int):
    """What the page must show for a pick: the run's own search, values and the model's reply,
    written as the live grid writes them."""
    from skinlib import attributes
    unit = attributes.get(attribute).unit
    top = ex.search(q, method, attribute, k)
    reply = ex.ask(q, attribute)
    said = attributes.get(attribute).read_answer(reply)
    head = [f"query {q}", f"{attribute} {ex.values.loc[q, attribute]:.2f} {unit}".rstrip(),
            "model says " + (f"{said:.2f} {unit}".rstrip() if said == said else f"no number ({reply!r})")]
    hits = [(r.isic_id, [f"#{r.rank} {r.isic_id}", f"{getattr(r, attribute):.2f} {unit}".rstrip(),
                         f"percentile {r.percentile:.0f}" if r.percentile == r.percentile
                         else "no percentile (no measured value)"]) for r in top.itertuples()]
    return head, hits


@functools.cache
def _expected_panel(run, q: str):
    """What the malignancy panel must show for query q: chapter 6's saved probe applied to the 16
    values the run's model reads in q, the label from the release, the contributions largest first."""
    import pandas as pd

    from skinlib import attributes, config, malignancy
    cfg = config.load_profile("smoke")
    ex = _explorer(run)
    probe = malignancy.load_probe(config.malignancy_probe_path(run))
    m = malignancy.explain(probe, [attributes.get(a).read_answer(ex.ask(q, a)) for a in ex.names])
    target = pd.read_csv(config.release_files(cfg, run)[1], usecols=["isic_id", "target"]).set_index("isic_id").target[q]
    shown = [(n, float(f"{c:.2f}") + 0.0) for n, c in zip(attributes.NAMES, m["contributions"])]
    rows = [[n, f"{c:+.2f}"] for n, c in sorted(shown, key=lambda t: -abs(t[1]))]
    rows.append(["intercept", f"{probe.intercept:+.2f}"])
    return (f"malignancy probe: P(malignant) {m['probability']:.3f}", "label: " + ("malignant" if target else "benign"),
            True, rows)   # the panel says where its numbers come from


@functools.cache
def _explorer(run):
    from skinlib import config, explore
    return explore.Explorer(config.load_profile("smoke"), run)


def _shown_pick(box):
    pick = box.locator(".skx-pick")
    head = _caption(pick.locator(".skx-query figcaption").inner_text())
    hits = [(h.get_attribute("data-id"), _caption(h.locator("figcaption").inner_text()))
            for h in pick.locator(".skx-hit").all()]
    return (pick.get_attribute("data-method"), pick.get_attribute("data-attribute"), int(pick.get_attribute("data-k")),
            pick.get_attribute("data-query"), pick.locator(".skx-title").first.inner_text()), head, hits


def _shown_panel(box):
    from skinlib import explore
    panel = box.locator(".skx-pick .skx-malig")
    rows = [[c.strip() for c in r.locator("td").all_inner_texts()] for r in panel.locator("tr").all()]
    return (panel.locator(".skx-title").inner_text(), panel.locator(".skx-label").inner_text(),
            explore.PROBE_NOTE in panel.locator(".skx-note").inner_text(), [[r[0], r[2]] for r in rows])


def test_the_static_explorer_shows_the_runs_own_picks(served, browser, smoke_run):
    """Every control of the kernel-free explorer changes what is shown, and what is shown is what the
    run's Explorer returns for the same pick (ids, values, percentiles, the model's answer)."""
    from skinlib import explore, study
    ex = _explorer(smoke_run[0])
    _, base = served
    page, problems = visit(browser, base + "book/run/07_explore.html")
    assert not problems, problems
    box = page.locator(".skx-static")
    ctl = {n: box.locator(f"[data-control={n}]") for n in ("query", "method", "attribute", "k")}
    queries = ctl["query"].locator("option").all_inner_texts()
    assert len(queries) == min(len(ex.q_ids), explore.STATIC_QUERIES) and set(queries) <= set(ex.q_ids)
    methods = ctl["method"].locator("option").all_inner_texts()
    assert methods == [study.LABELS[m] for m in explore.METHODS]
    assert ctl["attribute"].locator("option").all_inner_texts() == list(ex.names)

    def check(q, method, attribute, k):
        (m, a, kk, qq, title), head, hits = _shown_pick(box)
        assert (m, a, kk, qq) == (method, attribute, k, q)
        assert study.LABELS[method] in title and attribute in title  # the grid names its method
        want_head, want_hits = _expected_pick(ex, q, method, attribute, k)
        assert head == want_head and hits == want_hits, (method, attribute, k, q)
        # beside the retrievals: the probe's reading of the query, as the run's own probe gives it
        assert _shown_panel(box) == _expected_panel(smoke_run[0], q), q
        broken = page.evaluate("Array.from(document.querySelectorAll('.skx-pick img'))"
                               ".filter(i => !(i.complete && i.naturalWidth > 0)).length")
        assert broken == 0

    check(queries[0], "image_text", "areaMM2", 5)  # the first view
    steps = [("method", 1), ("attribute", 5), ("k", 10), ("query", len(queries) - 1), ("method", 2),
             ("k", 1), ("attribute", 15), ("method", 3), ("query", len(queries) // 2), ("method", 4),
             ("k", 7), ("method", 5), ("attribute", 0), ("method", 0), ("k", 3)]
    state = {"query": 0, "method": 0, "attribute": list(ex.names).index("areaMM2"), "k": 5}
    for control, value in steps:
        if control == "k":
            ctl["k"].fill(str(value))
        else:
            ctl[control].select_option(str(value))
        state[control] = value
        check(queries[state["query"]], explore.METHODS[state["method"]], ex.names[state["attribute"]], state["k"])
    page.context.close()


def test_the_static_explorer_works_from_the_disk(smoke_book, browser):
    """README: open _build/html/index.html. From file:// the explorer still loads its data file."""
    context = browser.new_context()
    page = context.new_page()
    remote: list[str] = []
    page.on("request", lambda r: r.url.startswith(("file:", "data:")) or remote.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((smoke_book / "book/run/07_explore.html").as_uri(), wait_until="load")
    page.locator(".skx-static .skx-hit").first.wait_for(timeout=10_000)
    assert page.locator(".skx-static .skx-hit").count() == 5
    assert page.evaluate("Array.from(document.querySelectorAll('.skx-pick img'))"
                         ".every(i => i.complete && i.naturalWidth > 0)")
    assert not errors and not remote, (errors, remote)
    context.close()


WINDOW = {"width": 1300, "height": 3000}   # a laptop's browser window
MAX_LINE = 88   # the longest code line tests/test_rendered_pages.py lets a chapter keep

# Every code box of the page, each with a copy of itself holding a MAX_LINE-character line added
# next to it (so the check does not depend on the chapter's own longest line): the boxes that
# scroll sideways, then whether the page itself does.
SCROLLING = """n => {
  document.querySelectorAll('details').forEach(d => d.open = true);
  const pres = Array.from(document.querySelectorAll('div.cell_input pre'));
  const probes = pres.map(p => { const c = p.cloneNode(false); c.textContent = 'x'.repeat(n);
                                 p.after(c); return c; });
  const wide = p => p.scrollWidth > p.clientWidth;
  const out = {boxes: pres.length, fonts: [...new Set(pres.map(p => getComputedStyle(p).fontSize))],
               code: pres.filter(wide).map(p => [p.scrollWidth, p.clientWidth, p.innerText.slice(0, 50)]),
               probe: probes.filter(wide).map(p => [p.scrollWidth, p.clientWidth]),
               page: [document.documentElement.scrollWidth, document.documentElement.clientWidth]};
  probes.forEach(p => p.remove());
  return out;
}"""


def test_an_88_character_code_line_fits_a_1300_px_window(served, browser):
    """At a 1300 px window no code box of a chapter scrolls sideways, nor would one holding a line
    of 88 characters (the book's stylesheet sizes code for it), and no page is wider than the
    window (wide outputs scroll inside their own box)."""
    from skinlib import config
    _, base = served
    context = browser.new_context(viewport=WINDOW)
    page = context.new_page()
    found = {}
    for stage in config.STAGE_NAMES:
        page.goto(f"{base}book/run/{stage}.html", wait_until="load")
        got = page.evaluate(SCROLLING, MAX_LINE)
        assert got["boxes"] >= 3, f"{stage}: {got['boxes']} code boxes found"
        problems = [f"code box {w} px wide shows {c} px: {t!r}" for w, c, t in got["code"]]
        problems += [f"a {MAX_LINE}-character line needs {w} px, its box shows {c} px (font {got['fonts']})"
                     for w, c in got["probe"][:1]]
        if got["page"][0] > got["page"][1]:
            problems.append(f"the page is {got['page'][0]} px wide in a {got['page'][1]} px window")
        if problems:
            found[stage] = problems
    context.close()
    assert not found, "\n".join(f"{s}: {x}" for s, xs in found.items() for x in xs)
