"""The chapters read as the paper does: the plumbing folded out of the reader's way, code lines that
do not scroll. Checked on the notebooks' sources and on the smoke profile's rendered book."""
from __future__ import annotations

import re

import jupytext
import pytest

from skinlib import config

MAX_LINE = 88
CHAPTERS = list(config.STAGE_NAMES)
FOLDS = {"hide-input", "remove-input", "hide-cell", "remove-cell"}
IMPORT = re.compile(r"^\s*(import \w|from \S+ import )", re.M)


def plumbing(source: str, tags: set[str]) -> str | None:
    """Why a code cell is plumbing (the reader needs it folded), or None."""
    if "parameters" in tags:
        return "the parameters cell"
    if IMPORT.search(source):
        return "imports"
    if "chapter.open(" in source:
        return "the chapter's opening"
    return None


def source_cells(stage: str):
    nb = jupytext.read(config.REPO_ROOT / "notebooks" / f"{stage}.py")
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("stage", CHAPTERS)
def test_the_notebooks_fold_their_plumbing_and_keep_lines_short(stage):
    problems = []
    for n, cell in enumerate(source_cells(stage)):
        tags = set(cell.metadata.get("tags", []))
        why = plumbing(cell.source, tags)
        if why and not tags & FOLDS:
            problems.append(f"cell {n} ({why}) has none of the tags {sorted(FOLDS)}")
        problems += [f"cell {n}: {len(line)} characters: {line.strip()[:60]}"
                     for line in cell.source.splitlines() if len(line) > MAX_LINE]
    assert not problems, f"notebooks/{stage}.py:\n" + "\n".join(problems)


@pytest.mark.parametrize("stage", CHAPTERS)
def test_every_chapter_opens_with_the_one_shared_call(stage):
    cells = source_cells(stage)
    code = "\n".join(c.source for c in cells)
    assert code.count("chapter.open(") == 1, "one chapter.open call"
    assert sum("parameters" in c.metadata.get("tags", []) for c in cells) == 1
    copies = ["config.load_profile(", "config.run_dir(", "config.set_threads(", "load_manifest("]
    assert not [c for c in copies if c in code], "the opening is chapter.open's, not a copy"


@pytest.mark.slow
def test_rendered_chapters_show_no_unfolded_plumbing_and_no_long_code_line(smoke_book):
    from bs4 import BeautifulSoup

    found = {}
    for stage in CHAPTERS:
        page = smoke_book / "book" / "run" / f"{stage}.html"
        soup = BeautifulSoup(page.read_text(), "html.parser")
        cells = soup.select("div.cell")
        assert len(cells) >= 3, f"{page.name}: {len(cells)} code cells found"
        problems = []
        for n, cell in enumerate(cells):
            tags = {c[len("tag_"):] for c in cell.get("class", []) if c.startswith("tag_")}
            pre = cell.select_one("div.cell_input pre")
            source = pre.get_text() if pre else ""
            why = plumbing(source, tags)
            if why is None and pre is not None and not cell.select_one("div.cell_output"):
                why = "code that shows nothing"
            if why and not tags & FOLDS:
                problems.append(f"cell {n} ({why}) is shown unfolded: {source.strip()[:60]!r}")
            problems += [f"cell {n}: a code line of {len(line)} characters"
                         for line in source.splitlines() if len(line) > MAX_LINE]
        # the folds are real: the page carries the toggles the tags ask for
        folded = [c for c in cells if "tag_hide-input" in c.get("class", [])]
        assert folded and all(c.select_one("details") for c in folded), page.name
        if problems:
            found[page.name] = problems
    assert not found, "\n".join(f"{p}: {x}" for p, xs in found.items() for x in xs)
