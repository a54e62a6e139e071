"""Drive every panel from Python: set values, click Run, check what the output area shows."""
import ipywidgets as w
import pytest
import torch

from workbench.anatomy import parts
from workbench.widgets import ErasePanel


def images_in(panel) -> int:
    return sum("image/png" in o.get("data", {}) for o in panel.output.outputs)


def html_in(panel) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in panel.output.outputs)


def sweep_sliders(panel) -> None:
    """Move every slider to both ends of its range; the panel must read back exactly those values."""
    sliders = [(n, c) for n, c in panel.controls.items() if isinstance(c, (w.IntSlider, w.FloatLogSlider, w.FloatSlider))]
    assert sliders
    for name, slider in sliders:
        old = slider.value
        ends = (slider.base ** slider.min, slider.base ** slider.max) if isinstance(slider, w.FloatLogSlider) \
            else (slider.min, slider.max)
        for end in ends:
            panel.set(**{name: end})
            assert panel.values()[name] == pytest.approx(end)
        panel.set(**{name: old})


@pytest.mark.slow
def test_erase_panel_runs_on_click_and_shows_grid_table_and_bars(toy, oracle):
    base = {n: p.weight.clone() for n, p in parts(toy).items()}
    panel = ErasePanel(toy, oracle, run=False, concept="car", method="uce", per_prompt=1)
    assert panel.result is None and not panel.output.outputs
    panel.button.click()
    assert panel.error is None, panel.error
    assert images_in(panel) == 2  # the before/after grid and the accuracy bars
    assert ">car<" in html_in(panel) and "truck" in html_in(panel)
    measured = panel.result["measured"]
    assert measured.edit.method == "uce" and measured.edit.concept == "car"
    assert measured.after["car"] <= measured.before["car"]
    assert panel.progress.value == panel.progress.max and panel.progress.bar_style == "success"
    assert "uce erased 'car'" in panel.status.value
    assert all(torch.equal(base[n], p.weight) for n, p in parts(toy).items())  # the panel never keeps an edit

    first = panel.result
    panel.set(method="fewshot", steps=2, parts="text.5.ffn").button.click()
    assert panel.error is None and panel.result is not first
    assert panel.result["edit"].method == "fewshot" and panel.result["edit"].parts == ["text.5.ffn.in", "text.5.ffn.out"]


def test_erase_panel_shows_only_the_chosen_methods_knobs(toy, oracle):
    panel = ErasePanel(toy, oracle, run=False)
    for method, shown in (("rece", {"epochs", "ridge"}), ("uce", {"lam"}), ("fewshot", {"lr", "steps"})):
        panel.set(method=method)
        hidden = {n for n, c in panel.controls.items() if c.layout.display == "none"}
        assert not shown & hidden and hidden == {"epochs", "ridge", "lam", "lr", "steps"} - shown


def test_erase_panel_sliders_cover_their_range(toy, oracle):
    sweep_sliders(ErasePanel(toy, oracle, run=False))


@pytest.mark.slow
def test_erase_panel_reports_bad_input_in_the_panel(toy, oracle):
    panel = ErasePanel(toy, oracle, run=False)
    with pytest.raises(ValueError, match="choose from"):
        panel.set(concept="unicorn")
    with pytest.raises(ValueError, match="no control 'colour'"):
        panel.set(colour="red")
    panel.set(method="rece", parts="text.*.ffn").run()  # RECE cannot edit the text encoder
    assert isinstance(panel.error, ValueError) and panel.progress.bar_style == "danger"
    assert "few-shot" in panel.status.value and "few-shot" in panel.output.outputs[0]["text"]


# ---------------------------------------------------------------------------------------------------
# The other panels (sweep, landing, FFN versus attention, comparison) and a model without an oracle.
# Each runs with one seed and one or two images per prompt, so a test stays well under a minute on CPU.

import time  # noqa: E402

from workbench.project import landing  # noqa: E402
from workbench.sweep import SUBSETS, layers  # noqa: E402
from workbench.widgets import ComparePanel, LandingPanel, SubsetPanel, SweepPanel  # noqa: E402


def weights(pipe) -> dict[str, torch.Tensor]:
    return {n: p.weight.detach().clone() for n, p in parts(pipe).items()}


def unchanged(pipe, before: dict[str, torch.Tensor]) -> bool:
    """The pipeline's weights equal ``before`` exactly and no edit is left applied."""
    now = parts(pipe)
    return (now.keys() == before.keys() and all(torch.equal(before[n], p.weight) for n, p in now.items())
            and not getattr(pipe, "_workbench_applied", []))


def markdown_in(panel) -> str:
    return "".join(o.get("data", {}).get("text/markdown", "") for o in panel.output.outputs)


