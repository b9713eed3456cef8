import numpy as np
import pandas as pd
import pytest

from skinlib import attributes, replies


def test_registry_covers_the_papers_16_attributes():
    # Table 1 of the paper, by SLICE-3D column.
    table1 = {
        "tbp_lv_areaMM2", "tbp_lv_minorAxisMM", "tbp_lv_norm_color", "tbp_lv_radial_color_std_max",
        "tbp_lv_deltaB", "tbp_lv_deltaL", "tbp_lv_deltaLB", "tbp_lv_stdLExt", "clin_size_long_diam_mm",
        "tbp_lv_perimeterMM", "tbp_lv_norm_border", "tbp_lv_area_perim_ratio", "tbp_lv_A", "tbp_lv_Aext",
        "tbp_lv_B", "tbp_lv_Bext",
    }
    assert set(attributes.COLUMNS) == table1
    assert len(attributes.ATTRIBUTES) == 16
    assert len(set(attributes.NAMES)) == 16
    assert len({a.question for a in attributes.ATTRIBUTES}) == 16


def test_columns_exist_in_the_real_release(fixtures_dir):
    header = pd.read_csv(fixtures_dir / "isic2024-train-sample/train-metadata.csv", nrows=0).columns
    assert set(attributes.COLUMNS) <= set(header)
    header = pd.read_csv(fixtures_dir / "isic2024-test-metadata.csv", nrows=0).columns
    assert set(attributes.COLUMNS) <= set(header)


def test_lookup_by_name_or_column_and_clear_error():
    assert attributes.get("areaMM2") is attributes.get("tbp_lv_areaMM2")
    with pytest.raises(KeyError, match="unknown attribute 'area'.*areaMM2"):
        attributes.get("area")
    assert attributes.resolve(None) == attributes.ATTRIBUTES
    assert [a.name for a in attributes.resolve(["A", "B"])] == ["A", "B"]


@pytest.mark.parametrize("name,value,text", [
    ("areaMM2", 5.678, "05.7"), ("areaMM2", 50.67, "50.7"), ("areaMM2", 141.94, "141.9"),
    ("deltaL", -7.46, "07.46"), ("deltaL", 0.5, "-00.50"), ("deltaB", -0.001, "0.00"), ("deltaB", -1.5, "-1.50"),
    ("minorAxisMM", 12.0, "12.00"), ("area_perim_ratio", 0.04, "00.0")])
def test_answer_is_digits_in_the_registry_format(name, value, text):
    att = attributes.get(name)
    assert att.format_answer(value) == text
    assert att.read_answer(att.format_answer(value)) == pytest.approx(value, abs=10 ** -att.decimals)
    assert replies.parse_number(text) == pytest.approx(float(text))


def test_read_answer_inverts_format_answer_sign_included():
    rng = np.random.default_rng(1)
    for att in attributes.ATTRIBUTES:
        for v in rng.uniform(-10 ** att.int_digits, 10 ** att.int_digits, 50):
            assert att.read_answer(att.format_answer(v)) == pytest.approx(v, abs=10 ** -att.decimals), att.name
        assert np.isnan(att.read_answer("no number")), att.name


def test_first_answer_character_varies_over_real_lesions(fixtures_dir):
    # h_im,a is the state that predicts the answer's first token: an answer that starts with the same
    # character for (nearly) every lesion, e.g. the "-" of an all-negative attribute, leaves it
    # nothing to say about the image. Checked on the 5,000 real metadata rows.
    real = pd.read_csv(fixtures_dir / "isic2024-metadata-sample5k.csv", usecols=list(attributes.COLUMNS))
    for att in attributes.ATTRIBUTES:
        vals = real[att.column].dropna()
        vals = vals[vals != 0] if att.zero_is_missing else vals
        first = vals.map(lambda v: att.format_answer(v)[0]).value_counts(normalize=True)
        assert first.iloc[0] < 0.9, f"{att.name}: {first.iloc[0]:.0%} of answers start with {first.index[0]!r}"


def test_answer_width_is_fixed_for_typical_values():
    # every value below 10**int_digits gives the same number of characters (sign aside)
    rng = np.random.default_rng(0)
    for att in attributes.ATTRIBUTES:
        vals = rng.uniform(0, 10 ** att.int_digits - 1, 200)
        assert len({len(att.format_answer(v)) for v in vals}) == 1, att.name


def test_answer_rejects_non_finite():
    with pytest.raises(ValueError, match="areaMM2"):
        attributes.get("areaMM2").format_answer(float("nan"))


def test_named_renames_and_reports_missing_columns(fixtures_dir):
    raw = pd.read_csv(fixtures_dir / "isic2024-train-sample/train-metadata.csv")
    named = attributes.named(raw)
    assert list(named.columns) == ["isic_id", "patient_id", *attributes.NAMES]
    assert named["areaMM2"].tolist() == raw["tbp_lv_areaMM2"].tolist()
    with pytest.raises(KeyError, match="tbp_lv_deltaLB"):
        attributes.named(raw.drop(columns="tbp_lv_deltaLB"))


def test_zeros_as_missing_only_touches_the_flagged_attributes():
    f = pd.DataFrame({n: [0.0, 1.0] for n in attributes.NAMES})
    g = attributes.zeros_as_missing(f)
    flagged = {a.name for a in attributes.ATTRIBUTES if a.zero_is_missing}
    assert flagged == {"norm_color", "radial_color_std_max"}
    for n in attributes.NAMES:
        assert g[n].isna().sum() == (1 if n in flagged else 0)
    assert f.notna().all().all()  # the input is not modified


def test_the_possible_ranges_hold_every_real_value(fixtures_dir):
    # the bounds come from the attributes' meanings; the 5,000 real rows and the released test set
    # (whose stdLExt holds Lext, as released) must all lie inside them
    for path in ("isic2024-metadata-sample5k.csv", "isic2024-test-metadata.csv",
                 "isic2024-train-sample/train-metadata.csv"):
        real = pd.read_csv(fixtures_dir / path, usecols=list(attributes.COLUMNS))
        for att in attributes.ATTRIBUTES:
            vals = real[att.column].dropna()
            vals = vals[vals != 0] if att.zero_is_missing else vals
            assert att.in_range(vals).all(), (path, att.name, vals[~att.in_range(vals)].tolist()[:5])


def test_the_ranges_refuse_what_the_meanings_rule_out():
    for name in ("areaMM2", "minorAxisMM", "clin_size_long_diam_mm", "perimeterMM", "area_perim_ratio"):
        assert not attributes.get(name).in_range([0.0, -1.0]).any(), name  # a size is > 0
    for name in ("norm_color", "norm_border"):
        assert attributes.get(name).in_range([0.0, 10.0]).all() and not attributes.get(name).in_range([-0.01, 10.01]).any()
    for name in ("A", "Aext", "B", "Bext"):
        assert not attributes.get(name).in_range([-200.0, 200.0]).any()


def test_the_ranges_are_not_part_of_what_the_model_is_taught(monkeypatch):
    # fine-tuned stages stamped with the registry's fingerprint stay valid when only a bound moves
    import dataclasses
    before = attributes.fingerprint()
    moved = tuple(dataclasses.replace(a, low=-1e9, high=1e9, low_open=False) for a in attributes.ATTRIBUTES)
    monkeypatch.setattr(attributes, "ATTRIBUTES", moved)
    assert attributes.fingerprint() == before
    asked = (dataclasses.replace(moved[0], question=moved[0].question + " "),) + moved[1:]
    monkeypatch.setattr(attributes, "ATTRIBUTES", asked)
    assert attributes.fingerprint() != before  # what the model is taught still counts
