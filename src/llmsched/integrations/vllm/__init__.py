"""llmsched's policies inside a real vLLM engine (vLLM 0.32.0, V1).

`vllm serve MODEL --scheduler-cls llmsched.integrations.vllm.ParsScheduler` loads one; the
classes are imported on first use, so `llmsched.integrations.vllm.settings` (which validates
per-request data) stays usable without vLLM.
"""

_NAMES = ("Llmsched", "Fcfs", "Priority", "RoundRobin", "Sarathi", "Pars", "Slai", "Pascal")
_NAMES += ("Recording",)  # vLLM's own scheduler, recording its steps (steps.py)
SCHEDULERS = tuple(f"{n}Scheduler" for n in _NAMES) + tuple(f"Async{n}Scheduler" for n in _NAMES)
__all__ = [*SCHEDULERS, "RequestArgsCheck"]


def __getattr__(name: str):
    if name in SCHEDULERS:
        from llmsched.integrations.vllm import schedulers

        return getattr(schedulers, name)
    if name == "RequestArgsCheck":
        from llmsched.integrations.vllm.checks import RequestArgsCheck

        return RequestArgsCheck
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
