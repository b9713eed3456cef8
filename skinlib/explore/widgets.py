"""The live explorer's widgets (ipywidgets): `Controls`, and reading an uploaded image as a query."""
from __future__ import annotations

import html
import io

from skinlib import attributes, study
from skinlib.explore.explorer import K_MAX, METHODS, Explorer
from skinlib.explore.markup import grid_html
from skinlib.explore.picks import as_pick


class BadUpload(ValueError):
    """An uploaded file that is not an image the explorer can read."""


def read_upload(entry: dict):
    """(RGB image, file name) of one ipywidgets FileUpload entry; BadUpload when it is no image."""
    from PIL import Image, UnidentifiedImageError

    name = entry.get("name") or "the upload"
    try:
        with Image.open(io.BytesIO(bytes(entry["content"]))) as im:
            return im.convert("RGB"), name
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        why = "not an image format Pillow knows" if isinstance(e, UnidentifiedImageError) else str(e)
        raise BadUpload(f"{name!r} cannot be used as a query: {why}. Upload a PNG or JPEG crop of a "
                        "lesion, or pick a query from the list.") from None


class Controls:
    """The live explorer (ipywidgets): a query from the test set or an uploaded image, a method, an
    attribute and k; every change redraws the pick. Picking a query (or "clear upload") drops the
    upload. Beside the grid, the malignancy probe's reading of the query from the 16 attributes the
    model reads (asked once per query or upload, then kept while other controls change). The last
    pick is kept in `result` (the top-k frame), `reply` (the model's answer), `reading`
    (`Explorer.malignancy`, None without a probe), `message` (what went wrong with an upload, else
    "") and `seconds`, so it can be checked without a browser."""

    def __init__(self, ex: Explorer, upload: bool = True):
        import ipywidgets as W

        self.ex = ex
        self.query = W.Dropdown(options=list(ex.q_ids), description="query")
        # FileUpload only where a frontend exists: its comm hangs a kernel that has none (papermill).
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="or upload") if upload else None
        self.clear = W.Button(description="clear upload", disabled=True) if upload else None
        self.method = W.Dropdown(options=[(study.LABELS[m], m) for m in METHODS], value="image_text",
                                 description="method")
        self.attribute = W.Dropdown(options=list(attributes.NAMES), value="areaMM2", description="attribute")
        self.k = W.IntSlider(value=5, min=1, max=K_MAX, description="k")
        self.status = W.HTML()
        self.grid = W.HTML()
        self.uploaded = None  # (image, name) while an upload is the query
        self.result, self.reply, self.message, self.seconds = None, None, "", None
        self.reading = None
        self._readings: dict = {}  # query id (or the upload's name) -> Explorer.malignancy
        top = [self.query] + ([self.upload, self.clear] if upload else [])
        self.widget = W.VBox([W.HBox(top), W.HBox([self.method, self.attribute, self.k]), self.status, self.grid])
        self.query.observe(self._on_query, names="value")
        for w in (self.method, self.attribute, self.k):
            w.observe(self.show, names="value")
        if upload:
            self.upload.observe(self._on_upload, names="value")
            self.clear.on_click(lambda _b: self._drop_upload(redraw=True))

    def _drop_upload(self, redraw: bool) -> None:
        self.uploaded = None
        self._readings.pop(("upload",), None)
        if self.upload is not None and self.upload.value:
            self.upload.value = ()  # observed as an empty value, which draws nothing
            self.clear.disabled = True
        if redraw:
            self.show()

    def _on_query(self, _change) -> None:
        self._drop_upload(redraw=False)
        self.show()

    def _on_upload(self, change) -> None:
        if not change["new"]:
            return
        self._readings.pop(("upload",), None)
        try:
            self.uploaded = read_upload(change["new"][0])
        except BadUpload as e:
            self._drop_upload(redraw=False)
            self.show(message=str(e))  # the list's query is shown again, with the reason
            return
        self.clear.disabled = False
        self.show()

    def query_value(self):
        """The uploaded image while there is one, else the chosen query id."""
        return self.uploaded[0] if self.uploaded else self.query.value

    def show(self, *_, message: str = ""):
        import time

        t = time.perf_counter()
        query, name = self.query_value(), (self.uploaded[1] if self.uploaded else None)
        method, attribute = self.method.value, self.attribute.value
        self.result = self.ex.search(query, method, attribute, self.k.value)
        self.reply = self.ex.ask(query, attribute)
        key = ("upload",) if name else query   # a new upload drops the old one's reading first
        if key not in self._readings:
            self._readings[key] = self.ex.malignancy(query)
        self.reading = self._readings[key]
        p = as_pick(self.ex, query, self.result, self.reply, method, attribute, name)
        self.grid.value = grid_html(self.ex, p, query if name else None, self.reading)
        self.message, self.seconds = message, time.perf_counter() - t
        shown = f"uploaded image {name}" if name else f"query {query}"
        err = f'<div class="skx-error">{html.escape(message)}</div>' if message else ""
        self.status.value = f"{err}showing {html.escape(shown)} ({self.seconds:.2f} s)"
        return self.result
