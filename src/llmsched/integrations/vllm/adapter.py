"""An llmsched instance policy inside vLLM's own scheduler (vLLM 0.32, V1 engine).

Each step the adapter (1) brings its mirror of vLLM's requests up to date, (2) asks the policy
for a plan on the same :class:`~llmsched.engine.instance.InstanceView` the simulator builds,
and (3) has vLLM's own ``Scheduler.schedule`` carry the plan out: the plan's victims are
preempted through vLLM's ``_preempt_request``; the requests it admits are what vLLM's waiting
queue holds for this call, in the plan's order; the step's token budget is the plan's total, and
each request is capped at its planned tokens (in ``_reserve_prefill_lookahead``, the per-request
hook vLLM calls in both of its loops; a request the plan leaves out gets 0 and is skipped).
vLLM's KV manager allocates every block and vLLM builds the output for the model runner, so
nothing of vLLM's bookkeeping is rewritten here.

Admission rules are the policy's: vLLM's own gates (the watermark and
``scheduler_reserve_full_isl``) are switched off in its KV manager and applied by the policy
from the view's config, which mirrors vLLM's settings. That is what lets a policy admit more
strictly (Sarathi's whole-prompt rule) or preempt for a waiting request (``priority-v0.6``).

The mirror follows vLLM through the hooks every path goes through: ``add_request``,
``_preempt_request`` (the plan's, or vLLM's own), ``_free_request`` (finished, aborted or
failed), and ``update_from_output`` for tokens, their times and the ``</think>`` boundary.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import FCFSRequestQueue
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request as VllmRequest
from vllm.v1.request import RequestStatus

from llmsched.engine.config import EngineConfig
from llmsched.engine.instance import EngineState
from llmsched.engine.state import RequestState, Status
from llmsched.integrations.vllm.settings import (
    RequestDataError,
    Settings,
    check_params,
    request_args,
)
from llmsched.policies import policy_class
from llmsched.policies.base import InstancePolicy
from llmsched.workload.request import Request

logger = logging.getLogger("llmsched.vllm")


class MirroredState(RequestState):
    """A vLLM request as a policy sees it, with the request itself and how many of its output
    tokens have their times logged."""

    __slots__ = ("observed", "vllm")

    def __init__(self, request: Request, vllm: VllmRequest) -> None:
        super().__init__(request)
        self.vllm = vllm
        self.observed = 0


class VllmEngineState(EngineState):
    """vLLM's scheduler as an llmsched policy sees it: one RequestState per vLLM request, the
    waiting ones in the policy's order, the step end times their tokens index."""

    def __init__(self, config: EngineConfig, policy: InstancePolicy) -> None:
        super().__init__(0, config, policy)
        self.states: dict[str, MirroredState] = {}
        self.dirty: list[MirroredState] = []  # scheduled last step: their progress changed
        self.parked: dict[str, MirroredState] = {}  # preempted, output still in flight
        self.think_end: int | None = None  # token id that ends reasoning
        # Something happened that the last plan did not foresee: an arrival, a finish, a
        # preemption, `</think>`. The policy must be asked again.
        self.changed = True
        self._step_start = 0.0
        self._iteration = -1  # log index of the step whose output is being processed

    # --- vLLM -> mirror ---------------------------------------------------------------------
    def add(self, request: Request, vllm: VllmRequest, reasoning: bool) -> MirroredState:
        state = MirroredState(request, vllm)
        if reasoning:  # reasoning until `</think>` shows it where it ended
            state.reasoning_tokens = state.output_tokens
        self.states[state.request_id] = state
        self.enqueue(state)
        self.changed = True
        return state

    def sync(self, blocks: dict, num_free_blocks: int) -> None:
        """Progress of the requests scheduled since the last sync (no other request's changed),
        their token times logged; `blocks` is vLLM's request id -> KV blocks held."""
        running, last = Status.RUNNING, self._iteration
        record = self.record_tokens
        for state in self.dirty:
            if state.status is not running:
                continue
            req = state.vllm
            n = req.num_output_tokens
            if n > state.observed:  # log_tokens, inlined: this runs for every request
                record(state, last - n + state.observed + 1, n - state.observed)
                state.observed = n
            state.computed = req.num_computed_tokens
            # In-flight tokens (async scheduling) count: the next step decodes after them.
            state.generated = n + req.num_output_placeholders
            state.blocks = len(blocks.get(state.request_id, ()))
            if state.generated >= state.output_tokens:
                # Its last token is in flight (async scheduling): vLLM schedules it no more,
                # though it holds its seat and KV until that token is in. Nothing to compute.
                state.computed = state.prompt_tokens + state.generated
        self.kv.used = self.kv.num_blocks - num_free_blocks

    def admitted(self, state: MirroredState, now: float) -> None:
        self.dequeue(state)
        state.status = Status.RUNNING
        self.running.append(state)
        if math.isnan(state.first_scheduled):
            state.first_scheduled = now

    def preempted(self, state: MirroredState, stale: bool) -> None:
        """vLLM preempted the request (recompute): as the simulator's engine does. With output
        still in flight (`stale`, async scheduling) vLLM resumes it only once that output is
        in: until then it waits outside the policy's queue."""
        self.changed = True
        self.running.remove(state)
        state.computed = 0
        state.blocks = 0
        state.preemptions += 1
        self.policy.on_preempt(state, self.view)
        if stale:
            state.status = Status.WAITING
            self.parked[state.request_id] = state
        else:
            self.enqueue(state)

    def unpark(self) -> None:
        for rid, state in list(self.parked.items()):
            if not state.vllm.num_stale_output_tokens:
                del self.parked[rid]
                self.enqueue(state)
                self.changed = True

    def start_iteration(self, now: float) -> None:
        self.now = self._step_start = now

    def end_iteration(self, now: float) -> None:
        """A step that ran tokens ended at `now` (its output is about to be processed)."""
        last = self.log.data[self.log.size - 1] if self.log.size else -math.inf
        self.busy_time += now - max(self._step_start, last)
        self._iteration = self.log.extend([now])
        self.now = now

    def log_tokens(self, state: MirroredState) -> None:
        """Log the times of the request's tokens since it was last looked at: one per step it
        ran since (a request in a plan that repeats runs every step)."""
        old, n = state.observed, state.vllm.num_output_tokens
        if n > old:
            self.record_tokens(state, self._iteration - n + old + 1, n - old)
            state.observed = n

    def watch_think(self, states: list[MirroredState]) -> None:
        """`</think>` among the tokens these requests just produced (one each, at most)?"""
        running, think = Status.RUNNING, self.think_end
        for state in states:
            if state.status is running and state.generated < state.reasoning_tokens:
                tokens = state.vllm._output_token_ids  # (its public view indexes in Python)
                if tokens and tokens[-1] == think:
                    self.log_tokens(state)
                    state.generated = len(tokens) + state.vllm.num_output_placeholders
                    state.reasoning_tokens = len(tokens)  # `</think>` is the last reasoning token
                    self.changed = True
                    self.policy.on_phase_change(state, self.view)

    def finished(self, req: VllmRequest) -> None:
        state = self.states.pop(req.request_id, None)
        if state is None:
            return  # a request rejected on arrival
        self.changed = True
        if state.status is Status.RUNNING:
            self.log_tokens(state)
            self.running.remove(state)
        elif state.queue_entry is not None:
            self.dequeue(state)
        self.parked.pop(req.request_id, None)
        state.status = Status.FINISHED
        self.policy.on_finish(state, self.view)


