"""Figures that read files the project writes."""
import matplotlib
import pandas as pd
import pytest

from skinlib import figures


def test_benchmark_ratio_figure_draws_the_newest_row_of_each_benchmark():
    bench = pd.DataFrame({"benchmark": ["a", "b", "a"], "ratio": [2.0, 0.5, 8.0]})
    fig = figures.benchmark_ratios(bench)
    widths = sorted(p.get_width() for p in fig.axes[0].patches)
    assert widths == [0.5, 8.0]
    with pytest.raises(ValueError):
        figures.benchmark_ratios(bench.iloc[:0])


def test_readout_figure_draws_one_bar_per_attribute_and_kind_and_labels_cut_bars():
    t = pd.DataFrame({"attribute": ["B", "areaMM2", "B", "areaMM2"], "kind": ["answers", "answers", "h", "h"],
                      "r2": [0.5, -3.0, 0.8, 0.9]})
    fig = figures.readout_vs_answers(t, labels={"h": "read-out"})
    ax = fig.axes[0]
    heights = [round(p.get_height(), 3) for p in ax.patches]
    assert sorted(heights) == [-0.2, 0.5, 0.8, 0.9]           # -3.0 cut at the floor ...
    assert "-3.0" in [x.get_text() for x in ax.texts]          # ... and labelled
    assert [x.get_text() for x in ax.get_xticklabels()] == ["areaMM2", "B"]   # registry order
    assert [x.get_text() for x in ax.get_legend().get_texts()] == ["answers", "read-out"]


def test_r2_parts_figure_stacks_the_losses_up_to_the_correlation():
    t = pd.DataFrame({"attribute": ["B", "areaMM2"], "r2": [0.5, -0.3], "tracked": [0.8, 0.05],
                      "scale": [0.2, 0.05], "offset": [0.1, 0.3]})
    ax = figures.r2_parts(t).axes[0]
    assert [x.get_text() for x in ax.get_xticklabels()] == ["areaMM2", "B"]   # registry order
    bars = {}
    for p in ax.patches:
        bars.setdefault(round(p.get_x() + p.get_width() / 2), []).append((p.get_y(), p.get_y() + p.get_height()))
    for i, (r2, top) in enumerate([(-0.3, 0.05), (0.5, 0.8)]):
        segs = [s for s in bars[i] if s[1] > s[0]]
        assert min(s[0] for s in segs) == pytest.approx(min(r2, 0))          # from the R² (or 0) ...
        assert max(s[1] for s in segs) == pytest.approx(top)                 # ... up to ρ²
        assert sum(b - a for a, b in segs) == pytest.approx(top - min(r2, 0))  # no gaps, no overlap
    cut = figures.r2_parts(t.assign(r2=[0.5, -3.0], offset=[0.1, 3.0]), floor=-0.5).axes[0]
    assert "-3.0" in [x.get_text() for x in cut.texts]
    assert min(p.get_y() for p in cut.patches) >= -0.5


def test_r2_readings_figure_draws_each_reading_with_its_interval_and_a_legend_clear_of_the_bars():
    t = pd.DataFrame({"attribute": ["B", "areaMM2"] * 2, "reading": ["greedy"] * 2 + ["median"] * 2,
                      "r2": [0.5, -3.0, 0.7, 0.9], "r2_lo": [0.4, -3.5, 0.6, 0.85], "r2_hi": [0.6, -2.5, 0.8, 0.95]})
    fig = figures.r2_readings(t, labels={"median": "median of the distribution"})
    ax = fig.axes[0]
    tops = sorted(round(p.get_y() + p.get_height(), 3) for p in ax.patches if p.get_width() < 1)
    assert tops == [-0.2, 0.5, 0.7, 0.9]                       # the -3.0 bar cut at the floor
    assert "-3.0" in [x.get_text() for x in ax.texts]
    segments = [s for c in ax.collections for s in c.get_segments()]
    spans = sorted(round(float(s[1][1] - s[0][1]), 3) for s in segments)
    assert spans == [0.1, 0.2, 0.2]                            # no bar for the interval below the floor
    assert [x.get_text() for x in ax.get_xticklabels()] == ["areaMM2", "B"]
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.y0 >= ax.get_window_extent().y1 - 1         # above the plot, not over the bars


