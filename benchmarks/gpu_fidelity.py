"""The latency model against a real GPU: operator profiles and the simulator's own batches.

Three steps; only the second needs a GPU (one command per model, each well inside a 10-minute
limit on an H100):

1. here (needs the shared data): simulate Llama-3-8B and Qwen2.5-32B on an H100 over the real
   Azure conv and code traces and ShareGPT lengths, keep a spread of the batches the engine
   planned (decode-only, mixed prefill + decodes, prefill-only; real chunk and KV lengths):

       .venv/bin/python benchmarks/gpu_fidelity.py plans        # -> benchmarks/results/gpu/

2. on the GPU (torch from the machine; llmsched from src/):

       PYTHONPATH=src python3 benchmarks/gpu_fidelity.py measure --model llama-3-8b --out $OUT

   profiles the model's operators, attention and whole layers (`llmsched profile`'s CSVs) and
   replays the recorded batches through the whole decoder stack (`replay_batches`), into
   OUT/<model>/. With the device tool: carry `benchmarks/results/gpu`.

3. here: `.venv/bin/python benchmarks/gpu_fidelity.py report --measured DIR` prints
   (a) the A100-calibrated model's error on the H100 before recalibrating, (b) after fitting on
   one model and testing on the other, and (c) the replayed iterations against the model, for
   the roofline defaults, the A100 calibration and the H100 one.

On a CPU, `measure --tiny` runs the whole path on a tiny stand-in model (what the tests do).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmsched.hardware import replay  # noqa: E402

PLANS = ROOT / "benchmarks/results/gpu"
GPU = "h100"
# Per model: (trace, Poisson rate in req/s), loads at which the engine runs full and
# mixed batches on one H100 (TP 1) with vLLM V1's defaults.
SOURCES = {
    "llama-3-8b": (
        ("traces/azure2023/AzureLLMInferenceTrace_conv.csv", 12.0),
        ("traces/azure2023/AzureLLMInferenceTrace_code.csv", 6.0),
        ("prompts/sharegpt/sharegpt_v3_prefix_pairs.jsonl.gz", 40.0),
    ),
    "qwen2.5-32b": (
        ("traces/azure2023/AzureLLMInferenceTrace_conv.csv", 3.0),
        ("traces/azure2023/AzureLLMInferenceTrace_code.csv", 1.5),
        ("prompts/sharegpt/sharegpt_v3_prefix_pairs.jsonl.gz", 10.0),
    ),
}


def plans_path(folder: Path, model: str) -> Path:
    return Path(folder) / f"plans-{model}.json"


def cmd_plans(opts) -> None:
    from llmsched.config import SimulationConfig

    for model, sources in SOURCES.items():
        pooled, described = [], []
        for trace, rate in sources:
            cfg = SimulationConfig(
                trace=trace,
                skip_invalid=True,
                num_requests=opts.requests,
                rate=rate,
                model=model,
                gpu=GPU,
                seed=opts.seed,
            )
            batches = replay.record_batches(cfg)
            pooled += batches
            described.append(f"{trace} at {rate:g} req/s: {len(batches)} spans")
            print(f"{model}: {described[-1]}", file=sys.stderr, flush=True)
        picked = replay.sample_batches(pooled, opts.per_model)
        kinds = {k: sum(replay.kind_of(b) == k for b in picked) for k in replay.KINDS}
        path = replay.save_batches(
            plans_path(opts.out, model),
            picked,
            model=model,
            gpu=GPU,
            sources=described,
            requests=opts.requests,
            seed=opts.seed,
        )
        print(f"{model}: kept {len(picked)} of {len(pooled)} batches {kinds} -> {path}")


def cmd_measure(opts) -> None:
    from llmsched.hardware.profiler import profile_model, replay_batches

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    out = Path(opts.out) / opts.model
    batches, meta = replay.load_batches(plans_path(opts.plans, opts.model))
    if opts.max_batches:
        batches = replay.sample_batches(batches, opts.max_batches)  # a spread, not the first
    tiny = True if opts.tiny else None
    if opts.parts:
        profile_model(
            opts.model, tp=1, out_dir=out, tiny=tiny, parts=opts.parts.split(","), progress=say
        )
    times = replay_batches(
        opts.model, batches, tiny=tiny, repeats=opts.repeats, warmup=opts.warmup, progress=say
    )
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"model": opts.model, "device": device, "tiny": opts.tiny, "plans": meta}
    result["measured_s"] = times
    result["batches"] = [[[list(p) for p in pre], list(dec)] for pre, dec in batches]
    (out / "replay.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "replay.json").write_text(json.dumps(result) + "\n")
    say(f"wrote {out}")


def cmd_report(opts) -> None:
    from llmsched.hardware import calibration as cal
    from llmsched.hardware.calibration import Efficiency
    from llmsched.hardware.roofline import RooflineModel

    measured = Path(opts.measured)
    models = sorted(p.parent.name for p in measured.glob("*/replay.json"))
    profiles = (
        cal.load_vidur_profiles(measured, opts.gpu) if list(measured.glob("*/mlp.csv")) else None
    )
    a100 = cal.read_calibration(cal.calibration_path("a100"))
    if any(json.loads(p.read_text()).get("tiny") for p in measured.glob("*/meta.json")):
        print("NOTE: measured with tiny stand-in models: the figures only exercise the code path\n")
    fitted = {}
    if profiles is not None:
        names = sorted(profiles.operators)
        report = cal.evaluate(a100, profiles, names, attention="all")
        print(
            cal.format_report(report, f"(a) A100-calibrated model on {opts.gpu}, before refitting")
        )
        for held in names if len(names) > 1 else []:
            train = [n for n in names if n != held]
            c, _, held_report = cal.calibrate(profiles, train, [held])
            fitted[held] = c
            print(
                cal.format_report(
                    held_report, f"(b) fitted on {', '.join(train)}, tested on {held}"
                )
            )
    for model in models:
        batches, data = replay.load_batches(measured / model / "replay.json")
        where = f"measured on {data['device']}" + (", tiny stand-in" if data["tiny"] else "")
        variants = {"roofline defaults": Efficiency(), "A100 calibration": a100.efficiency}
        if model in fitted:
            variants[f"{opts.gpu} calibration (fitted without {model})"] = fitted[model].efficiency
        for label, eff in variants.items():
            lm = RooflineModel(model, opts.gpu, 1, efficiency=eff)
            comparison = replay.compare(lm, batches, data["measured_s"])
            print(f"\n(c) {model}: {len(batches)} replayed iterations ({where}); {label}\n")
            print(comparison.format())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("plans", help="record the simulator's batches (CPU, shared data)")
    p.add_argument("--out", type=Path, default=PLANS)
    p.add_argument("--requests", type=int, default=1500, help="requests per trace")
    p.add_argument("--per-model", type=int, default=200, help="batches kept per model")
    p.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("measure", help="profile a model and replay its batches (GPU)")
    m.add_argument("--model", required=True, choices=sorted(SOURCES))
    m.add_argument("--plans", type=Path, default=PLANS)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--parts", default="mlp,attention,layer", help="profiler parts; '' skips")
    m.add_argument("--max-batches", type=int, help="replay a spread of N of the batches")
    m.add_argument("--repeats", type=int, default=10)
    m.add_argument("--warmup", type=int, default=3)
    m.add_argument("--tiny", action="store_true", help="a tiny stand-in model (CPU)")
    r = sub.add_parser("report", help="errors before and after recalibrating (CPU)")
    r.add_argument("--measured", type=Path, required=True, help="measure's --out folder")
    r.add_argument("--plans", type=Path, default=PLANS)
    r.add_argument("--gpu", default=GPU, help="the GPU measured")
    opts = parser.parse_args()
    {"plans": cmd_plans, "measure": cmd_measure, "report": cmd_report}[opts.step](opts)


if __name__ == "__main__":
    main()
