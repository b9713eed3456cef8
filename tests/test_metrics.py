import numpy as np
import pandas as pd
import pytest

from skinlib import metrics


def test_r2_matches_an_independent_computation():
    rng = np.random.default_rng(0)
    y = rng.normal(5, 2, 300)
    p = y + rng.normal(0, 1, 300)
    # independent: R² of a prediction = 1 - MSE / Var(y) (population variance)
    assert metrics.r2_score(y, p) == pytest.approx(1 - np.mean((y - p) ** 2) / np.var(y))
    assert metrics.r2_score(y, y) == 1.0
    assert metrics.r2_score(y, np.full_like(y, y.mean())) == pytest.approx(0.0)
    assert metrics.r2_score(y, -y) < 0


def test_r2_table_counts_unparsed_and_keeps_registry_order():
    rng = np.random.default_rng(1)
    rows = []
    for name in ("deltaL", "areaMM2"):
        y = rng.normal(0, 1, 50)
        p = y + rng.normal(0, 0.3, 50)
        p[:4] = np.nan
        rows.append(pd.DataFrame({"attribute": name, "true": y, "pred": p}))
    t = metrics.r2_table(pd.concat(rows))
    assert list(t.columns) == ["attribute", "r2", "mae", "n", "unparsed"]
    assert list(t.attribute) == ["areaMM2", "deltaL"]                 # registry order
    assert (t.n == 46).all() and (t.unparsed == 4).all()
    assert (t.r2 > 0.8).all()


def test_r2_table_refuses_unknown_attributes():
    with pytest.raises(KeyError, match="nope"):
        metrics.r2_table(pd.DataFrame({"attribute": ["nope"], "true": [1.0], "pred": [1.0]}))
