"""Experiment grids: concepts x methods x parts x seeds x knobs, run in-process or on a Dask cluster.

A grid is a dict or a YAML file (``data/grids/toy.yaml``)::

    model: toy                    # or a diffusers folder / hub id; also dtype, device (cpu, cuda, auto),
                                  # concept_set and judge (a CLIP folder / hub id) for Stable Diffusion
    concepts: [apple, car]
    methods: [uce, rece]
    parts:                        # each entry is one run's scope (a dict method -> entries: per method)
      - default                   # the method's own default parts
      - unet.*.xattn.v            # a glob, or a list of globs (one run)
      - {per_layer: [xattn.k, xattn.v]}       # one run per layer's component, as layer_sweep
      - {cumulative: ffn, within: text.*, layers: [0, 2]}   # layers 0..i of the text encoder
    seeds: [0, 1, 2]
    knobs: {rece: {epochs: 3}}                # fixed knobs per method
    vary: {uce: {lam: [0.5, 2.0]}}            # knobs whose values multiply the grid
    measure: {per_prompt: 8, per_other: 4, eval_seed: 1234}    # or false: sizes of the edits only
    threads: 1                    # torch threads per run, the same in-process and on every worker
    attacks:                      # instead of measure: attack every edit (data/grids/attacks_toy.yaml)
      names: [derived, inversion]             # default: every attack
      budgets: {inversion: [25, 100, 400]}    # one budget, or a list: a budget curve
      eval_seeds: [7000, 7001, 7002]          # default: workbench.attacks.EVAL_SEEDS
      seed: 0                                 # the attacks' own seed

:func:`plan` expands it into :class:`Run` s, each with a stable key (a hash of its whole config and the
library versions), after checking every name against the model: an unknown method, concept, knob or a
selector that matches nothing refuses the grid before any run starts. :func:`run_grid` runs what the
results store (:mod:`workbench.store`) does not hold yet, in this process or on Dask workers (each
loads the model once; a run is a task), writing each row as it arrives; a row has the columns of a
:func:`~workbench.sweep.layer_sweep` row plus ``key, config, knobs, host, worker, pid, run_seconds,
finished, error, traceback``. An attack grid's row holds instead each judged image (``images``) and what
each attack crafted (``crafted``); :func:`workbench.attacks.table.grid_images` turns its rows into the
attack table.

>>> import tempfile
>>> grid = {"model": "toy", "concepts": ["apple"], "methods": ["uce"], "parts": ["unet.mid.0.xattn.v"],
...         "measure": False}
>>> table = run_grid(grid, tempfile.mkdtemp(), progress=False)
>>> table[["concept", "method", "part", "error"]].values.tolist()
[['apple', 'uce', 'unet.mid.0.xattn.v', None]]
"""
from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import os
import random
import socket
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm

from .anatomy import as_list, component_of, layer_of, names as part_names, select
from .attacks import ATTACKS, BUDGETS, EVAL_SEEDS
from .attacks.table import attack_edit
from .concepts import ConceptSet
from .edits import versions
from .judges import ClipJudge
from .methods import METHODS, erase
from .models import load
from .profile import Profile, attach, profile_of
from .store import Store, load_results
from .sweep import Measurer, Planned, check_method, layer_sweep, run_one, scope

#: Measurement settings a grid may give, with layer_sweep's defaults.
MEASURE = {k: inspect.signature(layer_sweep).parameters[k].default
           for k in ("per_prompt", "per_other", "others", "eval_seed")}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: What an attack grid's ``attacks`` mapping may hold.
ATTACK_SETTINGS = ("names", "budgets", "eval_seeds", "seed")
#: Knobs a grid sets through its own keys, never through ``knobs``.
_RESERVED = {"parts": "parts", "seed": "seeds", "progress": "(the grid's progress bar)"}


