"""Drive every panel from Python: set values, click Run, check what the output area shows."""
import ipywidgets as w
import pytest
import torch

from workbench.methods import REGISTRY
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
    every = {k.control for m in REGISTRY.values() for k in m.knobs}
    for method, shown in (("rece", {"epochs", "ridge"}), ("uce", {"lam"}), ("fewshot", {"lr", "steps"}),
                          ("prune", {"share", "timesteps"}), ("sae", {"features"})):
        panel.set(method=method)
        hidden = {n for n, c in panel.controls.items() if c.layout.display == "none"}
        assert not shown & hidden and hidden == every - shown


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


# ---------------------------------------------------------------------------------------------------
# Every panel on the toy DiT (a FLUX transformer), and the model control that switches a panel between
# the toy world's two bundled models.

import workbench  # noqa: E402
from workbench.attnmaps import cross_attention_layers  # noqa: E402
from workbench.embed import spaces  # noqa: E402
from workbench.families import family_of  # noqa: E402
from workbench.methods.esd import preset_parts, presets  # noqa: E402
from workbench.profile import Profile, attach, profile_of  # noqa: E402
from workbench.tracing import sites  # noqa: E402
from workbench.widgets import AttackPanel, AttentionPanel, EsdPanel, TracePanel  # noqa: E402

PANELS = [ErasePanel, ComparePanel, SweepPanel, LandingPanel, SubsetPanel, AttackPanel, EsdPanel, TracePanel,
          AttentionPanel]


@pytest.fixture(scope="module")
def toy_dit():
    return workbench.load("toy-dit")


def options(panel) -> dict[str, tuple]:
    """Each control's choices (options of a selection, range of a slider, placeholder of a text field)."""
    return {n: tuple(getattr(c, "options", ())) or (getattr(c, "min", None), getattr(c, "max", None),
                                                     getattr(c, "placeholder", None))
            for n, c in panel.controls.items()}


def assert_valid(panel) -> None:
    """Every control holds a value it offers: a choice among its options, a number within its range."""
    for name, c in panel.controls.items():
        if isinstance(c, w.SelectMultiple):
            assert set(c.value) <= set(c.options), name
        elif isinstance(c, w.Dropdown):
            assert c.value in c.options, name
        elif isinstance(c, w.FloatLogSlider):
            assert c.base ** c.min <= c.value <= c.base ** c.max, name
        elif hasattr(c, "min"):
            assert c.min <= c.value <= c.max, name


@pytest.mark.parametrize("cls", PANELS, ids=lambda cls: cls.__name__)
def test_every_panel_on_the_toy_dit_starts_with_the_model_control_and_valid_transformer_settings(toy_dit, oracle, cls):
    panel = cls(toy_dit, oracle, run=False)
    assert list(panel.controls)[0] == "model" and panel.values()["model"] == "toy-dit"
    assert panel.controls["model"].options == ("toy", "toy-dit")
    assert panel.result is None and panel.error is None and not panel.output.outputs
    assert_valid(panel)
    shown = repr([(c.value, getattr(c, "options", None), getattr(c, "placeholder", None), getattr(c, "tooltip", None))
                  for c in panel.controls.values()])
    assert "unet" not in shown  # no UNet part, layer or block offered or suggested on a transformer
    assert panel.stages({k: v for k, v in panel.values().items() if k != "model"}) >= 1
    assert list(panel.widget.children[1].children) == list(panel.controls.values())


