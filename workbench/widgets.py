"""Control panels for the notebooks: controls, a Run button with a progress bar, and an output area.

Each panel runs once when it is made (so "run all cells" shows a full result without a click) and
again on every click of Run. ``panel.result`` holds the last result, ``panel.set(**values)`` sets
controls from code, and ``panel.run()`` is what the button does.

A panel measures through the judge it is given (the toy oracle, a CLIP judge); without one it shows
images and the sizes of the edits. Concept choices come from the model's concept set, method knobs
start at the model's defaults (:func:`workbench.methods.defaults`), and part names, layers, spaces,
presets and sites are the model's own.

On a model whose world comes in several bundled models (the toy UNet ``"toy"`` and the toy DiT
``"toy-dit"``) the first control, ``model``, switches between them: the panel loads the other model
(once per session), keeps every setting still valid there and takes that model's defaults for the rest.

>>> import workbench
>>> from workbench.profile import profile_of
>>> from workbench.widgets import ErasePanel
>>> pipe = workbench.load("toy")
>>> panel = ErasePanel(pipe, profile_of(pipe).judge(), run=False)
>>> panel.set(concept="cat", method="uce").values()["method"], panel.values()["lam"]
('uce', 2.0)
>>> panel.set(model="toy-dit").values()["model"], type(panel.pipe).__name__, panel.values()["concept"]
('toy-dit', 'FluxPipeline', 'cat')
"""
from __future__ import annotations

import io
import traceback
from typing import Any, Callable, Mapping

import ipywidgets as w
import pandas as pd
import matplotlib.pyplot as plt
from IPython.display import Image, Markdown, display
from matplotlib.figure import Figure

from .anatomy import select
from .attnmaps import attention_maps, compare_table as attention_table, cross_attention_layers
from .attacks import ATTACKS, EVAL_SEEDS, attack as run_attack, unattacked
from .attacks.table import summary as attack_summary
from .embed import POOLS, spaces
from .families import family_of
from .grid import connect, run_grid, sweep_grid
from .heads import MODES as HEAD_MODES, attribute as attribute_heads, head_sites
from .judges import Judge
from .methods import METHODS, REGISTRY, Knob, View, defaults, erase, quick
from .methods.esd import presets as esd_presets
from .models import load
from . import neurons
from .plots import image_grid, method_comparison, subset_bars, sweep_heatmap
from .plots import attention_grid, trace_sites, trace_tokens
from .plots import head_grid, neuron_counts, neuron_scores
from .profile import profile_of
from .project import LandingMap
from .sampling import STEPS
from .report import before_after, compare, erase_and_measure, showcase
from .sweep import SUBSETS, aggregate, ffn_vs_attention, finding, layer_sweep, layers, scope, selectors
from .tracing import compare_table as trace_table, sites as trace_site_names, trace

_STYLE = {"description_width": "110px"}
#: The traits that make two controls the same control but for their value: a model switch replaces a
#: control only where one of these differs on the new model.
_SHAPE = ("options", "min", "max", "step", "base", "description", "placeholder", "tooltip", "rows", "readout_format")
#: Text controls that hold a part selector: on another model they keep it only where it still matches a part.
_SELECTORS = ("parts",)
#: Bundled models loaded by a panel's model switch, by (name, dtype, device): loaded once per session.
_LOADED: dict[tuple[str, str, str], Any] = {}


def _bundled(name: str, like) -> Any:
    """The bundled model ``name`` (:func:`workbench.load`) in ``like``'s dtype and on its device, loaded once."""
    dtype, device = getattr(like, "dtype", None), getattr(like, "device", None)
    key = (name, str(dtype), str(device))
    if key not in _LOADED:
        _LOADED[key] = load(name, dtype=dtype, device=device)
    return _LOADED[key]


def _display_data(item: Any) -> Any:
    """What the output area stores for ``item``: figures become PNG images (then are closed)."""
    if isinstance(item, Figure):
        buf = io.BytesIO()
        item.savefig(buf, format="png", dpi=150, bbox_inches="tight")
        plt.close(item)
        return Image(data=buf.getvalue(), format="png")
    return item


def _choices(control: w.ValueWidget) -> list[Any]:
    """The values a selection control offers (the value of a ``(label, value)`` option)."""
    return [o[1] if isinstance(o, tuple) else o for o in control.options]


def _concepts_control(pipe, value: tuple[str, ...]) -> w.SelectMultiple:
    names = profile_of(pipe).concept_set().names
    return w.SelectMultiple(options=names, value=tuple(v for v in value if v in names), description="concepts",
                            rows=5)


