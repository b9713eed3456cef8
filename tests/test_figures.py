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