def click(panel) -> list[int]:
    """Click Run; check it succeeded and that the progress bar was filled by the run's own steps
    (``stages`` matched the number of steps ``compute`` took). Returns the bar's values along the way."""
    seen: list[int] = []
    panel.progress.observe(lambda change: seen.append(change["new"]), names="value")
    before = panel.output.outputs
    panel.button.click()
    assert panel.error is None, repr(panel.error)
    assert panel.output.outputs != before and not panel.button.disabled
    assert panel.progress.value == panel.progress.max and panel.progress.bar_style == "success"
    assert [v for v in seen if v] == list(range(1, panel.progress.max + 1)), \
        f"stages() said {panel.progress.max}, compute stepped {len([v for v in seen if v])} times: {seen}"
    return seen


@pytest.mark.slow
def test_sweep_panel_table_has_one_row_per_layer_and_component(toy, oracle):
    base = weights(toy)
    panel = SweepPanel(toy, oracle, run=False, concept="apple", method="uce", seeds=1, per_prompt=1)
    assert panel.result is None and not panel.output.outputs
    click(panel)
    table = panel.result["table"]
    names = layers(toy, "uce")
    assert panel.progress.max == 2 * len(names) == len(table)
    assert sorted(zip(table["layer_name"], table["component"])) == \
        sorted((n, c) for n in names for c in ("xattn.k", "xattn.v"))
    assert table["part"].tolist() == [f"{n}.{c}" for n in names for c in ("xattn.k", "xattn.v")]
    assert table["efficacy"].between(0, 1).all() and table["preservation"].notna().all()
    assert (table["dW"] > 0).all() and not table["cumulative"].any() and set(table["concept"]) == {"apple"}
    assert images_in(panel) == 1  # the heatmap; the table is HTML
    shown = html_in(panel)
    assert all(p in shown for p in table["part"]) and "efficacy" in shown
    best = table.loc[table["efficacy"].idxmax()]
    assert f"{len(table)} runs; strongest single erasure: {best['part']}" in panel.status.value
    assert panel.result["value"] == "efficacy"
    assert unchanged(toy, base)


@pytest.mark.slow
def test_sweep_panel_cumulative_without_oracle_on_the_toy(toy):
    base = weights(toy)
    names = layers(toy, "uce")
    panel = SweepPanel(toy, None, run=False, concept="apple", method="uce", cumulative=True, value="efficacy")
    click(panel)
    table = panel.result["table"]
    assert panel.progress.max == 2 * len(names) == len(table) and table["cumulative"].all()
    assert "efficacy" not in table and panel.result["value"] == "dW_relative"
    for comp in ("xattn.k", "xattn.v"):  # layers 0..i: each run edits one more layer than the last
        rows = table[table["component"] == comp].sort_values("layer")
        assert [len(p) for p in rows["parts_edited"]] == list(range(1, len(names) + 1))
    assert images_in(panel) == 1 and "no judge" in panel.status.value
    assert unchanged(toy, base)

    panel.set(cumulative=False, method="rece")
    click(panel)
    table = panel.result["table"]
    assert not table["cumulative"].any() and set(table["method"]) == {"rece"}
    assert [len(p) for p in table["parts_edited"]] == [1] * len(table) == [1] * 2 * len(names)
    assert unchanged(toy, base)


@pytest.mark.slow
def test_sweep_panel_without_oracle_shows_edit_sizes(tiny_sd_dir):
    import workbench

    pipe = workbench.load(tiny_sd_dir)
    base = weights(pipe)
    panel = SweepPanel(pipe, None, run=False, concept="a red balloon", method="uce", value="efficacy")
    assert isinstance(panel.controls["concept"], w.Text)
    click(panel)
    table = panel.result["table"]
    assert len(table) == 2 * len(layers(pipe, "uce")) == panel.progress.max
    assert "efficacy" not in table and (table["dW_relative"] > 0).all()
    assert panel.result["value"] == "dW_relative"  # efficacy needs the oracle: the heatmap falls back
    assert images_in(panel) == 1 and "no judge" in panel.status.value
    assert unchanged(pipe, base)


def test_sweep_panel_sliders_cover_their_range(toy, oracle):
    sweep_sliders(SweepPanel(toy, oracle, run=False))