def test_the_toy_dits_panels_offer_its_own_spaces_presets_sites_layers_and_parts(toy_dit, oracle):
    landing = LandingPanel(toy_dit, oracle, run=False)
    assert list(landing.controls["space"].options) == spaces(toy_dit)
    assert landing.values()["space"] == "dit.context.proj"
    assert landing.set(method="fewshot").values()["space"] == "text"  # few-shot edits the text encoders
    esd = EsdPanel(toy_dit, oracle, run=False)
    assert list(esd.controls["preset"].options) == list(presets(toy_dit))
    assert esd.values()["preset"] == "esd-u" and esd.values()["lr"] == 1e-4  # the toy DiT profile's ESD defaults
    assert "dit.*" in esd.controls["parts"].placeholder and "text stream" in esd.controls["preset"].tooltip
    assert list(TracePanel(toy_dit, oracle, run=False).controls["sites"].options) == sites(toy_dit)
    layers_offered = AttentionPanel(toy_dit, run=False).controls["layer"].options
    assert layers_offered == ("all", *cross_attention_layers(toy_dit)) and "dit.single.0" in layers_offered
    erase_parts = ErasePanel(toy_dit, oracle, run=False).controls["parts"]
    assert erase_parts.placeholder == "method default, e.g. dit.*.text.[kv]"


def test_the_sweep_panels_progress_bar_counts_the_runs_on_each_model(toy, toy_dit, oracle):
    # ESD varies 3 components per UNet layer; on the DiT a double block has 5 of its 6 (no single.attn), a
    # single block 2 (single.attn, ffn): not 2 per layer, as the bar once assumed
    for pipe, method, runs in ((toy, "uce", 7 * 2), (toy, "esd", 7 * 3), (toy_dit, "uce", 6 * 2),
                               (toy_dit, "esd", 6 * 5 + 2 * 2), (toy_dit, "fewshot", 12 * 2)):
        panel = SweepPanel(pipe, oracle, run=False, method=method, seeds=2)
        assert panel.stages(panel.values()) == 2 * runs, (profile_of(pipe).name, method)


def _erase(panel, pipe):
    edit = panel.result["edit"]  # UCE's default parts on a transformer: the matrices that read the text
    assert edit.method == "uce" and edit.parts == family_of(pipe).default_entries(pipe) == ["dit.context.proj",
                                                                                             "dit.pooled.in"]
    assert images_in(panel) == 2 and panel.result["measured"].after["apple"] <= panel.result["measured"].before["apple"]


def _compare(panel, pipe):
    assert panel.result[["method", "concept"]].values.tolist() == [["uce", "apple"]]
    assert panel.result["efficacy"].between(0, 1).all()


def _sweep(panel, pipe):
    table = panel.result["table"]
    assert len(table) == 2 * len(layers(pipe, "uce")) == 12 and set(table["component"]) == {"text.k", "text.v"}
    assert table["part"].str.startswith("dit.").all() and "no judge" in panel.status.value


def _landing(panel, pipe):
    assert panel.result["map"].space == "dit.context.proj" and len(panel.result["table"]) == 3


def _subset(panel, pipe):
    assert panel.result["summary"]["subset"].tolist() == list(SUBSETS)
    assert all(p.startswith("text") for parts_ in panel.result["table"]["parts_edited"] for p in parts_)


def _attack(panel, pipe):
    assert panel.result["attack"].name == "derived" and set(panel.result["rates"]["attack"]) >= {"none", "derived"}


def _esd(panel, pipe):
    assert sorted(panel.result["edit"].parts) == sorted(preset_parts(pipe, "esd-u"))
    assert panel.result["measured"] is not None


def _trace(panel, pipe):
    assert panel.result["traces"]["before"].layers()["site"].tolist() == ["text.5", "dit.0"]


def _attention(panel, pipe):
    assert list(panel.result) == ["before", "after uce"] and list(panel.result["before"].layers) == ["dit.0"]


