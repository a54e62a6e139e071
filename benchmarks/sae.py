"""SAE feature erasure (workbench/sae.py) on the toy models: training time and FVU, the defaults' choice,
and efficacy and preservation at the defaults.

    python benchmarks/sae.py --timing                 # train the default block's SAE afresh: seconds, FVU
    python benchmarks/sae.py --sweep                  # blocks x features x multipliers on tuning concepts
    python benchmarks/sae.py                          # apple, cat, van gogh at the defaults
    python benchmarks/sae.py --model toy-dit --concepts apple
    python benchmarks/sae.py --bundle                 # (re)write data/sae/<model>/<block>.safetensors

The sweep chooses on *tuning* concepts (banana, car, dog, picasso; seed 99), never on the concepts the
report measures (apple, cat, van gogh; seed 1234). Efficacy is the oracle's accuracy on the concept
(lower is stronger): ``evaluate``'s probes (for an object two of its eight are an erase wording) and
``held-out``, only wordings the features were never chosen on (ConceptSet.held_out, cycled to eight
images). Preservation: accuracy on the six other concepts of ``evaluate`` (4 images each) over the
unedited model's.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import workbench
from workbench.metrics import evaluate, judge_prompts
from workbench.profile import profile_of
from workbench.sae import BUNDLED, SAE, default_block, load_or_train, sae, train

TUNING = ("banana", "car", "dog", "picasso")
REPORT = ("apple", "cat", "van gogh")


def held_out_accuracy(pipe, judge, erasure, concept: str, n: int = 8, seed: int = 1234) -> float:
    """The judge's accuracy on ``n`` images of the concept's held-out wordings (cycled), under ``erasure``."""
    cs = profile_of(pipe).concept_set()
    wordings = cs.held_out(concept, n)
    prompts = [wordings[i % len(wordings)] for i in range(n)]
    with erasure.apply(pipe):
        _, rows = judge_prompts(pipe, judge, prompts, [concept] * n, [seed], cs)
    return float(rows["hit"].mean())


def measure(pipe, judge, concepts, seed: int, before: dict, **knobs) -> list[dict]:
    out = []
    for c in concepts:
        t0 = time.perf_counter()
        erasure = sae(pipe, c, progress=False, **knobs)
        seconds = time.perf_counter() - t0
        if c not in before:
            before[c] = evaluate(pipe, judge, c, seed=seed)
        s = evaluate(pipe, judge, c, edit=erasure, seed=seed, before=before[c])
        out.append(dict(concept=c, accuracy=s["accuracy"], base=s["base_accuracy"], n=s["n_images"],
                        preservation=s["preservation"], n_others=4 * len(s["others"]),
                        held_out=held_out_accuracy(pipe, judge, erasure, c, seed=seed), seconds=seconds))
    return out


def sweep(model: str, blocks: list[str], counts: list[int], multipliers: list[float]) -> None:
    pipe = workbench.load(model)
    judge = profile_of(pipe).judge()
    before: dict = {}
    print("| block | features | multiplier | accuracy (mean over tuning concepts) | held-out | preservation | "
          "per concept (accuracy / preservation) |")
    print("|---|---|---|---|---|---|---|")
    for block in blocks:
        load_or_train(pipe, block, progress=False)
        for n in counts:
            for m in multipliers:
                rows = measure(pipe, judge, TUNING, 99, before, block=block, features=n, multiplier=m)
                mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
                each = ", ".join(f"{r['concept']} {r['accuracy']:.2f}/{r['preservation']:.2f}" for r in rows)
                print(f"| {block} | {n} | {m:g} | {mean('accuracy'):.3f} | {mean('held_out'):.3f} | "
                      f"{mean('preservation'):.3f} | {each} |", flush=True)


def report(model: str, concepts: list[str]) -> None:
    pipe = workbench.load(model)
    judge = profile_of(pipe).judge()
    print(f"{model}, block {default_block(pipe)}")
    print("| concept | accuracy before -> after (n) | held-out accuracy (n=8) | preservation (n) | seconds |")
    print("|---|---|---|---|---|")
    for r in measure(pipe, judge, concepts, 1234, {}):
        print(f"| {r['concept']} | {r['base']:.2f} -> {r['accuracy']:.2f} ({r['n']}) | {r['held_out']:.2f} | "
              f"{r['preservation']:.3f} ({r['n_others']}) | {r['seconds']:.1f} |", flush=True)


def timing(model: str, block: str | None) -> None:
    pipe = workbench.load(model)
    block = block or default_block(pipe)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        m = train(pipe, block, path=Path(d) / "sae.safetensors", progress=False)
        print(f"{model} {block}: {time.perf_counter() - t0:.1f} s (sampling and {m.step} steps), FVU {m.fvu:.4f}, "
              f"last batch {m.curve[-1]:.4f}")


def bundle(model: str, block: str | None) -> None:
    """Train the default block's SAE with the defaults and write it, without Adam's state, to data/sae."""
    pipe = workbench.load(model)
    block = block or default_block(pipe)
    with tempfile.TemporaryDirectory() as d:
        m = train(pipe, block, path=Path(d) / "sae.safetensors", progress=False)
        target = BUNDLED / model / f"{block}.safetensors"
        SAE(m.module, m.block, m.config, m.curve, m.step, m.fvu, m.seconds).save(target)
    print(f"wrote {target} (FVU {m.fvu:.4f}, {m.seconds:.0f} s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--block")
    parser.add_argument("--concepts", nargs="+", default=list(REPORT))
    parser.add_argument("--timing", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--bundle", action="store_true")
    parser.add_argument("--blocks", nargs="+", default=["unet.mid", "unet.up.0", "unet.up.1"])
    parser.add_argument("--features", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--multipliers", nargs="+", type=float, default=[0.0, -1.0, -2.0, -4.0])
    args = parser.parse_args()
    if args.timing:
        timing(args.model, args.block)
    elif args.sweep:
        sweep(args.model, args.blocks, args.features, args.multipliers)
    elif args.bundle:
        bundle(args.model, args.block)
    else:
        report(args.model, args.concepts)