@pytest.mark.slow
def test_landing_panel_shows_map_and_neighbours(toy, oracle):
    base = weights(toy)
    threads = torch.get_num_threads()
    space = "unet.mid.0.xattn.k"
    panel = LandingPanel(toy, oracle, run=False, concept="apple", method="uce", space=space, k=3)
    assert panel.result is None and not panel.output.outputs
    click(panel)
    table = panel.result["table"]
    assert panel.progress.max == 3 and len(table) == 3 and table["rank"].tolist() == [1, 2, 3]
    assert (table["concept"] == "apple").all() and "apple" not in table["neighbour"].tolist()
    assert table["distance"].is_monotonic_increasing
    edit = panel.result["edit"]
    assert edit.method == "uce" and edit.concept == "apple"
    # the same neighbours as the map-free function, measured in the space itself
    direct = landing(toy, edit, "apple", k=3, space=space)
    assert table["neighbour"].tolist() == direct["neighbour"].tolist()
    first = table["neighbour"].iloc[0]
    assert f"sits nearest to {first!r}" in panel.status.value
    assert images_in(panel) == 1 and all(n in html_in(panel) for n in table["neighbour"])
    assert panel.result["map"].space == space
    assert torch.get_num_threads() == threads  # fitting UMAP must not change torch's thread count
    assert unchanged(toy, base)

    panel.set(k=5).run()
    assert panel.error is None and len(panel.result["table"]) == 5
    assert panel.result["table"]["neighbour"].iloc[0] == first  # same edit, same map: same nearest word
    assert unchanged(toy, base)


def test_landing_panel_offers_every_space_and_sliders_cover_their_range(toy, oracle):
    from workbench.embed import spaces

    panel = LandingPanel(toy, oracle, run=False)
    assert list(panel.controls["space"].options) == spaces(toy)
    sweep_sliders(panel)


@pytest.mark.slow
def test_subset_panel_compares_the_four_subsets_and_states_the_finding(toy, oracle):
    base = weights(toy)
    panel = SubsetPanel(toy, oracle, run=False, concepts=["apple"], seeds=1, steps=2, per_prompt=1)
    assert panel.result is None and not panel.output.outputs
    click(panel)
    result = panel.result
    table, summary, finding = result["table"], result["summary"], result["finding"]
    assert panel.progress.max == len(SUBSETS) == len(table) == 4
    assert summary["subset"].tolist() == list(SUBSETS) == ["ffn", "attn", "ffn + last attn", "all"]
    assert (summary["n"] == 1).all() and summary["efficacy"].between(0, 1).all()
    assert table["efficacy"].between(0, 1).all() and (table["dW"] > 0).all()
    assert finding.startswith("(a) Knowledge mainly in the FFNs") and "\n(b) " in finding
    assert panel.status.value == finding.splitlines()[0]
    shown = markdown_in(panel)
    assert "(a) Knowledge mainly in the FFNs" in shown and "(b) Erased objects drift" in shown
    assert images_in(panel) == 1 and "ffn + last attn" in html_in(panel)
    assert unchanged(toy, base)


def test_subset_panel_sliders_cover_their_range(toy, oracle):
    sweep_sliders(SubsetPanel(toy, oracle, run=False))


@pytest.mark.slow
def test_compare_panel_has_one_row_per_method_and_concept(toy, oracle):
    base = weights(toy)
    panel = ComparePanel(toy, oracle, run=False, concepts=["apple"], methods=["uce", "rece"], per_prompt=1)
    assert panel.result is None and not panel.output.outputs
    click(panel)
    table = panel.result
    assert panel.progress.max == 2 == len(table)
    assert sorted(zip(table["method"], table["concept"])) == [("rece", "apple"), ("uce", "apple")]
    assert table["efficacy"].between(0, 1).all() and table["before"].between(0, 1).all()
    assert (table["efficacy"] == 1 - table["after"]).all()
    best = table.groupby("method")["after"].mean().idxmin()
    assert panel.status.value == f"2 erasures; lowest mean accuracy on the erased concept: {best}"
    assert images_in(panel) == 1 and ">uce<" in html_in(panel) and ">rece<" in html_in(panel)
    assert unchanged(toy, base)

    panel.set(concepts=["apple", "car"], methods=["uce"])
    click(panel)
    assert panel.progress.max == 2
    assert sorted(zip(panel.result["method"], panel.result["concept"])) == [("uce", "apple"), ("uce", "car")]
    assert ">car<" in html_in(panel) and ">rece<" not in html_in(panel)
    assert unchanged(toy, base)