@pytest.mark.slow
@pytest.mark.parametrize("make, check", [
    (lambda pipe, oracle: ErasePanel(pipe, oracle, run=False, concept="apple", method="uce", per_prompt=1), _erase),
    (lambda pipe, oracle: ComparePanel(pipe, oracle, run=False, concepts=["apple"], methods=["uce"], per_prompt=1),
     _compare),
    (lambda pipe, oracle: SweepPanel(pipe, None, run=False, concept="apple", method="uce", per_prompt=1), _sweep),
    (lambda pipe, oracle: LandingPanel(pipe, oracle, run=False, concept="apple", method="uce", k=3), _landing),
    (lambda pipe, oracle: SubsetPanel(pipe, oracle, run=False, concepts=["apple"], seeds=1, steps=1, per_prompt=1),
     _subset),
    (lambda pipe, oracle: AttackPanel(pipe, oracle, run=False, concept="apple", method="uce", seeds=1), _attack),
    (lambda pipe, oracle: EsdPanel(pipe, oracle, run=False, concept="apple", iterations=1, per_prompt=1), _esd),
    (lambda pipe, oracle: TracePanel(pipe, oracle, run=False, concept="apple", method="none",
                                     sites=["text.5", "dit.0"], n=1), _trace),
    (lambda pipe, oracle: AttentionPanel(pipe, None, run=False, concept="apple", method="uce", layer="dit.0"),
     _attention),
], ids=["erase", "compare", "sweep", "landing", "subset", "attack", "esd", "trace", "attention"])
def test_every_panel_runs_on_the_toy_dit_with_small_settings_and_keeps_no_edit(toy_dit, oracle, make, check):
    base = weights(toy_dit)
    panel = make(toy_dit, oracle)
    click(panel)
    assert panel.output.outputs and panel.status.value
    check(panel, toy_dit)
    assert unchanged(toy_dit, base)


@pytest.mark.parametrize("cls, chosen, on_dit, back", [
    (ErasePanel, dict(concept="car", method="uce", parts="unet.*.xattn.v", lam=0.5, per_prompt=2),
     dict(concept="car", method="uce", parts="", lam=0.5, per_prompt=2), dict(parts="")),
    (ErasePanel, dict(method="fewshot", parts="text.5.ffn", steps=3),
     dict(method="fewshot", parts="text.5.ffn", steps=3), {}),
    (ComparePanel, dict(concepts=["cat", "sun"], methods=["uce"]), dict(concepts=("cat", "sun"), methods=("uce",)),
     {}),
    (SweepPanel, dict(concept="sun", method="rece", cumulative=True),
     dict(concept="sun", method="rece", cumulative=True), {}),
    (LandingPanel, dict(method="uce", space="unet.mid.0.xattn.k", k=4),
     dict(method="uce", space="dit.context.proj", k=4),
     dict(space="unet.up.0.0.xattn.k")),  # the DiT's default space, then the toy's
    (SubsetPanel, dict(concepts=["boat"], steps=2), dict(concepts=("boat",), steps=2), {}),
    (AttackPanel, dict(concept="cat", attack="derived", seeds=1), dict(concept="cat", seeds=1), {}),
    (EsdPanel, dict(iterations=7), dict(preset="esd-u", iterations=7), {}),  # an untouched preset follows the model
    (EsdPanel, dict(preset="esd-x-strict", parts="unet.*.ffn"), dict(preset="esd-x-strict", parts=""), dict(parts="")),
    (TracePanel, dict(sites=["text.5", "unet.up.2"], n=2), dict(sites=("text.5",), n=2), dict(sites=("text.5",))),
    (AttentionPanel, dict(word="red", layer="unet.mid.0"), dict(word="red", layer="all"), dict(layer="all")),
], ids=["erase-unet-parts", "erase-text-parts", "compare", "sweep", "landing", "subset", "attack", "esd-untouched",
        "esd-preset-and-unet-parts", "trace-sites", "attention-layer"])
def test_a_panel_switched_to_the_toy_dit_and_back_restores_the_options_and_keeps_valid_values(toy, oracle, cls, chosen,
                                                                                           on_dit, back):
    panel = cls(toy, oracle, run=False, **chosen)
    on_toy, offered = panel.values(), options(panel)
    panel.set(model="toy-dit")
    dit_panel = cls(panel.pipe, oracle, run=False)
    assert type(panel.pipe).__name__ == "FluxPipeline" and panel.values()["model"] == "toy-dit"
    assert options(panel) == options(dit_panel) and panel.judge is oracle  # a judge the user gave is kept
    assert panel.values() == {**dit_panel.values(), **on_dit}  # the rest: the DiT's defaults
    assert_valid(panel)
    assert list(panel.widget.children[1].children) == list(panel.controls.values())
    assert panel.result is None and "press Run" in panel.status.value  # a switch does not run

    panel.set(model="toy")
    assert panel.pipe is toy and options(panel) == offered
    assert panel.values() == {**on_toy, **back}  # what the DiT could not hold comes back as the toy's default
    assert_valid(panel)