class Panel:
    """The shared frame of every panel; subclasses define ``controls``, ``compute`` and ``show``."""

    title = ""

    def __init__(self, pipe, judge: Judge | None = None, run: bool = True, **values: Any) -> None:
        self.pipe, self.judge = pipe, judge
        self._pipes = {profile_of(pipe).name: pipe}  # the pipeline given stays the one for its model
        self.controls: dict[str, w.ValueWidget] = self.make_controls()
        self._defaults = {name: c.value for name, c in self.controls.items()}
        profile = profile_of(pipe)
        if len(profile.models) > 1 and profile.name in profile.models:
            model = w.Dropdown(options=list(profile.models), value=profile.name, description="model",
                               tooltip="the bundled model to run on")
            model.observe(lambda change: self._switch(change.new), names="value")
            self.controls = {"model": model, **self.controls}
        for c in self.controls.values():
            self._dress(c)
        self.button = w.Button(description="Run", button_style="primary", icon="play",
                               tooltip="run with the settings above")
        self.progress = w.IntProgress(value=0, min=0, max=1, description="", layout=w.Layout(width="240px"))
        self.status = w.HTML()
        self.output = w.Output()
        self.result: Any = None
        self.error: BaseException | None = None
        self.button.on_click(lambda _: self.run())
        self._grid = w.GridBox(list(self.controls.values()),
                               layout=w.Layout(grid_template_columns="repeat(2, 340px)", grid_gap="2px 12px"))
        self.widget = w.VBox([
            w.HTML(f"<b>{self.title}</b>"),
            self._grid,
            w.HBox([self.button, self.progress, self.status]),
            self.output,
        ])
        self.set(**values)
        if run:
            self.run()

    # what subclasses provide
    def make_controls(self) -> dict[str, w.ValueWidget]:
        """The controls for ``self.pipe``, at its defaults (called again on a model switch)."""
        raise NotImplementedError

    def compute(self, step: Callable[[str], None], **values: Any) -> Any:
        raise NotImplementedError

    def show(self, result: Any) -> list[Any]:
        """What to put in the output area: figures, tables, text."""
        raise NotImplementedError

    def stages(self, values: dict[str, Any]) -> int:
        """How many times ``compute`` will call ``step`` (the progress bar's length)."""
        return 1

    def sync(self) -> None:
        """Make the controls agree with each other, after ``set`` or a model switch (e.g. show a method's knobs)."""

    # the frame
    @staticmethod
    def _dress(control: w.ValueWidget) -> None:
        control.style = _STYLE
        control.layout = w.Layout(width="320px")  # one Layout per control: hiding one must not hide all

    def set(self, **values: Any) -> "Panel":
        """Set controls by name (``model`` first: it decides the others' options); an unknown name or a value
        a control refuses raises ``ValueError``."""
        if "model" in values:
            values = {"model": values.pop("model"), **values}
        for name, value in values.items():
            if name not in self.controls:
                raise ValueError(f"{type(self).__name__} has no control {name!r}; "
                                 f"its controls are {', '.join(self.controls)}")
            control = self.controls[name]
            if getattr(control, "options", None) is not None and not isinstance(control, w.Text):
                labels = _choices(control)
                wanted = value if isinstance(value, (tuple, list)) else [value]
                missing = [v for v in wanted if v not in labels]
                if missing:
                    raise ValueError(f"{name} cannot be {missing[0]!r}; choose from {', '.join(map(str, labels))}")
            control.value = tuple(value) if isinstance(value, list) else value
        self.sync()
        return self

    def values(self) -> dict[str, Any]:
        """The controls' current values."""
        return {name: c.value for name, c in self.controls.items()}

    def _switch(self, name: str) -> None:
        """Run on the bundled model ``name``: its pipeline, the judge that goes with it, its controls."""
        old = profile_of(self.pipe)
        if name == old.name:
            return
        try:
            pipe = self._pipes[name] if name in self._pipes else _bundled(name, self.pipe)
        except Exception:
            self.controls["model"].value = old.name  # the switch did not happen: say so
            raise
        self._pipes[name] = pipe
        if self.judge is not None and self.judge is old._judge:
            self.judge = profile_of(pipe).judge()
        self.pipe = pipe
        self._rebuild()
        self.status.value = f"now on {name}: press Run"

    def _rebuild(self) -> None:
        """Remake the controls for ``self.pipe``: a control left at the old model's default takes the new
        model's, any other keeps its value where still valid; a control whose options changed is replaced."""
        fresh = self.make_controls()
        controls = {"model": self.controls["model"]} if "model" in self.controls else {}
        wanted: dict[str, Any] = {}
        for name, new in fresh.items():
            old = self.controls.get(name)
            wanted[name] = new.value
            if old is not None and old.value != self._defaults.get(name) and self._valid(name, new, old.value):
                wanted[name] = (tuple(v for v in old.value if v in _choices(new))
                                if isinstance(new, w.SelectMultiple) else old.value)
            same = old is not None and type(old) is type(new) and all(
                getattr(old, t, None) == getattr(new, t, None) for t in _SHAPE)
            if not same:
                self._dress(new)
            controls[name] = old if same else new
        self.controls = controls
        self._defaults = {name: c.value for name, c in fresh.items()}
        for name, value in wanted.items():  # after the swap, so that observers see the new controls
            self.controls[name].value = value
        self._grid.children = list(self.controls.values())
        self.sync()

    def _valid(self, name: str, control: w.ValueWidget, value: Any) -> bool:
        """Whether ``control`` (one made for ``self.pipe``) can hold ``value``."""
        if isinstance(control, w.SelectMultiple):
            return not value or any(v in _choices(control) for v in value)
        if getattr(control, "options", None) is not None:
            return value in _choices(control)
        if isinstance(control, w.FloatLogSlider):
            return control.base ** control.min <= value <= control.base ** control.max
        if hasattr(control, "min") and hasattr(control, "max"):
            return control.min <= value <= control.max
        if isinstance(control, w.Text) and name in _SELECTORS and value.strip():
            try:
                select(self.pipe, value.strip())
            except KeyError:
                return False
        return True

    def _step(self, label: str) -> None:
        self.progress.value = min(self.progress.max, self.progress.value + 1)
        self.status.value = label

    def run(self) -> Any:
        """Compute with the current values and show the result in the output area."""
        values = {name: v for name, v in self.values().items() if name != "model"}  # the model is self.pipe
        self.button.disabled = True
        self.progress.max, self.progress.value = max(1, self.stages(values)), 0
        self.progress.bar_style = ""
        self.error = None
        try:
            result = self.compute(self._step, **values)
        except Exception as exc:  # shown in the panel, kept on .error; the notebook keeps running
            self.error = exc
            self.progress.bar_style = "danger"
            self.status.value = f"<span style='color:#D55E00'>{type(exc).__name__}: {exc}</span>"
            self.output.outputs = ()
            self.output.append_stderr("".join(traceback.format_exception_only(type(exc), exc)))
            return None
        finally:
            self.button.disabled = False
        self.result = result
        self.progress.value, self.progress.bar_style = self.progress.max, "success"
        self.status.value = self.summary(result) or "done"
        self.output.outputs = ()
        for item in self.show(result):
            self.output.append_display_data(_display_data(item))
        return result

    def summary(self, result: Any) -> str:
        """A one-line description of ``result`` for the status line."""
        return ""

    def _ipython_display_(self) -> None:
        display(self.widget)