def engine_config(scheduler) -> EngineConfig:
    """The view's engine settings: vLLM's own (a policy's paper defaults do not apply here)."""
    sc = scheduler.scheduler_config
    return EngineConfig(
        num_blocks=scheduler.kv_cache_config.num_blocks - 1,  # one is vLLM's null block
        block_size=scheduler.block_size,
        max_num_batched_tokens=scheduler.max_num_scheduled_tokens,
        max_num_seqs=scheduler.max_num_active_reqs,
        max_model_len=scheduler.max_model_len,
        long_prefill_token_threshold=sc.long_prefill_token_threshold,
        watermark=sc.watermark,
        reserve_full_isl=scheduler.scheduler_reserve_full_isl,
    )


class PolicySchedulerMixin:
    """Mixed in before vLLM's ``Scheduler`` (or ``AsyncScheduler``): the policy decides,
    vLLM executes. Subclasses name the policy (``policy_name``; None: from the settings)."""

    policy_name: str | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clock: Callable[[], float] = time.time  # the clock of vLLM's arrival times
        self.settings = Settings.from_additional_config(self.vllm_config.additional_config)
        self._check_supported()
        self.policy = self._make_policy()
        # The policy owns admission: vLLM's own gates would second-guess its plan.
        self.kv_cache_manager.watermark_blocks = 0
        config = engine_config(self)
        self.scheduler_reserve_full_isl = False
        # The policy owns the order too; vLLM's queues only hold what the plan admits.
        self.waiting = FCFSRequestQueue()
        self.kv_holding_waiting = FCFSRequestQueue()
        self._engine = VllmEngineState(config, self.policy)
        reasoning = self.settings.reasoning
        self._reasoning = self.policy.phase_aware if reasoning is None else reasoning
        self._engine.think_end = self._think_end_token()
        # This step's plan as vLLM's hooks read it: the tokens of each request (None outside
        # schedule()) and, where the plan holds more KV than that, the tokens to hold.
        self._caps: dict[str, int] | None = None
        self._holds: dict[str, int] = {}
        # The last plan, and how many more steps it may run unchanged (see schedule)
        self._plan, self._planned, self._plan_states, self._plan_tokens = None, {}, [], 0
        self._repeats, self._repeat_blocks = 0, 0
        # vLLM's request id -> KV blocks (one full-attention group: checked above)
        self._req_blocks = self.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks
        self._block_pool = self.kv_cache_manager.block_pool
        self._rejected: set[str] = set()
        self._orders: dict[int, list] = {}  # id(output) -> its requests' states, in plan order
        self.num_deviations = 0  # steps whose batch differed from the plan
        self.num_prefix_hits = 0  # steps where a prefix-cache hit shortened a planned chunk
        self.num_missing_scores = 0
        self._predictor = self._load_ranker()
        if self.scheduler_config.async_scheduling and not isinstance(self, AsyncScheduler):
            logger.warning(
                "this engine schedules asynchronously and %s is vLLM's synchronous Scheduler: "
                "it works, with vLLM's 'degraded performance'; use Async%s, or serve with "
                "--no-async-scheduling",
                type(self).__name__,
                type(self).__name__,
            )
        logger.info(
            "llmsched policy %r (%s) schedules this engine: %d KV blocks, %d tokens per step",
            self.policy.name,
            type(self).__name__,
            config.num_blocks,
            config.max_num_batched_tokens,
        )

    # --- set-up -------------------------------------------------------------------------------
    def _check_supported(self) -> None:
        unsupported = []
        groups = self.kv_cache_config.kv_cache_groups
        spec = groups[0].kv_cache_spec if len(groups) == 1 else None
        if not isinstance(spec, FullAttentionSpec) or spec.sliding_window is not None:
            unsupported.append("models with more than one full-attention KV cache group")
        if self.num_spec_tokens or self.num_lookahead_tokens:
            unsupported.append("speculative decoding")
        if self.connector is not None or self.ec_connector is not None:
            unsupported.append("KV or encoder-cache connectors")
        if self.use_pp:
            unsupported.append("pipeline parallelism")
        if self.adaptive_long_prefill_threshold:
            unsupported.append("long_prefill_token_threshold_adaptive")
        if unsupported:
            raise ValueError(
                f"{type(self).__name__} does not support {', '.join(unsupported)}: serve with "
                "vLLM's own scheduler, or without these options"
            )

    def _make_policy(self) -> InstancePolicy:
        s = self.settings
        name = self.policy_name or s.policy
        if name is None:
            raise ValueError(
                f"{type(self).__name__} runs any llmsched policy: name one with "
                '--additional-config \'{"llmsched": {"policy": "fcfs", "params": {}}}\' '
                "(`llmsched list` shows them)"
            )
        if self.policy_name and s.policy not in (None, self.policy_name):
            raise ValueError(
                f"{type(self).__name__} runs policy {self.policy_name!r}, not {s.policy!r}: "
                "use llmsched.integrations.vllm.LlmschedScheduler to choose the policy"
            )
        cls = policy_class(name)
        check_params(cls, s.params)
        params = {k: v for k, v in s.params.items() if k != "preemption"}
        try:
            policy = cls(preemption="recompute", **params)
        except (TypeError, ValueError) as e:
            raise ValueError(f"llmsched.params for policy {name!r}: {e}") from None
        engine = {
            "max_num_batched_tokens": self.max_num_scheduled_tokens,
            "max_num_seqs": self.max_num_active_reqs,
            "watermark": self.scheduler_config.watermark,
        }
        differs = {k: v for k, v in cls.engine_defaults.items() if engine.get(k, v) != v}
        if differs:
            logger.info(
                "policy %r's paper runs with %s; this engine keeps vLLM's settings (pass them "
                "to vllm serve to match)",
                name,
                ", ".join(f"{k}={v}" for k, v in differs.items()),
            )
        return policy

    def _think_end_token(self) -> int | None:
        if self.settings.think_end_token_id is not None:
            return self.settings.think_end_token_id
        if not self._reasoning:
            return None
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                self.vllm_config.model_config.tokenizer, trust_remote_code=False
            )
            token = tokenizer.convert_tokens_to_ids("</think>")
        except Exception as e:  # no tokenizer folder, or no such token
            raise ValueError(
                f"policy {self.policy.name!r} needs the id of the token that ends reasoning and "
                f"the model's tokenizer cannot give it ({e}): pass it with --additional-config "
                '\'{"llmsched": {"think_end_token_id": 151649}}\''
            ) from None
        if token is None or token == tokenizer.unk_token_id:
            raise ValueError(
                "the model's tokenizer has no '</think>' token: pass the id that ends reasoning "
                'with --additional-config \'{"llmsched": {"think_end_token_id": N}}\''
            )
        return int(token)

    def _load_ranker(self):
        """The trained ranker that scores prompts without a score, and the tokenizer that
        turns a prompt's token ids back into the text it was trained on."""
        if self.settings.ranker is None:
            return None
        from transformers import AutoTokenizer

        from llmsched.predict import load_predictor

        tokenizer = AutoTokenizer.from_pretrained(self.vllm_config.model_config.tokenizer)
        predictor = load_predictor(self.settings.ranker)
        return lambda ids: float(predictor.score([tokenizer.decode(ids)])[0])

    # --- requests -----------------------------------------------------------------------------
    def add_request(self, request: VllmRequest) -> None:
        known = request.request_id in self.requests
        super().add_request(request)
        if known:
            return  # a streaming-input update of a request vLLM already has
        try:
            self._engine.add(self._request_of(request), request, self._reasoning_of(request))
        except RequestDataError as e:
            logger.error("%s; the request fails", e)
            self._rejected.add(request.request_id)
            self._engine.changed = True

    def _request_of(self, request: VllmRequest) -> Request:
        extra = request.sampling_params.extra_args if request.sampling_params else None
        args = request_args(extra, request.request_id, self.settings.tiers)
        score = args.score
        if score is None and self._predictor is not None:
            score = self._predictor(request.prompt_token_ids or [])
        if score is None and self.policy.needs_scores:
            score = self.settings.missing_score
            self.num_missing_scores += 1
            if self.num_missing_scores == 1:
                logger.warning(
                    "request %r has no score (vllm_xargs.score) and no ranker is configured: "
                    "policy %r serves it with score %s (after every scored request); later "
                    "ones are counted, not logged",
                    request.request_id,
                    self.policy.name,
                    score,
                )
        tier = self.settings.tiers.get(args.tier) if args.tier else None
        return Request(
            request.request_id,
            arrival=max(0.0, request.arrival_time),
            prompt_tokens=request.num_prompt_tokens,
            output_tokens=max(1, request.max_tokens),
            priority=request.priority,
            tier=args.tier,
            tpot_slo=args.tbt or (tier.tbt if tier else None),
            ttft_slo=args.ttft,
            score=score,
            session_id=args.session_id,
            turn=args.turn,
            tool=args.tool,
            is_last_step=args.is_last_step,
        )

    def _reasoning_of(self, request: VllmRequest) -> bool:
        extra = request.sampling_params.extra_args if request.sampling_params else None
        value = (extra or {}).get("reasoning")
        return self._reasoning if value is None else bool(value)

    # --- one step -----------------------------------------------------------------------------
    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        if self._pause_state != PauseState.UNPAUSED:
            self._engine.changed = True
            return super().schedule(throttle_prefills)
        engine = self._engine
        now = self.clock()
        engine.start_iteration(now)
        free = self._block_pool.get_num_free_blocks()
        if engine.pins and min(engine.pins.values()) <= now:
            engine.changed = True  # a pin expired: the policy looks at it (the simulator's event)
        if self._repeats and not engine.changed and free >= self._repeat_blocks:
            # Nothing happened since the last plan, which the policy said may repeat: the
            # simulator's spans rest on the same promise (BatchPlan.repeat).
            self._repeats -= 1
            plan, planned, holds = self._plan, self._planned, {}
        else:
            plan, planned, holds = self._new_plan(free)
            while plan.released:  # (a plan that releases pins never repeats)
                for pinned in plan.released:
                    engine.release_pin(pinned)
                    self._free_blocks(pinned.vllm)
                if plan.items or plan.preempted:
                    break
                # It only released pins: it runs nothing, and the policy plans again on the
                # freed KV at once, as the simulator's engine does.
                plan, planned, holds = self._new_plan(self._block_pool.get_num_free_blocks())
        for victim, _ in plan.preempted:
            request = victim.vllm
            self.running.remove(request)
            self._preempt_request(request, now)
        admit = [s.vllm for s, _ in plan.items if s.status is Status.WAITING]
        queue, self.waiting = self.waiting, FCFSRequestQueue(admit)
        budget = self.max_num_scheduled_tokens
        self.max_num_scheduled_tokens, self._caps, self._holds = self._plan_tokens, planned, holds
        try:
            output = super().schedule(throttle_prefills)
        finally:
            self.max_num_scheduled_tokens, self._caps = budget, None
            self.num_lookahead_tokens = 0
            left, self.waiting = self.waiting, queue
        started = [r for r in admit if r.status == RequestStatus.RUNNING]
        if started:
            queue.remove_requests(started)
            for request in started:
                engine.admitted(engine.states[request.request_id], now)
        for request in left:  # preempted by vLLM itself during the call
            if request not in admit:
                queue.prepend_request(request)
        # Their outputs are observed in the plan's order, as the simulator applies a plan:
        # callbacks that requeue (PASCAL at `</think>`) then break ties the same way.
        scheduled = output.num_scheduled_tokens
        if scheduled == planned:
            engine.dirty = self._plan_states
        else:
            unplanned = set(scheduled) - set(planned) & set(engine.states)
            engine.dirty = [s for s in self._plan_states if s.request_id in scheduled]
            engine.dirty += [engine.states[r] for r in scheduled if r in unplanned]
            self._deviation(planned, scheduled, started)
        self._orders[id(output)] = engine.dirty
        return output

    def _new_plan(self, free: int):
        """Ask the policy, on a view brought up to date; note how often the plan may repeat."""
        engine = self._engine
        engine.sync(self._req_blocks, free)
        plan = self.policy.schedule(engine.view)
        # One pass over the plan: its tokens by request id, and how often it may repeat: as
        # often as it allows while no decode finishes before the last time (the simulator's
        # span bound) and KV for one more step of it stays free.
        planned, states = {}, []
        repeats, bs, total, blocks = plan.repeat, self.block_size, 0, 0
        for state, tokens in plan.items:
            planned[state.request_id] = tokens
            states.append(state)
            total += tokens
            blocks += -(-tokens // bs) + 1
            left = state.output_tokens - state.generated
            if left < repeats and state.computed + 1 == state.prompt_tokens + state.generated:
                repeats = left  # a decode (or a recompute's last token) that finishes first
        self._plan, self._planned, self._plan_states = plan, planned, states
        self._plan_tokens, self._repeats, self._repeat_blocks = total, repeats - 1, blocks
        engine.changed = False
        return plan, planned, {s.request_id: t for s, t in plan.hold.items()}

    def _reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens) -> int:
        """vLLM asks this of every request, in both loops, just before it allocates KV for it:
        the tokens the plan gives it (0: skip it), and the KV it holds beyond them (Sarathi's
        whole prompt), which vLLM allocates as "lookahead" slots in the same call."""
        caps = self._caps
        if caps is None:
            return super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        # (No multi-token-prediction lookahead to keep: speculative decoding is refused.)
        cap = caps.get(request.request_id, 0)
        tokens = num_new_tokens if num_new_tokens < cap else cap
        if self._holds:
            hold = self._holds.get(request.request_id, 0)
            self.num_lookahead_tokens = max(0, hold - num_computed_tokens - tokens)
        return tokens

    def _deviation(self, planned: dict, scheduled: dict, started: list[VllmRequest]) -> None:
        """vLLM's batch is not the plan. One reason is expected: with prefix caching on, a
        request admitted with a cache hit computes fewer tokens than planned (the simulator and
        the view know no prefix cache yet), and the budget the hit frees stays unused."""
        self._engine.changed = True
        hits = {r.request_id for r in started if r.num_computed_tokens > scheduled[r.request_id]}
        if all(
            scheduled.get(rid) == tokens or (rid in hits and scheduled[rid] < tokens)
            for rid, tokens in planned.items()
        ):
            self.num_prefix_hits += 1
            return
        self.num_deviations += 1
        message = f"vLLM ran {dict(scheduled)} where policy {self.policy.name!r} planned {planned}"
        if self.settings.strict:
            raise RuntimeError(message)
        logger.debug(message)

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ):
        engine = self._engine
        if scheduler_output.total_num_scheduled_tokens:
            engine.end_iteration(self.clock())
        if self._rejected:  # vLLM finishes these as errors, with an output for the client
            self.grammar_compile_error_reqs |= self._rejected
            self._rejected = set()
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        order = self._orders.pop(id(scheduler_output), None)
        if order is None:  # a step scheduled by vLLM alone (paused)
            states = engine.states
            order = [states[r] for r in scheduler_output.num_scheduled_tokens if r in states]
        if engine.think_end is not None:  # `</think>` must be seen the step it comes
            engine.watch_think(order)
        if engine.parked:
            engine.unpark()
        return outputs

    # --- hooks every path goes through -------------------------------------------------------
    def _preempt_request(self, request, timestamp, drop_stale_output: bool = False) -> None:
        super()._preempt_request(request, timestamp, drop_stale_output)
        state = self._engine.states.get(request.request_id)
        if state is not None and state.status is Status.RUNNING:
            stale = request.num_stale_output_tokens > 0 and not request.drop_stale_output
            self._engine.preempted(state, stale)

    def _free_request(self, request, delay_free_blocks: bool = False):
        """A request is done. A policy that pins (Continuum) may keep the KV blocks of one that
        finished normally: vLLM then keeps them referenced, as it does for a KV transfer
        (`delay_free_blocks`), until a plan releases the pin (`schedule`)."""
        engine = self._engine
        state = engine.states.get(request.request_id)
        until = None
        if (
            state is not None
            and state.status is Status.RUNNING
            and not delay_free_blocks
            and request.status
            in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)
        ):
            until = self.policy.pin_until(state, engine.view)
        result = super()._free_request(request, delay_free_blocks or until is not None)
        if until is not None:
            state.blocks = len(self._req_blocks.get(request.request_id, ()))
            engine.pin(state, until)
        engine.finished(request)
        return result
