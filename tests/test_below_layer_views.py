"""The views below the layer: neuron and head figures (workbench.plots) and the neuron panel (workbench.widgets)."""
import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

import workbench
from workbench.anatomy import parts
from workbench.edits import applied
from workbench.heads import HeadAttribution, attribute, head_sites
from workbench.neurons import SHARE, TIMESTEPS, neuron_layers, scores
from workbench.plots import PALETTE, head_grid, neuron_counts, neuron_scores, prune_curve
from workbench.sampling import STEPS
from workbench.widgets import NeuronPanel

VERMILLION = "#D55E00"


@pytest.fixture(scope="module")
def apple(toy):
    """Cheap scores: two prompts each side, two steps, one text-encoder layer and the UNet's mid block."""
    return scores(toy, "apple", prompts=["an apple", "a red apple"], preserve=["a car", "a cat"],
                  parts=["text.5", "unet.mid.0"], steps=2)


def colour_of(artist) -> str:
    return mcolors.to_hex(artist.get_facecolor()[0] if hasattr(artist, "get_offsets") else artist.get_facecolor())


def weights(pipe) -> dict[str, torch.Tensor]:
    return {n: p.weight.detach().clone() for n, p in parts(pipe).items()}


def unchanged(pipe, before: dict[str, torch.Tensor]) -> bool:
    return not applied(pipe) and all(torch.equal(p.weight, before[n]) for n, p in parts(pipe).items())


# ---------------------------------------------------------------------------------------------------
# figures


def test_neuron_scores_draws_every_neuron_with_the_skilled_ones_in_vermillion_and_the_diagonal(apple):
    fig = neuron_scores(apple, "unet.mid.0.ffn.out", share=0.05, timesteps=2)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    others, skilled = ax.collections
    chosen = apple.skilled(0.05, 2)["unet.mid.0.ffn.out"]
    assert len(skilled.get_offsets()) == len(chosen) > 0 and len(others.get_offsets()) == 512 - len(chosen)
    assert colour_of(skilled) == VERMILLION.lower()
    (diagonal,) = ax.lines
    x, y = diagonal.get_data()
    assert list(x) == list(y)
    assert ax.get_title(loc="left") == f"unet.mid.0: {len(chosen)} of 512 neurons skilled (apple)"
    # the skilled neurons' points are the concept's mean WANDA (y) against the preserve prompts' (x)
    expected = np.stack([apple.wanda("unet.mid.0.ffn.out", True)[:2].mean(0)[chosen].numpy(),
                         apple.wanda("unet.mid.0.ffn.out")[:2].mean(0)[chosen].numpy()], 1)
    assert np.allclose(np.asarray(skilled.get_offsets()), expected)


def test_neuron_scores_takes_a_block_name_and_the_contrastive_score_and_refuses_an_unscored_layer(apple):
    by_block = neuron_scores(apple, "text.5", score="contrastive")  # a text encoder's neurons: one pass
    assert by_block.axes[0].get_title(loc="left").startswith("text.5: ") and "one pass" in by_block.axes[0].get_xlabel()
    with pytest.raises(ValueError, match="not a scored neuron layer; scored: text.5.ffn.out, unet.mid.0.ffn.out"):
        neuron_scores(apple, "unet.up.0.0")


def test_neuron_counts_of_one_concept_has_a_bar_per_layer_coloured_by_text_encoder_and_denoiser(apple):
    counts = apple.counts(0.05, 2)
    fig = neuron_counts(counts)
    ax = fig.axes[0]
    bars = ax.patches
    assert len(bars) == 2 and [b.get_height() for b in bars] == counts["skilled"].tolist()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["text.5", "unet.mid.0"]
    assert [colour_of(b) for b in bars] == [PALETTE[0].lower(), PALETTE[1].lower()]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["text encoder", "denoiser"]
    (bars,) = ax.containers
    assert isinstance(bars, BarContainer) and bars.errorbar is None  # one concept: no interval


def test_neuron_counts_of_several_concepts_shows_the_mean_with_its_interval_in_network_order():
    layers = ["text.0", "text.1", "unet.down.1.0", "unet.mid.0"]
    table = pd.DataFrame([dict(concept=c, layer=l, part=f"{l}.ffn.out", component=l.split(".")[0], skilled=k + i)
                          for i, c in enumerate("abcd") for k, l in enumerate(layers)])
    fig = neuron_counts(table)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == layers
    assert [b.get_height() for b in ax.patches] == pytest.approx([1.5, 2.5, 3.5, 4.5])
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert bars.errorbar is not None  # the 95% intervals over the four concepts
    assert ax.get_title(loc="left") == "mean of 4 concepts, 95% CI"
    with pytest.raises(ValueError, match="missing skilled"):
        neuron_counts(table.drop(columns="skilled"))


