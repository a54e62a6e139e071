"""Layer-by-layer erasure and the FFN-versus-attention experiment, as tidy tables: one row per run.

:func:`layer_sweep` runs one method scoped to one part at a time (``text.{i}.ffn`` and ``text.{i}.attn``
for few-shot unlearning, ``unet.<block>.xattn.k`` and ``.v`` for UCE and RECE, ``unet.<block>.attn``,
``.xattn`` and ``.ffn`` for ESD), or to layers 0..i (``cumulative=True``). On a transformer (FLUX,
SD 3) the layers are its blocks and the components each stream's matrices (``img.q``, ``text.k``,
``img.ffn``: :func:`workbench.anatomy.component_of`) or the groups of :data:`DIT_GROUPS` (``img.attn``,
``text.ffn``, ``attn``...); a block without the component (a single block has no ``img.ffn``) is
left out. :func:`ffn_vs_attention`
compares few-shot parameter subsets (FFN only, attention only, FFN + last attention, everything);
:func:`finding` says in words what the table shows. :func:`unet_subsets` runs the same comparison in the
UNet with ESD (FFNs, self-attention, cross-attention), summarised by :func:`subset_rates` and
:func:`unet_finding`.
Every run is measured by :func:`workbench.metrics.evaluate` against a baseline measured once.

>>> import workbench
>>> from workbench.sweep import layer_sweep
>>> pipe = workbench.load("toy")
>>> table = layer_sweep(pipe, "apple", method="uce", layers=[2], per_prompt=1, per_other=1,
...                     others=["banana"], progress=False)
>>> table[["part", "layer", "component"]].values.tolist()
[['unet.mid.0.xattn.k', 2, 'xattn.k'], ['unet.mid.0.xattn.v', 2, 'xattn.v']]
>>> bool(table["efficacy"].between(0, 1).all())
True
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import pandas as pd
from tqdm.auto import tqdm

from .anatomy import as_list, component_of, layer_of, names as part_names, select, text_encoders
from .concepts import ConceptSet
from .edits import Edit
from .judges import Judge
from .methods import REGISTRY, View, erase
from .methods.fewshot import default_parts
from .metrics import DEFAULTS, drift_test, evaluate
from .profile import profile_of
from .stats import cluster_rate, difference, enough, paired_cells, unit_cells

#: Where each method's edits can go, and the components a layer sweep runs by default (from the
#: methods' registrations, :data:`workbench.methods.REGISTRY`).
SCOPE: Mapping[str, tuple[str, tuple[str, ...]]] = View(lambda: {n: (m.scope, m.components)
                                                                 for n, m in REGISTRY.items()})
#: The few-shot parameter subsets the paper compares; ``None`` is its default (:func:`default_parts`). On a
#: model with several text encoders each subset covers all of them, as the default does (:func:`every_encoder`).
SUBSETS: dict[str, str | None] = {"ffn": "text.*.ffn", "attn": "text.*.attn", "ffn + last attn": None,
                                  "all": "text.*"}
#: The UNet parameter subsets ESD compares: the transformer blocks' FFNs, self-attention, cross-attention.
UNET_SUBSETS: dict[str, str] = {"ffn": "unet.*.ffn", "attn": "unet.*.attn", "xattn": "unet.*.xattn"}
#: Components of a transformer's blocks a sweep can name beside single matrices: per kind of block
#: (``double``: ``dit.{i}``, ``single``: ``dit.single.{j}``), the parts below the block they select. A
#: single block's attention is its q, k and v (its ``out`` projects attention and MLP together).
DIT_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "img.attn": {"double": ("img.[qkv]", "img.out")},
    "text.attn": {"double": ("text.[qkv]", "text.out")},
    "attn": {"double": ("img.[qkv]", "img.out", "text.[qkv]", "text.out"), "single": ("[qkv]",)},
    "ffn": {"double": ("img.ffn", "text.ffn"), "single": ("ffn",)},
    "img": {"double": ("img",)},
    "text": {"double": ("text",)},
    "single.attn": {"single": ("[qkv]",)},
}


@dataclass(frozen=True)
class Planned:
    """One planned sweep run: the concept, the parts it may edit (``selectors``; empty for the method's
    default parts), where it sits in the sweep and its training seed."""

    concept: str
    subset: str
    selectors: tuple[str, ...]
    layer: int | None
    layer_name: str
    component: str
    cumulative: bool
    seed: int


def every_encoder(pipe, selector: str) -> list[str]:
    """A selector of the text encoder ``text`` (``"text.*.ffn"``, one of :data:`SUBSETS`) for each of
    ``pipe``'s text encoders (FLUX: its pooled CLIP ``text`` and its token-row T5 ``text2``).

    >>> import workbench
    >>> every_encoder(workbench.load("toy"), "text.*.ffn"), every_encoder(workbench.load("toy-dit"), "text.*")
    (['text.*.ffn'], ['text.*', 'text2.*'])
    """
    if selector.split(".")[0] != "text":
        raise ValueError(f"{selector!r} is not a selector of the text encoder 'text' (such as 'text.*.ffn')")
    return [encoder + selector[len("text"):] for encoder in text_encoders(pipe)]


def scope(pipe, method: str) -> tuple[str, tuple[str, ...]]:
    """``(the parts whose layers a sweep of method walks, its default components)`` on ``pipe``'s kind
    of denoiser (the method's registration, :data:`workbench.methods.REGISTRY`)."""
    check_method(method)
    return REGISTRY[method].scope_on(pipe)


def layers(pipe, method: str = "fewshot") -> list[str]:
    """The layers ``method`` can edit, in network order: ``["text.0", ...]``, ``["unet.down.1.0", ...]``
    or ``["dit.0", ...]``."""
    return list(dict.fromkeys(layer_of(n) for n in select(pipe, scope(pipe, method)[0])))


def selectors(pipe, layer: str, component: str) -> list[str]:
    """The selectors of ``component`` in ``layer`` that match a part (empty when the layer has none):
    ``layer.component``, a transformer group's globs (:data:`DIT_GROUPS`), or a single block's matrix
    (``single.q`` is ``dit.single.0.q``).

    >>> import workbench
    >>> selectors(workbench.load("toy"), "text.2", "ffn")
    ['text.2.ffn']
    """
    if layer.startswith("dit.") and component in DIT_GROUPS:
        kind = "single" if layer.startswith("dit.single.") else "double"
        wanted = [f"{layer}.{g}" for g in DIT_GROUPS[component].get(kind, ())]
    else:
        wanted = [_glob(layer, component)]
    out = []
    for selector in wanted:
        try:
            select(pipe, selector)
        except KeyError:
            continue
        out.append(selector)
    return out


def _glob(layer: str, component: str) -> str:
    """The selector of one :func:`workbench.anatomy.component_of` component within its layer."""
    if layer.split(".")[-1] == component:  # a top-level part of a transformer: dit.context
        return layer
    if layer.startswith("dit.single.") and component.startswith("single."):
        return f"{layer}.{component[len('single.'):]}"
    return f"{layer}.{component}"


def layer_sweep(pipe, concept: str, method: str = "fewshot", components: Sequence[str] | None = None,
                cumulative: bool = False, seeds: Sequence[int] = (0,), judge: Judge | None = None, *,
                layers: Sequence[int] | None = None, measure: bool = True, others: Sequence[str] | None = None,
                per_prompt: int = DEFAULTS.per_prompt, per_other: int = DEFAULTS.per_other,
                eval_seed: int = DEFAULTS.seed, progress: bool = True,
                on_run: Callable[[str], None] | None = None, concept_set: ConceptSet | None = None,
                **method_kwargs) -> pd.DataFrame:
    """Erase ``concept`` with ``method`` scoped to one layer's component at a time (or layers 0..i).

    ``components`` default to the method's registered ones (:func:`scope`: ``("ffn", "attn")`` for few-shot,
    ``("xattn.k", "xattn.v")`` for UCE and RECE; finer ones such as ``"attn.v"`` work too; on a transformer
    its streams' matrices and the groups of :data:`DIT_GROUPS`, e.g. ``["img.attn", "img.ffn",
    "text.attn", "text.ffn"]`` with ESD); ``layers`` picks layer indices (default all).
    ``judge`` and ``concept_set`` default to the model profile's; ``measure=False`` skips measuring (only
    ``||dW||`` and time: works on any pipeline). Other keyword arguments go to the method, after the
    defaults of :func:`workbench.methods.erase`.

    One row per (seed, layer, component). Columns: ``method, concept, seed, subset, part, layer,
    layer_name, component, cumulative`` (what was run), ``efficacy, accuracy, base_accuracy,
    preservation, preservation_related, preservation_unrelated, drift, drift_chance, n_images`` (see
    :func:`workbench.metrics.evaluate`), ``dW, dW_relative, dW_by_layer`` (norm of the change: all
    edited parts together, relative to their weights, and per layer), ``parts_edited``, ``seconds``
    (the edit's own time) and ``eval_seconds``. ``table.attrs`` holds the baselines and the seconds
    spent measuring them.
    """
    runs = _layer_runs(pipe, concept, method, components, cumulative, seeds, layers)
    measurer = Measurer.make(pipe, judge, concept_set, measure, others, per_prompt, per_other, eval_seed)
    return _run_table(pipe, runs, method, measurer, progress, on_run, method_kwargs)


def ffn_vs_attention(pipe, concepts: Sequence[str], seeds: Sequence[int] = (0, 1, 2), judge: Judge | None = None,
                     *, per_layer: bool = False, measure: bool = True, others: Sequence[str] | None = None,
                     per_prompt: int = DEFAULTS.per_prompt, per_other: int = DEFAULTS.per_other,
                     eval_seed: int = DEFAULTS.seed, progress: bool = True,
                     on_run: Callable[[str], None] | None = None, concept_set: ConceptSet | None = None,
                     **fewshot_kwargs) -> pd.DataFrame:
    """Few-shot unlearning of each concept through each parameter subset of :data:`SUBSETS` (in every text
    encoder), per seed.

    ``per_layer=True`` adds the layer sweep (``subset == "layer"``) for every concept and seed.
    Summarise with :func:`aggregate` and :func:`finding`.
    """
    runs = []
    for concept in as_list(concepts):
        for seed in seeds:
            for name, selector in SUBSETS.items():
                chosen = default_parts(pipe) if selector is None else every_encoder(pipe, selector)
                runs.append(Planned(concept, name, tuple(chosen), None, "all", name, False, seed))
        if per_layer:
            runs += _layer_runs(pipe, concept, "fewshot", None, False, seeds, None)
    measurer = Measurer.make(pipe, judge, concept_set, measure, others, per_prompt, per_other, eval_seed)
    return _run_table(pipe, runs, "fewshot", measurer, progress, on_run, fewshot_kwargs)


def unet_subsets(pipe, concepts: Sequence[str], seeds: Sequence[int] = (0, 1, 2), judge: Judge | None = None,
                 *, measure: bool = True, others: Sequence[str] | None = None,
                 per_prompt: int = DEFAULTS.per_prompt, per_other: int = DEFAULTS.per_other,
                 eval_seed: int = DEFAULTS.seed, progress: bool = True,
                 on_run: Callable[[str], None] | None = None, concept_set: ConceptSet | None = None,
                 **esd_kwargs) -> pd.DataFrame:
    """FFN versus attention in the UNet: ESD of each concept through each subset of :data:`UNET_SUBSETS`
    (FFNs only, self-attention only, cross-attention only), per seed; rows as :func:`ffn_vs_attention`'s.
    Summarise with :func:`subset_rates` and :func:`unet_finding`."""
    runs = [Planned(concept, name, (selector,), None, "all", name, False, seed)
            for concept in as_list(concepts) for seed in seeds for name, selector in UNET_SUBSETS.items()]
    measurer = Measurer.make(pipe, judge, concept_set, measure, others, per_prompt, per_other, eval_seed)
    return _run_table(pipe, runs, "esd", measurer, progress, on_run, esd_kwargs)


@dataclass
class Measurer:
    """Measures runs against each concept's baseline, measured once (or nothing, for ``judge=None``)."""

    judge: Judge | None
    concept_set: ConceptSet | None
    settings: dict
    baselines: dict[str, dict] = field(default_factory=dict)
    base_seconds: float = 0.0

    @classmethod
    def make(cls, pipe, judge: Judge | None, concept_set: ConceptSet | None, measure: bool,
             others: Sequence[str] | None, per_prompt: int, per_other: int, eval_seed: int) -> "Measurer":
        profile = profile_of(pipe)
        if measure:
            judge = judge if judge is not None else profile.judge()
            concept_set = concept_set if concept_set is not None else profile.concept_set()
        settings = dict(others=others, per_prompt=per_prompt, per_other=per_other, seed=eval_seed)
        return cls(judge if measure else None, concept_set, settings)

    def __call__(self, pipe, concept: str, edit: Edit) -> dict:
        """The run's scores (empty when not measuring) and the seconds they took."""
        if self.judge is None:
            return {"eval_seconds": float("nan")}
        before = self.baseline(pipe, concept)
        t0 = time.perf_counter()
        scores = evaluate(pipe, self.judge, concept, edit=edit, before=before,
                          concept_set=self.concept_set, **self.settings)
        return {**{k: v for k, v in scores.items() if k not in ("others", "settings")},
                "eval_seconds": time.perf_counter() - t0}

    def baseline(self, pipe, concept: str) -> dict:
        """The unedited model's scores on ``concept``, measured on first use (a grid's workers are given
        them instead: one measurement per concept for the whole cluster)."""
        if concept not in self.baselines:
            t0 = time.perf_counter()
            self.baselines[concept] = evaluate(pipe, self.judge, concept, concept_set=self.concept_set,
                                               **self.settings)
            self.base_seconds += time.perf_counter() - t0
        return self.baselines[concept]


def _run_table(pipe, runs: Sequence[Planned], method: str, measure: Measurer, progress: bool,
               on_run: Callable[[str], None] | None, method_kwargs: dict) -> pd.DataFrame:
    """Run the planned runs and measure each; ``on_run(label)`` is called after each run (for progress
    bars other than the text one)."""
    check_method(method)
    if "parts" in method_kwargs:
        raise ValueError("the sweep chooses `parts` itself; give `components` and `layers` instead")
    rows = []
    for run in tqdm(runs, desc=f"{method} sweep", disable=not progress):
        row = run_one(pipe, run, method, measure, method_kwargs)
        rows.append(row)
        if on_run is not None:
            on_run(f"{row['part']} (seed {run.seed})")
    table = pd.DataFrame(rows)
    if len(table):
        table["layer"] = table["layer"].astype("Int64")
    table.attrs.update(baselines={c: {k: v for k, v in b.items() if k != "settings"}
                                  for c, b in measure.baselines.items()},
                       base_seconds=measure.base_seconds)
    return table


def run_one(pipe, run: Planned, method: str, measure: Measurer, method_kwargs: dict) -> dict:
    """Erase, measure and size one planned run: one sweep row (empty ``run.selectors``: the method's
    default parts, named ``"default"``)."""
    selectors = list(run.selectors) or None
    edit = erase(pipe, run.concept, method, selectors, progress=False, seed=run.seed, **method_kwargs)
    row = dict(method=method, concept=run.concept, seed=run.seed, subset=run.subset,
               part=_compact(pipe, selectors) if selectors else "default", layer=run.layer,
               layer_name=run.layer_name, component=run.component, cumulative=run.cumulative)
    row |= measure(pipe, run.concept, edit)
    order = {layer: i for i, layer in enumerate(dict.fromkeys(layer_of(n) for n in part_names(pipe)))}
    row |= _sizes(edit.summary(pipe), order) if edit.deltas else dict(dW=0.0, dW_relative=0.0, dW_by_layer={})
    return row | dict(parts_edited=tuple(edit.parts), seconds=edit.seconds)


def _sizes(summary: pd.DataFrame, order: dict[str, int]) -> dict:
    """||dW|| of an edit: all parts together, relative to their weights, and per layer in network order."""
    by_layer = summary.assign(sq=summary["dW"] ** 2).groupby("layer")["sq"].sum() ** 0.5
    total = float((summary["dW"] ** 2).sum())
    return dict(dW=math.sqrt(total), dW_relative=math.sqrt(total / float((summary["W"] ** 2).sum())),
                dW_by_layer={k: float(by_layer[k]) for k in sorted(by_layer.index, key=order.__getitem__)})


VALUES = ("efficacy", "preservation", "drift", "drift_chance", "dW", "seconds")


def aggregate(table: pd.DataFrame, by: str | Sequence[str] = "subset",
              values: Sequence[str] = VALUES) -> pd.DataFrame:
    """Mean and standard deviation (over seeds, and over whatever else ``by`` leaves out) of ``values``.

    Columns ``<value>`` (mean), ``<value>_std`` and ``n`` (runs), one row per group, in table order.

    >>> t = pd.DataFrame({"subset": ["ffn", "ffn", "attn"], "efficacy": [0.5, 1.0, 0.0]})
    >>> aggregate(t, values=["efficacy"]).round(3).values.tolist()
    [['ffn', 0.75, 0.354, 2], ['attn', 0.0, nan, 1]]
    """
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in [*by, *values] if c not in table.columns]
    if missing:
        raise KeyError(f"the table has no column {', '.join(missing)}; it has {', '.join(table.columns)}")
    grouped = table.groupby(by, dropna=False, sort=False)
    out = grouped[list(values)].mean()
    for v in values:
        out[f"{v}_std"] = grouped[v].std()
    out["n"] = grouped.size()
    return out[[c for v in values for c in (v, f"{v}_std")] + ["n"]].reset_index()


