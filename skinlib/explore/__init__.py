"""The retrieval explorer behind notebooks/07_explore.py: pick a query, a method, an attribute, k.

`Explorer` answers each pick from flat indexes over a finished run's stored vectors, read as the
picks need them (`RunVectors`: at the paper's size at most 17.1 GB of float32 indexes, never the
109 GB of every extraction whole); an uploaded image is embedded on the spot by the model(s) the
method needs, each loaded on first use (the fine-tuned 7B: 16.6 GB on the device). `Controls` are
the live widgets (Jupyter). For the book, where there is no kernel, `write_static` precomputes
every (query, method, attribute) of a few dozen queries at the largest k into a data file and
thumbnails, and `static_page` is the plain-JavaScript explorer that reads them (no network, works
from file://).

    python -m skinlib.explore --profile default     # the live explorer in JupyterLab

opens a fresh copy of the chapter in an ignored folder (`live/`), so exploring never writes into
the tracked notebooks/07_explore.py.

The modules:

    explorer   `RunVectors`, the run's vectors as read; `Explorer`: searches, the model's replies,
               the probe's reading
    picks      one pick as plain data; the probe's reading rounded as the panels show it
    markup     a pick as HTML (grid, malignancy panel, thumbnails, stylesheet)
    widgets    `Controls`, the live ipywidgets explorer, and reading an upload
    static     the book's kernel-free explorer: data.js within its budget, and its page
    live       ``python -m skinlib.explore``: JupyterLab on a fresh copy of the chapter
"""
from __future__ import annotations

from skinlib.explore.explorer import IMAGE_ONLY, K_MAX, METHODS, Explorer, RunVectors
from skinlib.explore.live import LAB_ARGS, NOTEBOOK, SCRATCH, main, missing_run_files, prepare_live
from skinlib.explore.markup import (CSS, PROBE_NOTE, THUMB_PX, data_uri, grid_html, malignancy_html, pick_html,
                                    thumbnail)
from skinlib.explore.picks import as_pick, pick, probe_panel
from skinlib.explore.static import (STATIC_BUDGET, STATIC_JS, STATIC_NAME, STATIC_QUERIES, static_data,
                                    static_dir, static_page, static_queries, write_static)
from skinlib.explore.widgets import BadUpload, Controls, read_upload

__all__ = [
    "CSS", "IMAGE_ONLY", "K_MAX", "LAB_ARGS", "METHODS", "NOTEBOOK", "PROBE_NOTE", "RunVectors", "SCRATCH",
    "STATIC_BUDGET", "STATIC_JS", "STATIC_NAME", "STATIC_QUERIES", "THUMB_PX", "BadUpload", "Controls", "Explorer",
    "as_pick", "data_uri", "grid_html", "main", "malignancy_html", "missing_run_files", "pick", "pick_html",
    "prepare_live", "probe_panel", "read_upload", "static_data", "static_dir", "static_page",
    "static_queries", "thumbnail", "write_static",
]