def test_prune_curve_has_efficacy_and_preservation_panels_with_a_line_per_place_on_a_log_percent_axis():
    table = pd.DataFrame([dict(concept=c, seed=s, where=w, share=sh, efficacy=min(1.0, 3 * sh + 0.1 * s),
                               preservation=1 - sh / 2)
                          for c in ("apple", "car", "cat") for s in (0, 1) for w in ("denoiser", "text")
                          for sh in (0.001, 0.01, 0.1, 1.0)])
    fig = prune_curve(table)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    for ax, value in zip(fig.axes, ("efficacy", "preservation")):
        assert ax.get_ylabel() == value and ax.get_xscale() == "log"
        assert [line.get_label() for line in ax.lines] == ["denoiser", "text"]
        assert len(ax.collections) == 2  # one 95% band per line
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0.1%", "1%", "10%", "100%"]
    x, y = fig.axes[0].lines[0].get_data()
    assert list(x) == [0.001, 0.01, 0.1, 1.0] and y[1] == pytest.approx(0.03 + 0.05)  # seeds, then concepts
    with pytest.raises(ValueError, match="missing where"):
        prune_curve(table.drop(columns="where"))


def fake_attribution(sites: dict[str, int], strongest=("unet.up.1.1", 3)) -> HeadAttribution:
    rng = np.random.default_rng(0)
    rows = [dict(component=layer.split(".")[0], layer=layer, head=h, probability=0.9,
                 effect=-0.41 if (layer, h) == strongest else float(rng.normal(0, 0.02)))
            for layer, heads in sites.items() for h in range(heads)]
    return HeadAttribution("apple", "an apple", "ablate", 0.95, 0.95, 1, 0, pd.DataFrame(rows))


def test_head_grid_of_every_toy_head_is_a_layer_by_head_heatmap_centred_on_zero(toy):
    sites = {name: site.heads for name, site in head_sites(toy).items()}
    assert len(sites) == 13 and max(sites.values()) == 32
    fig = head_grid(fake_attribution(sites))
    ax, bar = fig.axes
    (image,) = ax.images
    assert image.get_array().shape == (13, 32)
    assert np.ma.getmaskarray(image.get_array())[0, 12:].all()  # a text layer has 12 heads: the rest blank
    low, high = image.get_clim()
    assert low == -high == pytest.approx(-0.41)
    assert bar.get_ylabel() == "effect on P(concept)"
    assert [t.get_text() for t in ax.get_yticklabels()] == list(sites)
    assert len(ax.get_xticklabels()) == 8  # every 4th head labelled: readable at 32 heads


@pytest.mark.slow
def test_head_grid_of_a_real_attribution_of_one_layer(toy):
    found = attribute(toy, "apple", layers="unet.mid.0", n=1, steps=2)
    fig = head_grid(found)
    assert fig.axes[0].images[0].get_array().shape == (1, 32)
    assert fig.axes[0].get_title(loc="left").startswith("apple: each head ablated")


# ---------------------------------------------------------------------------------------------------
# the panel


def test_the_neuron_panel_offers_the_toys_neuron_layers_and_starts_cheap(toy):
    panel = NeuronPanel(toy, None, run=False)
    assert list(panel.controls) == ["model", "concept", "layer", "score", "share", "timesteps", "heads", "mode", "n",
                                    "steps"]
    assert list(panel.controls["layer"].options) == list(neuron_layers(toy, "*"))
    assert len(panel.controls["layer"].options) == 13 and panel.values()["layer"] == "unet.mid.0.ffn.out"
    assert panel.values() == dict(model="toy", concept="apple", layer="unet.mid.0.ffn.out", score="wanda",
                                  share=SHARE, timesteps=TIMESTEPS, heads="text encoder", mode="restore", n=1,
                                  steps=STEPS)
    heads = panel.controls["heads"].options
    assert heads[:3] == ("cross-attention", "text encoder", "none") and heads[3:] == tuple(head_sites(toy))
    assert panel.result is None and not panel.output.outputs