def finding(table: pd.DataFrame, concept_set: ConceptSet | None = None, about: float = 0.15, much_less: float = 0.25,
            alpha: float = 0.05) -> str:
    """Whether the few-shot paper's two findings hold in ``table`` (from :func:`ffn_vs_attention`), with
    intervals, and "not significant at n" or "too little data" where the runs cannot decide.

    (a) Knowledge sits mainly in the FFNs: FFN-only efficacy within ``about`` of everything's, and at
    least ``much_less`` above attention-only's (paired bootstrap over concept x seed). (b) Erased
    objects drift to related objects: more often than erased objects of *other* groups land on those
    objects (:func:`workbench.metrics.drift_test`; needs the ``concept_set`` the runs were measured on).
    """
    for col in ("subset", "efficacy", "drift", "n_images"):
        if col not in table.columns:
            raise ValueError(f"finding needs measured runs (column {col!r} is missing): run "
                             "ffn_vs_attention(...) with measure=True")
    return _finding_ffn(table, about, much_less, alpha) + "\n" + _finding_drift(table, alpha, concept_set)


def _finding_ffn(table: pd.DataFrame, about: float, much_less: float, alpha: float = 0.05) -> str:
    eff = table.groupby("subset")["efficacy"].mean()
    need = [s for s in ("ffn", "attn", "all") if s not in eff.index]
    if need:
        return f"(a) FFN versus attention: not measured (no runs of subset {', '.join(need)})."
    runs = table[table["subset"].isin(["ffn", "attn", "all"])]
    cells = {s: _cells(runs[runs["subset"] == s]) for s in ("ffn", "attn", "all")}
    units = min(len(c) for c in cells.values())
    n_concepts, n_seeds = table["concept"].nunique(), table["seed"].nunique()
    means = ", ".join(f"{name} {cells[s].attrs['rate']}" for s, name in
                      (("ffn", "FFN only"), ("attn", "attention only"), ("all", "everything")))
    head = f"(a) Knowledge mainly in the FFNs: "
    tail = (f" Efficacy over {n_concepts} concept(s) x {n_seeds} seed(s) [95% interval]: {means} (criterion: FFN "
            f"only within {about:.2f} of everything and at least {much_less:.2f} above attention only).")
    short = enough(units, int(cells["ffn"]["count"].sum()))
    if short:
        return head + short + "." + tail
    above = difference(*_paired(cells["ffn"], cells["attn"]), level=1 - alpha)
    below = difference(*_paired(cells["all"], cells["ffn"]), level=1 - alpha)
    if below.a - below.b <= about and above.a - above.b >= much_less and above.significant:
        verdict = "holds on this model as measured"
    elif below.lo > about or above.hi < much_less:
        why = ([f"everything minus FFN only is {below.a - below.b:+.2f} [{below.lo:+.2f}, {below.hi:+.2f}]"]
               if below.lo > about else []) + (
              [f"FFN only minus attention only is {above.a - above.b:+.2f} [{above.lo:+.2f}, {above.hi:+.2f}]"]
              if above.hi < much_less else [])
        verdict = f"does not hold on this model as measured ({'; '.join(why)})"
    else:
        verdict = (f"not significant at n = {int(cells['ffn']['count'].sum())} images per subset "
                   f"({units} concept x seed units)")
    return head + verdict + "." + tail