@dataclass
class Grid:
    """A grid description; :meth:`of` reads a dict, :meth:`load` a YAML (or JSON) file."""

    concepts: list[str]
    methods: list[str]
    model: str = "toy"
    dtype: str | None = None
    device: str | None = None
    concept_set: str | None = None
    judge: str | dict | None = None
    parts: list | dict = field(default_factory=lambda: ["default"])
    seeds: list[int] = field(default_factory=lambda: [0])
    knobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    vary: dict[str, dict[str, list]] = field(default_factory=dict)
    measure: dict[str, Any] | bool = True
    threads: int = 1
    attacks: dict[str, Any] | None = None

    @classmethod
    def of(cls, spec: "Grid | dict[str, Any] | str | os.PathLike") -> "Grid":
        """A grid from a dict (or a path to a YAML file); unknown keys are refused with the valid ones."""
        if isinstance(spec, Grid):
            return spec
        if isinstance(spec, (str, os.PathLike)):
            return cls.load(spec)
        if not isinstance(spec, dict):
            raise TypeError(f"a grid is a dict or a YAML file, not {type(spec).__name__}")
        valid = [f.name for f in fields(cls)]
        unknown = [k for k in spec if k not in valid]
        missing = [k for k in ("concepts", "methods") if k not in spec]
        if unknown or missing:
            raise ValueError("the grid " + "; ".join(
                ([f"has unknown key(s) {', '.join(map(repr, unknown))}"] if unknown else [])
                + ([f"lacks {' and '.join(missing)}"] if missing else [])) + f"; its keys: {', '.join(valid)}")
        spec = dict(spec)
        for key in ("concepts", "methods", "seeds"):
            if key in spec:
                spec[key] = as_list(spec[key]) if isinstance(spec[key], str) else list(spec[key])
        return cls(**spec)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Grid":
        """Read a YAML or JSON grid; a relative ``concept_set`` path is relative to the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no grid file at {str(path)!r}; give a YAML file such as data/grids/toy.yaml")
        spec = yaml.safe_load(path.read_text())
        if not isinstance(spec, dict):
            raise ValueError(f"{str(path)!r} does not hold a grid (a mapping with concepts, methods, ...)")
        if spec.get("concept_set") and not Path(spec["concept_set"]).is_absolute():
            spec["concept_set"] = str((path.parent / spec["concept_set"]).resolve())
        return cls.of(spec)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def model_spec(self) -> dict[str, Any]:
        """What a process needs to load the model (and its concept set and judge)."""
        return {k: getattr(self, k) for k in ("model", "dtype", "device", "concept_set", "judge")}

    def parts_for(self, method: str) -> list:
        entries = self.parts.get(method, ["default"]) if isinstance(self.parts, dict) else self.parts
        return [entries] if isinstance(entries, (str, dict)) else list(entries)

    def measure_settings(self) -> dict[str, Any] | None:
        """The measurement settings with layer_sweep's defaults filled in, or ``None`` (not measuring, or
        an attack grid, whose runs are judged by their attacks)."""
        if self.measure is False or self.measure is None or self.attacks is not None:
            return None
        given = {} if self.measure is True else dict(self.measure)
        return {**MEASURE, **given}

    def attack_settings(self) -> dict[str, Any] | None:
        """An attack grid's settings with the defaults filled in (every attack at its default budget, the
        evaluation seeds, attack seed 0), or ``None`` for a grid that measures its edits instead."""
        if self.attacks is None:
            return None
        given = dict(self.attacks)
        return {"names": list(given.get("names") or ATTACKS), "budgets": dict(given.get("budgets") or {}),
                "eval_seeds": list(given.get("eval_seeds") or EVAL_SEEDS), "seed": given.get("seed", 0)}


@dataclass
class Run:
    """One run of a grid: a model, a method, one planned sweep run (concept, scope, seed), knobs and the
    measurement settings."""

    model: dict[str, Any]
    method: str
    spec: Planned
    knobs: dict[str, Any]
    measure: dict[str, Any] | None
    threads: int
    attacks: dict[str, Any] | None = None

    def config(self) -> dict[str, Any]:
        """Everything that decides the run's numbers, library versions included."""
        spec = asdict(self.spec)
        spec["selectors"] = list(spec["selectors"])
        model = dict(self.model)
        if model.get("concept_set"):  # its content decides the numbers, not where the file lies
            model["concept_set"] = hashlib.sha256(Path(model["concept_set"]).read_bytes()).hexdigest()[:20]
        attacks = {} if self.attacks is None else {"attacks": self.attacks}
        return {"model": model, "method": self.method, **spec, "knobs": self.knobs,
                "measure": self.measure, "threads": self.threads, **attacks, "versions": versions()}

    @cached_property
    def key(self) -> str:
        """A stable hash of :meth:`config`."""
        text = json.dumps(self.config(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def label(self) -> str:
        part = " + ".join(self.spec.selectors) or "default"
        return f"{self.method} {self.spec.concept!r} {part} (seed {self.spec.seed})"


# --- planning: validate, then expand -------------------------------------------------------------------

def plan(grid: Grid | dict | str | os.PathLike, pipe) -> list[Run]:
    """The grid's runs on ``pipe`` (its model), in order; refuses the grid (``ValueError`` naming every
    problem and the valid names) before anything runs."""
    grid = Grid.of(grid)
    problems = _problems(grid, pipe)
    if problems:
        raise ValueError("the grid was refused; nothing ran:\n- " + "\n- ".join(problems))
    runs = []
    for concept, method in itertools.product(grid.concepts, grid.methods):
        for scope, knobs in itertools.product(_scopes(pipe, grid.parts_for(method)), _knob_sets(grid, method)):
            for seed in grid.seeds:
                runs.append(Run(grid.model_spec(), method, replace(scope, concept=concept, seed=seed), knobs,
                                grid.measure_settings(), grid.threads, grid.attack_settings()))
    return list({r.key: r for r in runs}.values())


def _problems(grid: Grid, pipe) -> list[str]:
    problems = _name_problems(grid, pipe)
    if isinstance(grid.parts, dict):
        problems += [f"parts names method {m!r}, which the grid does not run (it runs {', '.join(grid.methods)})"
                     for m in grid.parts if m not in grid.methods]
    for method in grid.methods:
        for entry in grid.parts_for(method) if method in METHODS else []:
            problems += _part_problems(pipe, entry)
    problems += _knob_problems(grid)
    measure = grid.measure_settings()
    if measure is not None and measure["eval_seed"] in grid.seeds:
        problems.append(f"the evaluation seed {measure['eval_seed']} is also an erasure seed; evaluation images "
                        "must come from seeds the edits never saw: change measure.eval_seed or seeds")
    if not isinstance(grid.threads, int) or grid.threads < 1:
        problems.append(f"threads must be a whole number >= 1, not {grid.threads!r}")
    problems += _attack_problems(grid, pipe)
    return list(dict.fromkeys(problems))


def _attack_problems(grid: Grid, pipe) -> list[str]:
    if grid.attacks is None:
        return []
    if not isinstance(grid.attacks, dict):
        return [f"attacks is a mapping with {', '.join(ATTACK_SETTINGS)}, not {grid.attacks!r}"]
    problems = [f"attacks has no setting {k!r}; its settings: {', '.join(ATTACK_SETTINGS)}"
                for k in grid.attacks if k not in ATTACK_SETTINGS]
    s = grid.attack_settings()
    bad = [a for a in [*s["names"], *s["budgets"]] if a not in ATTACKS]
    if bad:
        problems.append(f"unknown attack(s) {', '.join(map(repr, bad))}; valid attacks: {', '.join(ATTACKS)}")
    for name, budget in s["budgets"].items():
        given = budget if isinstance(budget, list) else [budget]
        if not given or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in given):
            problems.append(f"the budget of {name} is a positive whole number or a list of them, not {budget!r}")
        elif name in ATTACKS and BUDGETS.get(name) is None:
            problems.append(f"{name} has no budget (it is a closed form); leave it out of budgets")
    seeds = s["eval_seeds"]
    if any(not isinstance(x, int) or isinstance(x, bool) for x in seeds):
        problems.append(f"attacks.eval_seeds must be whole numbers, not {seeds!r}")
    clash = sorted(set(seeds) & ({s["seed"]} | set(grid.seeds)))
    if clash:
        problems.append(f"evaluation seed(s) {clash} are also erasure or attack seeds; evaluation images must come "
                        "from seeds the edits and attacks never saw: change attacks.eval_seeds")
    cs = profile_of(pipe).concepts
    if cs is None:
        problems.append("attacking needs the model's concept set and judge: give concept_set (and judge) in the grid")
    return problems


def _name_problems(grid: Grid, pipe) -> list[str]:
    problems = []
    for kind, given in (("concepts", grid.concepts), ("methods", grid.methods), ("seeds", grid.seeds)):
        if not given:
            problems.append(f"the grid has no {kind}")
    bad = [m for m in grid.methods if m not in METHODS]
    if bad:
        problems.append(f"unknown method(s) {', '.join(map(repr, bad))}; valid methods: {', '.join(METHODS)}")
    if any(not isinstance(s, int) or isinstance(s, bool) for s in grid.seeds):
        problems.append(f"seeds must be whole numbers, not {grid.seeds!r}")
    concepts = profile_of(pipe).concepts
    measure = grid.measure_settings()
    wanted = list(grid.concepts) + list((measure or {}).get("others") or [])
    if concepts is not None:
        bad = [c for c in wanted if c not in concepts]
        if bad:
            problems.append(f"unknown concept(s) {', '.join(map(repr, bad))}; the model's concepts: "
                            f"{', '.join(concepts.names)}")
    elif measure is not None:
        problems.append("measuring needs the model's concept set and judge: give concept_set (and judge) in "
                        "the grid, or measure: false")
    if measure is not None:
        unknown = [k for k in measure if k not in MEASURE]
        if unknown:
            problems.append(f"measure has no setting {', '.join(map(repr, unknown))}; "
                            f"its settings: {', '.join(MEASURE)}")
    return problems


def _part_problems(pipe, entry: Any) -> list[str]:
    if entry == "default":
        return []
    if isinstance(entry, dict):
        return _layerwise_problems(pipe, entry)
    try:
        select(pipe, entry)
    except KeyError as exc:
        return [str(exc.args[0])]
    except TypeError:
        return [f"a parts entry is 'default', a glob, a list of globs or {{per_layer: ...}} / {{cumulative: ...}}, "
                f"not {entry!r}"]
    return []


def _layerwise_problems(pipe, entry: dict) -> list[str]:
    kinds = [k for k in ("per_layer", "cumulative") if k in entry]
    extra = [k for k in entry if k not in ("per_layer", "cumulative", "layers", "within")]
    if len(kinds) != 1 or extra:
        return [f"a layer-wise parts entry has one of per_layer or cumulative (and optionally layers, within), "
                f"not {entry!r}"]
    try:
        select(pipe, entry.get("within", "*"))
    except KeyError as exc:
        return [f"within: {exc.args[0]}"]
    problems = []
    for comp in as_list(entry[kinds[0]]):
        found = _layers_with(pipe, comp, entry.get("within", "*"))
        if not found:
            where = f" within {entry['within']!r}" if "within" in entry else ""
            problems.append(f"component {comp!r} is in no layer{where}; components: {', '.join(_components(pipe))}")
            continue
        bad = [i for i in entry.get("layers") or [] if not isinstance(i, int) or not 0 <= i < len(found)]
        if bad:
            problems.append(f"layer index {bad[0]!r} is out of range for {comp!r}: {len(found)} layers have it, "
                            f"0..{len(found) - 1}")
    return problems


def _knob_problems(grid: Grid) -> list[str]:
    problems = []
    for section in ("knobs", "vary"):
        table = getattr(grid, section)
        if not isinstance(table, dict):
            problems.append(f"{section} maps a method to its knobs ({{rece: {{epochs: 3}}}}), not {table!r}")
            continue
        for method, knobs in table.items():
            if method not in grid.methods:
                problems.append(f"{section} names method {method!r}, which the grid does not run "
                                f"(it runs {', '.join(grid.methods)})")
                continue
            accepted = list(inspect.signature(METHODS[method]).parameters)[2:]
            for knob, value in (knobs or {}).items():
                if knob in _RESERVED:
                    problems.append(f"{section}.{method}.{knob}: the grid sets {knob} through {_RESERVED[knob]}")
                elif knob not in accepted:
                    problems.append(f"{method} has no knob {knob!r}; its knobs: "
                                    f"{', '.join(k for k in accepted if k not in _RESERVED)}")
                elif section == "vary" and (not isinstance(value, list) or not value):
                    problems.append(f"vary.{method}.{knob} lists the values to try, e.g. [0.5, 2.0]; got {value!r}")
    return problems


def _components(pipe) -> list[str]:
    """Every component name a layer-wise entry can take: attn, ffn, xattn.k, ... and single matrices."""
    names = part_names(pipe)
    return list(dict.fromkeys([component_of(n) for n in names] + [n[len(layer_of(n)) + 1:] for n in names]))


def _layers_with(pipe, component: str, within: str = "*") -> list[str]:
    """The layers, in network order, among those of the parts ``within`` selects, that have ``component``."""
    out = []
    for layer in dict.fromkeys(layer_of(n) for n in select(pipe, within)):
        try:
            select(pipe, f"{layer}.{component}")
        except KeyError:
            continue
        out.append(layer)
    return out


def _scopes(pipe, entries: list) -> list[Planned]:
    """One planned run (concept and seed left blank) per scope the entries spell."""
    out = []
    for entry in entries:
        if entry == "default":
            out.append(Planned("", "default", (), None, "all", "default", False, 0))
        elif isinstance(entry, dict):
            out += _layerwise(pipe, entry)
        else:
            globs = tuple(as_list(entry))
            out.append(Planned("", "parts", globs, None, "all", " + ".join(globs), False, 0))
    return out


def _layerwise(pipe, entry: dict) -> list[Planned]:
    cumulative = "cumulative" in entry
    comps = as_list(entry["cumulative" if cumulative else "per_layer"])
    found = {comp: _layers_with(pipe, comp, entry.get("within", "*")) for comp in comps}
    count = max(len(v) for v in found.values())
    out = []
    for i in entry.get("layers") or range(count):
        for comp in comps:
            have = found[comp]
            if i < len(have):
                upto = have[:i + 1] if cumulative else [have[i]]
                out.append(Planned("", "cumulative" if cumulative else "layer", tuple(f"{l}.{comp}" for l in upto), i,
                                   have[i], comp, cumulative, 0))
    return out


def _knob_sets(grid: Grid, method: str) -> list[dict[str, Any]]:
    fixed = dict(grid.knobs.get(method) or {})
    varied = grid.vary.get(method) or {}
    return [{**fixed, **dict(zip(varied, values))} for values in itertools.product(*varied.values())]


def sweep_grid(pipe, concept: str, method: str, cumulative: bool = False, seeds: Sequence[int] = (0,),
               measure: dict[str, Any] | bool = True, model: str | None = None) -> dict[str, Any]:
    """The grid that runs what :func:`~workbench.sweep.layer_sweep` runs (its default components, every
    layer), for running it on a cluster."""
    within, components = scope(pipe, method)
    entry = {"cumulative" if cumulative else "per_layer": list(components), "within": within}
    return {"model": model or model_name(pipe), "concepts": [concept], "methods": [method], "parts": [entry],
            "seeds": list(seeds), "measure": measure}


def model_name(pipe) -> str:
    """The name a worker loads ``pipe``'s model by: a bundled model's (``"toy"``, ``"toy-dit"``) or its
    folder / hub id."""
    profile = profile_of(pipe)
    if profile.name in profile.models:
        return profile.name
    name = getattr(pipe, "name_or_path", None)
    if not name:
        raise ValueError("this pipeline has no name a worker could load it by; give the grid's model "
                         "('toy', a diffusers folder or a hub id)")
    return str(name)


# --- running one run, in any process -------------------------------------------------------------------

def load_model(spec: dict[str, Any]):
    """Load a grid's model (:func:`workbench.load`), with its concept set and CLIP judge when given."""
    dtype = spec.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    device = spec.get("device")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load(spec["model"], dtype=DTYPES.get(dtype), device=device)
    if spec.get("concept_set"):
        judge = spec.get("judge")
        kwargs = {"source": judge} if isinstance(judge, str) else dict(judge or {})
        loader = (lambda: ClipJudge.load(**{"device": pipe.device, "dtype": pipe.dtype, **kwargs})) if judge else None
        attach(pipe, Profile(str(spec["model"]), ConceptSet.load(spec["concept_set"]), loader,
                             dict(profile_of(pipe).defaults)))
    return pipe


class _Context:
    """What one process keeps between runs: each model loaded once, each measurer with its baselines."""

    def __init__(self, pipe=None, model: dict[str, Any] | None = None) -> None:
        self.pipes: dict[str, Any] = {} if pipe is None else {_text(model): pipe}
        self.measurers: dict[tuple[int, str], Measurer] = {}

    def pipe(self, model: dict[str, Any]):
        key = _text(model)
        if key not in self.pipes:
            self.pipes[key] = load_model(model)
        return self.pipes[key]

    def measurer(self, pipe, measure: dict[str, Any] | None) -> Measurer:
        key = (id(pipe), _text(measure))
        if key not in self.measurers:
            s = measure or MEASURE
            self.measurers[key] = Measurer.make(pipe, None, None, measure is not None, s["others"],
                                                s["per_prompt"], s["per_other"], s["eval_seed"])
        return self.measurers[key]


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


#: This process's models and measurers (a Dask worker's, or the in-process runner's without a pipe).
_PROCESS = _Context()
#: One run at a time per process: a run applies edits to the shared pipeline.
_LOCK = threading.Lock()


@contextmanager
def _determinism(threads: int, seed: int) -> Iterator[None]:
    """The same torch threads and global seeds for a run wherever it runs; threads restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def execute(run: Run, context: _Context | None = None, worker: str = "in-process",
            baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one grid run and return its row; a run that raises returns a row with its ``error``.
    ``baseline``: the unedited model's scores on the run's concept, when measured elsewhere."""
    t0 = time.perf_counter()
    try:
        with _LOCK:
            pipe = (context or _PROCESS).pipe(run.model)
            with _determinism(run.threads, run.spec.seed):
                if run.attacks is not None:
                    row = attack_one(pipe, run)
                else:
                    measurer = (context or _PROCESS).measurer(pipe, run.measure)
                    if baseline is not None:
                        measurer.baselines.setdefault(run.spec.concept, baseline)
                    row = run_one(pipe, run.spec, run.method, measurer, run.knobs)
            error, trace = None, None
    except Exception as exc:  # the row records it; the sweep goes on
        row, error, trace = _planned(run), f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=-8)
    return {**row, **_about(run, worker), "run_seconds": time.perf_counter() - t0, "error": error,
            "traceback": trace}


