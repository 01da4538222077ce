"""`llmsched sweep` and the executors: sweep files into cells, resuming, errors, and the Ray
backend on a real local Ray cluster giving the local backend's results (sweep and capacity).

Simulations are tiny (100 synthetic requests, well under a second each). Most tests run cells
in this process (`InProcess`); the backend tests use real worker processes and a real Ray.
"""

from __future__ import annotations

import csv
import json
import sys

import pytest
import yaml

from llmsched.capacity import parse_slo, search_capacity
from llmsched.cli import main
from llmsched.config import load_config
from llmsched.experiment import simulate
from llmsched.parallel import Executor, LocalExecutor, RayExecutor, make_executor
from llmsched.sweep import plan, read_sweep, run, run_sweep, write_results

BASE = {"num_requests": 100, "goodput": {"ttft": 2000, "tpot": 100}}


class InProcess(Executor):
    """Runs each item here, in reverse order (results must not depend on the order they
    arrive in), and records what it was given."""

    workers = 1

    def __init__(self):
        self.given = []

    def map_unordered(self, fn, items):
        items = list(items)
        self.given += items
        for i in reversed(range(len(items))):
            yield i, fn(items[i])


def write_sweep(tmp_path, spec, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def without_times(table):
    return [{k: v for k, v in row.items() if k != "sim_seconds"} for row in table]


# --- sweep files ---------------------------------------------------------------------------------
def test_grid_is_the_cartesian_product_in_the_files_order(tmp_path):
    sweep = read_sweep(
        write_sweep(
            tmp_path, {"base": BASE, "grid": {"policy": ["fcfs", "sarathi"], "rate": [2, 4]}}
        )
    )
    assert sweep.keys == ["policy", "rate"]
    assert [c.overrides for c in sweep.cells] == [
        {"policy": "fcfs", "rate": 2},
        {"policy": "fcfs", "rate": 4},
        {"policy": "sarathi", "rate": 2},
        {"policy": "sarathi", "rate": 4},
    ]
    assert [(c.config.policy, c.config.rate) for c in sweep.cells] == [
        ("fcfs", 2.0),
        ("fcfs", 4.0),
        ("sarathi", 2.0),
        ("sarathi", 4.0),
    ]
    assert all(c.config.num_requests == 100 for c in sweep.cells)  # the base's
    assert len({c.id for c in sweep.cells}) == 4
    assert [c.number for c in sweep.cells] == [1, 2, 3, 4]


def test_cells_cross_the_grid_and_a_dotted_key_sets_a_parameter(tmp_path):
    spec = {
        "base": BASE | {"policy_params": {"preemption": "recompute"}},
        "grid": {"rate": [2, 4]},
        "cells": [{"policy": "fcfs"}, {"policy": "rr", "policy_params.quantum": 64}],
    }
    sweep = read_sweep(write_sweep(tmp_path, spec))
    assert sweep.keys == ["policy", "policy_params.quantum", "rate"]
    assert [(c.config.policy, c.config.rate) for c in sweep.cells] == [
        ("fcfs", 2.0),
        ("fcfs", 4.0),
        ("rr", 2.0),
        ("rr", 4.0),
    ]
    # the dotted key adds to the base's mapping rather than replacing it
    assert sweep.cells[2].config.policy_params == {"preemption": "recompute", "quantum": 64}
    assert sweep.cells[0].config.policy_params == {"preemption": "recompute"}


def test_base_is_a_path_relative_to_the_sweep_file_and_null_means_the_default(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text("num_requests: 100\nmax_num_seqs: 64\n")
    spec = {"base": "base.yaml", "grid": {"max_num_seqs": [None, 32]}}
    sweep = read_sweep(write_sweep(tmp_path / "configs", spec))
    assert [c.config.max_num_seqs for c in sweep.cells] == [None, 32]
    assert all(c.config.num_requests == 100 for c in sweep.cells)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"policy": "fcfs"}, r"unknown key\(s\) 'policy'; a sweep file has base"),
        ({"base": BASE}, r"nothing to sweep: give grid: \{key: \[values\]\} and/or cells"),
        ({"grid": {}}, r"nothing to sweep"),
        ({"grid": {"rate": 4}}, r"grid key 'rate' must have a non-empty list of values, got 4"),
        ({"grid": {"rate": []}}, r"grid key 'rate' must have a non-empty list"),
        ({"grid": "rate"}, r"grid must map config keys to lists"),
        ({"grid": {"rat": [1, 2]}}, r"cell 1 \(rat=1\): .*rat.*did you mean 'rate'"),
        ({"grid": {"rate": [2, "fast"]}}, r"cell 2 \(rate='fast'\): .*rate"),
        ({"grid": {"num_requests": [50.5]}}, r"cell 1 \(num_requests=50.5\): .*num_requests"),
        ({"grid": {"policy": ["fcfs", "bogus"]}}, r"cell 2 \(policy='bogus'\): .*'bogus'"),
        ({"grid": {"model": ["llama-3-8b", "gpt-9"]}}, r"cell 2 \(model='gpt-9'\): .*gpt-9"),
        ({"grid": {"rate.x": [1]}}, r"cell 1 \(rate.x=1\): sweep key 'rate.x': rate is 4"),
        ({"cells": [{"policy": "fcfs"}, "sjf"]}, r"cells must be a list of mappings"),
        ({"cells": []}, r"cells is empty"),
        (
            {"grid": {"rate": [2]}, "cells": [{"rate": 4}]},
            r"'rate' both in grid and in cells",
        ),
        ({"grid": {"seed": [0, 1, 0]}}, r"cell 3 \(seed=0\) is the same run as cell 1"),
    ],
)
def test_bad_sweep_files_are_refused_naming_the_key(tmp_path, spec, message):
    spec = {"base": {"rate": 4} | BASE} | spec if "base" not in spec else spec
    path = write_sweep(tmp_path, spec)
    with pytest.raises(ValueError, match=message) as err:
        read_sweep(path)
    assert str(path) in str(err.value)