@pytest.mark.parametrize("heads, stages", [("none", 1), ("cross-attention", 1 + 7 * 32), ("text encoder", 1 + 6 * 12),
                                           ("unet.mid.0", 1 + 32), ("text.5", 1 + 12)])
def test_the_neuron_panels_progress_bar_counts_a_stage_per_head(toy, heads, stages):
    panel = NeuronPanel(toy, None, run=False, heads=heads)
    assert panel.stages({k: v for k, v in panel.values().items() if k != "model"}) == stages


def test_switching_the_neuron_panel_to_the_toy_dit_offers_the_dits_layers_and_heads(toy):
    panel = NeuronPanel(toy, None, run=False, share=0.05)
    panel.set(model="toy-dit")
    dit = panel.pipe
    assert type(dit).__name__ == "FluxPipeline"
    assert list(panel.controls["layer"].options) == list(neuron_layers(dit, "*"))
    assert panel.values()["layer"] == "dit.4.img.ffn.out" and panel.values()["share"] == 0.05
    assert tuple(panel.controls["heads"].options[3:]) == tuple(head_sites(dit))
    assert "unet" not in repr([getattr(c, "options", None) for c in panel.controls.values()])
    assert list(panel.widget.children[1].children) == list(panel.controls.values())
    panel.set(model="toy")
    assert panel.pipe is toy and panel.values()["layer"] == "unet.mid.0.ffn.out"


def test_a_bad_share_shows_an_error_in_the_panel_and_leaves_the_pipeline_unchanged(toy, oracle, monkeypatch):
    before = weights(toy)
    panel = NeuronPanel(toy, oracle, run=False, heads="none")
    # the slider cannot hold 0 (it stops at 0.1%): a share of 0 can only come from code
    monkeypatch.setattr(panel, "values", lambda: {**NeuronPanel.values(panel), "share": 0})
    assert panel.run() is None
    assert isinstance(panel.error, ValueError) and panel.progress.bar_style == "danger"
    assert "share is the fraction" in panel.status.value and "share" in panel.output.outputs[0]["text"]
    assert panel.result is None and unchanged(toy, before)


def test_heads_without_a_judge_are_refused_in_the_panel(toy):
    panel = NeuronPanel(toy, None, run=False, heads="unet.mid.0", steps=1)
    panel.run()
    assert isinstance(panel.error, ValueError) and "judge" in panel.status.value


@pytest.mark.slow
def test_a_cheap_neuron_panel_run_shows_the_scatter_the_counts_the_head_grid_and_the_top_heads(toy, oracle):
    before = weights(toy)
    panel = NeuronPanel(toy, oracle, run=False, concept="car", heads="unet.mid.0", steps=2, share=0.05,
                        layer="text.3.ffn.out")
    marks = []
    panel.progress.observe(lambda change: marks.append(change.new), names="value")
    panel.button.click()
    assert panel.error is None, panel.error
    result = panel.result
    assert result["scores"].concept == "car" and set(result["scores"].layers) == set(neuron_layers(toy, "*"))
    assert result["counts"]["concept"].eq("car").all() and len(result["counts"]) == 13
    assert len(result["attribution"].table) == 32 and set(result["attribution"].table["layer"]) == {"unet.mid.0"}
    images = sum("image/png" in o.get("data", {}) for o in panel.output.outputs)
    assert images == 3 and "text/html" in panel.output.outputs[-1]["data"]  # the top heads' table
    assert panel.progress.max == 33 and len(set(marks)) > 3  # the bar moves during the head run
    best = result["attribution"].top(1).iloc[0]
    assert panel.status.value.startswith(f"car: {int(result['counts']['skilled'].sum())} skilled neurons in ")
    assert f"strongest head unet.mid.0/h{int(best['head'])}" in panel.status.value
    assert unchanged(toy, before)

    panel.set(heads="none", layer="unet.up.1.1.ffn.out").run()  # the scores are kept: quick
    assert panel.error is None and panel.result["attribution"] is None
    assert sum("image/png" in o.get("data", {}) for o in panel.output.outputs) == 2
    assert "strongest head" not in panel.status.value


@pytest.mark.slow
def test_the_neuron_panel_runs_on_the_toy_dit(toy):
    dit = workbench.load("toy-dit")
    panel = NeuronPanel(dit, None, run=False, heads="none", steps=2)
    panel.run()
    assert panel.error is None, panel.error
    assert all(not p.startswith("unet") for p in panel.result["scores"].layers)
    assert "dit.single.0" in panel.result["counts"]["layer"].tolist()