def _knob_control(knob: Knob, value: Any) -> w.ValueWidget:
    """The slider of a registered method's knob (:class:`workbench.methods.Knob`), at ``value``."""
    if knob.kind == "int":
        return w.IntSlider(value=value, min=knob.low, max=knob.high, description=knob.label)
    return w.FloatLogSlider(value=value, base=10, min=knob.low, max=knob.high, description=knob.label,
                            readout_format=knob.readout)


def _knob_controls(pipe, method: str) -> dict[str, w.ValueWidget]:
    """The sliders of ``method``'s registered knobs, at the model's defaults, by control name."""
    start = defaults(pipe, method)
    return {k.control: _knob_control(k, start[k.name]) for k in REGISTRY[method].knobs}


def _concept_control(pipe, value: str = "apple") -> w.ValueWidget:
    """A dropdown of the model's concepts, or a text field for a model without a concept set."""
    concepts = profile_of(pipe).concepts
    if concepts is not None:
        return w.Dropdown(options=concepts.names, value=value if value in concepts else concepts.names[0],
                          description="concept")
    return w.Text(value=value, description="concept", continuous_update=False)


class ErasePanel(Panel):
    """Erase one concept, then show before/after images and the judge's accuracy table and bars.

    Without a judge (e.g. Stable Diffusion with no CLIP judge given) it shows the images and the size of
    the edit per part.
    """

    title = "Erase a concept"
    #: The method each knob control belongs to, and the knob's name there (from the methods' registrations).
    KNOBS: Mapping[str, tuple[str, str]] = View(lambda: {k.control: (m.name, k.name) for m in REGISTRY.values()
                                                         for k in m.knobs})

    def make_controls(self) -> dict[str, w.ValueWidget]:
        controls = {
            "concept": _concept_control(self.pipe),
            "method": w.Dropdown(options=list(METHODS), value="rece", description="method"),
            "parts": w.Text(value="", placeholder=f"method default, e.g. {scope(self.pipe, 'uce')[0]}",
                            description="parts", continuous_update=False),
            **{name: c for method in REGISTRY for name, c in _knob_controls(self.pipe, method).items()},
            "per_prompt": w.IntSlider(value=4, min=1, max=8, description="images/concept"),
            "seed": w.BoundedIntText(value=0, min=0, max=2**31 - 1, description="seed"),
        }
        controls["method"].observe(lambda _: self.sync(), names="value")
        return controls

    def sync(self) -> None:
        """Show only the chosen method's knobs."""
        method = self.controls["method"].value
        for name, (owner, _) in self.KNOBS.items():
            self.controls[name].layout.display = "" if owner == method else "none"

    def stages(self, values: dict[str, Any]) -> int:
        return 3

    def compute(self, step: Callable[[str], None], concept: str, method: str, parts: str, per_prompt: int,
                seed: int, **knobs: Any) -> dict[str, Any]:
        mine = {self.KNOBS[name][1]: v for name, v in knobs.items() if self.KNOBS[name][0] == method}
        scope = parts.strip() or None
        if self.judge is not None:
            step("erasing and measuring")
            result = erase_and_measure(self.pipe, self.judge, concept, method, scope, per_prompt=per_prompt,
                                       seed=seed, progress=False, **mine)
            edit = result.edit
        else:
            step("erasing")
            result, edit = None, erase(self.pipe, concept, method, scope, seed=seed, progress=False, **mine)
        step("drawing before and after")
        grid = before_after(self.pipe, edit, showcase(self.pipe, concept), n=per_prompt, seed=seed)
        step("done")
        return {"edit": edit, "measured": result, "grid": grid}

    def summary(self, result: dict[str, Any]) -> str:
        edit, measured = result["edit"], result["measured"]
        text = f"{edit.method} erased {edit.concept!r} in {edit.seconds:.2f} s"
        if measured is not None:
            text += (f"; accuracy on it {measured.before[measured.concept]:.0%} &rarr; {measured.after[measured.concept]:.0%}, "
                     f"preservation {measured.preservation:.0%}")
        return text

    def show(self, result: dict[str, Any]) -> list[Any]:
        measured = result["measured"]
        if measured is None:
            return [result["grid"], result["edit"].summary(self.pipe)]
        table = measured.printed().style.hide(axis="index")
        return [result["grid"], table, measured.figure()]


