"""Experiment grids: planning and refusal, the results store, and the same runs in-process and on a Dask
LocalCluster of two worker processes (toy model, tiny measurements)."""
import math
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from distributed import Client

from conftest import same_state, state_of
from workbench import build_tiny_sd, load
from workbench.cli import main
from workbench.concepts import ConceptSet
from workbench.edits import versions
from workbench.attacks.table import grid_images, summary
from workbench.grid import Grid, local_cluster, plan, run_grid
from workbench.profile import Profile, attach
from workbench.store import Store, load_results, status
from workbench.sweep import layer_sweep
from workbench.widgets import SweepPanel

DATA = Path(__file__).resolve().parents[1] / "data"
MEASURE = {"per_prompt": 1, "per_other": 1, "others": ["banana"]}
#: 2 concepts x 2 methods x 3 scopes = 12 runs.
GRID = {"model": "toy", "concepts": ["apple", "car"], "methods": ["uce", "rece"],
        "parts": ["default", "unet.mid.0.xattn.v", {"per_layer": "xattn.k", "layers": [2]}], "measure": MEASURE}
#: Where and when a run ran, and how long it took: everything else in a row is what it found.
WHERE = {"host", "worker", "pid", "finished", "run_seconds", "seconds", "eval_seconds", "traceback"}