def subset_rates(table: pd.DataFrame, by: str | Sequence[str] = "subset") -> pd.DataFrame:
    """Per group of ``by``: efficacy as a share of images with its 95% interval (``efficacy_lo``,
    ``efficacy_hi``: bootstrap over concept x seed units, :func:`workbench.stats.cluster_rate`), mean
    preservation, images and units.

    >>> t = pd.DataFrame({"subset": ["ffn"] * 2, "concept": ["a", "b"], "seed": [0, 0], "efficacy": [0.5, 1.0],
    ...                   "n_images": [8, 8], "preservation": [0.9, 1.0]})
    >>> subset_rates(t)[["subset", "efficacy", "k", "n", "units"]].values.tolist()
    [['ffn', 0.75, 12, 16, 2]]
    """
    by = [by] if isinstance(by, str) else list(by)
    rows = []
    for key, runs in table.groupby(by, sort=False):
        cells = _cells(runs)
        rate = cells.attrs["rate"]
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "efficacy": rate.rate,
                     "efficacy_lo": rate.lo, "efficacy_hi": rate.hi, "k": rate.k, "n": rate.n, "units": len(cells),
                     "interval": rate.method, "preservation": float(runs["preservation"].mean())})
    return pd.DataFrame(rows)


def unet_finding(table: pd.DataFrame, alpha: float = 0.05) -> str:
    """What :func:`unet_subsets` shows in words: each subset's efficacy with its interval, and whether
    cross-attention erases more than the FFNs and than self-attention (paired bootstrap over concept x
    seed units; "not significant at n = ..." when the data cannot tell)."""
    need = [s for s in UNET_SUBSETS if s not in set(table.get("subset", ()))]
    if need:
        return f"FFN versus attention in the UNet: not measured (no runs of subset {', '.join(need)})."
    cells = {s: _cells(table[table["subset"] == s]) for s in UNET_SUBSETS}
    rates = ", ".join(f"{name} {cells[s].attrs['rate']}" for s, name in
                      (("ffn", "FFNs only"), ("attn", "self-attention only"), ("xattn", "cross-attention only")))
    out = [f"ESD efficacy through UNet subsets over {table['concept'].nunique()} concept(s) x "
           f"{table['seed'].nunique()} seed(s) [95% interval]: {rates}."]
    units = min(len(c) for c in cells.values())
    short = enough(units, int(cells["xattn"]["count"].sum()))
    for other, name in (("ffn", "the FFNs"), ("attn", "self-attention")):
        if short:
            out.append(f"Cross-attention versus {name}: {short}.")
            continue
        d = difference(*_paired(cells["xattn"], cells[other]), level=1 - alpha)
        out.append(f"Cross-attention erases more than {name}: {d}.")
    return " ".join(out)


