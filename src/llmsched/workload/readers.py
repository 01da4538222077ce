"""Trace readers: real request traces (and llmsched's own JSONL) into a columnar Workload.

Every reader checks each row and names the file and the 1-based line of the first bad one, so
that a broken trace fails with a message a user can act on instead of a traceback from deep
inside the simulator. Rows that parse but are no servable request (zero-length prompt or output,
as the real ShareGPT data has) are an error too, unless ``skip_invalid=True``: then they are
skipped and counted in ``workload.skipped``. Rows are never dropped silently.

Formats (see docs/workload-format.md):

- ``azure``: Azure LLM inference trace CSV (``TIMESTAMP, ContextTokens, GeneratedTokens``).
- ``lengths``: Sarathi/Vidur/SLAI length CSV (``num_prefill_tokens, num_decode_tokens, ...``).
- ``mooncake``: Mooncake JSONL (``timestamp`` in ms, ``input_length``, ``output_length``,
  ``hash_ids``: 512-token chunks, read as the prompt's prefix runs).
- ``mooncake_sessions``: aiperf's multi-turn Mooncake JSONL (``session_id``, this turn's new
  ``input_length`` and ``hash_ids``, ``timestamp`` on a session's first turn, ``delay`` on the
  next ones), read as closed-loop programs.
- ``sharegpt``: ShareGPT prompt/response pairs JSONL with cl100k token counts.
- ``llmsched``: llmsched's own JSONL, one request per line, written by :func:`write_jsonl`.

Any of them may be gzip-compressed (recognised by its magic bytes, whatever the file name).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import lru_cache, partial
from pathlib import Path
from typing import IO

import numpy as np

from llmsched.data import resolve
from llmsched.workload.request import (
    FIELDS,
    Request,
    Workload,
    object_column,
    request_problem,
    runs_problem,
)

FORMATS = ("azure", "lengths", "mooncake", "mooncake_sessions", "sharegpt", "llmsched")
#: Tokens per Mooncake hash id (a KV chunk of the Mooncake traces and of aiperf's sessions).
MOONCAKE_CHUNK = 512
LLMSCHED_VERSION = 1

_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_LENGTHS_COLUMNS = ("num_prefill_tokens", "num_decode_tokens")
_REQUIRED = ("request_id", "arrival", "prompt_tokens", "output_tokens")


class TraceFormatError(ValueError):
    """A trace file that cannot be read as its format; the message names file, line and fix."""


# --- public API -------------------------------------------------------------------------------


def read_trace(
    path: str | Path,
    fmt: str | None = None,
    *,
    limit: int | None = None,
    skip_invalid: bool = False,
) -> Workload:
    """Read a trace file into a Workload.

    ``fmt`` is one of :data:`FORMATS`, or None to detect it from the file's first line.
    ``limit`` stops after that many valid rows. With ``skip_invalid`` rows that parse but are no
    servable request (e.g. 0 output tokens) are skipped; their number is ``workload.skipped``
    (always set: 0 when nothing was skipped).
    """
    path = resolve(path, "trace file")  # as given, or inside $LLMSCHED_DATA
    if not path.is_file():
        raise FileNotFoundError(f"trace file {path} is a folder, not a file")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if fmt is None:
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown trace format {fmt!r}; known formats: {', '.join(FORMATS)}")

    try:
        columns, skipped, timed = _read_rows(path, fmt, limit, skip_invalid)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise TraceFormatError(f"{path}: cannot be read as UTF-8 text or gzip ({e})") from None

    if not columns:  # no rows
        columns = {"arrival": []}
    elif fmt == "azure":  # absolute times in ns -> seconds since the earliest
        t = np.asarray(columns["arrival"], dtype=np.int64)
        columns["arrival"] = (t - t.min()) / 1e9
    elif fmt in ("mooncake", "mooncake_sessions"):  # ms -> seconds since the earliest
        t = np.asarray(columns["arrival"], dtype=np.float64)
        columns["arrival"] = (t - t.min()) / 1000.0
    elif "arrival" not in columns:  # untimed formats
        columns["arrival"] = np.zeros(len(columns["prompt_tokens"]))
    for name in ("prompt_text", "tier", "session_id", "prefix", "tool"):  # all None: no column
        if name in columns and all(v is None for v in columns[name]):
            del columns[name]

    workload = Workload(
        {
            k: object_column(v) if k in _OBJECT_COLUMNS else np.asarray(v)
            for k, v in columns.items()
        },
        source=str(path),
        timed=timed,
    )
    workload.skipped = skipped
    return workload


def detect_format(path: str | Path) -> str:
    """The format of a trace file, from its first non-empty line (header or first object)."""
    path = resolve(path, "trace file")  # as given, or inside $LLMSCHED_DATA
    if not path.is_file():
        raise FileNotFoundError(f"trace file {path} is a folder, not a file")
    try:
        with _open_text(path) as fh:
            first = next((line for line in fh if line.strip()), "")
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise TraceFormatError(f"{path}: cannot be read as UTF-8 text or gzip ({e})") from None
    text = first.strip().lstrip("\ufeff")
    known = f"known formats: {', '.join(FORMATS)}; pass the format explicitly if it is one of them"
    if not text:
        raise TraceFormatError(f"{path}: the file is empty, so its format cannot be detected")
    if text.startswith("["):
        raise TraceFormatError(
            f"{path}: a JSON array is not a supported trace; traces are JSONL (one object a "
            f"line) or CSV ({known})"
        )
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise TraceFormatError(f"{path}, line 1: not valid JSON ({e.msg})") from None
        keys = set(obj) if isinstance(obj, dict) else set()
        if obj.get("format") == "llmsched" or set(_REQUIRED) <= keys:
            return "llmsched"
        if {"session_id", "input_length", "output_length"} <= keys:
            return "mooncake_sessions"
        if {"prompt_tokens_cl100k", "response_tokens_cl100k"} <= keys:
            return "sharegpt"
        if {"timestamp", "input_length", "output_length"} <= keys:
            return "mooncake"
        found = ", ".join(sorted(keys)[:12])
        raise TraceFormatError(
            f"{path}: cannot detect the format of a JSONL file with fields {found}; {known}"
        )
    header = {h.strip() for h in next(csv.reader([text]))}
    if set(_AZURE_COLUMNS) <= header:
        return "azure"
    if set(_LENGTHS_COLUMNS) <= header:
        return "lengths"
    raise TraceFormatError(
        f"{path}: cannot detect the format from the first line {text[:120]!r}; {known}"
    )


def write_jsonl(workload: Workload, path: str | Path) -> Path:
    """Write a workload in llmsched's JSONL format (gzip when the name ends in ``.gz``).

    The first line is a header object (``{"format": "llmsched", "version": 1, "timed": ...}``)
    so that a trace without timestamps stays untimed when read back; each further line is one
    request, with the four required fields and every other field that is not at its default.
    """
    path = Path(path)
    cols = {k: v.tolist() for k, v in workload.columns.items() if v is not None}
    header = {
        "format": "llmsched",
        "version": LLMSCHED_VERSION,
        "timed": bool(workload.timed),
        "source": workload.source,
    }
    if path.name.endswith(".gz"):  # mtime=0: the same workload gives the same bytes
        opener = partial(gzip.GzipFile, mode="wb", mtime=0)
    else:
        opener = partial(open, mode="wb")
    with opener(path) as raw, io.TextIOWrapper(raw, encoding="utf-8") as fh:
        fh.write(json.dumps(header) + "\n")
        for i in range(len(workload)):
            row = {
                "request_id": str(cols["request_id"][i]),
                "arrival": cols["arrival"][i],
                "prompt_tokens": cols["prompt_tokens"][i],
                "output_tokens": cols["output_tokens"][i],
            }
            for name in _OPTIONAL:
                value = cols[name][i] if name in cols else None
                if value is None or _is_default(name, value):
                    continue
                if name in ("tier", "session_id"):
                    value = str(value)
                elif name in ("is_last_step", "closed_loop"):
                    value = bool(value)
                elif name == "prefix":
                    value = [[_key_to_json(key), n] for key, n in value]
                row[name] = value
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# --- reading machinery ------------------------------------------------------------------------

_OBJECT_COLUMNS = ("request_id", "prompt_text", "tier", "session_id", "prefix", "tool")
_OPTIONAL = tuple(f for f in FIELDS if f not in _REQUIRED)


def _is_default(name: str, value) -> bool:
    default = _DEFAULTS[name]
    if isinstance(default, float) and math.isnan(default):
        return math.isnan(value)
    return value == default


def _open_text(path: Path) -> IO[str]:
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _read_rows(
    path: Path, fmt: str, limit: int | None, skip_invalid: bool
) -> tuple[dict[str, list], int, bool]:
    """(column lists, rows skipped, timed) of a trace in a known format."""
    timed = True
    with _open_text(path) as fh:
        if fmt == "azure":
            rows = _azure_rows(path, fh)
        elif fmt == "lengths":
            rows = _lengths_rows(path, fh)
            timed = False
        elif fmt == "mooncake":
            rows = _mooncake_rows(path, fh)
        elif fmt == "mooncake_sessions":
            rows = _session_rows(path, fh)
        elif fmt == "sharegpt":
            rows = _sharegpt_rows(path, fh)
            timed = False
        else:
            header: dict = {}
            rows = _llmsched_rows(path, fh, header)
        columns, skipped = _collect(
            path, rows, limit=limit, skip_invalid=skip_invalid, checks_arrival=fmt == "llmsched"
        )
    if fmt == "llmsched":
        timed = bool(header.get("timed", True))
    return columns, skipped, timed


def _collect(
    path: Path,
    rows: Iterator[tuple[int, dict]],
    *,
    limit: int | None,
    skip_invalid: bool,
    checks_arrival: bool,
) -> tuple[dict[str, list], int]:
    """Rows into column lists, applying the invalid-row policy and the limit."""
    columns: dict[str, list] = {}
    skipped = 0
    kept = 0
    if limit == 0:
        return columns, 0
    for lineno, row in rows:
        problem = request_problem(
            row["arrival"] if checks_arrival else 0.0,
            row["prompt_tokens"],
            row["output_tokens"],
            row.get("reasoning_tokens", 0),
        )
        if problem:
            if skip_invalid:
                skipped += 1
                continue
            raise TraceFormatError(
                f"{path}, line {lineno}: {problem}. This is the first such row; how many more "
                "the file holds is not known. To skip such rows and count them, pass "
                "skip_invalid=True (CLI: --skip-invalid)"
            )
        if not columns:
            columns = {name: [] for name in row}
        for name, value in row.items():
            columns[name].append(value)
        kept += 1
        if limit is not None and kept >= limit:
            break
    return columns, skipped


def _fail(path: Path, lineno: int, what: str) -> TraceFormatError:
    return TraceFormatError(f"{path}, line {lineno}: {what}")


def _csv_rows(path: Path, fh: IO[str], required: tuple[str, ...]) -> Iterator[tuple[int, list]]:
    """(line number, the required fields) of each data row of a CSV file with a header."""
    reader = csv.reader(fh)
    header = next(reader, None)
    if header is None:
        raise TraceFormatError(
            f"{path}: the file is empty; expected a header with columns {', '.join(required)}"
        )
    header = [h.strip().lstrip("\ufeff") for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise _fail(
            path, 1, f"missing column(s) {', '.join(missing)}; the header has {', '.join(header)}"
        )
    index = [header.index(c) for c in required]
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise _fail(path, reader.line_num, f"not valid CSV ({e})") from None
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        if len(row) != len(header):
            raise _fail(
                path,
                reader.line_num,
                f"{len(row)} fields, but the header has {len(header)} ({', '.join(header)})",
            )
        yield reader.line_num, [row[i] for i in index]


def _json_rows(path: Path, fh: IO[str]) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-empty line of a JSONL file."""
    for lineno, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(path, lineno, f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise _fail(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _csv_int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} is not a number: {text!r}") from None
    if not value.is_integer():
        raise ValueError(f"{name} must be a whole number of tokens, got {text!r}")
    return int(value)


def _field(obj: dict, name: str):
    if name not in obj:
        raise ValueError(f"missing field {name!r}")
    return obj[name]


def _json_number(obj: dict, name: str) -> float:
    value = _field(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"field {name!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"field {name!r} must be finite, got {value!r}")
    return value


def _key_to_json(key):
    """A run's key as JSON: tuples become lists (read back as tuples)."""
    return [_key_to_json(k) for k in key] if isinstance(key, tuple) else key


def _key_from_json(key):
    if isinstance(key, list):
        return tuple(_key_from_json(k) for k in key)
    if isinstance(key, (str, int)) and not isinstance(key, bool):
        return key
    raise TypeError(f"a prefix key is a string, an integer or a list of them, got {key!r:.60}")


def _json_runs(value) -> tuple:
    """Field 'prefix': [[key, tokens], ...], the prompt's shared runs (Request.prefix)."""
    if not isinstance(value, list):
        raise TypeError(f"field 'prefix' must be a list of [key, tokens] pairs, got {value!r:.80}")
    runs = []
    for run in value:
        if not (isinstance(run, list) and len(run) == 2 and type(run[1]) is int and run[1] >= 1):
            raise ValueError(f"field 'prefix': each run is [key, tokens >= 1], got {run!r:.80}")
        runs.append((_key_from_json(run[0]), run[1]))
    return tuple(runs)


def _json_int(obj: dict, name: str) -> int:
    value = _json_number(obj, name)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"field {name!r} must be a whole number, got {value!r}")
        value = int(value)
    return value


def _json_bool(obj: dict, name: str) -> bool:
    value = _field(obj, name)
    if not isinstance(value, bool):
        raise TypeError(f"field {name!r} must be true or false, got {value!r}")
    return value


def _json_str(obj: dict, name: str, *, allow_int: bool = False) -> str | None:
    value = _field(obj, name)
    if value is None or isinstance(value, str):
        return value
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"field {name!r} must be a string, got {value!r}")


_TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:?\d\d)?")


def _timestamp_ns(text: str) -> int:
    """Nanoseconds since the epoch (UTC when no offset is given). Exact for Azure's 7 digits."""
    m = _TIMESTAMP.fullmatch(text.strip())
    if m is None:
        raise ValueError(
            f"unparsable timestamp {text!r} (expected e.g. 2023-11-16 18:15:46.6805900)"
        )
    whole, fraction, offset = m.groups()
    try:
        seconds = _epoch_seconds(whole + (offset or ""))
    except ValueError:
        raise ValueError(f"unparsable timestamp {text!r} (no such date or time)") from None
    nanos = int(fraction.ljust(9, "0")) if fraction else 0
    return seconds * 1_000_000_000 + nanos


@lru_cache(maxsize=4096)
def _epoch_seconds(whole: str) -> int:
    """Seconds since the epoch of a date and time to the second (UTC when no offset is given);
    remembered, since a trace's neighbouring rows mostly share their second."""
    dt = datetime.fromisoformat(whole)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


# --- one generator of rows per format ---------------------------------------------------------


def _azure_rows(path: Path, fh: IO[str]) -> Iterator[tuple[int, dict]]:
    for i, (lineno, (ts, ctx, gen)) in enumerate(_csv_rows(path, fh, _AZURE_COLUMNS)):
        try:
            row = {
                "request_id": str(i),
                "arrival": _timestamp_ns(ts),
                "prompt_tokens": _csv_int(ctx, "ContextTokens"),
                "output_tokens": _csv_int(gen, "GeneratedTokens"),
            }
        except (ValueError, TypeError) as e:
            raise _fail(path, lineno, str(e)) from None
        yield lineno, row


