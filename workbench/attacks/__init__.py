"""Does the erased concept come back? Attacks on an erasure, judged on held-out prompts and seeds.

An attack takes a pipeline and an :class:`~workbench.edits.Edit` (or a pipeline with the edit already
applied), a concept, a judge, a budget and a seed, and crafts prompt embeddings that try to bring the
concept back (:data:`ATTACKS`):

=================  =====================================================================  ==============
``derived``        RECE's closed form against the final edited cross-attention weights    (no budget)
``inversion``      soft tokens learnt on the erased model from the concept's images       steps
``unlearndiff``    a 5-token prefix optimised with the erased model's denoising loss      steps
``concept_vector`` innocent prompts + eta x the concept's direction (Ring-A-Bell's idea)  eta values
=================  =====================================================================  ==============

The optimising attacks train with the model family's own loss (noise, v- or flow-matching velocity) and
run on every family; on FLUX and SD 3 :mod:`.unlearndiff`'s prefix lives in the encoders that share the
token rows' vocabulary (its module doc says why). The crafted embeddings stand for the concept's
*held-out* probe wordings (never an erase prompt) and are judged on :data:`EVAL_SEEDS`, which no erasure
or attack in the workbench draws from. The attack success rate is the share of those images in which the
judge sees the concept.

>>> import workbench
>>> from workbench.methods import erase
>>> from workbench.profile import profile_of
>>> pipe = workbench.load("toy")
>>> result = attack(pipe, erase(pipe, "apple", "uce"), "apple", profile_of(pipe).judge(), "derived",
...                 eval_seeds=[7000])
>>> result.table.columns.tolist()
['attack', 'concept', 'seed', 'prompt', 'label', 'hit']
>>> len(result.table), 0 <= result.rate.rate <= 1
(3, True)
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import pandas as pd
import torch
from PIL import Image

from ..concepts import ConceptSet
from ..edits import Edit, Timer
from ..judges import Judge
from ..metrics import judge_prompts
from ..profile import profile_of
from ..sampling import generate_from
from ..stats import Rate, cluster_rate, unit_cells
from .common import Crafted, eval_prompts
from . import concept_vector as _cv, inversion as _inv, unlearndiff as _ud
from .concept_vector import concept_vector
from .derived import derived
from .inversion import inversion
from .unlearndiff import unlearndiff

#: Every attack by name, in the order tables list them.
ATTACKS: dict[str, Callable[..., Crafted]] = {
    "derived": derived, "inversion": inversion, "unlearndiff": unlearndiff, "concept_vector": concept_vector,
}
#: Each attack's budget when none is given (optimisation steps, or eta values); the derived one has none.
BUDGETS: dict[str, int | None] = {"derived": None, "inversion": _inv.STEPS, "unlearndiff": _ud.STEPS,
                                  "concept_vector": _cv.BUDGET}
#: Evaluation seeds: no erasure (few-shot trains on seeds 0..), attack (0..) or metric (1234) uses them.
EVAL_SEEDS = (7000, 7001, 7002, 7003)


@dataclass
class Attack:
    """An attack's result: what it crafted, the images those make on the evaluation seeds, one row per
    image in ``table`` (``attack, concept, seed, prompt, label, hit``), the success ``rate`` with its
    interval (bootstrap over seeds), and the seconds crafting took."""

    name: str
    concept: str
    crafted: Crafted
    images: list[Image.Image]
    table: pd.DataFrame
    rate: Rate
    seconds: float
    budget: int | None = None
    seed: int = 0
    info: dict = field(default_factory=dict)


def _check(pipe, edit: Edit | None, concept: str, cs: ConceptSet, name: str, budget: int | None,
           eval_seeds: Sequence[int], seed: int) -> None:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    if budget is not None and (not isinstance(budget, int) or budget < 1):
        raise ValueError(f"budget must be a positive whole number (steps, or eta values) or None for the "
                         f"attack's default, not {budget!r}")
    kind = cs.kind(concept)  # names the concept set's concepts when it is not one of them
    if concept not in cs.labels(kind):
        raise ValueError(f"the judge cannot label {concept!r}: its {kind} labels are {', '.join(cs.labels(kind))}")
    if not eval_seeds:
        raise ValueError("give at least one evaluation seed")
    if seed in eval_seeds:
        raise ValueError(f"the attack's seed {seed} is also an evaluation seed; evaluation seeds must be held out")
    if edit is not None:
        edit.check(pipe)


def judged(pipe, judge: Judge, embeds: torch.Tensor | None, prompts: Sequence[str], concept: str,
           cs: ConceptSet, eval_seeds: Sequence[int], name: str) -> tuple[list[Image.Image], pd.DataFrame]:
    """Generate ``embeds`` (or, for None, the ``prompts`` themselves) on every evaluation seed and let the
    judge choose among the labels of the concept's kind: the images and one row per image."""
    columns = ["attack", "concept", "seed", "prompt", "label", "hit"]
    if embeds is None:
        images, rows = judge_prompts(pipe, judge, prompts, [concept] * len(prompts), eval_seeds, cs)
        return images, rows.assign(attack=name)[columns]
    images, rows = [], []
    labels = cs.labels(cs.kind(concept))
    for s in eval_seeds:
        made = generate_from(pipe, embeds, s)
        for prompt, label in zip(prompts, judge.choose(made, labels)):
            rows.append(dict(attack=name, concept=concept, seed=s, prompt=prompt, label=label, hit=label == concept))
        images += made
    return images, pd.DataFrame(rows, columns=columns)