@pytest.mark.parametrize("make", [
    lambda pipe, oracle: ComparePanel(pipe, oracle, run=False, concepts=[], per_prompt=1),
    lambda pipe, oracle: ComparePanel(pipe, oracle, run=False, concepts=["apple"], methods=[], per_prompt=1),
    lambda pipe, oracle: SubsetPanel(pipe, oracle, run=False, concepts=[], per_prompt=1),
], ids=["compare-no-concepts", "compare-no-methods", "subset-no-concepts"])
def test_panels_report_an_empty_selection_in_the_panel(toy, oracle, make):
    base = weights(toy)
    panel = make(toy, oracle)
    start = time.perf_counter()
    assert panel.run() is None  # nothing raised
    assert time.perf_counter() - start < 5  # refused before any work
    assert isinstance(panel.error, ValueError) and "select at least one" in str(panel.error)
    assert panel.result is None and panel.progress.bar_style == "danger"
    assert "ValueError" in panel.status.value and "select at least one" in panel.status.value
    assert len(panel.output.outputs) == 1 and "select at least one" in panel.output.outputs[0]["text"]
    assert not panel.button.disabled and unchanged(toy, base)


def test_panels_refuse_unknown_choices_when_set(toy, oracle):
    with pytest.raises(ValueError, match="choose from"):
        ComparePanel(toy, oracle, run=False).set(concepts=["apple", "unicorn"])
    with pytest.raises(ValueError, match="choose from"):
        SubsetPanel(toy, oracle, run=False).set(concepts=["unicorn"])
    with pytest.raises(ValueError, match="choose from"):
        SweepPanel(toy, oracle, run=False).set(method="dreambooth")
    with pytest.raises(ValueError, match="choose from"):
        LandingPanel(toy, oracle, run=False).set(space="unet.nowhere")
    with pytest.raises(ValueError, match="no control 'seed'"):
        SweepPanel(toy, oracle, run=False).set(seed=3)


def test_compare_panel_sliders_cover_their_range(toy, oracle):
    sweep_sliders(ComparePanel(toy, oracle, run=False))


@pytest.mark.slow
def test_erase_panel_on_the_tiny_sd_pipeline_shows_grid_and_edit_sizes(tiny_sd_dir):
    import workbench

    pipe = workbench.load(tiny_sd_dir)
    base = weights(pipe)
    panel = ErasePanel(pipe, run=False, concept="a red balloon", method="uce", per_prompt=1)
    assert isinstance(panel.controls["concept"], w.Text) and panel.values()["concept"] == "a red balloon"
    panel.button.click()
    assert panel.error is None, repr(panel.error)
    assert panel.progress.value == panel.progress.max and panel.progress.bar_style == "success"
    edit = panel.result["edit"]
    assert panel.result["measured"] is None and edit.method == "uce" and edit.concept == "a red balloon"
    assert images_in(panel) == 1  # the before/after grid; no accuracy bars
    shown = html_in(panel)
    assert all(p in shown for p in edit.parts) and "dW" in shown and "relative" in shown
    assert "before" not in shown and "after" not in shown  # no accuracy table
    assert "uce erased 'a red balloon'" in panel.status.value and "accuracy" not in panel.status.value
    assert unchanged(pipe, base)


def test_the_erase_panel_shows_a_newly_registered_methods_knob_only_when_it_is_chosen(toy):
    from workbench.methods import REGISTRY, Knob, register
    from workbench.methods.uce import uce

    register("uce_copy", uce, "unet.*.xattn.[kv]", ["xattn.k"], [Knob("lam", "copy lambda", "log", -3, 2, control="lam_c")])
    try:
        panel = ErasePanel(toy, None, run=False)
        slider = panel.controls["lam_c"]
        assert isinstance(slider, w.FloatLogSlider) and (slider.min, slider.max, slider.value) == (-3, 2, 0.5)
        assert slider.layout.display == "none"
        panel.set(method="uce_copy")
        assert slider.layout.display == "" and panel.controls["lam"].layout.display == "none"
    finally:
        REGISTRY.pop("uce_copy")


def test_the_sliders_of_a_methods_knobs_keep_their_ranges_and_start_at_the_models_defaults(toy, oracle):
    erase_panel, subset_panel = ErasePanel(toy, oracle, run=False), SubsetPanel(toy, oracle, run=False)
    shown = {n: (type(c).__name__, c.min, c.max, c.value, c.description, getattr(c, "readout_format", None))
             for n, c in erase_panel.controls.items() if n in ("epochs", "ridge", "lam", "lr", "steps")}
    assert shown == {"epochs": ("IntSlider", 1, 6, 3, "RECE epochs", "d"),
                     "ridge": ("FloatLogSlider", -4, -1, 1e-3, "RECE ridge", ".0e"),
                     "lam": ("FloatLogSlider", -2, 1, 2.0, "UCE lambda", ".2g"),
                     "lr": ("FloatLogSlider", -6, -3, 5e-5, "few-shot lr", ".0e"),
                     "steps": ("IntSlider", 1, 40, 8, "few-shot steps", "d")}
    assert [(n, c.value) for n, c in subset_panel.controls.items() if n in ("lr", "steps")] == [("lr", 5e-5), ("steps", 8)]