class ComparePanel(Panel):
    """RECE, UCE and few-shot on the same concepts: the table and figure a paper would print."""

    title = "Compare erasure methods"

    def make_controls(self) -> dict[str, w.ValueWidget]:
        return {
            "concepts": _concepts_control(self.pipe, ("apple", "car", "van gogh")),
            "methods": w.SelectMultiple(options=list(METHODS), value=quick(), description="methods", rows=4),
            "per_prompt": w.IntSlider(value=4, min=1, max=8, description="images/concept"),
            "seed": w.BoundedIntText(value=0, min=0, max=2**31 - 1, description="seed"),
        }

    def stages(self, values: dict[str, Any]) -> int:
        return len(values["concepts"]) * len(values["methods"])

    def compute(self, step: Callable[[str], None], concepts: tuple[str, ...], methods: tuple[str, ...],
                per_prompt: int, seed: int) -> Any:
        if not concepts or not methods:
            raise ValueError("select at least one concept and one method (ctrl/cmd-click to select several)")
        return compare(self.pipe, self.judge, concepts, methods, per_prompt=per_prompt, seed=seed, on_step=step)

    def summary(self, table: Any) -> str:
        best = table.groupby("method")["after"].mean().idxmin()
        return f"{len(table)} erasures; lowest mean accuracy on the erased concept: {best}"

    def show(self, table: Any) -> list[Any]:
        fmt = {"before": "{:.0%}", "after": "{:.0%}", "preservation": "{:.0%}", "seconds": "{:.2f}",
               "dW": "{:.3g}", "relative dW": "{:.2%}", "efficacy": "{:.0%}"}
        return [method_comparison(table), table.style.format(fmt).hide(axis="index")]