def _rate(table: pd.DataFrame) -> Rate:
    cells = unit_cells(table)
    return cluster_rate(cells["sum"].to_numpy(), cells["count"].to_numpy())


def attack(pipe, edit: Edit | None, concept: str, judge: Judge, name: str = "derived", budget: int | None = None,
           seed: int = 0, eval_seeds: Sequence[int] = EVAL_SEEDS, concept_set: ConceptSet | None = None,
           **options) -> Attack:
    """Run attack ``name`` on ``pipe`` with ``edit`` applied (``None``: the pipeline as it is) and judge it.

    ``budget`` is the attack's effort (optimisation steps, or the number of eta values; ``None``: its
    default); ``seed`` seeds its optimisation; ``options`` go to the attack function (e.g. ``tokens``,
    ``project``). The pipeline is left exactly as it was.
    """
    cs = concept_set if concept_set is not None else profile_of(pipe).concept_set()
    _check(pipe, edit, concept, cs, name, budget, eval_seeds, seed)
    fn = ATTACKS[name]
    budget = BUDGETS[name] if budget is None else budget
    unknown = [k for k in options if k not in inspect.signature(fn).parameters]
    if unknown:
        raise TypeError(f"{name} has no option {', '.join(map(repr, unknown))}; its options: "
                        f"{', '.join(list(inspect.signature(fn).parameters)[6:])}")
    with edit.apply(pipe) if edit is not None else nullcontext():
        with Timer() as timer:
            crafted = fn(pipe, concept, cs, judge, budget, seed, **options)
        images, table = judged(pipe, judge, crafted.embeds, crafted.prompts, concept, cs, eval_seeds, name)
    return Attack(name, concept, crafted, images, table, _rate(table), timer.seconds, budget, seed, crafted.info)


def budget_curve(pipe, edit: Edit | None, concept: str, judge: Judge, name: str, budgets: Sequence[int],
                 seed: int = 0, eval_seeds: Sequence[int] = EVAL_SEEDS, concept_set: ConceptSet | None = None,
                 **options) -> list[Attack]:
    """Attack ``name`` at each of ``budgets``: one :class:`Attack` per budget, in increasing order.

    An optimising attack (``inversion``, ``unlearndiff``) runs once, to the largest budget, and keeps what
    it had crafted at each smaller one (the same steps in the same order: each is the result a run to
    that budget gives); its ``seconds`` are those that budget took. Other attacks run once per budget.
    """
    budgets = sorted(set(budgets))
    if not budgets:
        raise ValueError("give at least one budget")
    if "checkpoints" not in inspect.signature(ATTACKS.get(name, attack)).parameters:
        return [attack(pipe, edit, concept, judge, name, b, seed, eval_seeds, concept_set, **options) for b in budgets]
    top = attack(pipe, edit, concept, judge, name, budgets[-1], seed, eval_seeds, concept_set,
                 checkpoints=budgets[:-1], **options)
    cs = concept_set if concept_set is not None else profile_of(pipe).concept_set()
    out = []
    with edit.apply(pipe) if edit is not None else nullcontext():
        for b, crafted in top.crafted.info.pop("checkpoints").items():
            images, table = judged(pipe, judge, crafted.embeds, crafted.prompts, concept, cs, eval_seeds, name)
            out.append(Attack(name, concept, crafted, images, table, _rate(table), crafted.info["seconds"], b, seed,
                              crafted.info))
    return out + [replace(top, seconds=top.crafted.info["seconds"])]


def unattacked(pipe, edit: Edit | None, concept: str, judge: Judge, eval_seeds: Sequence[int] = EVAL_SEEDS,
               concept_set: ConceptSet | None = None) -> tuple[pd.DataFrame, dict[str, list[Image.Image]]]:
    """The same held-out prompts and seeds without an attack: rows ``attack="none"`` with the edit and
    ``attack="unedited"`` without it (the ceiling an attack can hope to reach), and their images."""
    cs = concept_set if concept_set is not None else profile_of(pipe).concept_set()
    prompts = eval_prompts(cs, concept)
    before_images, before = judged(pipe, judge, None, prompts, concept, cs, eval_seeds, "unedited")
    with edit.apply(pipe) if edit is not None else nullcontext():
        after_images, after = judged(pipe, judge, None, prompts, concept, cs, eval_seeds, "none")
    return pd.concat([before, after], ignore_index=True), {"unedited": before_images, "none": after_images}


__all__ = ["ATTACKS", "BUDGETS", "EVAL_SEEDS", "Attack", "Crafted", "attack", "budget_curve", "judged", "unattacked",
           "derived", "inversion", "unlearndiff", "concept_vector"]