def test_ordering_figure_colours_each_attribute_by_its_verdict():
    t = pd.DataFrame({"attribute": ["areaMM2", "B", "areaMM2", "B"],
                      "comparison": ["image_text<image"] * 2 + ["hierarchical~image_text"] * 2,
                      "difference": [-5.0, 1.0, 0.5, 3.0], "lo": [-7.0, -1.0, -1.0, 2.5],
                      "hi": [-3.0, 3.0, 1.5, 3.5], "verdict": ["holds", "not separable", "holds", "reversed"]})
    fig = figures.ordering_differences(t)
    # titles wrap to fit the page: compare their words
    titles = [" ".join(ax.get_title().split()) for ax in fig.axes]
    assert titles == ["image_text<image", "hierarchical~image_text"]
    for ax, comp in zip(fig.axes, ["image_text<image", "hierarchical~image_text"]):
        g = t[t.comparison == comp]
        drawn = {}
        for line in (ln for ln in ax.lines if ln.get_marker() == "o"):   # not the interval caps
            for x, y in zip(line.get_xdata(), line.get_ydata()):
                drawn[int(y)] = (float(x), line.get_color())
        want = {i: (d, figures.VERDICT_COLORS[v]) for i, (d, v) in enumerate(zip(g.difference, g.verdict))}
        assert drawn == want


def _inches(fig, artist):
    """Where `artist` was drawn, in inches (draw the figure first)."""
    return artist.get_window_extent().transformed(fig.dpi_scale_trans.inverted())


def test_image_grids_fill_the_page_width_with_readable_captions():
    import numpy as np
    images = [np.zeros((120, 120, 3), np.uint8)] * 12
    fig = figures.image_grid(images, [f"crop {i}\nsecond line" for i in range(12)], ncols=6)
    assert fig.get_figwidth() == pytest.approx(figures.PAGE_WIDTH)
    fig.canvas.draw()
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 12
    assert min(_inches(fig, ax).width for ax in axes) > 0.85 * figures.PAGE_WIDTH / 6
    assert min(ax.title.get_fontsize() for ax in axes) >= 8
    # the second row's captions do not run into the first row's images
    first, second = axes[:6], axes[6:]
    assert max(_inches(fig, ax.title).y1 for ax in second) < min(_inches(fig, ax).y0 for ax in first)
    with pytest.raises(ValueError, match="12 images but 2 captions"):
        figures.image_grid(images, ["a", "b"])


def test_distribution_and_roc_legends_sit_outside_every_panel():
    import numpy as np

    from skinlib import attributes, malignancy, malignancy_figures
    rng = np.random.default_rng(0)
    frames = {k: pd.DataFrame({n: rng.normal(10, 2, 50) for n in attributes.NAMES}) for k in "abc"}
    roc = pd.DataFrame({"features": np.repeat(["x", "y", "z"], 40),
                        "isic_id": [str(i) for i in range(120)],
                        "target": np.tile([0, 1], 60), "score": rng.normal(size=120)})
    roc = roc.assign(**{c: 0 for c in malignancy.SCORE_COLUMNS if c not in roc})
    for fig in (figures.attribute_distributions(frames), malignancy_figures.roc_curves(roc)):
        legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
        assert len(legends) == 1 and len(legends[0].get_texts()) == 3
        fig.canvas.draw()
        box = _inches(fig, legends[0])
        for ax in fig.axes:
            assert not box.overlaps(_inches(fig, ax)), ax.get_title()


def test_stage_shares_labels_each_stage_with_its_share_and_colours_the_total_by_the_goal():
    stages = pd.DataFrame({"stage": ["00_phantom", "01_data", "02_finetune"], "seconds": [30.0, 70.0, 400.0]})
    fig = figures.stage_shares(stages, goal_s=600)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels == [" 30 s (6%)", " 70 s (14%)", " 400 s (80%)"]
    total_bar = fig.axes[1].patches[0]
    assert total_bar.get_width() == 500 and total_bar.get_facecolor()[:3] == matplotlib.colors.to_rgb("C2")
    over = figures.stage_shares(stages.assign(seconds=stages.seconds * 2), goal_s=600)
    assert over.axes[1].patches[0].get_facecolor()[:3] == matplotlib.colors.to_rgb("C3")
    with pytest.raises(ValueError, match="no stages"):
        figures.stage_shares(stages.iloc[:0])