def test_a_missing_base_file_names_where_it_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"base.yaml does not exist .*relative to the"):
        read_sweep(write_sweep(tmp_path, {"base": "base.yaml", "grid": {"seed": [0]}}))


# --- running, the table, resuming ----------------------------------------------------------------
def small_sweep(tmp_path, rates=(2, 4)):
    spec = {"base": BASE, "grid": {"policy": ["fcfs", "sarathi"], "rate": list(rates)}}
    return read_sweep(write_sweep(tmp_path, spec))


def test_rows_hold_each_cells_own_results_in_the_sweeps_order(tmp_path):
    sweep = small_sweep(tmp_path)
    table, done = run_sweep(sweep, tmp_path / "out", InProcess())
    assert not done.errors
    assert [row["cell"] for row in table] == [c.id for c in sweep.cells]
    for row, cell in zip(table, sweep.cells):
        assert (row["policy"], row["rate"]) == (cell.config.policy, cell.config.rate)
        summary = simulate(cell.config).summary  # the row is this cell's, not another's
        assert row["completed"] == 100 and row["error"] == ""
        assert row["mean_ttft_ms"] == summary["mean_ttft_ms"]
        assert row["request_goodput"] == summary["request_goodput"] is not None
        assert row["sim_seconds"] > 0
        assert row["config"] == json.loads(json.dumps(cell.config.to_dict()))
    # the two policies differ at the higher rate: the rows are not all one run
    assert table[1]["p99_ttft_ms"] != table[3]["p99_ttft_ms"]

    csv_path, json_path = write_results(table, tmp_path / "out")
    assert json.loads(json_path.read_text()) == table
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and "config" not in rows[0]
    assert [r["policy"] for r in rows] == ["fcfs", "fcfs", "sarathi", "sarathi"]
    assert float(rows[2]["mean_ttft_ms"]) == table[2]["mean_ttft_ms"]


def test_a_rerun_skips_the_cells_already_done(tmp_path):
    out = tmp_path / "out"
    first = InProcess()
    table, _ = run_sweep(small_sweep(tmp_path), out, first)
    assert len(first.given) == 4
    again = InProcess()
    table2, done = run_sweep(small_sweep(tmp_path), out, again)
    assert again.given == [] and len(done.done) == 4 and not done.todo
    assert table2 == table  # read back as written, times included
    # two more rates: only their four cells run
    more = InProcess()
    table3, done = run_sweep(small_sweep(tmp_path, rates=(2, 4, 6, 8)), out, more)
    assert sorted(c.rate for c in more.given) == [6.0, 6.0, 8.0, 8.0]
    assert len(table3) == 8 and all(row["completed"] == 100 for row in table3)


def test_a_corrupt_or_foreign_result_file_is_reported_and_its_cell_run_again(tmp_path):
    out = tmp_path / "out"
    sweep = small_sweep(tmp_path)
    run_sweep(sweep, out, InProcess())
    cells = out / "cells"
    cut = cells / f"{sweep.cells[0].id}.json"
    cut.write_text(cut.read_text()[:100])  # cut short
    foreign = cells / f"{sweep.cells[1].id}.json"
    foreign.write_text((cells / f"{sweep.cells[2].id}.json").read_text())  # another cell's
    todo = plan(sweep, out)
    assert sorted(todo.corrupt) == sorted([cut, foreign])
    assert [c.number for c in todo.todo] == [1, 2]
    run(todo, out, InProcess())
    fresh = plan(sweep, out)
    assert not fresh.todo and not fresh.corrupt


def test_a_failing_cell_is_reported_in_its_row_and_not_stored(tmp_path):
    spec = {"base": BASE | {"rate": 2}, "cells": [{}, {"trace": "no/such/trace.csv"}]}
    sweep = read_sweep(write_sweep(tmp_path, spec))
    table, done = run_sweep(sweep, tmp_path / "out", InProcess())
    assert table[0]["error"] == "" and table[0]["completed"] == 100
    assert table[1]["error"].startswith("FileNotFoundError: trace file not found")
    assert table[1]["completed"] is None
    assert list(done.errors) == [sweep.cells[1].id]
    assert [c.number for c in plan(sweep, tmp_path / "out").todo] == [2]  # tried again


