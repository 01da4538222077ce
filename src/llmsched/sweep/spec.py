"""A sweep file: a base config crossed with a grid and/or a list of cells; each cell one run.

    base: demo.yaml            # a config file (relative to this file), or a mapping of keys
    grid:                      # every combination of these values (cartesian product)
      policy: [fcfs, sarathi]
      rate: [2, 4, 6]
      seed: [0, 1]
    cells:                     # each crossed with every grid point (default: one empty cell)
      - {}
      - {max_num_batched_tokens: 512, policy_params.quantum: 300}

Any SimulationConfig key can be swept; `a.b` sets key `b` inside the mapping `a` (a policy's
parameter, say); null means the key's default. Every cell's config is built and its engine
checked before anything runs, so a bad value fails the sweep at once, naming the cell.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmsched.config import SimulationConfig, load_config, read_config_file

SWEEP_KEYS = ("base", "grid", "cells")


@dataclass(frozen=True)
class Cell:
    number: int  # 1-based, in the sweep's order
    overrides: dict[str, Any]  # the swept keys' values, as written in the sweep file
    config: SimulationConfig  # the resolved config: base, then the overrides
    id: str  # a hash of the resolved config: the name of its stored result

    def describe(self) -> str:
        return describe(self.number, self.overrides)


def describe(number: int, overrides: dict[str, Any]) -> str:
    values = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    return f"cell {number}" + (f" ({values})" if values else "")


@dataclass(frozen=True)
class Sweep:
    path: Path
    keys: list[str]  # the swept keys, in the file's order
    cells: list[Cell]


def read_sweep(path: str | Path) -> Sweep:
    """The sweep file's cells, each config validated and its engine built once (cheap: no
    workload), or a ValueError naming the file, the cell and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"sweep file {path} does not parse: {err}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"sweep file {path} must be a mapping with base, grid and/or cells")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ValueError(
            f"sweep file {path}: unknown key(s) {', '.join(map(repr, unknown))}; a sweep file "
            "has base (a config or its path), grid (key: [values]) and cells ([overrides])"
        )
    if not spec.get("grid") and spec.get("cells") is None:
        raise ValueError(
            f"sweep file {path} has nothing to sweep: give grid: {{key: [values]}} and/or "
            "cells: [{key: value, ...}]"
        )
    base = _base(spec.get("base"), path)
    grid = _grid(spec.get("grid"), path)
    overrides = _cells(spec.get("cells"), path)
    both = sorted({k for cell in overrides for k in cell} & set(grid))
    if both:
        raise ValueError(
            f"sweep file {path}: {', '.join(map(repr, both))} both in grid and in cells; "
            "a key is swept in one of them"
        )
    keys = list(dict.fromkeys([*(k for cell in overrides for k in cell), *grid]))
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    cells, seen = [], {}
    for number, changes in enumerate((c | p for c in overrides for p in points), start=1):
        cell = _cell(number, base, changes, path)
        if cell.id in seen:
            raise ValueError(
                f"sweep file {path}: {cell.describe()} is the same run as "
                f"{seen[cell.id].describe()}; remove one"
            )
        seen[cell.id] = cell
        cells.append(cell)
    return Sweep(path, keys, cells)


def _base(base: Any, path: Path) -> dict[str, Any]:
    if base is None:
        return {}
    if isinstance(base, str):
        file = path.parent / base
        if not file.is_file():
            raise FileNotFoundError(
                f"sweep file {path}: base config {file} does not exist (a base path is relative "
                "to the sweep file's folder)"
            )
        return read_config_file(file)
    if isinstance(base, dict):
        return {str(k).replace("-", "_"): v for k, v in base.items()}
    raise ValueError(f"sweep file {path}: base must be a config file's path or a mapping")


def _grid(grid: Any, path: Path) -> dict[str, list]:
    if grid is None:
        return {}
    if not isinstance(grid, dict):
        raise ValueError(f"sweep file {path}: grid must map config keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(
                f"sweep file {path}: grid key {key!r} must have a non-empty list of values, "
                f"got {values!r} (e.g. {key}: [a, b])"
            )
    return {str(k).replace("-", "_"): v for k, v in grid.items()}


def _cells(cells: Any, path: Path) -> list[dict[str, Any]]:
    if cells is None:
        return [{}]
    if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
        raise ValueError(f"sweep file {path}: cells must be a list of mappings of config keys")
    if not cells:
        raise ValueError(f"sweep file {path}: cells is empty; leave it out to use the grid alone")
    return [{str(k).replace("-", "_"): v for k, v in c.items()} for c in cells]


def _cell(number: int, base: dict[str, Any], changes: dict[str, Any], path: Path) -> Cell:
    from llmsched.experiment import build_cluster

    values = dict(base)
    try:
        for key, value in changes.items():
            _set(values, key, value)
        # None means "the default", as an omitted flag does.
        config = load_config(**{k: v for k, v in values.items() if v is not None})
        build_cluster(config)  # an unknown policy, model or GPU, or impossible budgets
    except (ValueError, TypeError) as err:
        # TypeError: a value of the wrong type that reached a comparison.
        raise ValueError(f"sweep file {path}: {describe(number, changes)}: {err}") from None
    return Cell(number, changes, config, config_id(config))


def _set(values: dict[str, Any], key: str, value: Any) -> None:
    """`values[key] = value`, where `a.b` is key `b` inside the mapping `a`."""
    head, dot, rest = key.partition(".")
    if dot:
        inner = values.get(head) or {}
        if not isinstance(inner, dict):
            raise ValueError(f"sweep key {key!r}: {head} is {inner!r}, not a mapping")
        inner = dict(inner)
        _set(inner, rest, value)
        value = inner
    values[head] = value


def config_id(config: SimulationConfig) -> str:
    """A stable name for a resolved config: equal configs, equal ids."""
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def swept_value(config: SimulationConfig, key: str) -> Any:
    """A swept key's value in a resolved config (`a.b`: key `b` of mapping `a`)."""
    head, dot, rest = key.partition(".")
    value = getattr(config, head)
    for part in rest.split(".") if dot else ():
        value = value.get(part) if isinstance(value, dict) else None
    return value
