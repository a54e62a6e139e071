"""Attack success rates over methods x concepts x attacks, and over the single-part edits of a layer sweep.

:func:`success_table` erases each concept with each method (the model profile's defaults, one seed),
attacks each edit with each attack at one budget per attack (the same for every method), and judges
everything on the held-out prompts and evaluation seeds; :func:`summary` turns its image rows into
rates with 95% intervals (bootstrap over concept x seed), beside the unedited model's and the
un-attacked edit's rates.

>>> import workbench
>>> from workbench.profile import profile_of
>>> pipe = workbench.load("toy")
>>> t = success_table(pipe, profile_of(pipe).judge(), ["apple"], ["uce"], ["derived"], eval_seeds=[7000],
...                   progress=False)
>>> summary(t)[["method", "attack", "n"]].values.tolist()
[['uce', 'unedited', 3], ['uce', 'none', 3], ['uce', 'derived', 3]]
"""
from __future__ import annotations

import resource
from typing import Callable, Sequence

import pandas as pd
from tqdm.auto import tqdm

from ..anatomy import component_of, layer_of, select
from ..concepts import ConceptSet
from ..edits import Edit
from ..judges import Judge
from ..methods import REGISTRY, erase
from ..profile import profile_of
from ..stats import MIN_UNITS, difference, interval_text, paired_cells, paired_difference, rates, unit_cells
from . import EVAL_SEEDS, attack, budget_curve, unattacked

#: The rows a summary lists first: the ceiling and the floor an attack is read against.
BASELINES = ("unedited", "none")


def peak_gb() -> float:
    """This process's peak resident memory so far, in GB (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


#: The columns of an attack table: one row per judged image.
COLUMNS = ["method", "concept", "attack", "budget", "seed", "prompt", "label", "hit", "edit_seconds",
           "attack_seconds", "peak_gb"]


def success_table(pipe, judge: Judge, concepts: Sequence[str], methods: Sequence[str], attacks: Sequence[str],
                  budgets: dict[str, int | Sequence[int]] | None = None, eval_seeds: Sequence[int] = EVAL_SEEDS,
                  seed: int = 0, concept_set: ConceptSet | None = None, progress: bool = True,
                  on_run: Callable[[str], None] | None = None) -> pd.DataFrame:
    """One row per judged image (:data:`COLUMNS`): each concept erased by each method with seed ``seed``,
    then attacked by each attack at its budget (a list of budgets gives a budget curve, see
    :func:`attack_edit`); ``table.attrs["crafted"]`` keeps each attack's prompts and settings."""
    cs = concept_set if concept_set is not None else profile_of(pipe).concept_set()
    parts, crafted = [], {}
    jobs = [(m, c) for m in methods for c in concepts]
    for method, concept in tqdm(jobs, desc="attacks", disable=not progress):
        edit = erase(pipe, concept, method, seed=seed, progress=False)
        rows, made = attack_edit(pipe, edit, judge, concept, attacks, budgets, eval_seeds, seed, cs, on_run)
        parts.append(rows.assign(method=method))
        crafted.update({(method, concept, *k): v for k, v in made.items()})
    table = pd.concat(parts, ignore_index=True)[COLUMNS]
    table.attrs["crafted"] = crafted
    return table