def _cells(runs: pd.DataFrame) -> pd.DataFrame:
    """Erased images (``sum``) of all images (``count``) per concept x seed cell; ``attrs["rate"]``: the
    pooled efficacy with its interval."""
    erased = (runs["efficacy"] * runs["n_images"]).round().astype(int)
    out = unit_cells(runs.assign(erased=erased), "erased", "n_images")
    out.attrs["rate"] = cluster_rate(out["sum"].to_numpy(), out["count"].to_numpy())
    return out


def _paired(a: pd.DataFrame, b: pd.DataFrame) -> tuple:
    both = paired_cells(a, b)
    return both["sum_a"], both["count_a"], both["sum_b"], both["count_b"]


def _finding_drift(table: pd.DataFrame, alpha: float, concept_set: ConceptSet | None = None) -> str:
    head = "(b) Erased objects drift to related objects: "
    if "labels" not in table.columns or table["drift"].notna().sum() == 0:
        return head + "not measured (drift needs measured runs of object concepts, with the judge's labels)."
    cs = concept_set
    if cs is None:
        return head + "not measured (give the concept set the runs were measured on)."
    objects = table[table["drift"].notna()]
    rows = objects[["concept", "seed", "subset", "part", "labels"]].explode("labels").rename(columns={"labels": "label"})
    groups = {cs.group(c) for c in objects["concept"].unique()}
    if len(groups) < 2:
        return head + (f"cannot be tested here: its null (where erased objects of other groups land) needs erased "
                       f"objects from at least two groups; this table has only the {', '.join(groups)} group.")
    test = drift_test(rows.dropna(subset=["label"]), cs, unit=("concept", "seed", "subset", "part"))
    pooled = test.iloc[-1]
    n = int(pooled["moved"])
    short = enough(objects[["concept", "seed"]].drop_duplicates().shape[0], n)
    if short:
        return head + short + "."
    if pooled["p"] < alpha and pooled["difference"] > 0:
        verdict = "holds on this model as measured"
    elif pooled["hi"] < 0:
        verdict = "does not hold on this model as measured (they land on related objects less often than the null)"
    else:
        verdict = f"not significant at n = {n} moved images"
    return (head + verdict + f". Of {n} images that no longer showed the erased object, {pooled['observed']:.0%} "
            f"were called another object of its group; the null (images of erased objects of other groups "
            f"called one of those objects) is {pooled['null']:.0%}; difference {pooled['difference']:+.0%} "
            f"[{pooled['lo'] * 100:+.0f}, {pooled['hi'] * 100:+.0f}], one-sided bootstrap p = {pooled['p']:.2g} "
            f"over concept x seed x run units.")