def attack_one(pipe, run: Run) -> dict[str, Any]:
    """Erase as ``run`` says and attack the edit with the run's attacks: the planned columns, the erasure's
    seconds, every judged image (``images``: attack, budget, seed, prompt, label, hit, attack_seconds,
    peak_gb) and what each attack crafted (``crafted``, by ``"attack@budget"``)."""
    s, settings = run.spec, run.attacks
    edit = erase(pipe, s.concept, run.method, list(s.selectors) or None, progress=False, seed=s.seed, **run.knobs)
    images, crafted = attack_edit(pipe, edit, profile_of(pipe).judge(), s.concept, settings["names"],
                                  settings["budgets"], settings["eval_seeds"], settings["seed"])
    images = images.drop(columns=["concept", "edit_seconds"]).astype(object)
    return {**_planned(run), "images": images.where(images.notna(), None).to_dict("records"),
            "crafted": {f"{a}@{b}": _plain(v) for (a, b), v in crafted.items()},
            "parts_edited": tuple(edit.parts), "seconds": edit.seconds}


def _plain(value: Any) -> Any:
    """``value`` with numpy and torch scalars made plain Python (for JSON)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def _planned(run: Run) -> dict[str, Any]:
    """The columns a row has before it ran: what was asked for."""
    s = run.spec
    return dict(method=run.method, concept=s.concept, seed=s.seed, subset=s.subset,
                part=" + ".join(s.selectors) or "default", layer=s.layer, layer_name=s.layer_name,
                component=s.component, cumulative=s.cumulative)


def _about(run: Run, worker: str | None) -> dict[str, Any]:
    return dict(key=run.key, model=run.model["model"], knobs=run.knobs, config=run.config(),
                host=socket.gethostname(), worker=worker, pid=os.getpid(),
                finished=datetime.now(timezone.utc).isoformat())


def _failed(run: Run, exc: BaseException) -> dict[str, Any]:
    """The row of a run whose task returned no row (its workers kept dying, the baseline it needed
    failed, the cluster went away)."""
    return {**_planned(run), **_about(run, None), "host": None, "pid": None, "run_seconds": float("nan"),
            "error": f"{type(exc).__name__}: {exc}", "traceback": None}


def _execute_on_worker(run: Run, baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    from distributed import get_worker

    return execute(run, _PROCESS, get_worker().address, baseline)


def _baseline_on_worker(run: Run) -> dict[str, Any]:
    """The unedited model's scores on ``run``'s concept, with ``run``'s measurement settings."""
    with _LOCK:
        pipe = _PROCESS.pipe(run.model)
        with _determinism(run.threads, run.spec.seed):
            return _PROCESS.measurer(pipe, run.measure).baseline(pipe, run.spec.concept)


