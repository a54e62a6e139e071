"""Run the toy notebooks on either bundled toy model, each in a fresh kernel, and print a Markdown table.

    python benchmarks/notebooks.py                          # 01-05, 07, 08 on the toy UNet ("toy")
    python benchmarks/notebooks.py --model toy-dit          # the same notebooks on the toy DiT
    python benchmarks/notebooks.py --model toy-dit --only 01 02    # some of them, by number
    python benchmarks/notebooks.py --model toy-dit --keep out/notebooks-dit   # and keep the executed copies
    OMP_NUM_THREADS=1 python benchmarks/notebooks.py        # one torch thread per kernel (a shared CPU)

Each notebook takes its model from ``WORKBENCH_TOY`` (``MODEL = os.environ.get("WORKBENCH_TOY", "toy")`` in
its first code cell); 06 is about Stable Diffusion (``WORKBENCH_SD``) and is not run here. A notebook runs
top to bottom in a fresh Python kernel started with ``WORKBENCH_TOY=<model>``, through nbclient, from the
notebooks folder (as nbval runs it); nothing is written back (``--keep DIR`` writes the executed copies,
outputs and all, to DIR) and no output is compared (nbval does that on "toy"). One row per notebook:

- *result*: ``passed``, or where and what failed first: a cell's exception (``cell 9: ValueError: ...``),
  or a control panel's (``panel in cell 11: ...``; a panel catches its error and shows it in its own
  output area, so the cell itself does not fail);
- *seconds*: wall time from starting the kernel to the end of the last cell run;
- *peak GB*: the kernel's peak resident memory (``VmHWM`` from ``/proc``, read before the kernel is shut
  down), summed over the kernel process and every process it started that is still alive.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import nbformat
import psutil
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
#: The notebooks that run on a toy model (06 runs on Stable Diffusion or its tiny stand-in).
TOY_NOTEBOOKS = ("01", "02", "03", "04", "05", "07", "08")
MODELS = ("toy", "toy-dit")


def notebook_paths(only: list[str] | None) -> list[Path]:
    """The toy notebooks, or those whose number is in ``only`` (``"1"`` and ``"01"`` alike)."""
    wanted = TOY_NOTEBOOKS if not only else tuple(n.zfill(2) for n in only)
    unknown = [n for n in wanted if n not in TOY_NOTEBOOKS]
    if unknown:
        sys.exit(f"no toy notebook {unknown[0]}; choose from {', '.join(TOY_NOTEBOOKS)}")
    return [next(NOTEBOOKS.glob(f"{n}_*.ipynb")) for n in wanted]


def peak_gb(pid: int | None) -> float:
    """The summed high-water mark of resident memory (VmHWM) of ``pid`` and its living descendants, in GB."""
    if pid is None:
        return float("nan")
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan")
    total_kb = 0
    for proc in procs:
        try:
            with open(f"/proc/{proc.pid}/status") as status:
                total_kb += next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            continue
    return total_kb / 1024 ** 2


def panel_error(nb) -> str | None:
    """The first error a control panel showed in its output area (its stderr), from the stored widget state,
    with the cell that displayed the panel."""
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    for key, model in state.items():
        if model.get("model_name") != "OutputModel":
            continue
        errors = ["".join(out.get("text", "")).strip() for out in model.get("state", {}).get("outputs", [])
                  if out.get("output_type") == "stream" and out.get("name") == "stderr"]
        if not any(errors):
            continue
        box = next((k for k, m in state.items() if f"IPY_MODEL_{key}" in m.get("state", {}).get("children", [])), key)
        cell = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code" and any(
            o.get("data", {}).get("application/vnd.jupyter.widget-view+json", {}).get("model_id") == box
            for o in c.get("outputs", []))), None)
        where = "panel" if cell is None else f"panel in cell {cell}"
        return f"{where}: {next(e for e in errors if e).splitlines()[-1]}"
    return None


async def run_notebook(path: Path, timeout: int, keep: Path | None = None) -> tuple[str, float, float]:
    """Run one notebook in a fresh kernel: (result, wall seconds, peak GB); ``keep``: a folder to write the
    executed copy to."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=False,
                            store_widget_state=True, resources={"metadata": {"path": str(path.parent)}})
    result, start, peak = "passed", time.perf_counter(), float("nan")
    async with client.async_setup_kernel():
        provisioner = getattr(client.km, "provisioner", None)
        pid = getattr(getattr(provisioner, "process", None), "pid", None) or getattr(provisioner, "pid", None)
        index = -1
        try:
            for index, cell in enumerate(nb.cells):
                await client.async_execute_cell(cell, index, execution_count=client.code_cells_executed + 1)
        except CellExecutionError as exc:
            first = (f"{exc.ename}: {exc.evalue}".strip().splitlines() or [exc.ename])[0]
            result = f"cell {index}: {first}"
        except (CellTimeoutError, DeadKernelError) as exc:
            result = f"cell {index}: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
        for cell in nb.cells[index + 1:] if result != "passed" else ():  # not run: no stored outputs either
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        seconds = time.perf_counter() - start
        peak = peak_gb(pid)
        client.set_widgets_metadata()
    if result == "passed":
        result = panel_error(nb) or result
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, keep / path.name)
    return result, seconds, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="toy", choices=MODELS, help="the toy model the notebooks load")
    p.add_argument("--only", nargs="+", metavar="NN", help="notebook numbers, e.g. 01 07 (default: all toy notebooks)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds one cell may take")
    p.add_argument("--keep", type=Path, metavar="DIR", help="write the executed notebooks to DIR (not over the originals)")
    args = p.parse_args()

    if args.keep is not None and args.keep.resolve() == NOTEBOOKS:
        sys.exit("--keep must be another folder: the notebooks themselves are never written")
    os.environ["WORKBENCH_TOY"] = args.model  # the kernels inherit it
    rows = []
    print(f"model {args.model}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", file=sys.stderr)
    for path in notebook_paths(args.only):
        result, seconds, peak = asyncio.run(run_notebook(path, args.timeout, args.keep))
        print(f"{path.stem}: {result} ({seconds:.0f} s, {peak:.2f} GB)", file=sys.stderr, flush=True)
        rows.append(f"| {path.stem} | {args.model} | {result.replace('|', '/')} | {seconds:.0f} | {peak:.2f} |")
    print("| notebook | model | result | seconds | peak GB |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