def attack_edit(pipe, edit: Edit, judge: Judge, concept: str, attacks: Sequence[str],
                budgets: dict[str, int | Sequence[int]] | None = None, eval_seeds: Sequence[int] = EVAL_SEEDS,
                seed: int = 0, concept_set: ConceptSet | None = None,
                on_run: Callable[[str], None] | None = None) -> tuple[pd.DataFrame, dict]:
    """Attack one edit with every attack, judged on the held-out prompts and ``eval_seeds``: the image
    rows (the unedited model's and the un-attacked edit's first; :data:`COLUMNS` but ``method``) and,
    per ``(attack, budget)``, what the attack crafted. A budget given as a list runs
    :func:`~workbench.attacks.budget_curve`: one row set per budget, an optimising attack trained once."""
    cs = concept_set if concept_set is not None else profile_of(pipe).concept_set()
    budgets = dict(budgets or {})
    base, _ = unattacked(pipe, edit, concept, judge, eval_seeds, cs)
    parts = [base.assign(budget=None, edit_seconds=edit.seconds, attack_seconds=0.0, peak_gb=peak_gb())]
    crafted = {}
    for name in attacks:
        given = budgets.get(name)
        results = (budget_curve(pipe, edit, concept, judge, name, given, seed, eval_seeds, cs)
                   if isinstance(given, (list, tuple)) else
                   [attack(pipe, edit, concept, judge, name, given, seed, eval_seeds, cs)])
        for result in results:
            budget = result.budget
            parts.append(result.table.assign(budget=budget, edit_seconds=edit.seconds,
                                             attack_seconds=result.seconds, peak_gb=peak_gb()))
            crafted[(name, budget)] = {"prompts": result.crafted.prompts,
                                       **{k: v for k, v in result.info.items() if k != "checkpoints"}}
        if on_run is not None:
            on_run(f"{edit.method} {concept} {name}")
    table = pd.concat(parts, ignore_index=True)
    table["budget"] = table["budget"].astype("Int64")
    return table[[c for c in COLUMNS if c != "method"]], crafted


def grid_images(runs: pd.DataFrame) -> pd.DataFrame:
    """The attack table (:data:`COLUMNS`, plus the run's ``erase_seed``, ``part`` and ``key``) of an attack
    grid's rows (:func:`workbench.grid.run_grid` with ``attacks``, or :func:`workbench.store.load_results`);
    runs that failed are left out (``table.attrs["failed"]`` counts them)."""
    if "images" not in runs:
        raise ValueError("these rows are not an attack grid's (they have no 'images'); run a grid with an "
                         "'attacks' setting, e.g. data/grids/attacks_toy.yaml")
    ok = runs[runs["error"].isna() & runs["images"].notna()]
    frames = [pd.DataFrame(list(r.images)).assign(method=r.method, concept=r.concept, erase_seed=r.seed, part=r.part,
                                                  key=r.key, edit_seconds=r.seconds) for r in ok.itertuples()]
    if not frames:
        return pd.DataFrame(columns=[*COLUMNS, "erase_seed", "part", "key"])
    table = pd.concat(frames, ignore_index=True)
    table["budget"] = table["budget"].astype("Int64")
    table["hit"] = table["hit"].astype(bool)
    table = table[[*COLUMNS, "erase_seed", "part", "key"]]
    table.attrs["failed"] = int(len(runs) - len(ok))
    return table


def summary(table: pd.DataFrame, by: Sequence[str] = ("method", "attack")) -> pd.DataFrame:
    """Success rate per ``by`` group with its 95% interval, ``k``, ``n`` and concept x seed ``units``;
    the baselines (``unedited``, ``none``) first within each method."""
    out = rates(table, list(by))
    order = {a: i for i, a in enumerate([*BASELINES, *dict.fromkeys(table["attack"])])}
    return out.sort_values(list(by), key=lambda col: col.map(order) if col.name == "attack" else
                           col.map({m: i for i, m in enumerate(dict.fromkeys(table[col.name]))}),
                           kind="stable").reset_index(drop=True)


def rates_wide(table: pd.DataFrame, rows: str = "attack", columns: str = "method") -> pd.DataFrame:
    """The success rates of an attack table as a paper prints them: one row per ``rows`` value (attacks,
    baselines first; or ``"budget"``...), one column per ``columns`` value, each cell ``rate [lo, hi]``
    (percent, 95% interval), and the images per cell (``n``; a range where cells differ)."""
    s = summary(table, (columns, rows))
    s = s.assign(cell=[interval_text(r, lo, hi) for r, lo, hi in zip(s["rate"], s["lo"], s["hi"])])
    wide = s.pivot(index=rows, columns=columns, values="cell")
    wide = wide.reindex(index=list(dict.fromkeys(s[rows])), columns=list(dict.fromkeys(s[columns]))).fillna("")
    n = s.groupby(rows, sort=False)["n"].agg(lambda x: str(x.min()) if x.min() == x.max() else f"{x.min()}-{x.max()}")
    wide["n"] = n.reindex(wide.index)
    wide.columns.name = None
    return wide


