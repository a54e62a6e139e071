"""Paper-style figures: one look for every plot, each function returns a matplotlib Figure.

>>> from PIL import Image
>>> from workbench.plots import image_grid
>>> fig = image_grid([[Image.new("RGB", (32, 32))] * 3] * 2, ["row a", "row b"], ["x", "y", "z"])
>>> len(fig.axes)
6
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

STYLE = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "font.family": "DejaVu Sans",
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
}


def _detached(make: Callable[..., Figure]) -> Callable[..., Figure]:
    """Close the figure in pyplot once drawn: notebooks then show it once (as the returned value),
    not a second time from pyplot's list of open figures; saving and displaying it still work."""

    @functools.wraps(make)
    def wrapper(*args, **kwargs) -> Figure:
        fig = make(*args, **kwargs)
        plt.close(fig)
        return fig

    return wrapper


@_detached
def image_grid(images: Sequence[Sequence[Image.Image]], row_labels: Sequence[str] = (),
               col_labels: Sequence[str] = (), cell: float = 0.62) -> Figure:
    """A labelled grid: ``images[r][c]`` at row ``r``, column ``c``; ``cell`` inches per image."""
    rows, cols = len(images), max(len(r) for r in images)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(cols * cell + 1.1, rows * cell + 0.35), squeeze=False)
        for r in range(rows):
            for c in range(cols):
                ax = axes[r][c]
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if c < len(images[r]):
                    ax.imshow(images[r][c], interpolation="nearest")
                if c == 0 and r < len(row_labels):
                    ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center")
                if r == 0 and c < len(col_labels):
                    ax.set_title(col_labels[c], fontsize=7)
        fig.subplots_adjust(wspace=0.04, hspace=0.04)
    return fig


#: Okabe-Ito, a colour-blind-safe palette.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")


@_detached
def accuracy_bars(before: dict[str, float], after: dict[str, float], title: str = "") -> Figure:
    """Oracle accuracy per concept before and after an edit, as paired bars."""
    keys = list(before)
    x = np.arange(len(keys))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(3.3, 0.28 * len(keys) + 0.8), 2.0))
        ax.bar(x - 0.2, [before[k] for k in keys], 0.4, label="before", color=PALETTE[0])
        ax.bar(x + 0.2, [after[k] for k in keys], 0.4, label="after", color=PALETTE[1])
        ax.set_xticks(x, keys, rotation=60, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy")
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(frameon=False, ncols=2, loc="lower right", bbox_to_anchor=(1, 1.0))
        if title:
            ax.set_title(title, loc="left", pad=6)
    return fig


_LABELS = {"efficacy": "efficacy", "preservation": "preservation", "drift": "drift to related",
           "dW": "||ΔW||", "dW_relative": "||ΔW|| / ||W||", "seconds": "edit seconds", "accuracy": "accuracy"}
_SHARES = ("efficacy", "preservation", "preservation_related", "preservation_unrelated", "drift", "accuracy",
           "attack_success")


def _short(layer: str) -> str:
    return layer.split(".", 1)[1] if layer.startswith(("text.", "unet.")) else layer


@_detached
def sweep_heatmap(table, value: str = "efficacy", title: str = "") -> Figure:
    """A layer sweep (:func:`workbench.sweep.layer_sweep`) as layers x components, colour = ``value``
    (mean over seeds and concepts), each cell labelled."""
    runs = table[table["layer"].notna()] if "layer" in table else table.iloc[:0]
    if runs.empty or value not in runs:
        raise ValueError(f"sweep_heatmap needs layer-sweep rows with a {value!r} column; make them with "
                         "workbench.sweep.layer_sweep (measure=True for efficacy and preservation)")
    rows = runs["component"] + np.where(runs["cumulative"], " (0..i)", "")
    grid = runs.assign(row=rows).pivot_table(index="row", columns="layer", values=value, aggfunc="mean",
                                             sort=False)
    names = runs.drop_duplicates("layer").set_index("layer")["layer_name"]
    share = value in _SHARES
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(3.3, 0.32 * len(grid) + 0.95))
        im = ax.imshow(grid.to_numpy(float), cmap="viridis", aspect="auto",
                       vmin=0 if share else None, vmax=1 if share else None)
        lo, hi = im.get_clim()
        for (r, c), v in np.ndenumerate(grid.to_numpy(float)):
            if np.isfinite(v):
                dark = (v - lo) / ((hi - lo) or 1) < 0.6
                ax.text(c, r, f"{v:.2f}" if share else f"{v:.2g}", ha="center", va="center", fontsize=6,
                        color="white" if dark else "black")
        ax.set_xticks(range(grid.shape[1]), [_short(names[c]) for c in grid.columns],
                      rotation=0 if len(grid.columns) <= 8 else 60)
        ax.set_yticks(range(len(grid)), grid.index)
        unet = str(names.iloc[0]).startswith("unet.")
        ax.set_xlabel("UNet cross-attention layer" if unet else "text-encoder layer")
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        fig.colorbar(im, ax=ax, pad=0.02, fraction=0.05).set_label(_LABELS.get(value, value))
        if title:
            ax.set_title(title, loc="left")
    return fig