def check_method(method: str) -> None:
    """Raise for a method the layer sweep does not run, naming those it does.

    >>> check_method("ablate")
    Traceback (most recent call last):
    ValueError: unknown method 'ablate'; the sweep runs rece, uce, fewshot, esd, prune
    """
    runs = [name for name, m in REGISTRY.items() if m.scope or m.dit_scope]
    if method in REGISTRY and method not in runs:
        raise ValueError(f"{method} has no layer sweep (it acts on one block); the sweep runs {', '.join(runs)}")
    if method not in runs:
        raise ValueError(f"unknown method {method!r}; the sweep runs {', '.join(runs)}")


def _layer_runs(pipe, concept: str, method: str, components: Sequence[str] | None, cumulative: bool,
                seeds: Sequence[int], picked: Sequence[int] | None) -> list[Planned]:
    all_layers = layers(pipe, method)
    if isinstance(components, str):
        components = [components]
    where, registered = scope(pipe, method)
    components = list(registered if components is None else components)
    if not components:
        raise ValueError("give at least one component, e.g. 'ffn' or 'attn'")
    parts_in = select(pipe, [f"{layer}.*" for layer in all_layers])
    available = ", ".join(sorted({component_of(n) for n in parts_in}))
    if all_layers[0].startswith("dit."):
        available += " (or a group: " + ", ".join(DIT_GROUPS) + ")"
    if method == "fewshot":
        scoped = select(pipe, where)
        available += " (or one matrix: " + ", ".join(dict.fromkeys(n.split(".", 2)[2] for n in scoped)) + ")"
    found = {(layer, comp): selectors(pipe, layer, comp) for layer in all_layers for comp in components}
    for comp in components:
        if not any(found[(layer, comp)] for layer in all_layers):
            raise ValueError(f"component {comp!r} matches nothing in the layers {method} edits "
                             f"({all_layers[0]} ... {all_layers[-1]}); components there: {available}")
    idx = range(len(all_layers)) if picked is None else list(picked)
    bad = [i for i in idx if not 0 <= i < len(all_layers)]
    if bad:
        raise ValueError(f"layer index {bad[0]} is out of range: {method} edits {len(all_layers)} layers, "
                         f"0..{len(all_layers) - 1}")
    runs = []
    for seed in seeds:
        for i in idx:
            for comp in components:
                if not found[(all_layers[i], comp)]:
                    continue
                upto = all_layers[:i + 1] if cumulative else [all_layers[i]]
                runs.append(Planned(concept, "cumulative" if cumulative else "layer",
                                    tuple(s for layer in upto for s in found[(layer, comp)]), i, all_layers[i], comp,
                                    cumulative, seed))
    return runs


def _compact(pipe, selectors: list[str]) -> str:
    """A short name for a set of parts: ``"text.*.ffn + text.5.attn"`` rather than 14 part names."""
    if len(selectors) == 1:
        return selectors[0]
    chosen = select(pipe, selectors)
    text_layers = layers(pipe, "fewshot")
    out = []
    for comp in dict.fromkeys(component_of(n) for n in chosen):
        have = [layer for layer in dict.fromkeys(layer_of(n) for n in chosen if component_of(n) == comp)]
        full = all(set(select(pipe, _glob(layer, comp))) <= set(chosen) for layer in have)
        if full and have == text_layers:
            out.append(f"text.*.{comp}")
        elif full:
            out += [_glob(layer, comp) for layer in have]
        else:
            out += [n for n in chosen if component_of(n) == comp]
    return " + ".join(out)
