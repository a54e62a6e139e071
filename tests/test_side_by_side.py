"""Two models side by side: the tables compare the same concepts, keep each model apart, and carry intervals."""
import pandas as pd
import pytest

from workbench.side_by_side import attack_table, layer_table, methods_table, trace_profile, trace_table, together


def _methods(concepts, efficacy, variant="uce"):
    return pd.DataFrame({"concept": concepts, "variant": variant, "seed": 0, "efficacy": efficacy, "n_images": 4,
                         "preservation": 0.9})


def test_tables_are_compared_on_the_concepts_both_models_hold():
    t = together({"a": _methods(["apple", "car", "cat"], [1.0, 1.0, 1.0]), "b": _methods(["car", "cat"], [0.0, 0.5])})
    assert sorted(t.groupby("model")["concept"].apply(sorted).tolist()) == [["car", "cat"], ["car", "cat"]]
    with pytest.raises(ValueError, match="share no concept"):
        together({"a": _methods(["apple"], [1.0]), "b": _methods(["car"], [1.0])})


def test_the_methods_table_gives_each_model_its_own_rate_with_an_interval_and_its_images():
    table = methods_table({"unet": _methods(list("abcdef"), [1.0] * 6), "dit": _methods(list("abcdef"), [0.5] * 6)})
    rows = table.set_index("model")
    assert rows.loc["unet", "efficacy"].startswith("100% [") and rows.loc["dit", "efficacy"].startswith("50% [")
    assert rows.loc["dit", "images"] == 24 and rows.loc["dit", "concepts"] == 6
    assert rows.loc["dit", "preservation"] == "90% [90, 90]"


def test_the_attack_table_puts_each_method_of_each_model_in_its_own_column():
    def rows(model_hits):
        return pd.DataFrame([dict(method=m, concept=c, attack=a, budget=None, seed=s, hit=h)
                             for m in ("uce", "rece") for c in ("apple", "car") for a in ("unedited", "none")
                             for s in (0, 1) for h in ([True, True] if a == "unedited" else [model_hits, False])])
    wide = attack_table({"toy": rows(False), "toy-dit": rows(True)})
    assert list(wide.columns) == ["uce · toy", "uce · toy-dit", "rece · toy", "rece · toy-dit", "n"]
    assert wide.loc["none", "uce · toy"].startswith("0% [") and wide.loc["none", "uce · toy-dit"].startswith("50% [")


def test_traces_and_sweeps_line_up_along_each_models_depth():
    trace = pd.DataFrame({"concept": "apple", "site": ["text.0", "text.1", "dit.0", "dit.0.img", "dit.0.text", "dit.1"],
                          "kind": ["text", "text", "dit", "dit", "dit", "dit"], "probability": 0.5, "clean": 0.9,
                          "corrupted": 0.2})
    profile = trace_profile(trace_table({"toy-dit": trace})).set_index("site")
    assert profile.loc["dit.0.text", "group"] == "toy-dit: text stream"
    assert profile.loc["dit.0", "depth"] == 0 and profile.loc["dit.1", "depth"] == 1
    sweep = pd.DataFrame({"concept": ["apple"] * 3 + ["car"] * 3, "seed": 0, "layer_name": ["l0", "l1", "l2"] * 2,
                          "component": "k", "efficacy": [0.0, 0.5, 1.0, 0.0, 1.0, 1.0], "n_images": 4,
                          "preservation": 1.0})
    layers = layer_table({"toy": sweep}).set_index("layer")
    assert layers["depth"].tolist() == [0.0, 0.5, 1.0] and layers.loc["l1", "efficacy"] == 0.75
    assert layers.loc["l1", "images"] == 8 and layers.loc["l1", "lo"] < 0.75 < layers.loc["l1", "hi"] <= 1


def test_the_efficacy_preservation_figure_draws_one_panel_per_model_with_each_methods_intervals():
    from workbench.plots import efficacy_preservation
    table = methods_table({"unet": _methods(list("abcdef"), [1.0, 0.5] * 3),
                           "dit": pd.concat([_methods(list("abcdef"), [0.0] * 6),
                                             _methods(list("abcdef"), [1.0] * 6, variant="rece")])})
    assert {"efficacy_lo", "efficacy_hi", "preservation_lo", "preservation_hi"} <= set(table.columns)
    fig = efficacy_preservation(table)
    assert [ax.get_title() for ax in fig.axes] == ["unet", "dit"]
    assert [len(ax.containers) for ax in fig.axes] == [1, 2]  # one error-bar point per method