class SweepPanel(Panel):
    """Erase one concept through one layer's component at a time (or layers 0..i): heatmap and table.

    With a ``cluster`` (``local:2``, ``tcp://host:8786``) the same runs go to Dask workers as a grid
    (:mod:`workbench.grid`), each measured by the model's own judge, into a resumable results folder;
    the status line links Dask's dashboard.
    """

    title = "Erase layer by layer"

    def make_controls(self) -> dict[str, w.ValueWidget]:
        return {
            "concept": _concept_control(self.pipe),
            "method": w.Dropdown(options=list(METHODS), value="fewshot", description="method"),
            "cumulative": w.Checkbox(value=False, description="layers 0..i", indent=False),
            "value": w.Dropdown(options=["efficacy", "preservation", "drift", "dW_relative", "seconds"],
                                value="efficacy", description="colour"),
            "seeds": w.IntSlider(value=1, min=1, max=5, description="seeds"),
            "per_prompt": w.IntSlider(value=8, min=1, max=16, description="images/run"),
            "cluster": w.Text(value="", placeholder="this process; or local:2, tcp://host:8786",
                              description="Dask cluster", continuous_update=False),
            "results": w.Text(value="out/sweeps", description="results folder", continuous_update=False),
        }

    def stages(self, values: dict[str, Any]) -> int:
        method = values["method"]
        runs = sum(bool(selectors(self.pipe, layer, component)) for layer in layers(self.pipe, method)
                   for component in scope(self.pipe, method)[1])
        return values["seeds"] * runs

    def compute(self, step: Callable[[str], None], concept: str, method: str, cumulative: bool, value: str,
                seeds: int, per_prompt: int, cluster: str, results: str) -> Any:
        measure = self.judge is not None
        settings = dict(per_prompt=per_prompt, per_other=max(1, per_prompt // 2))
        value = value if measure or value in ("dW_relative", "seconds") else "dW_relative"
        if cluster.strip():
            return self._on_cluster(step, cluster.strip(), results.strip() or "out/sweeps", value,
                                    sweep_grid(self.pipe, concept, method, cumulative, range(seeds),
                                               settings if measure else False))
        table = layer_sweep(self.pipe, concept, method, cumulative=cumulative, seeds=range(seeds),
                            judge=self.judge, measure=measure, progress=False, on_run=step, **settings)
        return {"table": table, "value": value, "dashboard": None}

    def _on_cluster(self, step: Callable[[str], None], cluster: str, folder: str, value: str,
                    grid: dict[str, Any]) -> dict[str, Any]:
        client, close = connect(cluster)
        try:
            link = client.dashboard_link
            board = f" &middot; <a href='{link}' target='_blank'>Dask dashboard</a>"
            self.status.value = f"planning on {cluster}{board}"
            table = run_grid(grid, folder, cluster=client, progress=False, on_run=lambda run: step(run + board),
                             log=lambda _: None)
        finally:
            close()
        failed = table[table["error"].notna()]
        if len(failed):
            raise RuntimeError(f"{len(failed)} of {len(table)} runs failed (rows in {folder}); the first: "
                               f"{failed['error'].iloc[0]}")
        return {"table": table, "value": value, "dashboard": link}

    def summary(self, result: dict[str, Any]) -> str:
        table, link = result["table"], result.get("dashboard")
        where = f" on Dask (<a href='{link}' target='_blank'>dashboard</a>)" if link else ""
        if "efficacy" not in table:
            return f"{len(table)} runs{where} (no judge: sizes of the edits only)"
        best = table.loc[table["efficacy"].idxmax()]
        return (f"{len(table)} runs{where}; strongest single erasure: {best['part']} "
                f"(efficacy {best['efficacy']:.0%}: accuracy on the concept {best['accuracy']:.0%})")

    def show(self, result: dict[str, Any]) -> list[Any]:
        table = result["table"]
        cols = [c for c in ("part", "component", "layer", "seed", "efficacy", "preservation", "drift", "dW",
                            "dW_relative", "seconds") if c in table]
        link = result.get("dashboard")
        board = [Markdown(f"Dask dashboard: [{link}]({link})")] if link else []
        return [*board, sweep_heatmap(table, result["value"]), table[cols].round(3)]


class LandingPanel(Panel):
    """Where an erased concept lands: a UMAP map with arrows, and its nearest words after the edit."""

    title = "Where the erased concept lands"

    def make_controls(self) -> dict[str, w.ValueWidget]:
        controls = {
            "concept": _concept_control(self.pipe),
            "method": w.Dropdown(options=list(METHODS), value="rece", description="method"),
            "space": w.Dropdown(options=spaces(self.pipe), value=self._space_for("rece"), description="space"),
            "pool": w.Dropdown(options=list(POOLS), value="mean", description="pool"),
            "k": w.IntSlider(value=8, min=1, max=20, description="neighbours"),
            "seed": w.BoundedIntText(value=0, min=0, max=2**31 - 1, description="UMAP seed"),
        }
        # UCE and RECE leave the text encoder alone: follow the method to a space where its edit shows
        controls["method"].observe(lambda change: setattr(self.controls["space"], "value",
                                                          self._space_for(change.new)), names="value")
        return controls

    def _space_for(self, method: str) -> str:
        if scope(self.pipe, method)[0].startswith("text"):
            return "text"
        entries = family_of(self.pipe).text_entries(self.pipe)
        keys = [s for s in spaces(self.pipe) if s in entries and not s.endswith(".v")]
        return keys[len(keys) // 2] if keys else "text"

    def stages(self, values: dict[str, Any]) -> int:
        return 3

    def compute(self, step: Callable[[str], None], concept: str, method: str, space: str, pool: str, k: int,
                seed: int) -> Any:
        edit = erase(self.pipe, concept, method, progress=False)
        step("erased")
        umap = LandingMap.fit(self.pipe, space=space, pool=pool, seed=seed)
        step("map fitted")
        table = umap.landing(self.pipe, edit, concept, k=k)
        figure = umap.figure(self.pipe, edit, [concept], title=f"{method} erases {concept!r} ({space})")
        step("done")
        return {"edit": edit, "map": umap, "table": table, "figure": figure}

    def summary(self, result: dict[str, Any]) -> str:
        table = result["table"]
        return f"after the edit, {result['edit'].concept!r} sits nearest to {table['neighbour'].iloc[0]!r}"

    def show(self, result: dict[str, Any]) -> list[Any]:
        return [result["figure"], result["table"].round(3)]


class SubsetPanel(Panel):
    """Few-shot erasure through FFN only, attention only, FFN + last attention, or everything."""

    title = "FFN versus attention"

    def make_controls(self) -> dict[str, w.ValueWidget]:
        return {
            "concepts": _concepts_control(self.pipe, ("apple", "car", "cat")),
            "seeds": w.IntSlider(value=3, min=1, max=5, description="seeds"),
            **_knob_controls(self.pipe, "fewshot"),
            "per_prompt": w.IntSlider(value=8, min=1, max=16, description="images/run"),
        }

    def stages(self, values: dict[str, Any]) -> int:
        return len(values["concepts"]) * values["seeds"] * len(SUBSETS)

    def compute(self, step: Callable[[str], None], concepts: tuple[str, ...], seeds: int, per_prompt: int,
                **knobs: Any) -> Any:
        if not concepts:
            raise ValueError("select at least one concept (ctrl/cmd-click to select several)")
        names = {k.control: k.name for k in REGISTRY["fewshot"].knobs}
        table = ffn_vs_attention(self.pipe, concepts, seeds=range(seeds), judge=self.judge,
                                 **{names[c]: v for c, v in knobs.items()}, per_prompt=per_prompt,
                                 per_other=max(1, per_prompt // 2), progress=False, on_run=step)
        return {"table": table, "summary": aggregate(table),
                "finding": finding(table, profile_of(self.pipe).concept_set())}

    def summary(self, result: dict[str, Any]) -> str:
        return result["finding"].splitlines()[0]

    def show(self, result: dict[str, Any]) -> list[Any]:
        return [subset_bars(result["table"]), result["summary"].round(3), Markdown(result["finding"])]


class AttackPanel(Panel):
    """Erase a concept, attack the erasure, and show what comes back: images of the held-out prompts on
    the unedited model, the erased model and under the attack (first evaluation seed), and the success
    rates with their 95% intervals over every evaluation seed."""

    title = "Does it come back? Attack an erasure"

    def make_controls(self) -> dict[str, w.ValueWidget]:
        return {
            "concept": _concept_control(self.pipe),
            "method": w.Dropdown(options=list(METHODS), value="rece", description="method"),
            "attack": w.Dropdown(options=list(ATTACKS), value="derived", description="attack"),
            "budget": w.IntSlider(value=40, min=1, max=400, description="budget (steps / etas)"),
            "seeds": w.IntSlider(value=2, min=1, max=len(EVAL_SEEDS), description="evaluation seeds"),
        }

    def stages(self, values: dict[str, Any]) -> int:
        return 3

    def compute(self, step: Callable[[str], None], concept: str, method: str, attack: str, budget: int,
                seeds: int) -> Any:
        if self.judge is None:
            raise ValueError("an attack is judged: pass a judge, e.g. AttackPanel(pipe, profile_of(pipe).judge())")
        eval_seeds = EVAL_SEEDS[:seeds]
        edit = erase(self.pipe, concept, method, progress=False)
        step(f"erased {concept} with {method}")
        plain, images = unattacked(self.pipe, edit, concept, self.judge, eval_seeds)
        step("judged the unedited and the erased model")
        result = run_attack(self.pipe, edit, concept, self.judge, attack,
                            None if attack == "derived" else budget, eval_seeds=eval_seeds)
        step(f"{attack}: {result.rate}")
        table = pd.concat([plain, result.table], ignore_index=True).assign(method=method)
        return {"edit": edit, "images": images, "attack": result, "rates": attack_summary(table)}

    def summary(self, result: dict[str, Any]) -> str:
        r = result["attack"]
        return f"{r.name} on {r.concept}: {r.rate}"

    def show(self, result: dict[str, Any]) -> list[Any]:
        r = result["attack"]
        m = len(r.crafted.prompts)
        rows = [result["images"]["unedited"][:m], result["images"]["none"][:m], r.images[:m]]
        grid = image_grid(rows, ["unedited", "erased", r.name], [p[:28] for p in r.table["prompt"][:m]])
        rates = result["rates"][["attack", "rate", "lo", "hi", "k", "n", "units"]].round(3)
        return [grid, rates, Markdown("Attack prompts: " + "; ".join(f"`{p}`" for p in r.crafted.prompts))]


def _erasures() -> list[str]:
    """The erasures a localisation panel compares against the unedited model ("none": only the unedited one)."""
    return ["none", *REGISTRY]


class EsdPanel(Panel):
    """ESD through a preset or any selector of the denoiser's parts (UNet or transformer): before/after
    images, the judge's table and bars."""

    title = "Erase with ESD (fine-tuning the denoiser)"

    def make_controls(self) -> dict[str, w.ValueWidget]:
        start, presets = defaults(self.pipe, "esd"), esd_presets(self.pipe)
        return {
            "concept": _concept_control(self.pipe),
            "preset": w.Dropdown(options=list(presets), value=start["preset"], description="preset",
                                 tooltip="; ".join(f"{k}: {v}" for k, v in presets.items())),
            "parts": w.Text(value="", placeholder=f"the preset's, or e.g. {scope(self.pipe, 'esd')[0]}",
                            description="parts", continuous_update=False),
            "iterations": w.IntSlider(value=start["iterations"], min=1, max=400, description="iterations"),
            "lr": w.FloatLogSlider(value=start["lr"], base=10, min=-6, max=-3, description="lr", readout_format=".0e"),
            "eta": w.FloatSlider(value=start["eta"], min=0.0, max=3.0, step=0.1, description="eta"),
            "per_prompt": w.IntSlider(value=4, min=1, max=8, description="images/concept"),
            "seed": w.BoundedIntText(value=0, min=0, max=2**31 - 1, description="seed"),
        }

    def stages(self, values: dict[str, Any]) -> int:
        return 2

    def compute(self, step: Callable[[str], None], concept: str, preset: str, parts: str, iterations: int,
                lr: float, eta: float, per_prompt: int, seed: int) -> dict[str, Any]:
        knobs = dict(preset=preset, iterations=iterations, lr=lr, eta=eta, seed=seed, progress=False)
        scope = parts.strip() or None
        if self.judge is not None:
            measured = erase_and_measure(self.pipe, self.judge, concept, "esd", scope, per_prompt=per_prompt, **knobs)
            edit = measured.edit
        else:
            measured, edit = None, erase(self.pipe, concept, "esd", scope, **knobs)
        step(f"trained {len(edit.parts)} parts")
        grid = before_after(self.pipe, edit, showcase(self.pipe, concept), n=per_prompt, seed=seed)
        return {"edit": edit, "measured": measured, "grid": grid}

    def summary(self, result: dict[str, Any]) -> str:
        edit, measured = result["edit"], result["measured"]
        text = f"ESD trained {len(edit.parts)} parts in {edit.seconds:.1f} s"
        if measured is not None:
            text += (f"; accuracy on {measured.concept!r} {measured.before[measured.concept]:.0%} &rarr; "
                     f"{measured.after[measured.concept]:.0%}, preservation {measured.preservation:.0%}")
        return text

    def show(self, result: dict[str, Any]) -> list[Any]:
        measured = result["measured"]
        if measured is None:
            return [result["grid"], result["edit"].summary(self.pipe)]
        table = measured.printed().style.hide(axis="index")
        return [result["grid"], table, measured.figure()]


class TracePanel(Panel):
    """Causal tracing: which text-encoder layers and denoiser blocks (UNet or transformer) carry a concept,
    before and after an erasure (heatmaps of the judge's probability with each site restored; per token,
    optionally)."""

    title = "Where does the concept live? Causal tracing"

    def make_controls(self) -> dict[str, w.ValueWidget]:
        return {
            "concept": _concept_control(self.pipe),
            "prompt": w.Text(value="", placeholder="the concept set's probe, e.g. 'an apple'", description="prompt",
                             continuous_update=False),
            "method": w.Dropdown(options=_erasures(), value="rece", description="erasure"),
            "sites": w.SelectMultiple(options=trace_site_names(self.pipe), value=(), description="sites (all)",
                                      rows=5),
            "n": w.IntSlider(value=4, min=1, max=8, description="images/run"),
            "tokens": w.Checkbox(value=False, description="per token", indent=False),
            "seed": w.BoundedIntText(value=0, min=0, max=2**31 - 1, description="seed"),
        }

    def stages(self, values: dict[str, Any]) -> int:
        return 1 if values["method"] == "none" else 3

    def compute(self, step: Callable[[str], None], concept: str, prompt: str, method: str, sites: tuple[str, ...],
                n: int, tokens: bool, seed: int) -> dict[str, Any]:
        if self.judge is None:
            raise ValueError("a trace is scored by a judge: pass one, e.g. TracePanel(pipe, profile_of(pipe).judge())")
        options = dict(prompt=prompt.strip() or None, judge=self.judge, sites=list(sites) or None, n=n,
                       tokens=tokens, seed=seed)
        traces = {"before": trace(self.pipe, concept, **options)}
        step("traced the unedited model")
        if method != "none":
            edit = erase(self.pipe, concept, method, progress=False)
            step(f"erased with {method}")
            with edit.apply(self.pipe):
                traces[f"after {method}"] = trace(self.pipe, concept, **options)
            step("traced the erased model")
        return {"traces": traces, "tokens": tokens}

    def summary(self, result: dict[str, Any]) -> str:
        before = result["traces"]["before"]
        best = before.layers().sort_values("effect").iloc[-1]
        return (f"{before.prompt!r}: P({before.concept}) clean {before.clean:.2f}, corrupted {before.corrupted:.2f}; "
                f"restoring {best['site']} brings it to {best['probability']:.2f}")

    def show(self, result: dict[str, Any]) -> list[Any]:
        traces = result["traces"]
        shown: list[Any] = [trace_sites(list(traces.values()), list(traces))]
        if result["tokens"]:
            shown += [trace_tokens(t, f"{name}: {t.prompt!r}") for name, t in traces.items()]
        return shown + [trace_table(traces).round(2)]


class AttentionPanel(Panel):
    """Attention maps of a word where text meets image (a UNet's cross-attention, a transformer's joint
    attention), per layer and summed, before and after an erasure, beside the images."""

    title = "Where does the model look? Attention maps"

    def make_controls(self) -> dict[str, w.ValueWidget]:
        return {
            "concept": _concept_control(self.pipe),
            "prompt": w.Text(value="", placeholder="the concept set's probe, e.g. 'an apple'", description="prompt",
                             continuous_update=False),
            "word": w.Text(value="", placeholder="the concept", description="word", continuous_update=False),
            "method": w.Dropdown(options=_erasures(), value="rece", description="erasure"),
            "layer": w.Dropdown(options=["all", *cross_attention_layers(self.pipe)], value="all", description="layer"),
            "seed": w.BoundedIntText(value=0, min=0, max=2**31 - 1, description="seed"),
        }

    def stages(self, values: dict[str, Any]) -> int:
        return 1 if values["method"] == "none" else 2

    def compute(self, step: Callable[[str], None], concept: str, prompt: str, word: str, method: str, layer: str,
                seed: int) -> dict[str, Any]:
        prompt = prompt.strip() or showcase(self.pipe, concept)[0]
        options = dict(seed=seed, layers=None if layer == "all" else [layer])
        maps = {"before": attention_maps(self.pipe, prompt, word.strip() or concept, **options)}
        if method != "none":
            edit = erase(self.pipe, concept, method, progress=False)
            step(f"erased with {method}")
            with edit.apply(self.pipe):
                maps[f"after {method}"] = attention_maps(self.pipe, prompt, word.strip() or concept, **options)
        step("recorded")
        return maps

    def summary(self, maps: dict[str, Any]) -> str:
        return "; ".join(f"{name}: mean attention to {m.word!r} {m.total.mean():.2f} (sum of layers)"
                         for name, m in maps.items())

    def show(self, maps: dict[str, Any]) -> list[Any]:
        return [attention_grid(list(maps.values()), list(maps)), attention_table(maps).round(3)]


#: The head choices of :class:`NeuronPanel` besides single layers: every layer where text meets image (a
#: UNet's cross-attention, a transformer's joint attention), every text-encoder self-attention layer, none.
_HEAD_GROUPS = ("cross-attention", "text encoder", "none")


def _middle_neuron_layer(pipe) -> str:
    """The denoiser's middle feed-forward layer: a UNet's mid block, else the middle one of the image side."""
    found = neurons.neuron_layers(pipe)
    image = [n for n, l in found.items() if not l.component.endswith(".text")] or list(found)
    return next((n for n in image if ".mid." in n), image[len(image) // 2])


class NeuronPanel(Panel):
    """Which neurons and heads carry a concept: the concept's WANDA scores of every feed-forward neuron
    (:mod:`workbench.neurons`; the chosen layer's neurons against the preserve prompts, and the skilled
    neurons per layer, what :func:`workbench.methods.prune.prune` zeroes), then each attention head's
    effect on the judge's probability of the concept (:func:`workbench.heads.attribute`): the concept's word
    hidden under noise with one head's clean output restored (``mode="restore"``), or the clean prompt with
    one head zeroed (``"ablate"``).

    The neuron scores draw the concept set's prompts (the concept's and every other concept's, as
    :func:`~workbench.methods.prune.prune` does) once per model and sampling steps: later runs reuse them.
    Heads cost one image per head and ``n``: the text encoder's 72 heads (the default) take seconds to a
    minute on a CPU, every cross-attention head of the toy (7 x 32) at 20 steps about two minutes; one layer
    (``heads="unet.mid.0"``) or ``"none"`` is quicker.
    """

    title = "Which neurons and heads carry a concept?"

    def make_controls(self) -> dict[str, w.ValueWidget]:
        return {
            "concept": _concept_control(self.pipe),
            "layer": w.Dropdown(options=list(neurons.neuron_layers(self.pipe, "*")),
                                value=_middle_neuron_layer(self.pipe), description="neuron layer",
                                tooltip="the layer whose neurons the scatter shows (every layer is scored)"),
            "score": w.Dropdown(options=list(neurons.SCORES), value="wanda", description="score",
                                tooltip="wanda: on the concept's prompts; contrastive: minus the preserve prompts'"),
            "share": w.FloatLogSlider(value=neurons.SHARE, base=10, min=-3, max=0, description="share per step",
                                      readout_format=".1%"),
            "timesteps": w.IntSlider(value=neurons.TIMESTEPS, min=1, max=20, description="first steps"),
            "heads": w.Dropdown(options=[*_HEAD_GROUPS, *head_sites(self.pipe)], value="text encoder",
                                description="heads", tooltip="the attention layers whose heads are measured one "
                                "by one: the text encoder's, where text meets image, one layer, or none"),
            "mode": w.Dropdown(options=list(HEAD_MODES), value="restore", description="head mode",
                               tooltip="restore: one head's clean output into the run with the word hidden; "
                               "ablate: one head zeroed in the clean run"),
            "n": w.IntSlider(value=1, min=1, max=4, description="images/head"),
            "steps": w.IntSlider(value=STEPS, min=1, max=50, description="sampling steps",
                                 tooltip="denoising steps of every image drawn (fewer: a quicker, rougher look)"),
        }

    def head_layers(self, heads: str) -> list[str]:
        """The attention layers the ``heads`` choice names, in network order."""
        sites = head_sites(self.pipe)
        if heads == "none":
            return []
        if heads in _HEAD_GROUPS:
            text = heads == "text encoder"
            return [name for name, site in sites.items() if (site.component == "text") == text]
        return [heads]

    def stages(self, values: dict[str, Any]) -> int:
        sites = head_sites(self.pipe)
        return 1 + sum(sites[name].heads for name in self.head_layers(values["heads"]))

    def compute(self, step: Callable[[str], None], concept: str, layer: str, score: str, share: float,
                timesteps: int, heads: str, mode: str, n: int, steps: int) -> dict[str, Any]:
        neurons.check_share(share)
        if timesteps < 1:
            raise ValueError(f"timesteps (the first steps whose skilled neurons are united) must be at least 1, "
                             f"not {timesteps}")
        layers = self.head_layers(heads)
        if layers and self.judge is None:
            raise ValueError("heads are scored by a judge: pass one, e.g. NeuronPanel(pipe, profile_of(pipe).judge()),"
                             " or set heads to none")
        found = neurons.scores(self.pipe, concept, parts="*", steps=steps)
        counts = found.counts(share, timesteps, score).assign(concept=concept)
        step(f"scored the neurons of {len(counts)} layers")
        attribution = None
        if layers:
            done = [0]

            def progress(measured: int, total: int) -> None:
                for _ in range(measured - done[0]):
                    step(f"heads: {measured} of {total} measured")
                done[0] = max(done[0], measured)
            attribution = attribute_heads(self.pipe, concept, self.judge, layers=layers, mode=mode, n=n,
                                          steps=steps, progress=progress)
        return {"scores": found, "counts": counts, "attribution": attribution, "layer": layer, "score": score,
                "share": share, "timesteps": timesteps}

    def summary(self, result: dict[str, Any]) -> str:
        counts = result["counts"]
        text = (f"{result['scores'].concept}: {int(counts['skilled'].sum())} skilled neurons in "
                f"{int((counts['skilled'] > 0).sum())} layers")
        if result["attribution"] is not None and len(result["attribution"].table):
            best = result["attribution"].top(1).iloc[0]
            text += f"; strongest head {best['layer']}/h{int(best['head'])} ({best['effect']:.3f})"
        return text

    def show(self, result: dict[str, Any]) -> list[Any]:
        shown: list[Any] = [
            neuron_scores(result["scores"], result["layer"], result["share"], result["timesteps"], result["score"]),
            neuron_counts(result["counts"]),
        ]
        attribution = result["attribution"]
        if attribution is not None:
            shown += [head_grid(attribution), attribution.top(8).round(3)]
        return shown
