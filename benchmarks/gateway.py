"""The gateway's own cost, and a soak with a backend killed every minute.

Overhead: the same closed-loop clients (C concurrent streams, each sending its next request when
the last ends) talk to the emulated engines directly (round-robin on the client side) and then
through `llmsched serve gateway --router round-robin` in front of the same engines, in one run,
at C = 10, 100 and 500. Reported: TTFT p50 and p99 both ways and their difference (what the
gateway adds), and the streamed tokens per second each way.

Soak: C streams through the gateway over three engines for `--soak` seconds; every minute one
engine is killed (SIGKILL) and started again on its port. Each stream's text must read
`t0 t1 ... t{n-1}` exactly (protocol.py): a lost request, a lost token or a duplicated one is
counted. The gateway's failovers and retries come from its /metrics.

    .venv/bin/python benchmarks/gateway.py                     # overhead, ~5 min
    .venv/bin/python benchmarks/gateway.py --soak 600 --skip-overhead   # the 10-minute soak
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np

from llmsched.integrations.process import ServerProcess

MODEL = "llama-3-8b"
ENGINE = ["-m", "llmsched.integrations.serve.engine", "--model", MODEL, "--gpu", "a100-80gb"]
GATEWAY = ["-m", "llmsched.integrations.serve.gateway"]


async def closed_loop(urls, streams, seconds, prompt_len, output_len, check_text=False):
    """`streams` clients for `seconds`, each sending its next request when the last ends;
    returns (ttfts, tokens received, requests done, problems)."""
    ttfts, problems = [], []
    tokens = done = 0
    stop = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client(c: int) -> None:
            nonlocal tokens, done
            i = 0
            while time.perf_counter() < stop:
                url = urls[(c + i) % len(urls)] + "/v1/completions"
                i += 1
                body = {"model": MODEL, "prompt": [1000 + c] * prompt_len,
                        "max_tokens": output_len, "stream": True, "ignore_eos": True}  # fmt: skip
                start = time.perf_counter()
                first, text, ok = None, [], False
                try:
                    async with session.post(url, json=body) as r:
                        if r.status != 200:
                            problems.append(f"HTTP {r.status}: {(await r.text())[:120]}")
                            continue
                        async for line in r.content:
                            if not line.startswith(b"data:"):
                                continue
                            data = line[5:].strip()
                            if data == b"[DONE]":
                                ok = True
                                break
                            chunk = json.loads(data)
                            if "error" in chunk:
                                problems.append(f"in-stream error: {chunk['error']}")
                                break
                            if chunk.get("choices"):
                                if first is None:
                                    first = time.perf_counter() - start
                                text += chunk["choices"][0].get("text", "").split()
                except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                    problems.append(f"{type(e).__name__}: {e}"[:160])
                    continue
                if not ok:
                    problems.append(f"stream ended without [DONE] after {len(text)} tokens")
                    continue
                if check_text and text != [f"t{k}" for k in range(output_len)]:
                    problems.append(f"text not t0..t{output_len - 1}: {' '.join(text)[:200]}")
                ttfts.append(first)
                tokens += len(text)
                done += 1

        await asyncio.gather(*(client(c) for c in range(streams)))
    return np.array(ttfts), tokens, done, problems


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(targets, streams, args, watch: ServerProcess | None) -> dict:
    asyncio.run(closed_loop(targets, streams, 2, args.prompt, args.output))  # warm
    cpu = cpu_seconds(watch.process.pid) if watch else 0.0
    ttft, tokens, done, problems = asyncio.run(
        closed_loop(targets, streams, args.seconds, args.prompt, args.output)
    )
    cell = {
        "requests": done,
        "p50_ttft_ms": float(np.percentile(ttft, 50) * 1e3) if done else None,
        "p99_ttft_ms": float(np.percentile(ttft, 99) * 1e3) if done else None,
        "tokens_per_s": tokens / args.seconds,
        "problems": len(problems),
        "first_problem": problems[0] if problems else None,
    }
    if watch is not None and tokens:
        cell["gateway_cpu_us_per_token"] = (cpu_seconds(watch.process.pid) - cpu) / tokens * 1e6
    return cell


def overhead(args, folder: Path) -> list[dict]:
    """Each concurrency `repeats` times, direct and through the gateway alternately (which goes
    first alternates too); the medians over repeats, and their differences."""
    rows = []
    engines = [ServerProcess(ENGINE, log=folder / f"engine{i}.log") for i in range(args.engines)]
    for e in engines:
        e.start()
    urls = [e.url for e in engines]
    gateway = ServerProcess(
        [*GATEWAY, "--backends", ",".join(urls), "--router", "round-robin",
         "--log-level", "warning"],
        log=folder / "gateway.log",
    ).start()  # fmt: skip
    ways = {"direct": (urls, None), "gateway": ([gateway.url], gateway)}
    try:
        for streams in args.streams:
            cells: dict[str, list[dict]] = {"direct": [], "gateway": []}
            for rep in range(args.repeats):
                for way in sorted(ways, reverse=rep % 2 == 1):
                    cells[way].append(measure(*ways[way][:1], streams, args, ways[way][1]))
            row: dict = {"streams": streams, "repeats": cells}
            for way, runs in cells.items():
                row[way] = {
                    key: float(np.median([r[key] for r in runs]))
                    for key in ("p50_ttft_ms", "p99_ttft_ms", "tokens_per_s",
                                "gateway_cpu_us_per_token")
                    if all(r.get(key) is not None for r in runs)
                }  # fmt: skip
                row[way]["problems"] = sum(r["problems"] for r in runs)
            d, g = row["direct"], row["gateway"]
            row["added_p50_ttft_ms"] = g["p50_ttft_ms"] - d["p50_ttft_ms"]
            row["added_p99_ttft_ms"] = g["p99_ttft_ms"] - d["p99_ttft_ms"]
            row["throughput_ratio"] = g["tokens_per_s"] / d["tokens_per_s"]
            rows.append(row)
            print(
                f"{streams:4d} streams: TTFT p50 {d['p50_ttft_ms']:.1f} -> {g['p50_ttft_ms']:.1f} "
                f"ms ({row['added_p50_ttft_ms']:+.1f}), p99 {d['p99_ttft_ms']:.1f} -> "
                f"{g['p99_ttft_ms']:.1f} ms ({row['added_p99_ttft_ms']:+.1f}); tokens/s "
                f"{d['tokens_per_s']:.0f} -> {g['tokens_per_s']:.0f} "
                f"({row['throughput_ratio']:.2f}x); gateway CPU "
                f"{g['gateway_cpu_us_per_token']:.0f} us/token; problems "
                f"{d['problems']}/{g['problems']}",
                flush=True,
            )
    finally:
        gateway.stop()
        for e in engines:
            e.stop()
    return rows


def soak(args, folder: Path) -> dict:
    engines = [ServerProcess(ENGINE, log=folder / f"soak-engine{i}.log") for i in range(3)]
    for e in engines:
        e.start()
    gateway = ServerProcess(
        [*GATEWAY, "--backends", ",".join(e.url for e in engines), "--router", "round-robin"],
        log=folder / "soak-gateway.log",
    ).start()
    kills = 0

    async def killer() -> None:
        nonlocal kills
        while True:
            await asyncio.sleep(args.kill_every)
            victim = engines[kills % len(engines)]
            await asyncio.to_thread(victim.kill)
            kills += 1
            await asyncio.sleep(2)  # down for a moment: the gateway must route around it
            await asyncio.to_thread(victim.start)
            print(f"  killed and restarted {victim.url} ({kills})", flush=True)

    async def run():
        k = asyncio.ensure_future(killer())
        try:
            return await closed_loop(
                [gateway.url], args.soak_streams, args.soak, args.prompt, args.output, True
            )
        finally:
            k.cancel()

    try:
        ttft, tokens, done, problems = asyncio.run(run())
        m = scrape(gateway.url)
    finally:
        gateway.stop()
        for e in engines:
            e.stop()
    result = {
        "seconds": args.soak,
        "streams": args.soak_streams,
        "kills": kills,
        "requests_completed": done,
        "tokens": tokens,
        "problems": len(problems),
        "first_problems": problems[:5],
        "gateway_metrics": {
            k: v for k, v in m.items() if k.startswith("llmsched_gateway") and "_created" not in k
        },
    }
    print(json.dumps(result, indent=1))
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--streams", type=lambda s: [int(x) for x in s.split(",")], default=[10, 100, 500]
    )
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per cell")
    p.add_argument("--repeats", type=int, default=3, help="cells per way and concurrency")
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--output", type=int, default=64, help="output tokens")
    p.add_argument("--soak", type=float, default=0.0, help="soak seconds (0: no soak)")
    p.add_argument("--soak-streams", type=int, default=100)
    p.add_argument("--kill-every", type=float, default=60.0)
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--out", default="benchmarks/results/gateway.json")
    args = p.parse_args()
    out = Path(args.out)
    results: dict = {
        "machine": f"{os.cpu_count()} cores {platform.machine()}, "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if out.exists():
        results = json.loads(out.read_text()) | results
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_overhead:
            results["overhead"] = overhead(args, Path(tmp))
        if args.soak:
            results["soak"] = soak(args, Path(tmp))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
