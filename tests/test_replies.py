import math

import pandas as pd
import pytest

from skinlib import replies


@pytest.mark.parametrize("reply, value", [
    ("12.3 mm²", 12.3), ("about 4", 4.0), ("-7.25", -7.25), ("+012.50", 12.5), (".5", 0.5),
    ("−2.5", -2.5), ("  3.14\n", 3.14), ("12.", 12.0),
])
def test_numbers_are_read(reply, value):
    assert replies.parse_number(reply) == pytest.approx(value)


@pytest.mark.parametrize("reply", ["", "   ", None, "1.2.3", "abc", "3 or 4", "between 2 and 5", "."])
def test_replies_without_one_clean_number_are_nan(reply):
    assert math.isnan(replies.parse_number(reply))


def test_unparsed_are_counted_per_attribute_with_examples():
    f = pd.DataFrame({"attribute": ["a", "a", "b", "b", "b"],
                      "reply": ["1", "x", "2", "", "1.2.3"]})
    f["pred"] = [replies.parse_number(r) for r in f.reply]
    rep = replies.unparsed_report(f).set_index("attribute")
    assert rep.loc["a", "unparsed"] == 1 and rep.loc["b", "unparsed"] == 2
    assert rep.loc["b", "n"] == 3 and "'1.2.3'" in rep.loc["b", "examples"]
