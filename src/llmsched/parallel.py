"""Run one function over many inputs in parallel: local processes or a Ray cluster.

`llmsched sweep` and `llmsched capacity` hand their simulations to an executor and take the
results as they finish; neither knows where they ran. An executor maps a picklable function
over picklable items and yields ``(index, result)`` pairs in completion order:

    with make_executor("ray", address="auto") as ex:
        for i, summary in ex.map_unordered(run_cell, configs):
            ...

Ray is an optional extra (``pip install 'llmsched[ray]'``), imported only by `RayExecutor`.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

BACKENDS = ("local", "ray")


class Executor:
    """Runs `fn` over `items` with `workers` running at once; a context manager."""

    workers: int

    def map_unordered(
        self, fn: Callable[[Any], Any], items: Iterable[Any]
    ) -> Iterator[tuple[int, Any]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalExecutor(Executor):
    """Processes on this machine."""

    def __init__(self, workers: int | None = None):
        self.workers = max(1, workers or os.cpu_count() or 1)
        # forkserver, not fork: forking a process that has threads (a Ray driver, a server, a
        # notebook) can deadlock the child. Its server imports the simulator once, so each
        # worker starts already warm.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["llmsched.experiment"])
        self._pool = ProcessPoolExecutor(self.workers, mp_context=context)

    def map_unordered(self, fn, items):
        futures = {self._pool.submit(fn, item): i for i, item in enumerate(items)}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:  # the caller stopped early (an error, Ctrl-C): drop what has not started
            for future in futures:
                future.cancel()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


class RayExecutor(Executor):
    """Ray tasks on a cluster: `address` "auto" (the cluster this machine belongs to), a
    ``ray://host:port`` or ``host:port`` URL, or None for a Ray started here with `workers` CPUs.
    A Ray session already initialised in this process is used as it is, and left running.

    The cluster's nodes need llmsched installed (the same version), and any trace a config
    names at the same path (or under the same $LLMSCHED_DATA)."""

    def __init__(self, workers: int | None = None, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise ImportError(
                "the ray backend needs Ray, which is not installed: pip install 'llmsched[ray]'"
            ) from None
        self._ray = ray
        self._owner = not ray.is_initialized()
        if self._owner:
            local = address is None
            try:
                ray.init(
                    address=address,
                    num_cpus=workers if local else None,
                    include_dashboard=False if local else None,
                    logging_level="warning",
                )
            except ConnectionError as err:
                raise ConnectionError(f"cannot join the Ray cluster {address!r}: {err}") from None
        self.workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._task = ray.remote(num_cpus=1)(_call)

    def map_unordered(self, fn, items):
        ray = self._ray
        fn_ref = ray.put(fn)  # shipped to the object store once, not with every task
        todo = enumerate(items)
        pending: dict[Any, int] = {}

        def submit() -> None:
            # Twice the workers in flight: every CPU stays busy while results travel back,
            # and a sweep of thousands does not flood the scheduler.
            for i, item in itertools.islice(todo, 2 * self.workers - len(pending)):
                pending[self._task.remote(fn_ref, item)] = i

        try:
            submit()
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    yield i, ray.get(ref)
                submit()
        finally:
            for ref in pending:
                ray.cancel(ref)

    def close(self) -> None:
        if self._owner:
            self._ray.shutdown()


def check_backend(backend: str, address: str | None = None) -> None:
    """A ValueError for a backend that does not exist, or an address it cannot use."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if address is not None and backend != "ray":
        raise ValueError("--address names a Ray cluster: use it with --backend ray")


def make_executor(
    backend: str = "local", workers: int | None = None, address: str | None = None
) -> Executor:
    check_backend(backend, address)
    return LocalExecutor(workers) if backend == "local" else RayExecutor(workers, address)