def findings(table: pd.DataFrame) -> pd.DataFrame:
    """A results table without the columns that say where and when, sorted by key."""
    return table.drop(columns=[c for c in table if c in WHERE]).sort_values("key").reset_index(drop=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def models_loaded() -> int:
    """How many models this process has loaded for grid runs (run on a worker)."""
    from workbench import grid

    return len(grid._PROCESS.pipes)


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes, one thread each, each declaring one GPU (so tasks that ask for one run)."""
    local = local_cluster(2, dashboard_address=":0", resources={"GPU": 1})
    client = Client(local)
    yield client
    pids = list(client.run(os.getpid).values())  # the nannies live in this process
    client.close()
    local.close()
    assert not [pid for pid in pids if alive(pid)], "worker processes were left behind"


@pytest.fixture(scope="module")
def both(toy, cluster, tmp_path_factory):
    """GRID run here into one folder and on the cluster into another."""
    here, there = tmp_path_factory.mktemp("here"), tmp_path_factory.mktemp("there")
    state = state_of(toy)
    with ThreadPoolExecutor(1) as pool:  # the cluster's two workers run while this process runs its own
        remote = pool.submit(run_grid, GRID, there, cluster=cluster, resources={"GPU": 1}, progress=False,
                             log=lambda _: None)
        in_process = run_grid(GRID, here, pipe=toy, progress=False)
        on_cluster = remote.result()
    assert same_state(toy, state)
    return here, there, in_process, on_cluster


@pytest.mark.slow
def test_a_twelve_run_grid_gives_the_same_rows_on_a_cluster_as_in_process(both, cluster):
    _, _, here, there = both
    assert len(here) == len(there) == 12 and here.attrs["ran"] == there.attrs["ran"] == 12
    assert here["error"].isna().all() and there["error"].isna().all(), there["error"].dropna().tolist()
    assert set(there["worker"]) <= set(cluster.scheduler_info()["workers"]) and os.getpid() not in set(there["pid"])
    assert set(here["worker"]) == {"in-process"} and set(here["pid"]) == {os.getpid()}
    assert list(cluster.run(models_loaded).values()) == [1, 1]  # each worker loaded the model once
    assert set(cluster.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == {None}  # torch's pace
    a, b = findings(here), findings(there)
    assert list(a.columns) == list(b.columns)
    floats = ["dW", "dW_relative", "efficacy", "preservation", "accuracy", "base_accuracy"]
    pd.testing.assert_frame_equal(a.drop(columns=floats + ["dW_by_layer"]), b.drop(columns=floats + ["dW_by_layer"]))
    pd.testing.assert_frame_equal(a[floats], b[floats], rtol=1e-6)
    for x, y in zip(a["dW_by_layer"], b["dW_by_layer"]):
        assert x.keys() == y.keys() and all(math.isclose(x[k], y[k], rel_tol=1e-6) for k in x)


@pytest.mark.slow
def test_a_grid_row_has_the_columns_and_numbers_of_a_layer_sweep_row(both, toy):
    _, _, here, _ = both
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the grid runs (threads: 1)
    try:
        sweep = layer_sweep(toy, "apple", "uce", components=["xattn.k"], layers=[2], progress=False, **{
            "per_prompt": 1, "per_other": 1, "others": ["banana"]})
    finally:
        torch.set_num_threads(threads)
    row = here[(here["concept"] == "apple") & (here["method"] == "uce") & (here["subset"] == "layer")].iloc[0]
    expected = sweep.iloc[0]
    assert set(sweep.columns) <= set(here.columns)
    for col in sweep.columns:
        if col in WHERE:
            continue
        if isinstance(expected[col], float) and not math.isnan(expected[col]):
            assert row[col] == pytest.approx(expected[col], rel=1e-6), col
        elif col == "dW_by_layer":
            assert row[col] == pytest.approx(expected[col], rel=1e-6)
        else:
            assert row[col] == expected[col] or (pd.isna(row[col]) and pd.isna(expected[col])), col


def test_running_a_grid_again_does_no_work(both, toy, cluster):
    here_dir, there_dir, here, there = both
    stamps = {p: p.stat().st_mtime_ns for p in [*here_dir.rglob("*.parquet"), *there_dir.rglob("*.parquet")]}
    again_here = run_grid(GRID, here_dir, pipe=toy, progress=False)
    again_there = run_grid(GRID, there_dir, cluster=cluster, progress=False, log=lambda _: None)
    assert again_here.attrs["ran"] == again_there.attrs["ran"] == 0
    assert again_here.attrs["skipped"] == again_there.attrs["skipped"] == 12
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    pd.testing.assert_frame_equal(findings(again_here), findings(here))
    assert status(there_dir) == {"runs": 12, "done": 12, "failed": 0, "left": 0}


@pytest.mark.slow
def test_a_worker_killed_mid_sweep_loses_no_run(cluster, tmp_path):
    grid = {"model": "toy", "concepts": ["apple", "car"], "methods": ["rece", "uce"],
            "parts": ["default", "unet.mid.0.xattn.v"], "measure": False}
    killed = {}

    def kill_a_busy_worker(_: str) -> None:
        busy = [addr for addr, keys in cluster.processing().items() if keys]
        if not killed and busy:
            killed["pid"] = cluster.run(os.getpid, workers=busy[:1])[busy[0]]
            os.kill(killed["pid"], signal.SIGKILL)

    table = run_grid(grid, tmp_path, cluster=cluster, progress=False, on_run=kill_a_busy_worker, log=lambda _: None)
    assert killed, "no worker was busy when the first run came back"
    assert len(table) == 8 and set(table["key"]) == Store(tmp_path).done() | Store(tmp_path).failed()
    lost = table[table["error"].notna()]
    assert all(e.startswith("KilledWorker") for e in lost["error"]), lost["error"].tolist()  # recorded, if not retried
    assert len(lost) <= 1
    assert (table.loc[table["error"].isna(), "dW"] > 0).all()


def test_a_grid_with_an_unknown_method_concept_or_selector_is_refused_before_any_run(toy, cluster, tmp_path):
    bad = {**GRID, "methods": ["uce", "ucee"], "concepts": ["apple", "zebra"], "parts": ["unet.*.xattn.z"]}
    for where in ({"pipe": toy}, {"cluster": cluster, "log": lambda _: None}):
        with pytest.raises(ValueError) as err:
            run_grid(bad, tmp_path, progress=False, **where)
        text = str(err.value)
        assert "nothing ran" in text
        assert "unknown method(s) 'ucee'; valid methods: rece, uce, fewshot" in text
        assert "unknown concept(s) 'zebra'; the model's concepts: apple, banana" in text
        assert "'unet.*.xattn.z' matches no part" in text and "unet.mid.0.xattn.k" in text
        assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="rece has no knob 'lamb'; its knobs: .*ridge"):
        plan({**GRID, "knobs": {"rece": {"lamb": 1}}}, toy)
    with pytest.raises(ValueError, match="evaluation seed 1234 is also an erasure seed"):
        plan({**GRID, "seeds": [0, 1234]}, toy)
    with pytest.raises(ValueError, match="component 'fn' is in no layer; components: attn, ffn"):
        plan({**GRID, "parts": [{"per_layer": "fn"}]}, toy)
    with pytest.raises(ValueError, match="parts names method 'fewshot', which the grid does not run"):
        plan({**GRID, "parts": {"fewshot": ["text.*.ffn"]}}, toy)
    with pytest.raises(ValueError, match="unknown key.*'concept'.*its keys: concepts, methods"):
        Grid.of({"concept": ["apple"], "methods": ["uce"]})


@pytest.mark.slow
def test_a_run_that_raises_is_a_row_with_its_error_and_is_tried_again_next_time(toy, tmp_path):
    grid = {"model": "toy", "concepts": ["apple"], "methods": ["uce"], "parts": ["unet.mid.0.xattn.v"],
            "vary": {"uce": {"erase_scale": [1.0, float("nan")]}}, "measure": False}
    state = state_of(toy)
    table = run_grid(grid, tmp_path, pipe=toy, progress=False)
    assert same_state(toy, state)
    ok, bad = table.iloc[0], table.iloc[1]
    assert ok["error"] is None and ok["dW"] > 0 and ok["knobs"] == {"erase_scale": 1.0}
    assert bad["error"].startswith("FloatingPointError") and "Traceback" in bad["traceback"]
    assert (bad["method"], bad["concept"], bad["part"]) == ("uce", "apple", "unet.mid.0.xattn.v")
    assert status(tmp_path) == {"runs": 2, "done": 1, "failed": 1, "left": 0}
    assert run_grid(grid, tmp_path, pipe=toy, progress=False).attrs["ran"] == 1
    assert run_grid(grid, tmp_path, pipe=toy, progress=False, retry_failed=False).attrs["ran"] == 0


def test_run_keys_are_stable_and_change_with_whatever_changes_the_numbers(toy):
    keys = [r.key for r in plan(GRID, toy)]
    assert keys == [r.key for r in plan(Grid.of(dict(GRID)), toy)] and len(set(keys)) == 12
    assert plan(GRID, toy)[0].config()["versions"] == versions()
    for change in ({"seeds": [1]}, {"threads": 2}, {"measure": {**MEASURE, "per_prompt": 2}},
                   {"knobs": {"uce": {"lam": 1.0}, "rece": {"epochs": 2}}}, {"dtype": "float32"}):
        assert not set(keys) & {r.key for r in plan({**GRID, **change}, toy)}, change


def test_the_store_counts_done_failed_and_left_and_a_success_replaces_a_failure(tmp_path):
    store = Store(tmp_path)
    store.save_plan({"name": "g"}, ["a", "b", "c"])
    store.write({"key": "a", "dW": 1.0, "layer": 3, "error": None})
    store.write({"key": "b", "dW": None, "layer": None, "error": "RuntimeError: out of memory"})
    assert status(tmp_path) == {"runs": 3, "done": 1, "failed": 1, "left": 1}
    store.write({"key": "b", "dW": 2.0, "layer": None, "error": None})
    assert status(tmp_path) == {"runs": 3, "done": 2, "failed": 0, "left": 1}
    table = load_results(tmp_path).set_index("key")
    assert table["dW"].to_dict() == {"a": 1.0, "b": 2.0} and table["error"].isna().all()
    assert str(table["layer"].dtype) == "Int64" and table.loc["a", "layer"] == 3
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a.ok.parquet", "b.ok.parquet"]
    with pytest.raises(ValueError, match="needs a 'key'"):
        store.write({"dW": 1.0})


@pytest.mark.slow
def test_the_cli_runs_a_grid_file_and_reports_its_status(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"concepts": ["apple"], "methods": ["uce"], "measure": False,
                                    "parts": ["unet.mid.0.xattn.k", "unet.mid.0.xattn.v"]}))
    main(["sweep", str(path), "--out", str(tmp_path / "out")])
    assert "2 runs, 2 run now, 0 already in" in capsys.readouterr().out
    main(["sweep", str(path), "--out", str(tmp_path / "out")])
    assert "2 runs, 0 run now, 2 already in" in capsys.readouterr().out
    main(["sweep-status", str(tmp_path / "out")])
    assert "2 runs: 2 done, 0 failed, 0 left" in capsys.readouterr().out


def test_the_example_grids_plan_on_their_models(toy, tiny_sd_dir):
    assert len(plan(DATA / "grids" / "toy.yaml", toy)) == 2 * 2 * (1 + 2 * 7) * 2
    table = plan(DATA / "grids" / "attacks_toy.yaml", toy)
    assert len(table) == 20 * 4 and {r.method for r in table} == {"uce", "rece", "fewshot", "esd"}
    curves = plan(DATA / "grids" / "attack_budgets_toy.yaml", toy)
    assert len(curves) == 20 * 2 and curves[0].attacks["budgets"]["inversion"] == [25, 50, 100, 200, 400]
    grid = Grid.load(DATA / "grids" / "sd14.yaml")
    assert Path(grid.concept_set) == (DATA / "concept_sets" / "imagenette.json").resolve()
    pipe = attach(load(tiny_sd_dir), Profile("sd", ConceptSet.load(grid.concept_set)))  # SD's shape, few layers
    runs = plan(grid, pipe)
    n_xattn = len({r.spec.layer_name for r in runs if r.spec.subset == "layer"})
    assert len(runs) == 10 * 2 * (1 + 2 * n_xattn) * 3 and n_xattn > 1


@pytest.mark.slow
def test_the_sweep_panel_runs_its_sweep_on_a_cluster_and_links_the_dashboard(toy, cluster, tmp_path):
    address = cluster.scheduler.address
    panel = SweepPanel(toy, None, run=False, concept="apple", method="uce", cluster=address, results=str(tmp_path))
    panel.run()
    assert panel.error is None, panel.error
    table = panel.result["table"]
    assert len(table) == panel.progress.max == 14 and table["error"].isna().all()
    assert os.getpid() not in set(table["pid"]) and (table["dW"] > 0).all()
    link = cluster.dashboard_link
    assert link in panel.status.value and link in str(panel.output.outputs)
    assert panel.run() is not None and panel.result["table"].attrs["ran"] == 0  # the folder had them all


#: One edit attacked twice: the derived embedding, and inversion judged after 1 and 2 steps.
ATTACK_GRID = {"model": "toy", "concepts": ["apple"], "methods": ["uce"], "threads": 1,
               "attacks": {"names": ["derived", "inversion"], "budgets": {"inversion": [1, 2]}, "eval_seeds": [7000]}}


@pytest.mark.slow
def test_an_attack_grid_stores_every_judged_image_and_gives_the_same_table_on_a_cluster(toy, cluster, tmp_path):
    state = state_of(toy)
    here = run_grid(ATTACK_GRID, tmp_path / "here", pipe=toy, progress=False)
    there = run_grid(ATTACK_GRID, tmp_path / "there", cluster=cluster, resources={"GPU": 1}, progress=False,
                     log=lambda _: None)
    assert same_state(toy, state)
    assert here["error"].isna().all() and there["error"].isna().all()
    a, b = grid_images(here), grid_images(there)
    sizes = a.groupby(["attack", "budget"], sort=False, dropna=False).size()
    assert [(x, None if pd.isna(y) else y, n) for (x, y), n in sizes.items()] == [
        ("unedited", None, 3), ("none", None, 3), ("derived", None, 3), ("inversion", 1, 3), ("inversion", 2, 3)]
    image = ["method", "concept", "attack", "budget", "seed", "prompt", "label", "hit"]
    pd.testing.assert_frame_equal(a[image], b[image])
    assert a.loc[a["attack"] == "unedited", "hit"].all()
    assert set(here.iloc[0]["crafted"]) == {"derived@None", "inversion@1", "inversion@2"}
    rates = summary(a, ("method", "attack", "budget"))
    assert rates["n"].tolist() == [3] * 5
    again = run_grid(ATTACK_GRID, tmp_path / "here", pipe=toy, progress=False)
    assert again.attrs["ran"] == 0 and grid_images(again)[image].equals(a[image])


def test_an_attack_grid_with_an_unknown_attack_a_bad_budget_or_a_reused_seed_is_refused(toy, tmp_path):
    bad = {**ATTACK_GRID, "attacks": {"names": ["derived", "jailbreak"], "budgets": {"inversion": 0, "derived": 5},
                                      "eval_seeds": [0, 7000], "colour": "red"}}
    with pytest.raises(ValueError, match="the grid was refused; nothing ran") as refused:
        run_grid(bad, tmp_path, pipe=toy, progress=False)
    for problem in ("attacks has no setting 'colour'; its settings: names, budgets, eval_seeds, seed",
                    "unknown attack(s) 'jailbreak'; valid attacks: derived, inversion, unlearndiff, concept_vector",
                    "the budget of inversion is a positive whole number or a list of them, not 0",
                    "derived has no budget", "evaluation seed(s) [0] are also erasure or attack seeds"):
        assert problem in str(refused.value)
    assert status(tmp_path)["runs"] == 0
    with pytest.raises(ValueError, match="not an attack grid's"):
        grid_images(run_grid({**ATTACK_GRID, "attacks": None, "measure": False}, tmp_path, pipe=toy, progress=False))
