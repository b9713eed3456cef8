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