def test_sweep_command_writes_the_table_and_plot_and_says_what_it_skipped(tmp_path, capsys):
    path = write_sweep(tmp_path, {"base": BASE, "grid": {"rate": [2, 4], "seed": [0, 1]}})
    args = ["sweep", "--config", str(path), "--out", str(tmp_path / "out"), "--workers", "2"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "4 cells, 0 done before (skipped), 4 to run" in err
    for name in ("results.csv", "results.json", "sweep.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())) == 4
    assert main(args) == 0
    assert "4 cells, 4 done before (skipped), 0 to run" in capsys.readouterr().err


def test_sweep_command_refuses_a_bad_file_before_running_anything(tmp_path, capsys):
    path = write_sweep(tmp_path, {"base": BASE, "grid": {"rate": [2, -1]}})
    assert main(["sweep", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "cell 2 (rate=-1): rate" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sweep_command_exits_1_when_a_cell_fails(tmp_path, capsys):
    spec = {"base": BASE | {"rate": 2}, "cells": [{}, {"trace": "no/such/trace.csv"}]}
    path = write_sweep(tmp_path, spec)
    assert main(["sweep", "--config", str(path), "--out", str(tmp_path / "out")]) == 1
    assert "1 cell(s) failed" in capsys.readouterr().err
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())) == 2


# --- executors -----------------------------------------------------------------------------------
def test_local_executor_yields_every_result_once_with_its_index():
    with LocalExecutor(2) as ex:
        got = dict(ex.map_unordered(abs, [-3, 1, -7, 0, 5]))
    assert got == {0: 3, 1: 1, 2: 7, 3: 0, 4: 5}


def test_an_address_without_the_ray_backend_is_refused():
    with pytest.raises(ValueError, match="--address names a Ray cluster"):
        make_executor("local", address="auto")
    with pytest.raises(ValueError, match="backend must be one of"):
        make_executor("dask")


def test_a_missing_ray_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as when not installed
    with pytest.raises(ImportError, match=r"pip install 'llmsched\[ray\]'"):
        RayExecutor()
    path = write_sweep(tmp_path, {"base": BASE, "grid": {"rate": [2]}})
    args = ["sweep", "--config", str(path), "--out", str(tmp_path / "o"), "--backend", "ray"]
    assert main(args) == 2
    assert "llmsched[ray]" in capsys.readouterr().err


# --- a real Ray cluster --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'llmsched[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


def test_ray_sweep_gives_the_local_backends_results(tmp_path, ray_cluster):
    spec = {"base": BASE, "grid": {"policy": ["fcfs", "sjf"], "rate": [3, 6], "seed": [0, 1]}}
    sweep = read_sweep(write_sweep(tmp_path, spec))
    with LocalExecutor(2) as ex:
        local, _ = run_sweep(sweep, tmp_path / "local", ex)
    with RayExecutor() as ex:  # joins the session the fixture started
        assert ex.workers == 2
        on_ray, done = run_sweep(sweep, tmp_path / "ray", ex)
    assert ray_cluster.is_initialized()  # not ours to shut down
    assert not done.errors and len(on_ray) == 8
    assert without_times(on_ray) == without_times(local)
    assert len({row["mean_ttft_ms"] for row in on_ray}) == 8  # eight different runs


def test_ray_capacity_search_gives_the_local_backends_result(ray_cluster):
    cfg = load_config(num_requests=100, rate=1.0, seed=0, policy="fcfs")
    conditions = parse_slo("median_ttft<0.3s")
    with LocalExecutor(2) as ex:
        local = search_capacity(cfg, conditions, seeds=2, tolerance=0.1, executor=ex)
    with RayExecutor(workers=2) as ex:
        on_ray = search_capacity(cfg, conditions, seeds=2, tolerance=0.1, executor=ex)
    assert local.capacity > 0
    assert on_ray.as_dict() == local.as_dict()  # every evaluation, in the same order


def test_sweep_and_capacity_commands_run_on_ray(tmp_path, capsys, ray_cluster):
    path = write_sweep(tmp_path, {"base": BASE, "grid": {"rate": [2, 4]}})
    sweep = ["sweep", "--config", str(path), "--backend", "ray"]
    assert main([*sweep, "--out", str(tmp_path / "ray")]) == 0
    assert main([*sweep[:3], "--out", str(tmp_path / "local")]) == 0
    assert "ray backend" in capsys.readouterr().err
    rows = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("ray", "local")]
    assert without_times(rows[0]) == without_times(rows[1])

    capacity = ["capacity", "--slo", "median_ttft<0.3s", "--num-requests", "100"]
    capacity += ["--tolerance", "0.2", "--workers", "2"]
    assert main([*capacity, "--backend", "ray", "--out", str(tmp_path / "cap-ray")]) == 0
    assert main([*capacity, "--out", str(tmp_path / "cap-local")]) == 0
    results = [
        json.loads((tmp_path / d / "capacity.json").read_text()) for d in ("cap-ray", "cap-local")
    ]
    assert results[0] == results[1] and results[0]["fcfs"]["capacity_rps"] > 0
    assert ray_cluster.is_initialized()
