"""Step logs of a real engine (llmsched.hardware.steplog) and the latency model fitted on them
(`llmsched calibrate --from-steps`): synthetic logs whose cycles a known model made."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llmsched.cli import main
from llmsched.hardware.calibration.steps import calibrate_from_steps, load_steps, predict
from llmsched.hardware.calibration.store import read_calibration
from llmsched.hardware.latency import BatchShape
from llmsched.hardware.roofline import Efficiency, RooflineModel
from llmsched.hardware.specs import model_from_config, with_dtype
from llmsched.hardware.steplog import (
    batch_of_step,
    cycle_times,
    device_spec,
    frontend_latencies,
    read_step_log,
    worker_cores,
)
from llmsched.integrations.vllm.harness import TINY_LLAMA

DEVICE = {"kind": "cpu", "name": "Test CPU", "cores": 2, "peak_flops": 100e9,
          "memory_bandwidth": 20e9}  # fmt: skip
LARGE = TINY_LLAMA | {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 16, "num_key_value_heads": 8}  # fmt: skip
TRUTH = Efficiency(
    gemm_compute=0.6,
    gemm_memory=0.35,
    attn_compute=0.4,
    attn_memory=0.3,
    elementwise_memory=0.2,
    layer_overhead_s=0.8e-3,
    iteration_overhead_s=4e-3,
    sequence_overhead_s=0.3e-3,
)


def header(config: dict) -> dict:
    return {
        "llmsched_step_log": 1, "model_config": config, "dtype": "float32",
        "tensor_parallel_size": 1, "device": DEVICE, "num_blocks": 1000, "block_size": 32,
        "max_num_batched_tokens": 512, "max_num_seqs": 32, "monotonic": 0.0,
    }  # fmt: skip


def random_batch(rng) -> tuple[list, list]:
    kind = rng.integers(3)
    prefills = [] if kind == 0 else [
        [int(rng.integers(1, 512)), int(rng.integers(0, 1500))] for _ in range(rng.integers(1, 3))
    ]  # fmt: skip
    decodes = [] if kind == 2 else [int(rng.integers(1, 2000)) for _ in range(rng.integers(1, 32))]
    return prefills, decodes


def write_log(path: Path, config: dict, n: int, seed: int, efficiency=TRUTH, noise=0.0) -> Path:
    """A step log whose every step lasts what `efficiency` prices it at (times `noise`)."""
    rng = np.random.default_rng(seed)
    model = with_dtype(model_from_config(config), "float32")
    roofline = RooflineModel(model, device_spec(DEVICE), 1, efficiency)
    t, lines = 0.0, [json.dumps(header(config))]
    for i in range(n):
        prefills, decodes = random_batch(rng)
        step = {"p": prefills, "d": decodes}
        cycle = roofline.iteration_time(
            BatchShape.from_chunks(
                [tuple(p) for p in prefills], len(decodes), sum(d + 1 for d in decodes)
            )
        ) * (1 + noise * rng.standard_normal())
        busy = i % 50 != 49  # now and then the engine waits for work
        step |= {"t": [t, t + 1e-4, t + cycle - 2e-4, t + cycle - 1e-4], "busy": busy, "kv": 1,
                 "run": len(prefills) + len(decodes), "wait": 0, "pre": 0, "fin": 0}  # fmt: skip
        lines.append(json.dumps(step))
        t += cycle + (0.0 if busy else 5.0)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_step_log_reads_back_with_its_cycles(tmp_path):
    path = write_log(tmp_path / "a.jsonl", TINY_LLAMA, 120, seed=1)
    head, steps, _ = read_step_log(path)
    assert head["device"] == DEVICE and len(steps) == 120
    cycles = cycle_times(steps)
    assert np.isnan(cycles[49]) and np.isnan(cycles[-1])  # it waited after, or nothing follows
    assert np.all(cycles[~np.isnan(cycles)] > 0)
    prefills, decodes = batch_of_step(steps[0])
    assert all(len(p) == 2 for p in prefills) and all(isinstance(d, int) for d in decodes)


def test_a_line_being_written_is_left_out(tmp_path):
    """A live (or killed) engine's log may end in half a line: the complete steps read."""
    path = write_log(tmp_path / "a.jsonl", TINY_LLAMA, 10, seed=1)
    text = path.read_text()
    path.write_text(text + text.splitlines()[1][:25])
    assert len(read_step_log(path)[1]) == 10


def test_calibration_recovers_the_efficiencies_that_made_the_steps(tmp_path):
    """Two model shapes on one device, steps priced by a known model: the fit finds the model
    again (its price of unseen steps within 1 %), and the coefficients that dominate."""
    fit = [write_log(tmp_path / "tiny.jsonl", TINY_LLAMA, 400, seed=2),
           write_log(tmp_path / "large.jsonl", LARGE, 300, seed=3)]  # fmt: skip
    held = [write_log(tmp_path / "held.jsonl", LARGE, 200, seed=4)]
    cal, train, heldout = calibrate_from_steps(fit, held)
    assert heldout["all"]["median_abs_error"] < 0.01
    assert abs(heldout["all"]["total_error"]) < 0.01
    e = cal.efficiency
    for name in ("gemm_compute", "gemm_memory", "layer_overhead_s", "iteration_overhead_s",
                 "sequence_overhead_s"):  # fmt: skip
        assert getattr(e, name) == pytest.approx(getattr(TRUTH, name), rel=0.05), name
    steps = load_steps(held)
    priced = predict(steps, device_spec(cal.device), e)
    assert np.median(np.abs(priced / steps.cycle - 1)) < 0.01