def _plan_on_worker(grid: dict[str, Any]) -> list[Run]:
    return plan(grid, _PROCESS.pipe(Grid.of(grid).model_spec()))


# --- executors -----------------------------------------------------------------------------------------

def run_grid(grid: Grid | dict | str | os.PathLike, out: str | os.PathLike, *, pipe=None, cluster: Any = None,
             resources: dict[str, float] | None = None, retry_failed: bool = True, progress: bool = True,
             on_run: Callable[[str], None] | None = None, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Run the grid's runs that ``out`` does not hold yet; return every run's row of the grid.

    ``cluster``: ``None`` runs here, one run after another (on ``pipe`` when given: the grid's model,
    already loaded); ``"local:N"`` starts a Dask ``LocalCluster`` of N worker processes; a scheduler
    address (``"tcp://host:8786"``) or a ``distributed.Client`` uses that cluster. ``resources`` are
    what each task holds on a worker (``{"GPU": 1}`` for workers started with ``--resources GPU=1``).
    Failed runs are tried again unless ``retry_failed=False``. ``on_run(label)`` is called after each
    run; ``log`` gets the Dask dashboard's address. ``table.attrs``: ``ran``, ``skipped``, ``failed``,
    ``dashboard``.
    """
    grid, store = Grid.of(grid), Store(out)
    client, close = connect(cluster) if cluster is not None else (None, None)
    try:
        dashboard = _dashboard(client, log)
        runs = _plan_where(grid, pipe, client, resources)
        store.save_plan(grid.to_dict(), [r.key for r in runs])
        skip = store.done() | (set() if retry_failed else store.failed())
        todo = [r for r in runs if r.key not in skip]
        if client is None:
            _in_process(todo, store, _Context(pipe, grid.model_spec()) if pipe is not None else _PROCESS,
                        progress, on_run)
        else:
            _on_dask(todo, store, client, resources, progress, on_run)
    finally:
        if close is not None:
            close()
    return _results(out, runs, ran=len(todo), skipped=len(runs) - len(todo), dashboard=dashboard)


def _plan_where(grid: Grid, pipe, client, resources: dict[str, float] | None) -> list[Run]:
    """Plan here (on ``pipe``, or on this process's copy of the model) or on a worker of the cluster,
    which loads the model it will run on anyway."""
    if client is None:
        return plan(grid, pipe if pipe is not None else _PROCESS.pipe(grid.model_spec()))
    return client.submit(_plan_on_worker, grid.to_dict(), resources=resources, pure=False).result()


def _in_process(runs: list[Run], store: Store, context: _Context, progress: bool,
                on_run: Callable[[str], None] | None) -> None:
    for run in tqdm(runs, desc="grid", disable=not progress):
        store.write(execute(run, context))
        if on_run is not None:
            on_run(run.label())


def _on_dask(runs: list[Run], store: Store, client, resources: dict[str, float] | None, progress: bool,
             on_run: Callable[[str], None] | None) -> None:
    from distributed import as_completed

    batch = uuid.uuid4().hex[:6]
    baselines = _baselines(runs, client, resources, batch)
    futures = [client.submit(_execute_on_worker, run, baselines.get(_baseline_key(run)),
                             key=f"run-{run.key}-{batch}", resources=resources, pure=False) for run in runs]
    by_key = {f.key: run for f, run in zip(futures, runs)}
    for future in tqdm(as_completed(futures), total=len(futures), desc="grid", disable=not progress):
        run = by_key[future.key]
        try:
            row = future.result()
        except Exception as exc:  # the task was lost (e.g. its worker died more often than Dask retries)
            row = _failed(run, exc)
        store.write(row)
        future.release()
        if on_run is not None:
            on_run(run.label())


def _baseline_key(run: Run) -> str:
    return _text([run.model, run.measure, run.threads, run.spec.concept])


def _baselines(runs: list[Run], client, resources: dict[str, float] | None, batch: str) -> dict[str, Any]:
    """One task per concept (and model and measurement settings) measuring the unedited model, whose
    result every run of that concept receives: measured once for the cluster, not once per worker."""
    out = {}
    for run in runs:
        key = _baseline_key(run)
        if run.measure is not None and key not in out:
            out[key] = client.submit(_baseline_on_worker, run, key=f"baseline-{run.key}-{batch}",
                                     resources=resources, pure=False)
    return out


def _results(out: str | os.PathLike, runs: list[Run], **attrs: Any) -> pd.DataFrame:
    """The grid's rows in plan order (rows of other grids in the same folder are left out)."""
    table = load_results(out)
    order = {r.key: i for i, r in enumerate(runs)}
    table = table[table["key"].isin(order)]
    table = table.iloc[np.argsort([order[k] for k in table["key"]], kind="stable")].reset_index(drop=True)
    table.attrs.update(attrs, failed=int(table["error"].notna().sum()))
    return table


def connect(cluster: Any) -> tuple[Any, Callable[[], None]]:
    """A Dask client for ``cluster`` and what closes what was started here (a given client stays open)."""
    from distributed import Client

    if isinstance(cluster, Client):
        return cluster, lambda: None
    text = str(cluster)
    if text.startswith("local:") and text[6:].isdigit() and int(text[6:]) > 0:
        local = local_cluster(int(text[6:]))
        client = Client(local)
        return client, lambda: (client.close(), local.close())
    if "://" in text:
        client = Client(text)
        return client, client.close
    raise ValueError(f"unknown cluster {cluster!r}; give 'local:N' (N worker processes here), a scheduler "
                     "address such as 'tcp://host:8786', or a distributed.Client")


#: Dask's nanny gives each worker MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's adaptive mmap
#: threshold: every large tensor torch frees is unmapped and mapped again, and a toy run took twice as long.
#: For `dask worker`, the same setting is in data/grids/dask.yaml (DASK_CONFIG=data/grids/dask.yaml).
_NO_TRIM = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def local_cluster(n_workers: int, **kwargs: Any):
    """A Dask ``LocalCluster`` for grid runs: ``n_workers`` processes of one thread each, with glibc's
    default memory trimming (``kwargs`` go to ``LocalCluster``, e.g. ``dashboard_address=":0"``)."""
    import dask
    from distributed import LocalCluster

    with dask.config.set(_NO_TRIM):
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, **kwargs)


def _dashboard(client, log: Callable[[str], None]) -> str | None:
    if client is None:
        return None
    link = client.dashboard_link
    log(f"Dask dashboard: {link} ({len(client.scheduler_info()['workers'])} workers)")
    return link