def _lengths_rows(path: Path, fh: IO[str]) -> Iterator[tuple[int, dict]]:
    for i, (lineno, (prefill, decode)) in enumerate(_csv_rows(path, fh, _LENGTHS_COLUMNS)):
        try:
            row = {
                "request_id": str(i),
                "prompt_tokens": _csv_int(prefill, "num_prefill_tokens"),
                "output_tokens": _csv_int(decode, "num_decode_tokens"),
            }
        except (ValueError, TypeError) as e:
            raise _fail(path, lineno, str(e)) from None
        yield lineno, row


def _mooncake_rows(path: Path, fh: IO[str]) -> Iterator[tuple[int, dict]]:
    for i, (lineno, obj) in enumerate(_json_rows(path, fh)):
        try:
            row = {
                "request_id": str(i),
                "arrival": _json_number(obj, "timestamp"),
                "prompt_tokens": _json_int(obj, "input_length"),
                "output_tokens": _json_int(obj, "output_length"),
            }
            row["prefix"] = mooncake_runs(_hash_ids(obj), row["prompt_tokens"]) or None
        except (ValueError, TypeError) as e:
            raise _fail(path, lineno, str(e)) from None
        yield lineno, row


def _hash_ids(obj: dict) -> list[int]:
    hash_ids = obj.get("hash_ids")
    if hash_ids is None:
        return []
    if not isinstance(hash_ids, list) or not all(
        type(h) is int
        for h in hash_ids  # not isinstance: a bool is no block id
    ):
        raise ValueError(f"field 'hash_ids' must be a list of integers, got {hash_ids!r:.80}")
    return hash_ids


