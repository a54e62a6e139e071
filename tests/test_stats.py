import numpy as np
import pandas as pd
import pytest

from workbench.concepts import ConceptSet
from workbench.metrics import _preservation_interval, _scores, drift_test
from workbench.stats import MIN_UNITS, cluster_rate, difference, enough, rates, ratio, wilson, with_intervals
from workbench.sweep import finding


def test_wilson_interval_matches_the_textbook_values():
    r = wilson(5, 10)
    assert (round(r.lo, 3), round(r.hi, 3)) == (0.237, 0.763)
    assert round(wilson(0, 20).hi, 3) == 0.161
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson(3, 2)


def test_a_cluster_rate_falls_back_to_wilson_below_the_unit_minimum_and_bootstraps_above_it():
    few = cluster_rate([1] * (MIN_UNITS - 1), [4] * (MIN_UNITS - 1))
    assert few.method == "Wilson" and few == wilson(MIN_UNITS - 1, 4 * (MIN_UNITS - 1))
    many = cluster_rate([0, 4, 0, 4, 0, 4], [4] * 6)
    assert many.method == "bootstrap over 6 units" and many.rate == 0.5
    assert cluster_rate([0] * 6, [4] * 6) == wilson(0, 24) and wilson(0, 24).hi > 0.1  # never [0, 0]
    assert cluster_rate([4] * 6, [4] * 6) == wilson(24, 24)
    # units that disagree widen the interval beyond Wilson's over the same 24 images
    assert many.hi - many.lo > wilson(12, 24).hi - wilson(12, 24).lo


def test_rates_give_one_row_per_group_with_its_n_and_interval():
    t = pd.DataFrame({"method": ["a"] * 8 + ["b"] * 8, "concept": list("wxyz") * 4, "seed": [0, 0, 0, 0, 1, 1, 1, 1] * 2,
                      "hit": [True] * 8 + [False] * 7 + [True]})
    r = rates(t, "method").set_index("method")
    assert r.loc["a", "rate"] == 1.0 and r.loc["b", "k"] == 1 and r.loc["b", "n"] == 8 and r.loc["b", "units"] == 8
    assert r.loc["b", "lo"] <= 1 / 8 <= r.loc["b", "hi"]


def test_a_difference_is_significant_only_when_the_data_support_it():
    assert difference([6, 7, 6, 7, 6, 7], [8] * 6, [1, 0, 1, 0, 1, 0], [8] * 6).significant
    weak = difference([1, 0], [2, 2], [0, 1], [2, 2])
    assert not weak.significant and "not significant at n = 8" in str(weak)


def test_drift_null_comes_from_unrelated_erased_concepts_not_from_a_uniform_spread():
    cs = ConceptSet.of(objects=["apple", "pear", "car", "truck", "plane"],
                       groups={"fruit": ["apple", "pear"], "vehicle": ["car", "truck", "plane"]})
    rng = np.random.default_rng(0)
    # every erased image, whatever its concept, becomes "plane" half the time: a judge's attractor
    rows = [dict(concept=c, seed=s, label="plane" if rng.random() < 0.5 else "pear" if c != "pear" else "apple")
            for c in ("apple", "pear", "car") for s in range(6) for _ in range(8)]
    t = drift_test(pd.DataFrame(rows), cs).set_index("concept")
    # car's images land on a relative ("plane") half the time, as often as the fruits' images do: no drift
    assert abs(t.loc["car", "observed"] - t.loc["car", "null"]) < 0.15 and t.loc["car", "p"] > 0.05
    assert t.loc["car", "null"] > 0.3  # a uniform chance level would say 2 of 4 labels... the null sees the pull


def test_finding_says_there_is_too_little_data_rather_than_giving_a_verdict():
    t = pd.DataFrame({"subset": ["ffn", "attn", "ffn + last attn", "all"], "concept": ["apple"] * 4, "seed": [0] * 4,
                      "efficacy": [0.25, 0.0, 0.25, 0.5], "n_images": [4] * 4, "drift": [0.0] * 4,
                      "drift_chance": [0.1] * 4})
    text = finding(t)
    assert "too little data" in text and "does not hold" not in text.split("\n")[0]


def test_enough_names_what_is_missing():
    assert enough(12, 96) is None
    assert "1 concept x seed unit(s), 4 images" in enough(1, 4)


def test_scores_carry_the_efficacy_interval_over_their_images_and_preservation_over_other_concepts():
    cs = ConceptSet.of(objects=["apple", "banana", "cherry", "pear", "car", "cat", "dog"],
                       groups={"fruit": ["apple", "banana", "cherry", "pear"], "vehicle": ["car"],
                               "animal": ["cat", "dog"]})
    others = ["banana", "cherry", "pear", "car", "cat"]
    preds = [("apple", "apple"), ("apple", "pear"), ("apple", "cat"), ("apple", "car")]
    preds += [(c, c) for c in others for _ in range(2)]
    preds[-1] = ("cat", "dog")
    before = {"accuracy": 1.0, "others": {c: 1.0 for c in others}}
    s = _scores(preds, "apple", others, before, cs)
    assert (s["efficacy"], s["efficacy_lo"], s["efficacy_hi"]) == (0.75, wilson(3, 4).lo, wilson(3, 4).hi)
    assert s["preservation"] == pytest.approx(0.9)
    assert (s["preservation_lo"], s["preservation_hi"]) == ratio([2, 2, 2, 2, 1], [2] * 5)[1:]
    # fewer other concepts than a bootstrap can use: no interval rather than a degenerate one
    assert all(v != v for v in _preservation_interval(preds[:6], "apple", before["others"]).values())


def test_a_table_with_intervals_prints_each_rate_once_with_its_interval():
    t = pd.DataFrame({"part": ["a", "b"], "efficacy": [1.0, float("nan")], "efficacy_lo": [0.51, float("nan")],
                      "efficacy_hi": [1.0, float("nan")], "drift": [0.1, 0.2]})
    assert with_intervals(t).values.tolist() == [["a", "100% [51, 100]", 0.1], ["b", "n/a", 0.2]]


def test_images_are_grouped_into_concept_by_seed_cells_by_one_function_everywhere():
    from workbench.attacks import _rate
    from workbench.attacks.table import compare_methods
    from workbench.stats import paired_cells, unit_cells

    rng = np.random.default_rng(0)
    t = pd.DataFrame([dict(method=m, attack="none", concept=c, seed=s, hit=bool(rng.random() < p))
                      for m, p in (("uce", 0.6), ("rece", 0.2)) for c in "vwxyz" for s in (1, 0) for _ in range(4)])
    cells = unit_cells(t[t["method"] == "uce"])
    assert len(cells) == 10 and cells.index[0] == ("v", 0) and cells["count"].tolist() == [4] * 10
    assert unit_cells(t, sort=False).index[0] == ("v", 1)  # table order, as rates() resamples them
    assert _rate(t[t["method"] == "uce"]) == cluster_rate(cells["sum"], cells["count"])
    both = paired_cells(cells, unit_cells(t[t["method"] == "rece"]).iloc[:3])
    assert both.columns.tolist() == ["sum_a", "count_a", "sum_b", "count_b"] and len(both) == 3
    d = difference(cells["sum"], cells["count"], *(unit_cells(t[t["method"] == "rece"])[c] for c in ("sum", "count")))
    row = compare_methods(t).iloc[0]
    assert (row["a"], row["b"], row["p"], row["lo"], row["hi"]) == ("uce", "rece", d.p_two, d.lo, d.hi)