@_detached
def subset_bars(table, values: Sequence[str] = ("efficacy", "preservation", "dW", "seconds")) -> Figure:
    """The FFN-versus-attention comparison (:func:`workbench.sweep.ffn_vs_attention`): one panel per
    value, bars per parameter subset and concept, mean +- std over seeds."""
    runs = table[table["layer"].isna()] if "layer" in table else table.iloc[:0]
    missing = [v for v in values if v not in runs]
    if runs.empty or missing:
        raise ValueError("subset_bars needs whole-encoder runs from workbench.sweep.ffn_vs_attention"
                         + (f" with the columns {', '.join(missing)}" if missing else ""))
    subsets, concepts = list(dict.fromkeys(runs["subset"])), list(dict.fromkeys(runs["concept"]))
    stats = runs.groupby(["subset", "concept"])[list(values)].agg(["mean", "std"])
    ncols = min(2, len(values))
    nrows = -(-len(values) // ncols)
    width = 0.8 / len(concepts)
    x = np.arange(len(subsets))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.3, 1.25 * nrows + 0.55), squeeze=False)
        for ax, value in zip(axes.flat, values):
            for k, concept in enumerate(concepts):
                keys = [(s, concept) for s in subsets]
                mean = [stats.loc[key, (value, "mean")] if key in stats.index else np.nan for key in keys]
                std = [stats.loc[key, (value, "std")] if key in stats.index else np.nan for key in keys]
                ax.bar(x + (k - (len(concepts) - 1) / 2) * width, mean, width, yerr=np.nan_to_num(std),
                       color=PALETTE[k % len(PALETTE)], label=concept, capsize=1.2,
                       error_kw={"elinewidth": 0.6, "capthick": 0.6})
            ax.set_xticks(x, subsets, rotation=30, ha="right")
            ax.set_ylabel(_LABELS.get(value, value))
            if value in _SHARES:
                ax.set_ylim(0, 1.05)
            ax.spines[["top", "right"]].set_visible(False)
        for ax in list(axes.flat)[len(values):]:
            ax.set_visible(False)
        axes[0][0].legend(frameon=False, ncols=min(4, len(concepts)), loc="lower left", bbox_to_anchor=(0, 1.02),
                          handlelength=1, columnspacing=0.8)
        fig.tight_layout(h_pad=0.4, w_pad=0.6)
    return fig


@_detached
def dw_per_layer(table, by: str | None = None) -> Figure:
    """||ΔW|| per layer (``dW_by_layer`` of a sweep table), one line per ``by`` value, mean +- std.

    ``by`` defaults to ``"subset"`` for FFN-versus-attention tables (whole-encoder runs) and to
    ``"component"`` for layer sweeps.
    """
    if "dW_by_layer" not in table or table.empty:
        raise ValueError("dw_per_layer needs a table from workbench.sweep (column 'dW_by_layer')")
    whole = table[table["layer"].isna()]
    runs = whole if by in (None, "subset") and not whole.empty else table
    by = by or ("subset" if not whole.empty else "component")
    layers: list[str] = []
    for d in sorted(runs["dW_by_layer"], key=len, reverse=True):
        layers += [k for k in d if k not in layers]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(3.3, 1.9))
        for k, (name, group) in enumerate(runs.groupby(by, sort=False)):
            values = np.array([[d.get(layer, 0.0) for layer in layers] for d in group["dW_by_layer"]])
            std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(layers))
            ax.errorbar(range(len(layers)), values.mean(axis=0), yerr=std, color=PALETTE[k % len(PALETTE)],
                        marker="o", markersize=3, linewidth=1, capsize=1.5, label=name)
        ax.set_xticks(range(len(layers)), [_short(layer) for layer in layers],
                      rotation=0 if len(layers) <= 8 else 60)
        ax.set_xlabel("UNet cross-attention layer" if layers and layers[0].startswith("unet.")
                      else "text-encoder layer")
        ax.set_ylabel(_LABELS["dW"])
        ax.set_ylim(bottom=0)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(frameon=False, ncols=2, loc="lower left", bbox_to_anchor=(0, 1.0), handlelength=1.5)
    return fig


def group_colours(groups: Sequence[str], colours: dict[str, str] | None = None) -> dict[str, str]:
    """A colour per group: ``colours`` where given, then the palette in order (the empty group is grey)."""
    colours = dict(colours or {})
    spare = iter(c for c in PALETTE if c not in colours.values())
    for g in dict.fromkeys(groups):
        if g and g not in colours:
            colours[g] = next(spare, "#777777")
    return colours


def _place_labels(ax, points, labels: str, colours: dict[str, str]) -> None:
    """Label the chosen points; each label takes the first of four spots next to its point that no
    earlier label covers (boxes estimated in points from the font size, then mapped to data units)."""
    span_x = float(points["x"].max() - points["x"].min()) or 1.0
    span_y = float(points["y"].max() - points["y"].min()) or 1.0
    per_pt = (span_x / (2.7 * 72), span_y / (2.6 * 72))
    placed: list[tuple[float, float, float, float]] = []
    for _, p in points.iterrows():
        if not (labels == "all" or (labels == "concept" and p["kind"] == "concept")):
            continue
        w, h = 5 * 0.55 * len(p["word"]), 6.0
        for dx, dy, ha in ((2, 2, "left"), (2, -7, "left"), (-2, 2, "right"), (-2, -7, "right")):
            x0 = p["x"] + (dx if ha == "left" else dx - w) * per_pt[0]
            y0 = p["y"] + dy * per_pt[1]
            box = (x0, x0 + w * per_pt[0], y0, y0 + h * per_pt[1])
            if not any(box[0] < b[1] and b[0] < box[1] and box[2] < b[3] and b[2] < box[3] for b in placed):
                break
        else:
            dx, dy, ha = 2, 2, "left"
        placed.append(box)
        ax.annotate(p["word"], (p["x"], p["y"]), xytext=(dx, dy), textcoords="offset points", fontsize=5,
                    ha=ha, color=colours.get(p["group"], "#555555"), zorder=3)