def mooncake_runs(hash_ids: list[int], tokens: int) -> tuple:
    """The prefix runs of `tokens` prompt tokens that Mooncake `hash_ids` describe: one id per
    512-token chunk, key ("mooncake", id); a partial last chunk (tokens - 512 (len - 1) < 512)
    is keyed ("mooncake", id, size), as vLLM's TimedTrace seeds a partial chunk by its size too.
    No ids: () (nothing known to be shared). Ids that do not make ceil(tokens / 512) chunks are
    an error: Mooncake traces (and aiperf's sessions) have exactly one per chunk."""
    if not hash_ids:
        return ()
    need = -(-tokens // MOONCAKE_CHUNK)
    if len(hash_ids) != need:
        raise ValueError(
            f"hash_ids has {len(hash_ids)} ids, but {tokens} input tokens make {need} chunks of "
            f"{MOONCAKE_CHUNK} (one id per chunk, the last may be partial)"
        )
    runs = [(("mooncake", h), MOONCAKE_CHUNK) for h in hash_ids[:-1]]
    last = tokens - MOONCAKE_CHUNK * (len(hash_ids) - 1)
    key = ("mooncake", hash_ids[-1]) if last == MOONCAKE_CHUNK else ("mooncake", hash_ids[-1], last)
    runs.append((key, last))
    return tuple(runs)


def _session_rows(path: Path, fh: IO[str]) -> Iterator[tuple[int, dict]]:
    """aiperf's session JSONL as closed-loop turns. A turn's prompt is its predecessor's prompt,
    its predecessor's output and its own new tokens; its predecessor's tool_time is its delay.
    The whole file is read first (a turn's delay completes the turn before it)."""
    rows: list[tuple[int, dict]] = []
    last: dict[str, tuple[int, dict]] = {}  # session -> (line, row) of its latest turn
    for lineno, obj in _json_rows(path, fh):
        try:
            session = _json_str(obj, "session_id", allow_int=True)
            if session is None:
                raise TypeError("field 'session_id' must be a string, got None")
            new = _json_int(obj, "input_length")
            output = _json_int(obj, "output_length")
            before = last.get(session)
            turn = 0 if before is None else before[1]["turn"] + 1
            given = obj.get("turn")
            if given is not None and given != turn:
                raise ValueError(_turn_problem(session, given, turn, before))
            if before is None:
                if "timestamp" not in obj:
                    raise ValueError(
                        f"session {session!r} starts here without a 'timestamp' (ms): its first "
                        "turn is missing (a later turn gives 'delay' instead)"
                    )
                start = _json_number(obj, "timestamp")
                if new < 1:
                    raise ValueError(f"input_length must be >= 1 on a first turn, got {new}")
                prefix, prompt = (), new
            else:
                if "delay" not in obj:
                    raise ValueError(
                        f"session {session!r} already started on line {before[0]}: a later turn "
                        "gives 'delay' (ms after the previous response), not a new 'timestamp' "
                        "(is a session_id repeated, or a turn missing?)"
                    )
                delay = _json_number(obj, "delay")
                if delay < 0:
                    raise ValueError(f"field 'delay' must be >= 0 ms, got {delay!r}")
                if new < 0:
                    raise ValueError(f"input_length must be >= 0, got {new}")
                prev = before[1]
                prev["tool_time"] = delay / 1000.0
                start = prev["arrival"]
                prefix = Request(
                    prev["request_id"],
                    0.0,
                    prev["prompt_tokens"],
                    prev["output_tokens"],
                    prefix=prev["prefix"],
                ).continuation
                prompt = prev["prompt_tokens"] + prev["output_tokens"] + new
            prefix += mooncake_runs(_hash_ids(obj), new)
            row = {
                "request_id": f"{session}/{turn}",
                "arrival": start,  # ms; a later turn's is its session's start (a lower bound)
                "prompt_tokens": prompt,
                "output_tokens": output,
                "session_id": session,
                "turn": turn,
                "tool_time": 0.0,
                "prefix": prefix or None,
                "closed_loop": turn > 0,
            }
            problem = request_problem(0.0, prompt, output, 0)
            if problem:  # never skipped: a skipped turn would leave its program with a gap
                raise ValueError(problem)
        except (ValueError, TypeError) as e:
            raise _fail(path, lineno, str(e)) from None
        last[session] = (lineno, row)
        rows.append((lineno, row))
    yield from rows


def _turn_problem(session: str, given, expected: int, before: tuple[int, dict] | None) -> str:
    if not isinstance(given, int) or isinstance(given, bool):
        return f"field 'turn' must be an integer, got {given!r}"
    if before is None:
        return f"session {session!r} starts at turn {given}: turns 0..{given - 1} are missing"
    if given > expected:
        missing = f"turn {expected}" if given == expected + 1 else f"turns {expected}..{given - 1}"
        return (
            f"turn {given} of session {session!r} follows turn {expected - 1} (line {before[0]}): "
            f"{missing} missing"
        )
    return (
        f"turn {given} of session {session!r} comes after its turn {expected - 1} (line "
        f"{before[0]}): turns out of order or repeated"
    )


def _sharegpt_rows(path: Path, fh: IO[str]) -> Iterator[tuple[int, dict]]:
    for lineno, obj in _json_rows(path, fh):
        try:
            session = _json_str(obj, "id", allow_int=True)
            turn = _json_int(obj, "turn")
            row = {
                "request_id": f"{session}/{turn}",
                "prompt_tokens": _json_int(obj, "prompt_tokens_cl100k"),
                "output_tokens": _json_int(obj, "response_tokens_cl100k"),
                "prompt_text": _json_str(obj, "prompt"),
                "session_id": session,
                "turn": turn,
            }
        except (ValueError, TypeError) as e:
            raise _fail(path, lineno, str(e)) from None
        yield lineno, row


def _llmsched_rows(path: Path, fh: IO[str], header: dict) -> Iterator[tuple[int, dict]]:
    """Request rows; the optional header line's fields are put into ``header``."""
    seen: dict[str, int] = {}
    first = True
    for lineno, obj in _json_rows(path, fh):
        if first and "format" in obj:
            first = False
            if obj["format"] != "llmsched" or obj.get("version", 1) != LLMSCHED_VERSION:
                raise _fail(
                    path,
                    lineno,
                    f"header says format {obj['format']!r} version "
                    f"{obj.get('version')!r}; this reader reads llmsched version "
                    f"{LLMSCHED_VERSION}",
                )
            if not isinstance(obj.get("timed", True), bool):
                raise _fail(
                    path,
                    lineno,
                    f"header field 'timed' must be true or false, got {obj['timed']!r}",
                )
            header.update(obj)
            continue
        first = False
        unknown = set(obj) - set(FIELDS)
        if unknown:
            raise _fail(
                path,
                lineno,
                f"unknown field(s) {', '.join(sorted(unknown))}; known fields: {', '.join(FIELDS)}",
            )
        try:
            rid = _json_str(obj, "request_id", allow_int=True)
            if rid is None:
                raise TypeError("field 'request_id' must be a string, got None")
            row = {
                "request_id": rid,
                "arrival": float(_json_number(obj, "arrival")),
                "prompt_tokens": _json_int(obj, "prompt_tokens"),
                "output_tokens": _json_int(obj, "output_tokens"),
            }
            for name in _OPTIONAL:
                if obj.get(name) is None:
                    row[name] = _DEFAULTS[name]
                elif name in ("prompt_text", "tier", "session_id", "tool"):
                    row[name] = _json_str(obj, name, allow_int=name in ("tier", "session_id"))
                elif name in ("is_last_step", "closed_loop"):
                    row[name] = _json_bool(obj, name)
                elif name in ("reasoning_tokens", "priority", "turn"):
                    row[name] = _json_int(obj, name)
                elif name == "prefix":
                    row[name] = _json_runs(obj[name])
                else:
                    row[name] = float(_json_number(obj, name))
            for name, low, strict in _LOWER_BOUNDS:
                value = row[name]
                if value < low or (strict and value == low):
                    raise ValueError(
                        f"field {name!r} must be {'>' if strict else '>='} {low}, got {value!r}"
                    )
            if row["prefix"] is not None:
                problem = runs_problem(row["prefix"], row["prompt_tokens"])
                if problem:
                    raise ValueError(f"field 'prefix': {problem}")
        except (ValueError, TypeError) as e:
            raise _fail(path, lineno, str(e)) from None
        if rid in seen:
            raise _fail(path, lineno, f"request_id {rid!r} repeats line {seen[rid]}")
        seen[rid] = lineno
        yield lineno, row


_LOWER_BOUNDS = (
    ("ttft_slo", 0, True),
    ("tpot_slo", 0, True),
    ("turn", 0, False),
    ("tool_time", 0, False),
)
_DEFAULTS = {
    "reasoning_tokens": 0,
    "prompt_text": None,
    "ttft_slo": math.nan,
    "tpot_slo": math.nan,
    "priority": 0,
    "tier": None,
    "session_id": None,
    "turn": 0,
    "tool_time": 0.0,
    "score": math.nan,
    "prefix": None,
    "tool": None,
    "is_last_step": False,
    "closed_loop": False,
}