def test_calibrate_command_writes_a_file_simulate_uses(tmp_path, capsys):
    fit = write_log(tmp_path / "tiny.jsonl", TINY_LLAMA, 300, seed=5, noise=0.05)
    big = write_log(tmp_path / "large.jsonl", LARGE, 200, seed=6, noise=0.05)
    cal_path = tmp_path / "cal.json"
    code = main(["calibrate", "--from-steps", str(fit), str(big), "--out", str(cal_path)])
    assert code == 0, capsys.readouterr().err
    cal = read_calibration(cal_path)
    assert cal.device == DEVICE and cal.gpu.startswith("cpu: Test CPU")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_LLAMA))
    sim = ["simulate", "--model", str(model), "--dtype", "float32", "--latency", str(cal_path),
           "--num-requests", "20", "--rate", "5", "--max-num-seqs", "8"]  # fmt: skip
    assert main(sim) == 2  # a CPU has no GPU memory to size KV from
    assert "--num-blocks" in capsys.readouterr().err
    out = tmp_path / "s"
    assert main([*sim, "--num-blocks", "500", "--block-size", "32", "--out", str(out)]) == 0
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["completed"] == 20


def test_bad_step_logs_are_refused_with_the_reason(tmp_path):
    not_log = tmp_path / "x.jsonl"
    not_log.write_text('{"hello": 1}\n')
    with pytest.raises(ValueError, match="not an llmsched step log"):
        read_step_log(not_log)
    broken = write_log(tmp_path / "b.jsonl", TINY_LLAMA, 3, seed=0)
    broken.write_text(broken.read_text() + '{"t": [1, 2], "p": [], "d": []}\n')
    with pytest.raises(ValueError, match=r"b.jsonl:5: not a step \('t' holds 2 times"):
        read_step_log(broken)
    with pytest.raises(FileNotFoundError):
        read_step_log(tmp_path / "missing.jsonl")
    other = json.loads(json.dumps(header(TINY_LLAMA)))
    other["device"] = DEVICE | {"name": "Another CPU"}
    two = tmp_path / "two.jsonl"
    two.write_text(json.dumps(other) + "\n")
    with pytest.raises(ValueError, match="calibrate one device at a time"):
        load_steps([write_log(tmp_path / "ok.jsonl", TINY_LLAMA, 3, seed=0), two])


def test_worker_cores_follow_vllms_binding(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-3|8-11")
    assert worker_cores() == 8
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0, 1, 2, 3})
    assert worker_cores() == 3


def test_frontend_latency_is_what_the_client_sees_outside_the_engine():
    """Request 0 was sent at 10.00 s (monotonic) and reached vLLM's API server at 10.02 (the log
    opened at 9.0: 1.02 s on its clock); the step that made its first token ended at 10.30 and
    the client had the token at 10.33: 20 + 30 ms outside the engine. A request the log does
    not hold, and a failed one, are left out."""
    head = {"monotonic": 9.0}
    first = [["cmpl-llmsched-ab-0-x"], ["cmpl-llmsched-ab-1-y"]]
    steps = [{"t": [t, t + 0.01, t + 0.09, t + 0.1], "p": [[10, 0]], "d": [], "first": f}
             for t, f in zip((1.2, 2.0), first)]  # fmt: skip
    added = {"cmpl-llmsched-ab-0-x": 1.02, "cmpl-llmsched-ab-1-y": 1.9}
    bench = {"request_ids": ["llmsched-ab-0", "llmsched-ab-1", "llmsched-ab-2"],
             "start_times": [10.0, 10.8, 11.0], "ttfts": [0.33, 0.3, 0.2],
             "errors": ["", "HTTP 500", ""]}  # fmt: skip
    assert frontend_latencies(head, steps, added, bench) == pytest.approx([0.05])


def test_the_simulator_adds_the_frontend_latency_to_what_the_client_sees(tmp_path):
    flags = ["simulate", "--num-requests", "30", "--rate", "4", "--seed", "2"]
    assert main([*flags, "--out", str(tmp_path / "a")]) == 0
    assert main([*flags, "--frontend-latency", "0.25", "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / x / "summary.json").read_text()) for x in "ab")
    for key in ("mean_ttft_ms", "p99_ttft_ms", "mean_e2el_ms", "median_e2el_ms"):
        assert b[key] == pytest.approx(a[key] + 250.0), key
    for key in ("mean_tpot_ms", "p99_itl_ms", "completed"):
        assert b[key] == pytest.approx(a[key]), key
