"""The toy world's profile: its concept set, its judge (the oracle) and the method defaults measured on it.

>>> from workbench.toy import TOY_CONCEPTS, concept_prompts
>>> concept_prompts("apple")
['a photo of an apple', 'a picture of an apple', 'an icon of an apple', 'apple']
>>> TOY_CONCEPTS.probe("apple", 4)
['an apple', 'an icon of an apple', 'a blue apple', 'an apple by seurat']
>>> TOY_CONCEPTS.others("car")
['truck', 'boat', 'airplane', 'apple', 'sun', 'cat']
"""
from __future__ import annotations

from ..concepts import TEMPLATES, ConceptSet, a
from ..profile import Profile
from .oracle import HEADS, Oracle
from .paths import FEWSHOT_DIR, VOCABULARY_FILE
from .world import GROUP_OF, OBJECTS, PAINTERS

#: Few-shot learning rate on the toy model: the paper's 1e-5 leaves its small text encoder unchanged in
#: 8 steps; 5e-5 erases without drifting to related concepts (benchmarks/erasure.py).
TOY_FEWSHOT_LR = 5e-5

#: UCE's and RECE's lambda on the toy model. A third of the directions of its text embeddings carry
#: almost nothing of the preserved prompts, so the papers' values (UCE 0.5, RECE's epochs 0.1) let an edit
#: move them freely and other concepts fade (preservation 79-89% for five of the 20 concepts); these keep
#: preservation at 93% or more and erase as much (benchmarks/erasure.py).
TOY_LAMBDA = {"uce": dict(lam=2.0), "rece": dict(uce_lam=2.0, lam=0.5)}

#: Okabe-Ito colours of the vocabulary groups in landing maps.
GROUP_COLOURS = {"fruit": "#0072B2", "vehicle": "#E69F00", "sky": "#009E73", "animal": "#CC79A7",
                 "style": "#D55E00", "colour": "#56B4E9"}


class ToyConcepts(ConceptSet):
    """The icon world's 16 objects (4 groups) and 4 painters, probed the way the oracle was validated."""

    def showcase(self, concept: str) -> list[str]:
        """The concept, two related concepts and an unrelated one ("an icon of ..."; styles: cats and boats)."""
        if concept not in self:
            return super().showcase(concept)
        if self.kind(concept) == "object":
            group = self.group(concept)
            shown = [concept, *self.related(concept)[:2], "car" if group != "vehicle" else "cat"]
            return [f"an icon of {a(c)}" for c in shown]
        other = next(p for p in PAINTERS if p != concept)
        return [f"a cat by {concept}", f"a boat by {concept}", "a cat", f"a cat by {other}"]


TOY_CONCEPTS = ToyConcepts(
    kinds={**{o: "object" for o in OBJECTS}, **{p: "style" for p in PAINTERS}},
    groups={**GROUP_OF, **{p: "style" for p in PAINTERS}},
    templates=dict(TEMPLATES),
    probes={"object": ("{a}", "an icon of {a}", "a blue {c}", "{a} by seurat"), "style": ("{subject} by {c}",)},
    subjects=tuple(a(OBJECTS[(k * 5) % len(OBJECTS)]) for k in range(len(OBJECTS))),
    label_sets={"object": HEADS["object"], "style": HEADS["style"]},
    images=FEWSHOT_DIR,
    vocabulary=VOCABULARY_FILE,
    colours=GROUP_COLOURS,
    name="toy",
)

#: RECE on the toy keeps preserved prompts at the original weights and no empty prompt: over 8 concepts
#: (8 images each, seed 1234) 2/64 images still show the concept vs 5/64 with the reference's choices
#: (current weights, "" preserved), preservation 98.4% vs 98.2%.
TOY_RECE = {**TOY_LAMBDA["rece"], "preserve_at": "original", "preserve_empty": False}
#: Few-shot on the toy keeps Adam eps 1e-8, no weight decay, latent means, no flips: 23/64 vs 29/64 with the
#: reference's (eps 1e-6, weight decay 1e-8, sampled latents, flips), preservation 97.2% vs 92.9%.
TOY_FEWSHOT = {"lr": TOY_FEWSHOT_LR, "eps": 1e-8, "weight_decay": 0.0, "latent": "mean", "flip": False}

#: ESD's learning rate on the toy model per preset. esd-u and esd-all train 104 and 132 parts, convolutions
#: included, and at esd-x's rate erase neighbours too (5e-5 for 40 iterations: banana 0-50% and moon 0-25% of
#: 4 images after erasing apple or car); esd-x at 3e-5 for 60 iterations left cat in 4 of 4 images
#: (benchmarks/localisation.py --quality measures these rates).
TOY_ESD_LR = {"esd-x": 1e-4, "esd-x-strict": 1e-4, "esd-u": 1e-5, "esd-all": 1e-5}
#: ESD on the toy: 100 iterations (the paper's 1,000 take minutes here; 40 left dog in 6 of 8 held-out
#: images, 100 in none) with x_t from up to 10 DDIM steps, at esd-x's rate (give another preset its rate
#: from TOY_ESD_LR).
TOY_ESD = {"lr": TOY_ESD_LR["esd-x"], "iterations": 100, "sample_steps": 10}

PROFILE = Profile("toy", TOY_CONCEPTS, Oracle.load,
                  defaults={"uce": TOY_LAMBDA["uce"], "rece": TOY_RECE, "fewshot": TOY_FEWSHOT, "esd": TOY_ESD},
                  models=("toy", "toy-dit"))

#: ESD's learning rate on the toy DiT per preset. Its text stream's attention (esd-x) needs ten times the
#: UNet's rate: at 1e-4 for 100 iterations apple stayed in 4 of 4 held-out images, at 3e-4 van gogh in 3 of 4;
#: at 1e-3 all three of apple, cat and van gogh were erased (4 of 4 each) at preservation 0.76-0.96. esd-u at
#: 1e-4 erased all three at preservation 0.92-0.95 (erase_and_measure, per_prompt 4, seed 0).
TOY_DIT_ESD_LR = {"esd-x": 1e-3, "esd-x-strict": 1e-3, "esd-u": 1e-4, "esd-all": 1e-4}
#: ESD on the toy DiT: esd-u, the preset that erased at the best preservation above, at its rate.
TOY_DIT_ESD = {**TOY_ESD, "preset": "esd-u", "lr": TOY_DIT_ESD_LR["esd-u"]}

#: The toy DiT's profile: the toy world's, with ESD's defaults measured on the transformer.
PROFILE_DIT = Profile("toy-dit", TOY_CONCEPTS, Oracle.load, defaults={**PROFILE.defaults, "esd": TOY_DIT_ESD},
                      models=PROFILE.models)


def concept_prompts(concept: str) -> list[str]:
    """The prompts a toy concept is erased in (the templates of its kind)."""
    return TOY_CONCEPTS.prompts(concept)
