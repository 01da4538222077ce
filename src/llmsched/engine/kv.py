"""Paged KV cache accounting: fixed-size blocks, counted per request."""

from __future__ import annotations

from mypy_extensions import mypyc_attr

from llmsched.engine.state import RequestState


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks needed to hold `tokens` tokens of KV."""
    return -(-tokens // block_size)


@mypyc_attr(allow_interpreted_subclasses=True)  # (when compiled: setup.py)
class KVBlockManager:
    """GPU KV blocks of one instance. Host (swap) memory is unbounded, as in PASCAL's setup.
    Blocks are only counted: nothing is shared (prefix caching off; engine/prefix_cache.py)."""

    __slots__ = ("block_size", "caching", "cpu_used", "num_blocks", "used")

    def __init__(self, num_blocks: int, block_size: int = 16, caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block size must be >= 1 token, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Whether admissions look blocks up in a prefix cache (a PrefixCachingKV's are). An
        # instance attribute, not a class one: compiled code reads it from the object.
        self.caching = caching
        self.used = 0
        self.cpu_used = 0

    @property
    def free(self) -> int:
        return self.num_blocks - self.used

    @property
    def usage(self) -> float:
        return self.used / self.num_blocks

    def grow_to(self, state: RequestState, tokens: int, computed: int | None = None) -> int:
        """Allocate so that `state` holds blocks for `tokens` tokens; returns blocks added.
        (`computed`: the tokens computed or being computed, for a prefix cache.)"""
        need = -(-tokens // self.block_size) - state.blocks
        if need > 0:
            if need > self.num_blocks - self.used:
                raise RuntimeError(
                    f"KV over-allocation on {state.request_id}: needs {need} blocks, "
                    f"{self.num_blocks - self.used} free (a policy scheduled more than fits)"
                )
            state.blocks += need
            self.used += need
            return need
        return 0

    def free_request(self, state: RequestState) -> None:
        self.used -= state.blocks
        state.blocks = 0
        assert self.used >= 0, "KV blocks under-counted"

    def swap_out(self, state: RequestState) -> int:
        moved = state.blocks
        self.free_request(state)
        state.cpu_blocks = moved
        self.cpu_used += moved
        return moved

    def drop_cpu_copy(self, state: RequestState) -> int:
        """The request's swapped-out copy is no longer needed (swapped back in, or moved)."""
        moved = state.cpu_blocks
        self.cpu_used -= moved
        state.cpu_blocks = 0
        return moved