def attack_layers(pipe, judge: Judge, concept: str, method: str, attack_name: str, budget: int | None = None,
                  components: Sequence[str] | None = None, eval_seeds: Sequence[int] = EVAL_SEEDS,
                  seed: int = 0, concept_set: ConceptSet | None = None, progress: bool = True) -> pd.DataFrame:
    """Attack each single-part edit of a layer sweep (``method`` scoped to one layer's component at a
    time; ``components`` default to the method's: a UNet's cross-attention k and v, a transformer's
    double blocks' text k and v): one row per part with ``efficacy`` (share of the un-attacked
    held-out images that lost the concept) and ``attack_success``, shaped for
    :func:`workbench.plots.sweep_heatmap` (``value="attack_success"``)."""
    cs = concept_set if concept_set is not None else profile_of(pipe).concept_set()
    scope, default = REGISTRY[method].scope_on(pipe)
    components = default if components is None else components
    names = [n for n in select(pipe, scope) if component_of(n) in components]
    layer_order = list(dict.fromkeys(layer_of(n) for n in names))
    rows = []
    for name in tqdm(names, desc=f"{attack_name} per part", disable=not progress):
        edit = erase(pipe, concept, method, parts=name, seed=seed, progress=False)
        plain, _ = unattacked(pipe, edit, concept, judge, eval_seeds, cs)
        result = attack(pipe, edit, concept, judge, attack_name, budget, seed, eval_seeds, cs)
        kept = plain.loc[plain["attack"] == "none", "hit"]
        rows.append(dict(method=method, concept=concept, attack=attack_name, part=name,
                         layer=layer_order.index(layer_of(name)), layer_name=layer_of(name),
                         component=component_of(name), cumulative=False, efficacy=1 - float(kept.mean()),
                         attack_success=result.rate.rate, lo=result.rate.lo, hi=result.rate.hi, n=result.rate.n))
    table = pd.DataFrame(rows)
    table["layer"] = table["layer"].astype("Int64")
    return table


def _cells(table: pd.DataFrame, method: str, attack: str) -> pd.DataFrame:
    rows = table[(table["method"] == method) & (table["attack"] == attack)]
    return unit_cells(rows)