def test_switching_back_and_forth_reuses_the_loaded_models_and_the_panel_runs_on_the_one_chosen(toy, oracle):
    panel = ErasePanel(toy, oracle, run=False, concept="cat", method="fewshot", steps=1, per_prompt=1)
    dit = panel.set(model="toy-dit").pipe
    assert panel.set(model="toy").pipe is toy and panel.set(model="toy-dit").pipe is dit
    start = time.perf_counter()
    other = ComparePanel(toy, oracle, run=False)
    other.controls["model"].value = "toy-dit"  # what picking it in the dropdown does
    assert other.pipe is dit and time.perf_counter() - start < 2  # loaded once for the session
    every = {k.control for m in REGISTRY.values() for k in m.knobs}
    assert {n for n, c in panel.controls.items() if c.layout.display == "none"} == every - {"lr", "steps"}


@pytest.mark.slow
def test_a_switched_panel_runs_on_the_toy_dit_when_run_is_pressed(toy):
    panel = ErasePanel(toy, None, run=False, concept="cat", method="uce", per_prompt=1)
    click(panel)
    assert all(p.startswith("unet.") for p in panel.result["edit"].parts)
    first = panel.result
    panel.set(model="toy-dit")
    assert panel.result is first  # switching shows the last result until Run is pressed
    click(panel)
    assert panel.result is not first and all(p.startswith("dit.") for p in panel.result["edit"].parts)
    assert "uce erased 'cat'" in panel.status.value


def test_a_panel_made_for_the_toy_dit_applies_the_model_before_the_controls_that_depend_on_it(toy, oracle):
    panel = AttentionPanel(toy, oracle, run=False, layer="dit.single.1", concept="sun", model="toy-dit")
    assert type(panel.pipe).__name__ == "FluxPipeline" and panel.values()["layer"] == "dit.single.1"
    assert panel.values()["concept"] == "sun" and panel.values()["model"] == "toy-dit"
    esd = EsdPanel(toy, None, run=False, parts="dit.*.img.ffn", model="toy-dit")
    assert esd.values()["parts"] == "dit.*.img.ffn" and esd.judge is None


def test_the_model_switch_takes_the_new_models_judge_only_in_place_of_the_old_models(toy):
    own = profile_of(toy).judge()
    panel = ErasePanel(toy, own, run=False).set(model="toy-dit")
    assert panel.judge is profile_of(panel.pipe).judge() and panel.judge is not own
    assert panel.set(model="toy").judge is own
    mine = object()  # any judge the user gave stays, and so does no judge
    assert ErasePanel(toy, mine, run=False).set(model="toy-dit").judge is mine
    assert ErasePanel(toy, None, run=False).set(model="toy-dit").judge is None


def test_an_unknown_model_is_refused_with_the_valid_names_and_changes_nothing(toy, oracle):
    panel = TracePanel(toy, oracle, run=False, concept="car")
    values, controls = panel.values(), dict(panel.controls)
    for name in ("toy-unet", "CompVis/stable-diffusion-v1-4"):
        with pytest.raises(ValueError, match="model cannot be .*; choose from toy, toy-dit"):
            panel.set(concept="cat", model=name)  # the model is checked first: concept stays car
        assert panel.pipe is toy and panel.values() == values and panel.controls == controls


def test_a_model_without_bundled_siblings_has_no_model_control(toy):
    pipe = attach(workbench.load("toy"), Profile("mine", profile_of(toy).concepts))
    panel = ErasePanel(pipe, None, run=False)
    assert "model" not in panel.controls and list(panel.controls)[0] == "concept"
    with pytest.raises(ValueError, match="no control 'model'"):
        panel.set(model="toy-dit")
