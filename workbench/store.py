"""A results store that survives anything: one Parquet file per finished run, named by the run's key.

A run's row is written the moment it finishes, to a temporary file renamed into place (a crash leaves
either the whole row or none of it). A run that raised is a row too, with its ``error``; a later
success replaces it. :func:`load_results` reads the folder back as one pandas table, and
:func:`status` counts what is done, failed and left of the grids run into the folder.

>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> store = Store(folder)
>>> store.write({"key": "a1", "efficacy": 0.5, "dW_by_layer": {"text.0": 1.0}, "parts_edited": ("text.0.ffn.in",)})
>>> store.write({"key": "b2", "efficacy": None, "error": "ValueError: no"})
>>> sorted(store.done()), sorted(store.failed())
(['a1'], ['b2'])
>>> row = load_results(folder).set_index("key").loc["a1"]
>>> row["dW_by_layer"], row["parts_edited"]
({'text.0': 1.0}, ('text.0.ffn.in',))
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .paths import RESULTS

#: Schema metadata naming the columns stored as JSON text (dicts: per-layer sizes, a run's config) and
#: the list columns that were tuples.
_JSON_META, _TUPLE_META = b"workbench.json_columns", b"workbench.tuple_columns"
_OK, _FAILED = ".ok.parquet", ".failed.parquet"


class Store:
    """The results of runs in ``folder``: ``runs/<key>.ok.parquet`` or ``runs/<key>.failed.parquet``,
    and ``grids/<hash>.json`` (each grid run into the folder, with its planned keys)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.runs = self.folder / "runs"
        self.grids = self.folder / "grids"

    def write(self, row: dict[str, Any]) -> None:
        """Write one run's row (it must have a ``key``; ``error`` is ``None`` for a run that finished)."""
        key = row.get("key")
        if not isinstance(key, str) or not key or "/" in key:
            raise ValueError(f"a stored row needs a 'key' (a non-empty string without '/'), got {key!r}")
        failed = row.get("error") is not None
        self.runs.mkdir(parents=True, exist_ok=True)
        _atomic(self.runs / f"{key}{_FAILED if failed else _OK}", lambda tmp: pq.write_table(_table(row), tmp))
        if not failed:
            (self.runs / f"{key}{_FAILED}").unlink(missing_ok=True)

    def done(self) -> set[str]:
        """Keys of the runs that finished without an error."""
        return self._keys(_OK)

    def failed(self) -> set[str]:
        """Keys of the runs whose last attempt raised (and that have not finished since)."""
        return self._keys(_FAILED) - self.done()

    def _keys(self, suffix: str) -> set[str]:
        if not self.runs.is_dir():
            return set()
        return {p.name[:-len(suffix)] for p in self.runs.iterdir() if p.name.endswith(suffix)
                and not p.name.startswith(".")}

    def save_plan(self, grid: dict[str, Any], keys: Iterable[str]) -> Path:
        """Record a grid and the keys of its runs (what :func:`status` counts as left)."""
        text = json.dumps({"grid": grid, "keys": list(keys)}, sort_keys=True, default=str)
        path = self.grids / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
        self.grids.mkdir(parents=True, exist_ok=True)
        _atomic(path, lambda tmp: Path(tmp).write_text(text))
        return path

    def plans(self) -> list[dict[str, Any]]:
        """Every grid recorded in the folder: ``{"grid": ..., "keys": [...]}``, oldest first."""
        if not self.grids.is_dir():
            return []
        files = sorted(self.grids.glob("*.json"), key=lambda p: p.stat().st_mtime)
        return [json.loads(p.read_text()) for p in files]


def _atomic(path: Path, write) -> None:
    """Write through a temporary file beside ``path`` and rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _table(row: dict[str, Any]) -> pa.Table:
    """One row as an Arrow table; dicts and lists of dicts (an attack run's judged images) become JSON
    text and tuples lists (both named in the schema's metadata, so that they read back as they were)."""
    as_json = [k for k, v in row.items() if isinstance(v, dict) or (isinstance(v, list) and v
                                                                    and all(isinstance(x, dict) for x in v))]
    tuples = [k for k, v in row.items() if isinstance(v, tuple)]
    values = {k: [json.dumps(v, sort_keys=True) if k in as_json else list(v) if k in tuples else v]
              for k, v in row.items()}
    return pa.table(values).replace_schema_metadata({_JSON_META: json.dumps(as_json).encode(),
                                                     _TUPLE_META: json.dumps(tuples).encode()})


def _read(path: Path) -> pd.DataFrame:
    table = pq.read_table(path)
    frame = table.to_pandas()
    meta = table.schema.metadata or {}
    for col in json.loads(meta.get(_JSON_META, b"[]")):
        frame[col] = [json.loads(v) if isinstance(v, str) else v for v in frame[col]]
    tuples = json.loads(meta.get(_TUPLE_META, b"[]"))
    for col in frame.columns:
        if pa.types.is_list(table.schema.field(col).type):
            kind = tuple if col in tuples else list
            frame[col] = [kind(v) if v is not None else None for v in frame[col]]
    return frame


def load_results(folder: str | os.PathLike) -> pd.DataFrame:
    """Every stored run of ``folder`` as one table, in the order they finished (``error`` is ``None``
    for the runs that finished; a run that failed and then finished appears once, finished)."""
    store = Store(folder)
    done = store.done()
    paths = [p for p in (store.runs.iterdir() if store.runs.is_dir() else [])
             if p.name.endswith(_OK) or (p.name.endswith(_FAILED) and p.name[:-len(_FAILED)] not in done)]
    frames = [_read(p) for p in paths if not p.name.startswith(".")]
    if not frames:
        return pd.DataFrame(columns=["key", "error"])
    table = pd.concat(frames, ignore_index=True)
    if "error" not in table:
        table["error"] = None
    table["error"] = table["error"].astype(object).where(table["error"].notna(), None)
    if "layer" in table:
        table["layer"] = table["layer"].astype("Int64")
    if "finished" in table:
        table = table.sort_values("finished", kind="stable")
    return table.reset_index(drop=True)


def saved(name: str) -> pd.DataFrame:
    """Rows the workbench ships in ``data/results`` (``"attacks_toy"``: the attack table over every toy
    concept), found through the package, so a notebook reads them from wherever it is opened or copied.

    >>> sorted(saved("attacks_toy")["method"].unique())
    ['esd', 'fewshot', 'rece', 'uce']
    """
    path = RESULTS / f"{name}.csv"
    if not path.is_file():
        have = sorted(p.stem for p in RESULTS.glob("*.csv"))
        raise FileNotFoundError(f"no saved results named {name!r} in {RESULTS}; saved: {', '.join(have) or 'none'}")
    table = pd.read_csv(path)
    if "budget" in table:  # whole numbers with gaps (the baselines have none) read back as whole numbers
        table["budget"] = table["budget"].astype("Int64")
    return table


def status(folder: str | os.PathLike) -> dict[str, int]:
    """How many runs of the grids recorded in ``folder`` are done, failed and left (and in all)."""
    store = Store(folder)
    planned = {k for plan in store.plans() for k in plan["keys"]}
    done, failed = store.done(), store.failed()
    return {"runs": len(planned | done | failed), "done": len(done), "failed": len(failed),
            "left": len(planned - done - failed)}
