"""A 24-run grid in this process and on a Dask LocalCluster of 2 worker processes: wall time of each,
the speed-up (target >= 1.6x on a 2-core CPU), whether the rows are the same, and peak memory per process.

    python benchmarks/grid.py                   # 4 concepts x UCE, RECE x 3 scopes, measured by the oracle
    python benchmarks/grid.py --workers 4       # another cluster size
    python benchmarks/grid.py --concepts apple  # 6 runs: a quick check

Every run uses one torch thread (the grid's ``threads: 1``), in this process and on each worker, so
the two give the same numbers; the cluster's wall time is given with and without starting it.
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import pandas as pd
from distributed import Client

from workbench.grid import local_cluster, run_grid

GRID = {"model": "toy", "concepts": ["apple", "car", "cat", "van gogh"], "methods": ["uce", "rece"],
        "parts": ["default", "unet.mid.0.xattn.k", "unet.mid.0.xattn.v"], "seeds": [0],
        "measure": {"per_prompt": 4, "per_other": 1}, "threads": 1}
#: Columns that say where, when and how long; the rest is what a run found.
WHERE = ["host", "worker", "pid", "finished", "run_seconds", "seconds", "eval_seconds", "traceback"]


def peak_gb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def cpu_seconds() -> float:
    """CPU time this process has used (user + system): what a run costs, whatever else the machine runs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def findings(table: pd.DataFrame) -> pd.DataFrame:
    return table.drop(columns=[c for c in WHERE if c in table]).sort_values("key").reset_index(drop=True)


def same(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    try:
        pd.testing.assert_frame_equal(findings(a), findings(b), rtol=1e-6)
    except AssertionError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concepts", nargs="+", default=GRID["concepts"], help="fewer for a quick check")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="grid-bench-")

    grid = {**GRID, "concepts": args.concepts}
    t0, c0 = time.perf_counter(), cpu_seconds()
    here = run_grid(grid, os.path.join(folder, "here"), progress=False)
    t_here, cpu_here, peak_here = time.perf_counter() - t0, cpu_seconds() - c0, peak_gb()

    t0 = time.perf_counter()
    with local_cluster(args.workers, dashboard_address=":0") as lc, Client(lc) as client:
        t_start = time.perf_counter() - t0
        c0 = sum(client.run(cpu_seconds).values())
        t0 = time.perf_counter()
        there = run_grid(grid, os.path.join(folder, "there"), cluster=client, progress=False)
        t_there = time.perf_counter() - t0
        cpu_there = sum(client.run(cpu_seconds).values()) - c0
        peaks = [kib / 2 ** 20 for kib in client.run(
            lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss).values()]

    failed = int(here["error"].notna().sum() + there["error"].notna().sum())
    rows = [("in-process (1 process, 1 thread)", t_here, 1.0, f"{peak_here:.2f}"),
            (f"LocalCluster, {args.workers} workers: the grid", t_there, t_here / t_there,
             " / ".join(f"{p:.2f}" for p in peaks)),
            (f"LocalCluster, {args.workers} workers: start + the grid", t_start + t_there,
             t_here / (t_start + t_there), "")]
    print(f"{len(here)} runs ({len(grid['concepts'])} concepts x {len(grid['methods'])} methods x "
          f"{len(grid['parts'])} scopes), {os.cpu_count()} CPU cores; failed runs: {failed}; "
          f"same rows in-process and on the cluster: {'yes' if same(here, there) else 'NO'}")
    print(f"per run (erase + measure): wall {here['run_seconds'].mean():.2f} s in-process, "
          f"{there['run_seconds'].mean():.2f} s on a worker; CPU {cpu_here / len(here):.2f} s in-process, "
          f"{cpu_there / len(there):.2f} s on the workers (their model loads and baselines included)")
    print()
    print("| where | wall time | speed-up | peak memory per process (GB) |")
    print("|---|---|---|---|")
    for name, wall, speedup, peak in rows:
        print(f"| {name} | {wall:.1f} s | {speedup:.2f}x | {peak} |")
    print(f"\n(target: speed-up >= 1.6x with {args.workers} workers; the cluster started in {t_start:.1f} s)")


if __name__ == "__main__":
    main()
