"""Fingerprints of what the toy model computes: run on two commits and diff, to show a refactor changed
no number.

    python benchmarks/fingerprint.py > after.txt
    git worktree add /tmp/before <commit> && PYTHONPATH=/tmp/before python benchmarks/fingerprint.py > before.txt
    diff before.txt after.txt

One line per result: a hash of the UCE, RECE, few-shot (3 steps) and ESD (2 iterations) deltas for
"apple"; of each attack's crafted embeddings, with the labels the oracle gives their images (RECE's edit,
seed 7000); a trace's probabilities; pooled embeddings in a key space and a text-encoder layer; lens images;
attention maps. One torch thread, so the numbers do not depend on thread scheduling.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

import workbench
from workbench.attacks import attack
from workbench.attnmaps import attention_maps
from workbench.embed import embed, lens
from workbench.methods import esd, fewshot, rece, uce
from workbench.profile import profile_of
from workbench.toy import TOY_CONCEPTS
from workbench.tracing import trace


def digest(values) -> str:
    """A short hash of a tensor, an array or a dict of tensors (by sorted key)."""
    if isinstance(values, dict):
        values = torch.cat([values[k].flatten() for k in sorted(values)])
    array = values.detach().float().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, np.float32)
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()[:12]


def main() -> None:
    torch.set_num_threads(1)
    pipe = workbench.load("toy")
    judge = profile_of(pipe).judge()
    erased = rece(pipe, "apple", preserve=["a pear"])
    rows = {
        "uce": digest(uce(pipe, "apple", preserve=["a pear"]).deltas),
        "rece": digest(erased.deltas),
        "fewshot": digest(fewshot(pipe, "apple", images=TOY_CONCEPTS.image_folder("apple"), steps=3,
                                  progress=False).deltas),
        "esd": digest(esd(pipe, "apple", iterations=2, sample_steps=4, progress=False).deltas),
    }
    for name, budget in (("derived", None), ("inversion", 3), ("unlearndiff", 3), ("concept_vector", 2)):
        result = attack(pipe, erased, "apple", judge, name, budget, eval_seeds=[7000])
        embeds = result.crafted.embeds
        rows[name] = f"{digest(getattr(embeds, 'tokens', embeds))} {result.table['label'].tolist()}"
    traced = trace(pipe, "apple", judge=judge, n=1, steps=4, sites=["text.5", "unet.mid"])
    rows["trace"] = str([round(p, 6) for p in [traced.clean, traced.corrupted, *traced.table["probability"]]])
    rows["embed key space"] = digest(embed(pipe, ["apple", "car"], space="unet.mid.0.xattn.k", pool="concept",
                                           template="a photo of {}"))
    rows["embed text.3"] = digest(embed(pipe, ["apple"], space="text.3"))
    rows["lens"] = hashlib.sha1(b"".join(i.tobytes() for i in lens(pipe, "an apple", layers=[2, 5], steps=4))).hexdigest()[:12]
    rows["attention maps"] = digest(attention_maps(pipe, "a red apple", "apple", steps=4).total)
    for name, value in rows.items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
