"""Figures that read files the project writes."""
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
