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


def test_erase_panel_reports_bad_input_in_the_panel(toy, oracle):
    panel = ErasePanel(toy, oracle, run=False)
    with pytest.raises(ValueError, match="choose from"):
        panel.set(concept="unicorn")
    with pytest.raises(ValueError, match="no control 'colour'"):
        panel.set(colour="red")
    panel.set(method="rece", parts="text.*.ffn").run()  # RECE cannot edit the text encoder
    assert isinstance(panel.error, ValueError) and panel.progress.bar_style == "danger"
    assert "few-shot" in panel.status.value and "few-shot" in panel.output.outputs[0]["text"]