def _draw_arrows(ax, arrows) -> None:
    for _, a in arrows.iterrows():
        ax.annotate("", xy=(a["x1"], a["y1"]), xytext=(a["x0"], a["y0"]), zorder=4,
                    arrowprops=dict(arrowstyle="-|>", color="black", lw=0.8, shrinkA=0, shrinkB=0,
                                    mutation_scale=6))
        ax.scatter([a["x1"]], [a["y1"]], s=18, facecolors="white", edgecolors="black", linewidths=0.8, zorder=5)
        ax.annotate(f"{a['word']} (after)", (a["x1"], a["y1"]), xytext=(3, -7), textcoords="offset points",
                    fontsize=5.5, fontweight="bold", zorder=6)


@_detached
def landing_map(points, arrows=None, derived=None, title: str = "", labels: str = "concept",
                colours: dict[str, str] | None = None) -> Figure:
    """A UMAP map of a vocabulary with an edit's arrows, as drawn by ``LandingMap.figure``.

    ``points``: word, kind ("concept", "related", "distractor", ...), group, x, y; distractors grey and
    small, related words faint in their group's colour, concepts solid and labelled (``labels="all"``
    labels every word, ``"none"`` none). ``arrows``: word, x0, y0, x1, y1 (before -> after).
    ``derived``: label, x, y (RECE's derived embeddings, black crosses). ``colours``: group -> colour
    (default: the palette, in order of the groups).
    """
    colours = group_colours(points["group"], colours)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(3.3, 3.1))
        colour = [colours.get(g, "#999999") for g in points["group"]]
        kind = points["kind"].to_numpy()
        layers = (("distractor", 3, 0.35, "#BBBBBB"), ("extra", 3, 0.35, "#BBBBBB"), ("related", 7, 0.45, None),
                  ("concept", 16, 1.0, None))
        for name, size, alpha, fixed in layers:
            sel = kind == name
            if sel.any():
                ax.scatter(points["x"][sel], points["y"][sel], s=size, alpha=alpha, linewidths=0,
                           c=fixed or [c for c, s in zip(colour, sel) if s], zorder=2 if name == "concept" else 1)
        _place_labels(ax, points, labels, colours)
        if arrows is not None:
            _draw_arrows(ax, arrows)
        if derived is not None and len(derived):
            ax.scatter(derived["x"], derived["y"], marker="X", s=22, c="black", linewidths=0, zorder=6)
            for _, d in derived.iterrows():
                ax.annotate(str(d.get("epoch", "")), (d["x"], d["y"]), xytext=(3, 2), textcoords="offset points",
                            fontsize=5, zorder=6)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
        ax.spines[["top", "right"]].set_visible(False)
        present = [g for g in colours if g in set(points["group"])]
        handles = [Line2D([], [], ls="", marker="o", ms=3.5, color=colours[g], label=g) for g in present]
        if (kind == "distractor").any() or (kind == "extra").any():
            handles.append(Line2D([], [], ls="", marker="o", ms=2.5, color="#BBBBBB", label="other"))
        if derived is not None and len(derived):
            handles.append(Line2D([], [], ls="", marker="X", ms=4, color="black", label="derived (epoch)"))
        ax.legend(handles=handles, frameon=False, fontsize=5.5, ncols=4, loc="lower left",
                  bbox_to_anchor=(0, 1.0), handletextpad=0.1, columnspacing=0.8)
        if title:
            fig.suptitle(title, fontsize=7, y=1.06)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` by the path's suffix: ``.pdf``, ``.svg`` or ``.png`` (300 dpi)."""
    path = Path(path)
    if path.suffix.lower() not in (".pdf", ".svg", ".png"):
        raise ValueError(f"cannot save a figure as {path.suffix!r}: use .pdf, .svg or .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    with plt.rc_context(STYLE):
        fig.savefig(path, dpi=300)
    return path


@_detached
def method_comparison(table) -> Figure:
    """Accuracy on the erased concept (lower is better) and preservation (higher is better) per method,
    one group of bars per concept; ``table`` is :func:`workbench.report.compare`'s."""
    methods = list(dict.fromkeys(table["method"]))
    concepts = list(dict.fromkeys(table["concept"]))
    x = np.arange(len(concepts))
    width = 0.8 / len(methods)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(max(3.3, 0.5 * len(concepts) + 2.2), 1.9), sharey=True)
        for ax, column, label in ((axes[0], "after", "accuracy on erased concept"),
                                  (axes[1], "preservation", "preservation of others")):
            for i, m in enumerate(methods):
                rows = table[table["method"] == m].set_index("concept")
                ax.bar(x + (i - (len(methods) - 1) / 2) * width, [rows.loc[c, column] for c in concepts], width,
                       label=m, color=PALETTE[i % len(PALETTE)])
            ax.set_xticks(x, concepts, rotation=45, ha="right")
            ax.set_ylim(0, 1.05)
            ax.set_title(label)
            ax.spines[["top", "right"]].set_visible(False)
        axes[0].set_ylabel("share of images")
        axes[0].legend(frameon=False, ncols=len(methods), loc="lower left", bbox_to_anchor=(0, 1.08))
    return fig


@_detached
def attack_rates(summary) -> Figure:
    """Attack success rate per method, one bar per attack (the unedited model and the un-attacked edit
    first), with 95% intervals; ``summary`` is :func:`workbench.attacks.table.summary`'s."""
    methods = list(dict.fromkeys(summary["method"]))
    attacks = list(dict.fromkeys(summary["attack"]))
    x = np.arange(len(methods))
    width = 0.8 / len(attacks)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(3.3, 0.9 * len(methods) + 1.6), 2.0))
        for i, name in enumerate(attacks):
            rows = summary[summary["attack"] == name].set_index("method").reindex(methods)
            rate = rows["rate"].to_numpy(float)
            # a bootstrap interval of a rate near 0 or 1 can end a rounding short of the rate
            err = np.clip(np.vstack([rate - rows["lo"].to_numpy(float), rows["hi"].to_numpy(float) - rate]), 0, None)
            colour = {"unedited": "#BBBBBB", "none": "#666666"}.get(name, PALETTE[i % len(PALETTE)])
            ax.bar(x + (i - (len(attacks) - 1) / 2) * width, rate, width, yerr=err, label=name, color=colour,
                   error_kw=dict(lw=0.6, capsize=1.2))
        ax.set_xticks(x, methods)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("attack success rate")
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(frameon=False, ncols=3, loc="lower left", bbox_to_anchor=(0, 1.02), fontsize=6)
    return fig


def _heat(ax, grid: np.ndarray, vmin: float, vmax: float, cmap: str = "viridis", fmt: str = "{:.2f}"):
    """A labelled heatmap cell grid on ``ax`` (NaN cells blank); returns the image."""
    im = ax.imshow(grid, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    for (r, c), v in np.ndenumerate(grid):
        if np.isfinite(v):
            dark = (v - vmin) / ((vmax - vmin) or 1) < 0.6
            ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=5.5, color="white" if dark else "black")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return im


@_detached
def trace_sites(traces: Sequence, labels: Sequence[str] = (), value: str = "probability") -> Figure:
    """Causal traces (:func:`workbench.tracing.trace`) as one heatmap row per trace: the judge's
    probability of the concept with each text-encoder layer (restored at the concept's tokens), UNet
    block or transformer block restored; the clean and corrupted runs' probabilities in the row label.
    ``value`` can also be ``"effect"`` (restored minus corrupted)."""
    if not traces:
        raise ValueError("give at least one trace (workbench.tracing.trace)")
    sites = list(dict.fromkeys(s for t in traces for s in t.layers()["site"]))
    grid = np.array([[t.layers().set_index("site")[value].get(s, np.nan) for s in sites] for t in traces], float)
    names = [f"{lab or t.concept}\nclean {t.clean:.2f}, corrupted {t.corrupted:.2f}"
             for t, lab in zip(traces, list(labels) + [""] * len(traces))]
    lo = 0.0 if value == "probability" else min(-0.05, float(np.nanmin(grid)))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(3.3, 0.36 * len(sites) + 1.6), 0.36 * len(traces) + 0.9))
        im = _heat(ax, grid, lo, 1.0, cmap="viridis" if value == "probability" else "magma")
        ax.set_xticks(range(len(sites)), [_short(s) for s in sites], rotation=60, ha="right")
        ax.set_yticks(range(len(traces)), names)
        split = sum(s.startswith("text") for s in sites) - 0.5
        if 0 < split < len(sites) - 1:
            ax.axvline(split, color="white", lw=2)
        denoiser = "transformer block" if any(s.startswith("dit.") for s in sites) else "UNet block"
        ax.set_xlabel(f"restored site: text-encoder layer | {denoiser}")
        fig.colorbar(im, ax=ax, pad=0.02, fraction=0.04).set_label(
            "P(concept) restored" if value == "probability" else "causal effect")
    return fig


@_detached
def trace_tokens(trace, title: str = "") -> Figure:
    """A causal trace's text-encoder heatmap: the causal effect of restoring one layer at one token."""
    grid = trace.token_grid()
    values = grid.to_numpy(float)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(2.4, 0.42 * grid.shape[1] + 1.0), 0.26 * len(grid) + 0.9))
        im = _heat(ax, values, min(-0.05, float(np.nanmin(values))), max(0.05, float(np.nanmax(values))), cmap="magma")
        ax.set_xticks(range(grid.shape[1]), [c.split(":", 1)[1] for c in grid.columns], rotation=45, ha="right")
        ax.set_yticks(range(len(grid)), grid.index)
        ax.set_title(title or f"{trace.prompt!r}: clean {trace.clean:.2f}, corrupted {trace.corrupted:.2f}", loc="left")
        fig.colorbar(im, ax=ax, pad=0.02, fraction=0.05).set_label("causal effect")
    return fig


@_detached
def attention_grid(maps: Sequence, labels: Sequence[str] = (), cell: float = 0.62) -> Figure:
    """Cross-attention maps (:func:`workbench.attnmaps.attention_maps`), one row each (e.g. before and
    after an erasure): the image, the summed map over it, then every layer's map. Each column shares
    one colour scale across rows, so rows compare."""
    if not maps:
        raise ValueError("give at least one AttentionMaps (workbench.attnmaps.attention_maps)")
    layers = list(maps[0].layers)
    columns = ["image", "sum", *layers]
    top = {c: max(float(m.total.max() if c == "sum" else m.layers[c].max()) for m in maps) for c in columns[1:]}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(maps), len(columns), figsize=(len(columns) * cell + 1.1, len(maps) * cell + 0.45),
                                 squeeze=False)
        for r, m in enumerate(maps):
            for c, name in enumerate(columns):
                ax = axes[r][c]
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if name == "image":
                    ax.imshow(m.image, interpolation="nearest")
                elif name == "sum":
                    ax.imshow(m.image, interpolation="nearest")
                    ax.imshow(m.total, cmap="jet", alpha=0.5, vmin=0, vmax=top[name], interpolation="bilinear")
                else:
                    ax.imshow(m.layers[name], cmap="viridis", vmin=0, vmax=top[name], interpolation="bilinear")
                if r == 0:
                    ax.set_title(_short(name), fontsize=6, rotation=45 if len(columns) > 6 else 0, ha="left" if len(columns) > 6 else "center")
            label = labels[r] if r < len(labels) else m.prompt
            axes[r][0].set_ylabel(f"{label}\n{m.word!r}", rotation=0, ha="right", va="center")
        fig.subplots_adjust(wspace=0.04, hspace=0.04)
    return fig


@_detached
def forest(table, label: str = "") -> Figure:
    """A forest plot: one panel per attack, one row per concept (its difference and 95% interval), the
    estimate pooled over concepts as a diamond at the bottom, and the line of no difference; ``table``
    is :func:`workbench.attacks.table.concept_differences`'s rows (with ``attack``), for one or more
    attacks. ``label`` names the difference (``"UCE - RECE"``)."""
    attacks = list(dict.fromkeys(table["attack"]))
    concepts = [c for c in dict.fromkeys(table["concept"]) if c != "pooled"]
    y = {c: len(concepts) - i for i, c in enumerate(concepts)} | {"pooled": -0.4}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(attacks), figsize=(max(3.3, 1.75 * len(attacks) + 0.8),
                                                           0.16 * len(concepts) + 0.9), sharey=True, squeeze=False)
        for ax, attack in zip(axes[0], attacks):
            rows = table[table["attack"] == attack]
            for r in rows.itertuples():
                colour = "#666666" if r.direction == "not significant" else PALETTE[0 if r.difference > 0 else 1]
                if r.concept == "pooled":
                    ax.fill([r.lo, r.difference, r.hi, r.difference], [y[r.concept], y[r.concept] + 0.35, y[r.concept],
                            y[r.concept] - 0.35], color=colour, lw=0)
                else:
                    ax.plot([r.lo, r.hi], [y[r.concept]] * 2, color=colour, lw=0.8)
                    ax.plot(r.difference, y[r.concept], "o", color=colour, ms=2.5)
            ax.axvline(0, color="#999999", lw=0.5, zorder=0)
            ax.axhline(0.3, color="#DDDDDD", lw=0.5, zorder=0)
            ax.set_xlim(-1.05, 1.05)
            ax.set_xticks([-1, 0, 1], ["-100", "0", "+100"])
            ax.set_xticks([-0.5, 0.5], minor=True)
            ax.set_title(attack)
            ax.spines[["top", "right", "left"]].set_visible(False)
            ax.tick_params(axis="y", length=0)
            ax.set_xlabel(f"{label} (points)" if label else "difference (points)")
        fig.subplots_adjust(wspace=0.3)
        axes[0][0].set_yticks([y[c] for c in [*concepts, "pooled"]], [*concepts, "pooled over concepts"])
    return fig


@_detached
def budget_curves(summary) -> Figure:
    """Attack success rate against the attacker's budget, one panel per attack and one line per method
    with its 95% interval as a band; ``summary`` is :func:`workbench.attacks.table.summary` by
    ``("method", "attack", "budget")`` (rows without a budget, the baselines, are left out)."""
    rows = summary[summary["budget"].notna()]
    attacks = list(dict.fromkeys(rows["attack"]))
    methods = list(dict.fromkeys(rows["method"]))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(attacks), figsize=(max(3.3, 1.8 * len(attacks)), 1.9), sharey=True,
                                 squeeze=False)
        for ax, attack in zip(axes[0], attacks):
            for i, method in enumerate(methods):
                r = rows[(rows["attack"] == attack) & (rows["method"] == method)].sort_values("budget")
                x = r["budget"].to_numpy(float)
                ax.plot(x, r["rate"], "o-", color=PALETTE[i % len(PALETTE)], ms=2.5, lw=0.9, label=method)
                ax.fill_between(x, r["lo"].to_numpy(float), r["hi"].to_numpy(float), color=PALETTE[i % len(PALETTE)],
                                alpha=0.2, lw=0)
            ax.set_xscale("log", base=2)
            budgets = sorted(set(rows.loc[rows["attack"] == attack, "budget"].astype(int)))
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.minorticks_off()
            ax.set_ylim(0, 1.05)
            ax.set_xlabel("budget (steps)")
            ax.set_title(attack)
            ax.spines[["top", "right"]].set_visible(False)
        axes[0][0].set_ylabel("attack success rate")
        axes[0][0].legend(frameon=False, loc="lower right")
    return fig


@_detached
def efficacy_preservation(table, by: str = "variant") -> Figure:
    """Efficacy against preservation per method (or ``by``), one panel per model, each with its 95%
    intervals; ``table`` is :func:`workbench.side_by_side.methods_table`'s."""
    models = list(dict.fromkeys(table["model"]))
    labels = list(dict.fromkeys(table[by]))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(models), figsize=(2.2 * len(models) + 1.4, 2.1), sharex=True, sharey=True,
                                 squeeze=False)
        for ax, model in zip(axes[0], models):
            for r in table[table["model"] == model].itertuples():
                x, y = r.efficacy_rate, r.preservation_mean
                ax.errorbar(x, y, xerr=[[x - r.efficacy_lo], [r.efficacy_hi - x]],
                            yerr=[[y - r.preservation_lo], [r.preservation_hi - y]], fmt="o", ms=3.5,
                            color=PALETTE[labels.index(getattr(r, by)) % len(PALETTE)], lw=0.7, capsize=1.5,
                            label=getattr(r, by))
            ax.set_title(model)
            ax.set_xlim(-0.03, 1.03)
            ax.set_xlabel("efficacy (concept's images lost)")
            ax.spines[["top", "right"]].set_visible(False)
        axes[0, 0].set_ylabel("preservation of others")
        handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
        fig.legend([handles[k] for k in labels if k in handles], [k for k in labels if k in handles], frameon=False,
                   loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=6)
    return fig


@_detached
def depth_profile(table, value: str, ylabel: str, hue: str = "model") -> Figure:
    """A value per layer along each model's depth (0 = first layer or block, 1 = last), one line per ``hue``
    group with its 95% interval as a band; ``table`` has ``depth``, ``value``, ``lo`` and ``hi`` columns
    (:func:`workbench.side_by_side.layer_table`, or a trace table with a depth)."""
    groups = list(dict.fromkeys(table[hue]))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(3.4, 2.0))
        for i, g in enumerate(groups):
            rows = table[table[hue] == g].sort_values("depth")
            colour = PALETTE[i % len(PALETTE)]
            ax.plot(rows["depth"], rows[value], "o-", ms=3, lw=1, color=colour, label=g)
            ax.fill_between(rows["depth"], rows["lo"].clip(0, 1), rows["hi"].clip(0, 1), color=colour, alpha=0.15, lw=0)
        ax.set_xlabel("depth in the model (first layer 0, last 1)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(-0.03, 1.03)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(frameon=False, fontsize=6, loc="lower left", bbox_to_anchor=(0, 1.0), ncols=min(len(groups), 3))
    return fig


# ---------------------------------------------------------------------------------------------------
# Below the layer: neurons (workbench.neurons), pruning (workbench.methods.prune), heads (workbench.heads)

#: Okabe-Ito vermillion: what a figure singles out (skilled neurons).
_HIGHLIGHT = "#D55E00"


def _neuron_name(part: str) -> str:
    """A neuron layer's short name: its linear without ``.ffn.out`` (``unet.mid.0``, ``dit.0.img``)."""
    for tail in (".ffn.out", ".out"):
        if part.endswith(tail):
            return part[:-len(tail)]
    return part


def _is_text(component: str) -> bool:
    """Whether a component is a text encoder's (``text``, ``text2``), not the denoiser's (a DiT's text stream
    ``dit.text`` is the denoiser's)."""
    return str(component).split(".")[0].startswith("text")


def _percent(share: float) -> str:
    return f"{100 * share:g}%"


@_detached
def neuron_scores(scores, layer: str, share: float | None = None, timesteps: int | None = None,
                  score: str = "wanda") -> Figure:
    """One layer's neurons (:class:`workbench.neurons.NeuronScores`): each neuron's WANDA on the concept's
    prompts against its WANDA on the preserve prompts (means over the first ``timesteps`` steps), the
    skilled neurons (top ``share`` by ``score``, :meth:`~workbench.neurons.NeuronScores.skilled`) in
    vermillion and the diagonal, above which the concept drives a neuron harder than the other prompts do.
    ``layer``: the neuron layer (``unet.mid.0.ffn.out``) or its block (``unet.mid.0``); ``share`` and
    ``timesteps`` default to ConceptPrune's (:data:`workbench.neurons.SHARE`, ``TIMESTEPS``).

    >>> import workbench
    >>> from workbench.neurons import scores
    >>> s = scores(workbench.load("toy"), "apple", ["an apple"], ["a car"], parts="unet.mid.0", steps=2)
    >>> fig = neuron_scores(s, "unet.mid.0", share=0.05)
    >>> len(fig.axes), len(fig.axes[0].collections)     # the other neurons, the skilled ones
    (1, 2)
    >>> skilled = len(s.skilled(0.05)["unet.mid.0.ffn.out"])
    >>> fig.axes[0].get_title(loc="left") == f"unet.mid.0: {skilled} of 512 neurons skilled (apple)"
    True
    """
    from .neurons import SHARE, TIMESTEPS
    share = SHARE if share is None else share
    timesteps = TIMESTEPS if timesteps is None else timesteps
    name = layer if layer in scores.layers else next(
        (n for n, l in scores.layers.items() if layer in (l.layer, _neuron_name(n))), None)
    if name is None:
        raise ValueError(f"{layer!r} is not a scored neuron layer; scored: {', '.join(scores.layers)}")
    steps = min(timesteps, len(scores.norms[name]))
    x = scores.wanda(name, preserve=True)[:steps].mean(0).numpy()
    y = scores.wanda(name)[:steps].mean(0).numpy()
    chosen = np.zeros(len(x), dtype=bool)
    chosen[scores.skilled(share, timesteps, score)[name].numpy()] = True
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(2.8, 2.6))
        ax.scatter(x[~chosen], y[~chosen], s=3, c="#999999", alpha=0.5, linewidths=0, label="other neurons")
        ax.scatter(x[chosen], y[chosen], s=7, c=_HIGHLIGHT, linewidths=0, zorder=3,
                   label=f"skilled (top {_percent(share)}, {score})")
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        pad = 0.03 * ((hi - lo) or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", lw=0.6, ls="--", zorder=1)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
        when = "one pass" if steps == 1 == len(scores.norms[name]) else f"first {steps} steps"
        ax.set_xlabel(f"WANDA on the preserve prompts ({when})")
        ax.set_ylabel(f"WANDA on {scores.concept!r} prompts")
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(fontsize=6, loc="lower right", handletextpad=0.1, markerscale=1.5, framealpha=0.85,
                  edgecolor="none")
        ax.set_title(f"{_neuron_name(name)}: {int(chosen.sum())} of {len(x)} neurons skilled ({scores.concept})",
                     loc="left")
    return fig


@_detached
def neuron_counts(counts) -> Figure:
    """Skilled neurons per layer in network order (:meth:`workbench.neurons.NeuronScores.counts`), text-encoder
    layers and denoiser layers in two colours. A table of several concepts (a ``concept`` column, e.g. the
    counts of each concept concatenated) shows the mean over concepts with its 95% interval
    (:func:`workbench.stats.mean_interval`).

    >>> import pandas as pd
    >>> counts = pd.DataFrame(dict(concept=["a", "a", "b", "b"], layer=["text.0", "unet.mid.0"] * 2,
    ...                            component=["text", "unet"] * 2, skilled=[3, 5, 4, 9]))
    >>> fig = neuron_counts(counts)
    >>> len(fig.axes[0].patches), fig.axes[0].get_title(loc="left")
    (2, 'mean of 2 concepts, 95% CI')
    """
    from .stats import mean_interval
    missing = [c for c in ("layer", "component", "skilled") if c not in counts]
    if missing or counts.empty:
        raise ValueError("neuron_counts needs the rows of NeuronScores.counts() (columns layer, component, skilled)"
                         + (f"; missing {', '.join(missing)}" if missing else ""))
    key = "part" if "part" in counts else "layer"  # a DiT's double block has two FFNs (image, text stream)
    concepts = list(dict.fromkeys(counts["concept"])) if "concept" in counts else []
    rows = []
    for name, group in counts.groupby(key, sort=False):
        per = group.groupby("concept")["skilled"].sum() if len(concepts) > 1 else group["skilled"]
        mean, lo, hi = mean_interval(per.to_numpy(float)) if len(concepts) > 1 else (float(per.mean()), np.nan, np.nan)
        rows.append((_neuron_name(name), _is_text(group["component"].iloc[0]), mean, lo, hi))
    x = np.arange(len(rows))
    mean = np.array([r[2] for r in rows])
    err = np.nan_to_num(np.vstack([mean - [r[3] for r in rows], [r[4] for r in rows] - mean]))
    colours = [PALETTE[0] if r[1] else PALETTE[1] for r in rows]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(3.3, 0.22 * len(rows) + 1.0), 2.0))
        ax.bar(x, mean, 0.75, color=colours, yerr=err if len(concepts) > 1 else None,
               error_kw=dict(lw=0.6, capsize=1.2))
        ax.set_xticks(x, [r[0] for r in rows], rotation=60, ha="right")
        ax.set_ylabel("skilled neurons")
        ax.set_ylim(bottom=0)
        ax.spines[["top", "right"]].set_visible(False)
        kinds = [(PALETTE[0], "text encoder"), (PALETTE[1], "denoiser")]
        present = {r[1] for r in rows}
        handles = [plt.Rectangle((0, 0), 1, 1, color=c, label=label) for (c, label), text in zip(kinds, (True, False))
                   if text in present]
        ax.legend(handles=handles, frameon=False, fontsize=6, ncols=2, loc="lower right", bbox_to_anchor=(1, 1.0),
                  handlelength=1)
        if concepts:
            ax.set_title(concepts[0] if len(concepts) == 1 else f"mean of {len(concepts)} concepts, 95% CI",
                         loc="left", fontsize=7)
    return fig


@_detached
def prune_curve(table) -> Figure:
    """Efficacy and preservation of pruning (:func:`workbench.methods.prune.prune`) against the share of each
    layer's neurons pruned (log scale), one line per ``where`` (the neurons' place: ``"denoiser"``,
    ``"text"``), the mean over concepts (each concept's seeds averaged first) with its 95% interval as a band.
    ``table``: columns concept, where, share, efficacy, preservation (a sweep's rows).

    >>> import pandas as pd
    >>> table = pd.DataFrame(dict(concept=["a", "b"] * 4, where=["text"] * 4 + ["denoiser"] * 4,
    ...                           share=[0.01, 0.01, 0.1, 0.1] * 2, efficacy=[0.1, 0.2, 0.6, 0.8] * 2,
    ...                           preservation=[1.0, 0.9, 0.8, 0.7] * 2))
    >>> fig = prune_curve(table)
    >>> [ax.get_ylabel() for ax in fig.axes], len(fig.axes[0].lines)
    (['efficacy', 'preservation'], 2)
    """
    from .stats import mean_interval
    missing = [c for c in ("concept", "where", "share", "efficacy", "preservation") if c not in table]
    if missing or table.empty:
        raise ValueError("prune_curve needs rows with the columns concept, where, share, efficacy and preservation"
                         + (f"; missing {', '.join(missing)}" if missing else ""))
    runs = table.groupby(["where", "share", "concept"], sort=False)[["efficacy", "preservation"]].mean().reset_index()
    places = list(dict.fromkeys(table["where"]))
    shares = sorted(set(runs["share"].astype(float)))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(4.4, 1.9), sharex=True)
        for ax, value in zip(axes, ("efficacy", "preservation")):
            for i, place in enumerate(places):
                rows = runs[runs["where"] == place]
                points = [(s, *mean_interval(g[value].to_numpy(float), bounds=(0, 1)))
                          for s, g in rows.groupby("share", sort=True)]
                s, mean, lo, hi = (np.array(v, float) for v in zip(*points))
                colour = PALETTE[i % len(PALETTE)]
                ax.plot(s, mean, "o-", color=colour, ms=2.5, lw=0.9, label=place)
                ax.fill_between(s, lo, hi, color=colour, alpha=0.18, lw=0)
            ax.set_xscale("log")
            ax.set_xticks(shares, [_percent(s) for s in shares], rotation=45 if len(shares) > 5 else 0)
            ax.minorticks_off()
            ax.set_ylim(-0.03, 1.05)
            ax.set_ylabel(_LABELS[value])
            ax.set_xlabel("share of each layer's neurons")
            ax.spines[["top", "right"]].set_visible(False)
        concepts = table["concept"].nunique()
        axes[0].legend(frameon=False, fontsize=6, ncols=len(places), loc="lower left", bbox_to_anchor=(0, 1.0),
                       title=f"pruned neurons (mean of {concepts} concept{'s' * (concepts != 1)}, 95% CI)",
                       title_fontsize=6, alignment="left")
        fig.tight_layout(w_pad=1.0)
    return fig


@_detached
def head_grid(attribution) -> Figure:
    """Each attention head's effect on the judge's probability of the concept
    (:func:`workbench.heads.attribute`): layers as rows in network order, heads as columns, a diverging scale
    centred on 0 (red: the probability falls; a layer with fewer heads leaves its other cells grey).

    >>> import pandas as pd
    >>> from workbench.heads import HeadAttribution
    >>> table = pd.DataFrame(dict(component="unet", layer=["unet.mid.0"] * 4 + ["unet.up.0.0"] * 4,
    ...                           head=list(range(4)) * 2, probability=0.0,
    ...                           effect=[-0.4, 0.0, 0.1, -0.05, 0.0, 0.02, -0.2, 0.0]))
    >>> fig = head_grid(HeadAttribution("apple", "an apple", "ablate", 0.9, 0.9, 1, 0, table))
    >>> len(fig.axes), fig.axes[1].get_ylabel()
    (2, 'effect on P(concept)')
    """
    grid = attribution.grid()
    if grid.empty:
        raise ValueError("head_grid needs an attribution with at least one head (workbench.heads.attribute)")
    values = grid.to_numpy(float)
    top = max(float(np.nanmax(np.abs(values))), 1e-3)
    layers, heads = list(grid.index), [int(h) for h in grid.columns]
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#EEEEEE")
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(2.6, 0.14 * len(heads) + 1.9), 0.2 * len(layers) + 1.0))
        im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-top, vmax=top, aspect="auto",
                       interpolation="nearest")
        step = 1 if len(heads) <= 16 else 4
        ax.set_xticks(range(0, len(heads), step), [str(h) for h in heads[::step]])
        ax.set_xticks(range(len(heads)), minor=True)
        ax.set_yticks(range(len(layers)), layers, fontsize=6)
        ax.tick_params(length=0, which="both")
        text = sum(str(l).startswith("text") for l in layers)
        if 0 < text < len(layers):
            ax.axhline(text - 0.5, color="black", lw=0.8)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_xlabel("head")
        mode = getattr(attribution, "mode", "ablate")
        base = getattr(attribution, "baseline", float("nan"))
        start = "clean" if mode == "ablate" else "corrupted"
        ax.set_title(f"{getattr(attribution, 'concept', '')}: each head {'ablated' if mode == 'ablate' else 'restored'}"
                     f" (P {start} {base:.2f})", loc="left")
        fig.colorbar(im, ax=ax, pad=0.02, fraction=0.05 if len(heads) > 8 else 0.1).set_label("effect on P(concept)")
    return fig
