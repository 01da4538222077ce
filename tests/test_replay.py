"""Recording the simulator's batches for replay on a GPU, and comparing them with the model
(llmsched.hardware.replay, benchmarks/gpu_fidelity.py). The GPU itself is never needed: the
replay runs a tiny stand-in on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmsched.config import SimulationConfig
from llmsched.experiment import build_cluster, load_workload
from llmsched.hardware import replay
from llmsched.hardware.roofline import RooflineModel

ROOT = Path(__file__).resolve().parents[1]
CONFIG = SimulationConfig(num_requests=150, rate=30, model="llama-3-8b", gpu="h100", seed=1)


def test_a_recorded_batch_prices_as_the_engine_charged_its_iteration():
    """The batch kept for replay is the one the simulation paid for: the model's time of the
    recorded batch equals the first iteration's duration in the engine (no preemptions here, so
    no extra cost is added to it)."""
    charged = []

    def observe(inst, span):
        charged.append((replay.batch_of(span.plan), span.ends[0] - inst.now, inst.latency))

    cluster, _ = build_cluster(CONFIG, observer=observe)
    collector = cluster.run(load_workload(CONFIG))
    assert collector.column("preemptions").sum() == 0
    assert {replay.kind_of(b) for b, _, _ in charged} == set(replay.KINDS)
    for batch, duration, latency in charged:
        assert latency.iteration_time(replay.shape_of(batch)) == pytest.approx(duration, rel=1e-9)
    assert [b for b, _, _ in charged] == replay.record_batches(CONFIG)


def test_sample_spreads_over_kinds_and_sizes():
    batches = replay.record_batches(CONFIG)
    picked = replay.sample_batches(batches, 30)
    assert len(picked) == len(set(picked)) == 30
    assert set(picked) <= set(batches)
    counts = {k: sum(replay.kind_of(b) == k for b in picked) for k in replay.KINDS}
    # Equal shares, but this light run planned a single prefill-only batch: the others share
    # what it cannot fill.
    assert counts["prefill"] == len({b for b in batches if replay.kind_of(b) == "prefill"}) == 1
    assert abs(counts["decode"] - counts["mixed"]) <= 1
    decodes = sorted({b for b in batches if replay.kind_of(b) == "decode"}, key=lambda b: len(b[1]))
    sizes = [len(b[1]) for b in picked if replay.kind_of(b) == "decode"]
    assert min(sizes) == len(decodes[0][1]) and max(sizes) == len(decodes[-1][1])
    # A kind with too few batches leaves its share to the others; never more than exist.
    two_prefills = [((8, 0),), ((16, 4),)]
    few = [(p, ()) for p in two_prefills] + [((), (i,)) for i in range(10)]
    assert len(replay.sample_batches(few, 6)) == 6
    assert len(replay.sample_batches(few, 100)) == 12
    with pytest.raises(ValueError, match=">= 1"):
        replay.sample_batches(batches, 0)


def test_compare_leaves_out_the_cpu_side_and_checks_its_input():
    lm = RooflineModel("llama-3-8b", "h100", 1)
    batches = [((), (100,)), (((512, 0),), (10, 20)), (((2048, 1024),), ())]
    gpu_time = [lm.iteration_time(replay.shape_of(b)) - lm.breakdown(replay.shape_of(b))[
        "iteration_overhead"] for b in batches]  # fmt: skip
    exact = replay.compare(lm, batches, gpu_time)
    assert exact.summary()["all"]["median_ape"] == pytest.approx(0, abs=1e-12)
    slow = replay.compare(lm, batches, [t / 2 for t in gpu_time])  # the GPU twice as fast
    assert slow.summary()["all"]["bias"] == pytest.approx(1.0)
    assert set(slow.summary()) == {"decode", "mixed", "prefill", "all"}
    assert "| all | 3 |" in slow.format()
    with pytest.raises(ValueError, match="3 batches but 2"):
        replay.compare(lm, batches, gpu_time[:2])
    with pytest.raises(ValueError, match="> 0"):
        replay.compare(lm, batches, [0.0, 1.0, 1.0])


def test_batch_files_round_trip_and_bad_ones_are_refused(tmp_path):
    batches = replay.sample_batches(replay.record_batches(CONFIG), 9)
    path = replay.save_batches(tmp_path / "plans.json", batches, model="llama-3-8b")
    again, meta = replay.load_batches(path)
    assert again == batches and meta == {"model": "llama-3-8b"}
    (tmp_path / "bad.json").write_text(json.dumps({"batches": [[1, 2]]}))
    with pytest.raises(ValueError, match="not a batch file"):
        replay.load_batches(tmp_path / "bad.json")


def test_gpu_fidelity_driver_runs_on_the_cpu_with_a_tiny_model(tmp_path):
    """The GPU step of benchmarks/gpu_fidelity.py, on the CPU: profile and replay a spread of the
    recorded batches with a tiny stand-in, then the report over both models."""
    pytest.importorskip("torch")
    script = ROOT / "benchmarks/gpu_fidelity.py"
    for model in ("llama-3-8b", "qwen2.5-32b"):
        measure = [sys.executable, str(script), "measure", "--model", model, "--tiny"]
        measure += ["--max-batches", "3", "--repeats", "1", "--warmup", "0", "--parts", "mlp"]
        subprocess.run([*measure, "--out", str(tmp_path)], check=True, capture_output=True)
        data = json.loads((tmp_path / model / "replay.json").read_text())
        assert data["tiny"] and len(data["batches"]) == len(data["measured_s"]) == 3
        assert all(t > 0 for t in data["measured_s"])
    report = subprocess.run(
        [sys.executable, str(script), "report", "--measured", str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "tiny stand-in" in report and "fitted on qwen2.5-32b, tested on llama-3-8b" in report
    assert report.count("replayed iterations") == 2 * 3  # defaults, A100, H100 fit per model