def compare_methods(table: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Per attack, each pair of methods (a, b): success rate a minus b with its 95% interval and
    two-sided p-value (paired bootstrap over the concept x seed cells both have), and the verdict:
    "a higher", "b higher" or "not significant at n = ..."."""
    methods = list(dict.fromkeys(table["method"]))
    rows = []
    for name in [a for a in dict.fromkeys(table["attack"]) if a != "unedited"]:  # unedited: the same model
        for i, a in enumerate(methods):
            for b in methods[i + 1:]:
                both = paired_cells(_cells(table, a, name), _cells(table, b, name))
                if both.empty:
                    continue
                d = difference(both["sum_a"], both["count_a"], both["sum_b"], both["count_b"])
                n = int(both["count_a"].sum())
                verdict = (f"{a} higher" if d.a > d.b else f"{b} higher") if d.p_two < alpha else \
                    f"not significant at n = {n} per method"
                rows.append(dict(attack=name, a=a, b=b, rate_a=d.a, rate_b=d.b, difference=d.a - d.b, lo=d.lo,
                                 hi=d.hi, p=d.p_two, n=n, verdict=verdict))
    return pd.DataFrame(rows)


def concept_differences(table: pd.DataFrame, a: str, b: str, attack: str, budget: int | None = None) -> pd.DataFrame:
    """Success rate of ``attack`` after method ``a`` minus after method ``b``, per concept and pooled: the
    rows of a forest plot (:func:`workbench.plots.forest`).

    One row per concept (``rate_a, rate_b, difference, lo, hi, n``: images paired by seed and held-out prompt,
    Newcombe's interval for paired proportions over the concept's images), then the row ``"pooled"``:
    the difference of the pooled rates with a 95% interval from a bootstrap over *concepts* (each
    resampled concept brings all its seeds and prompts), so the interval widens as much as concepts
    disagree, its two-sided ``p`` and the verdict. ``direction`` says which way each row goes: ``a higher``,
    ``b higher`` or ``not significant``. ``budget``: which one, for an attack run at several.
    """
    rows, hits = [], []
    table = table[table["attack"] == attack]
    if "budget" in table and budget is not None:
        table = table[table["budget"] == budget]
    elif "budget" in table and table["budget"].nunique() > 1:
        raise ValueError(f"{attack} ran at budgets {', '.join(map(str, sorted(table['budget'].dropna().unique())))}; "
                         "give budget=... to compare at one")
    # the i-th image of a seed is the same held-out prompt after either method (crafted prompts differ)
    table = table.assign(slot=table.groupby(["method", "concept", "seed"]).cumcount())
    for concept in dict.fromkeys(table["concept"]):
        pair = [table[(table["method"] == m) & (table["concept"] == concept)].set_index(["seed", "slot"])["hit"]
                for m in (a, b)]
        both = pd.concat(pair, axis=1, keys=["a", "b"], join="inner")
        if both.empty:
            continue
        d, lo, hi = paired_difference(both["a"].to_numpy(bool), both["b"].to_numpy(bool))
        rows.append(dict(concept=concept, rate_a=both["a"].mean(), rate_b=both["b"].mean(), difference=d, lo=lo,
                         hi=hi, n=len(both), p=float("nan")))
        hits.append((int(both["a"].sum()), int(both["b"].sum()), len(both)))
    if not rows:
        raise ValueError(f"no concept has {attack!r} rows for both {a!r} and {b!r}; the table has methods "
                         f"{', '.join(dict.fromkeys(table['method']))}")
    ka, kb, n = (list(x) for x in zip(*hits))
    pooled = difference(ka, n, kb, n)
    rows.append(dict(concept="pooled", rate_a=pooled.a, rate_b=pooled.b, difference=pooled.a - pooled.b,
                     lo=pooled.lo, hi=pooled.hi, n=sum(n), p=pooled.p_two))
    out = pd.DataFrame(rows)
    out["direction"] = ["not significant" if lo <= 0 <= hi else f"{a} higher" if lo > 0 else f"{b} higher"
                        for lo, hi in zip(out["lo"], out["hi"])]
    if len(rows) - 1 < MIN_UNITS:  # a bootstrap over fewer concepts cannot see their spread
        out.loc[out.index[-1], "direction"] = f"too few concepts ({len(rows) - 1}) to pool"
    return out.assign(a=a, b=b, attack=attack)


def across_concepts(table: pd.DataFrame, a: str, b: str, attacks: Sequence[str] | None = None,
                    alpha: float = 0.05) -> pd.DataFrame:
    """Method ``a`` against method ``b`` per attack (and per budget, for an attack run at several), read
    over concepts: the pooled difference with its interval from a bootstrap over concepts, how many
    concepts go each way (:func:`concept_differences`), and the verdict in words: ``"a higher"``,
    ``"b higher"``, ``"depends on the concept"`` (concepts significantly both ways; with the pooled
    direction where it is significant) or ``"not significant at N concepts"``."""
    attacks = [x for x in dict.fromkeys(table["attack"]) if x != "unedited"] if attacks is None else list(attacks)
    rows = []
    for attack in attacks:
        budgets = table.loc[table["attack"] == attack, "budget"].dropna().unique() if "budget" in table else []
        for budget in sorted(budgets) if len(budgets) > 1 else [None]:
            d = concept_differences(table, a, b, attack, budget)
            pooled, each = d.iloc[-1], d.iloc[:-1]
            up, down = int((each["lo"] > 0).sum()), int((each["hi"] < 0).sum())
            overall = (f"{a} higher" if pooled["difference"] > 0 else f"{b} higher") if pooled["p"] < alpha else None
            if up and down:
                verdict = "depends on the concept" + (f" ({overall} pooled)" if overall else "")
            elif len(each) < MIN_UNITS:
                verdict = f"too few concepts ({len(each)}) to pool"
            else:
                verdict = overall or f"not significant at {len(each)} concepts"
            rows.append(dict(attack=attack, budget=budget, a=a, b=b, rate_a=pooled["rate_a"], rate_b=pooled["rate_b"],
                             difference=pooled["difference"], lo=pooled["lo"], hi=pooled["hi"], p=pooled["p"],
                             concepts=len(each), a_higher=up, b_higher=down, neither=len(each) - up - down,
                             verdict=verdict))
    out = pd.DataFrame(rows)
    out["budget"] = out["budget"].astype("Int64")
    return out
