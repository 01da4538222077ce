"""Trace readers: every format read, written as llmsched JSONL and read back; bad rows named."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmsched.data import data_dir
from llmsched.workload.readers import (
    FORMATS,
    TraceFormatError,
    detect_format,
    read_trace,
    write_jsonl,
)
from llmsched.workload.request import Request, Workload

# --- small files in each format, written by the tests -----------------------------------------

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:16:01.0000001,879,18
"""

LENGTHS = """num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio
74,918,992,0.0806100217864923
290,905,1195,0.3204419889502762
3,2,5,1.5
"""

MOONCAKE_ROWS = [  # one hash id per 512-token chunk: ceil(6955 / 512) = 14, 6472: 13
    {"timestamp": 0, "input_length": 6955, "output_length": 52, "hash_ids": list(range(14))},
    {
        "timestamp": 27482,
        "input_length": 6472,
        "output_length": 26,
        "hash_ids": [0, 1, 2, *range(100, 110)],
    },
    {"timestamp": 30535, "input_length": 6478, "output_length": 196, "hash_ids": []},
]
SESSION_ROWS = [  # aiperf's session JSONL: new tokens and ids per turn, delay after a response
    {"session_id": "s1", "timestamp": 1000, "input_length": 600, "output_length": 40,
     "hash_ids": [1, 2], "group_id": 0},
    {"session_id": "s2", "timestamp": 2500, "input_length": 512, "output_length": 10,
     "hash_ids": [1]},
    {"session_id": "s1", "delay": 1500, "input_length": 100, "output_length": 7, "hash_ids": [3]},
]  # fmt: skip


def sharegpt_row(sid: str, turn: int, prompt: str, p: int, r: int) -> dict:
    return {
        "id": sid,
        "turn": turn,
        "msg_idx": 2 * turn,
        "prompt": prompt,
        "response": "an answer",
        "prompt_chars": len(prompt),
        "response_chars": 9,
        "prompt_words": len(prompt.split()),
        "response_words": 2,
        "prompt_tokens_cl100k": p,
        "response_tokens_cl100k": r,
    }


SHAREGPT_ROWS = [
    sharegpt_row("abc_0", 0, "Summarize the plot of Hamlet.", 7, 244),
    sharegpt_row("abc_0", 1, "Now in one line,\nplease — «short»", 9, 31),
    sharegpt_row("xyz_3", 0, "你好", 2, 12),
]

LLMSCHED_ROWS = [
    {"request_id": "a", "arrival": 0.0, "prompt_tokens": 10, "output_tokens": 5},
    {
        "request_id": "b",
        "arrival": 0.25,
        "prompt_tokens": 100,
        "output_tokens": 50,
        "reasoning_tokens": 40,
        "prompt_text": "why?",
        "ttft_slo": 0.5,
        "tpot_slo": 0.05,
        "priority": -1,
        "tier": "gold",
        "session_id": "s1",
        "turn": 2,
        "tool_time": 1.5,
        "score": -0.75,
    },
    {"request_id": "c", "arrival": 0.1, "prompt_tokens": 1, "output_tokens": 1, "tier": None},
]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


CONTENT = {
    "azure": ("trace.csv", AZURE),
    "lengths": ("lengths.csv", LENGTHS),
    "mooncake": ("mooncake.jsonl", jsonl(MOONCAKE_ROWS)),
    "mooncake_sessions": ("sessions.jsonl", jsonl(SESSION_ROWS)),
    "sharegpt": ("pairs.jsonl", jsonl(SHAREGPT_ROWS)),
    "llmsched": ("requests.jsonl", jsonl(LLMSCHED_ROWS)),
}


def write(path: Path, text: str) -> Path:
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def make(tmp_path: Path, fmt: str, gz: bool = False) -> Path:
    name, text = CONTENT[fmt]
    return write(tmp_path / (name + (".gz" if gz else "")), text)


def assert_same(a: Workload, b: Workload) -> None:
    assert len(a) == len(b)
    assert a.timed == b.timed
    for name in a.columns:
        x, y = a.columns[name], b.columns[name]
        assert (x is None) == (y is None), name
        if x is None:
            continue
        if x.dtype == object:
            assert x.tolist() == y.tolist(), name
        else:
            assert x.dtype == y.dtype, name
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name


# --- each format ------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_through_llmsched_jsonl(tmp_path, fmt, gz):
    w = read_trace(make(tmp_path, fmt, gz), fmt)
    assert len(w) == 3
    assert w.skipped == 0
    out = write_jsonl(w, tmp_path / ("out.jsonl" + (".gz" if gz else "")))
    back = read_trace(out)
    assert_same(w, back)
    assert back.skipped == 0


def test_azure_values(tmp_path):
    w = read_trace(make(tmp_path, "azure"))
    assert w.timed
    # 7 fractional digits, kept exactly: 50.9951690 - 46.6805900 = 4.3145790
    assert w.arrivals == pytest.approx([0.0, 4.314579, 14.3194101], abs=1e-9)
    assert w.columns["prompt_tokens"].tolist() == [374, 396, 879]
    assert w.columns["output_tokens"].tolist() == [44, 109, 18]
    assert w.columns["request_id"].tolist() == ["0", "1", "2"]
    assert w.source.endswith("trace.csv")


def test_azure_out_of_order_timestamps_are_sorted(tmp_path):
    text = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:50.5,396,109
2023-11-16 18:15:46.5,374,44
2023-11-16 18:15:48.5,10,1
"""
    w = read_trace(write(tmp_path / "t.csv", text))
    assert w.arrivals.tolist() == [0.0, 2.0, 4.0]  # relative to the earliest, not the first row
    assert w.columns["request_id"].tolist() == ["1", "2", "0"]  # ids are file row positions
    assert w.columns["prompt_tokens"].tolist() == [374, 10, 396]


def test_azure_timestamps_with_offset_and_across_midnight(tmp_path):
    text = """TIMESTAMP,ContextTokens,GeneratedTokens
2024-05-10 23:59:59.500000+00:00,5,5
2024-05-11 00:00:00.750000+00:00,5,5
2024-05-11T02:00:01+02:00,5,5
"""
    w = read_trace(write(tmp_path / "t.csv", text))
    assert w.arrivals.tolist() == [0.0, 1.25, 1.5]


def test_lengths_values(tmp_path):
    w = read_trace(make(tmp_path, "lengths"))
    assert not w.timed
    assert w.arrivals.tolist() == [0.0, 0.0, 0.0]
    assert w.columns["prompt_tokens"].tolist() == [74, 290, 3]  # file order kept
    assert w.columns["output_tokens"].tolist() == [918, 905, 2]


def test_mooncake_values(tmp_path):
    w = read_trace(make(tmp_path, "mooncake"))
    assert w.timed
    assert w.arrivals.tolist() == [0.0, 27.482, 30.535]
    assert w.columns["prompt_tokens"].tolist() == [6955, 6472, 6478]
    assert w.columns["output_tokens"].tolist() == [52, 26, 196]


def test_mooncake_hash_ids_are_prefix_runs_of_512_tokens(tmp_path):
    w = read_trace(make(tmp_path, "mooncake"))
    first, second, third = w
    # 6955 = 13 x 512 + 299: the partial last chunk is keyed by its size too
    assert first.prefix == (
        *((("mooncake", h), 512) for h in range(13)),
        (("mooncake", 13, 299), 299),
    )
    assert sum(n for _, n in first.prefix) == first.prompt_tokens
    assert second.prefix[:3] == first.prefix[:3]  # ids 0, 1, 2 shared
    assert second.prefix[3][0] == ("mooncake", 100)
    assert third.prefix is None  # no ids: nothing known to be shared


def test_mooncake_full_last_chunk_has_the_plain_key(tmp_path):
    row = {"timestamp": 0, "input_length": 1024, "output_length": 1, "hash_ids": [7, 8]}
    (r,) = read_trace(write(tmp_path / "m.jsonl", jsonl([row])), "mooncake")
    assert r.prefix == ((("mooncake", 7), 512), (("mooncake", 8), 512))


def test_sessions_are_closed_loop_turns_over_their_predecessors_context(tmp_path):
    w = read_trace(make(tmp_path, "mooncake_sessions"))
    assert detect_format(make(tmp_path, "mooncake_sessions")) == "mooncake_sessions"
    assert w.timed
    by_id = {r.request_id: r for r in w}
    t0, t1, other = by_id["s1/0"], by_id["s1/1"], by_id["s2/0"]
    assert (t0.arrival, other.arrival) == (0.0, 1.5)  # seconds since the first timestamp
    assert t1.arrival == t0.arrival  # a lower bound: it is sent when turn 0 ends + its tool
    assert (t0.closed_loop, t1.closed_loop, other.closed_loop) == (False, True, False)
    assert (t0.turn, t1.turn) == (0, 1) and t0.session_id == t1.session_id == "s1"
    assert t0.tool_time == 1.5 and t1.tool_time == 0.0  # the next turn's delay, in seconds
    assert t0.prefix == ((("mooncake", 1), 512), (("mooncake", 2, 88), 88))
    assert t1.prompt_tokens == 600 + 40 + 100
    assert t1.prefix == t0.continuation + ((("mooncake", 3, 100), 100),)
    assert other.prefix == ((("mooncake", 1), 512),)  # shares its first chunk with s1


def test_session_ids_may_be_integers_and_turns_explicit(tmp_path):
    rows = [
        {"session_id": 4, "turn": 0, "timestamp": 0, "input_length": 3, "output_length": 2},
        {"session_id": 4, "turn": 1, "delay": 0, "input_length": 0, "output_length": 2},
    ]
    w = read_trace(write(tmp_path / "s.jsonl", jsonl(rows)), "mooncake_sessions")
    assert [r.request_id for r in w] == ["4/0", "4/1"]
    assert w[1].prompt_tokens == 5 and w[1].prefix == w[0].continuation


def test_mooncake_arrivals_start_at_first_timestamp(tmp_path):
    rows = [{"timestamp": 5000 + 250 * i, "input_length": 1, "output_length": 1} for i in range(3)]
    w = read_trace(write(tmp_path / "m.jsonl", jsonl(rows)), "mooncake")
    assert w.arrivals.tolist() == [0.0, 0.25, 0.5]


def test_sharegpt_values(tmp_path):
    w = read_trace(make(tmp_path, "sharegpt"))
    assert not w.timed
    assert w.columns["request_id"].tolist() == ["abc_0/0", "abc_0/1", "xyz_3/0"]
    assert w.columns["session_id"].tolist() == ["abc_0", "abc_0", "xyz_3"]
    assert w.columns["turn"].tolist() == [0, 1, 0]
    assert w.columns["prompt_tokens"].tolist() == [7, 9, 2]
    assert w.columns["output_tokens"].tolist() == [244, 31, 12]
    assert w[1].prompt_text == "Now in one line,\nplease — «short»"


def test_llmsched_values_and_defaults(tmp_path):
    w = read_trace(make(tmp_path, "llmsched"))
    assert w.timed  # no header: timed
    assert [r.request_id for r in w] == ["a", "c", "b"]  # sorted by arrival
    b = w[2]
    assert b == Request("b", 0.25, 100, 50, 40, "why?", 0.5, 0.05, -1, "gold", "s1", 2, 1.5, -0.75)
    assert np.isnan(w.columns["score"][0])  # no score: NaN in the column, None in a Request
    assert w[0] == Request("a", 0.0, 10, 5)
    assert w.columns["tier"].tolist() == [None, None, "gold"]


def test_untimed_trace_stays_untimed_through_llmsched_jsonl(tmp_path):
    w = read_trace(make(tmp_path, "lengths"))
    out = write_jsonl(w, tmp_path / "out.jsonl")
    header = json.loads(out.read_text().splitlines()[0])
    assert header == {"format": "llmsched", "version": 1, "timed": False, "source": w.source}
    assert read_trace(out).timed is False


def test_write_jsonl_omits_defaults_and_gzip_is_reproducible(tmp_path):
    w = read_trace(make(tmp_path, "llmsched"))
    lines = write_jsonl(w, tmp_path / "out.jsonl").read_text().splitlines()
    assert json.loads(lines[1]) == LLMSCHED_ROWS[0]
    assert json.loads(lines[2]) == {k: v for k, v in LLMSCHED_ROWS[2].items() if v is not None}
    a = write_jsonl(w, tmp_path / "a.jsonl.gz").read_bytes()
    b = write_jsonl(w, tmp_path / "a.jsonl.gz").read_bytes()
    assert a == b


def test_empty_trace_is_an_empty_workload(tmp_path):
    w = read_trace(write(tmp_path / "e.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"))
    assert len(w) == 0 and w.skipped == 0
    back = read_trace(write_jsonl(w, tmp_path / "e.jsonl"))
    assert len(back) == 0


text_st = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


@st.composite
def requests(draw, i):
    output = draw(st.integers(1, 10**6))
    return Request(
        request_id=draw(text_st) + f"#{i}",
        arrival=draw(st.floats(0, 1e9, allow_nan=False)),
        prompt_tokens=draw(st.integers(1, 10**6)),
        output_tokens=output,
        reasoning_tokens=draw(st.integers(0, output - 1)),
        prompt_text=draw(st.none() | text_st),
        ttft_slo=draw(st.none() | st.floats(1e-6, 1e3)),
        tpot_slo=draw(st.none() | st.floats(1e-6, 1e3)),
        priority=draw(st.integers(-(2**31), 2**31)),
        tier=draw(st.none() | text_st),
        session_id=draw(st.none() | text_st),
        turn=draw(st.integers(0, 1000)),
        tool_time=draw(st.floats(0, 1e4)),
        score=draw(st.none() | st.floats(-1e6, 1e6, allow_nan=False)),
    )


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.integers(0, 6).flatmap(lambda n: st.tuples(*[requests(i) for i in range(n)])),
    st.booleans(),
    st.booleans(),
)
def test_llmsched_jsonl_round_trip_is_exact(tmp_path, rows, timed, gz):
    w = Workload.from_requests(rows, source="hypothesis", timed=timed)
    back = read_trace(write_jsonl(w, tmp_path / ("w.jsonl.gz" if gz else "w.jsonl")))
    assert_same(w, back)
    assert list(back) == list(w)


# --- detection --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_format(tmp_path, fmt):
    path = make(tmp_path, fmt)
    assert detect_format(path) == fmt
    assert len(read_trace(path)) == 3


@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_format_gzip_whatever_the_name(tmp_path, fmt):
    gz = make(tmp_path, fmt, gz=True)
    odd = gz.rename(tmp_path / "trace.data")
    assert detect_format(odd) == fmt


def test_detect_llmsched_from_header_line(tmp_path):
    w = read_trace(make(tmp_path, "sharegpt"))
    assert detect_format(write_jsonl(w, tmp_path / "x.jsonl")) == "llmsched"


@pytest.mark.parametrize(
    "text",
    ["a,b,c\n1,2,3\n", '{"foo": 1}\n', "", "\n\n", '[{"conversations": []}]'],
    ids=["csv", "jsonl", "empty", "blank", "json-array"],
)
def test_undetectable_format_lists_known_formats(tmp_path, text):
    path = write(tmp_path / "x.txt", text)
    with pytest.raises(TraceFormatError, match="x.txt") as err:
        read_trace(path)
    if text.strip():
        assert ", ".join(FORMATS) in str(err.value)


def test_unknown_format_name_lists_known_formats(tmp_path):
    with pytest.raises(ValueError, match="unknown trace format 'csv'.*azure, lengths"):
        read_trace(make(tmp_path, "azure"), "csv")


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_trace(missing)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_trace(missing, "azure")


def test_a_relative_path_is_found_in_the_data_folder_or_the_error_says_where_it_looked(
    tmp_path, monkeypatch
):
    data = tmp_path / "data"
    (data / "traces").mkdir(parents=True)
    (data / "traces" / "az.csv").write_text(AZURE)
    monkeypatch.setenv("LLMSCHED_DATA", str(data))
    monkeypatch.chdir(tmp_path)
    assert len(read_trace("traces/az.csv")) == len(read_trace(data / "traces" / "az.csv"))
    with pytest.raises(FileNotFoundError) as err:
        read_trace("traces/nope.csv")
    message = str(err.value)
    assert str(tmp_path / "traces/nope.csv") in message
    assert str(data / "traces/nope.csv") in message and "$LLMSCHED_DATA" in message


# --- malformed rows ---------------------------------------------------------------------------

AZ = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"
LN = "num_prefill_tokens,num_decode_tokens\n5,5\n"
MC = '{"timestamp": 0, "input_length": 5, "output_length": 5, "hash_ids": [1]}\n'
SG = json.dumps(SHAREGPT_ROWS[0]) + "\n"
LS = '{"request_id": "a", "arrival": 0, "prompt_tokens": 5, "output_tokens": 5}\n'


def sg(**change) -> str:
    return json.dumps({**SHAREGPT_ROWS[1], **change}) + "\n"


SS = '{"session_id": "a", "timestamp": 0, "input_length": 5, "output_length": 5}\n'
MALFORMED = [
    ("azure", "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46,3\n", 1, "missing column(s) Generat"),
    ("azure", AZ + "2023-11-16 18:15:47.1,abc,44\n", 3, "ContextTokens is not a number: 'abc'"),
    ("azure", AZ + "2023-11-16 18:15:47.1,12,\n", 3, "GeneratedTokens is not a number"),
    ("azure", AZ + "2023-11-16 18:15:47.1,12.5,4\n", 3, "whole number"),
    ("azure", AZ + "16/11/2023 18:15,12,4\n", 3, "unparsable timestamp '16/11/2023 18:15'"),
    ("azure", AZ + "2023-02-30 18:15:47,12,4\n", 3, "unparsable timestamp"),
    ("azure", AZ + "2023-11-16 18:15:47,12\n", 3, "2 fields, but the header has 3"),
    ("azure", AZ + "\n2023-11-16 18:15:47,-3,4\n", 4, "prompt length must be >= 1 token, got -3"),
    ("azure", AZ + "2023-11-16 18:15:47,3,0\n", 3, "output length must be >= 1 token, got 0"),
    ("lengths", "num_prefill_tokens,x\n1,2\n", 1, "missing column(s) num_decode_tokens"),
    ("lengths", LN + "5,five\n", 3, "num_decode_tokens is not a number"),
    ("lengths", LN + "0,5\n", 3, "prompt length must be >= 1 token, got 0"),
    ("mooncake", MC + '{"timestamp": 1, "input_length": 5}\n', 2, "missing field 'output_length'"),
    (
        "mooncake",
        MC + '{"timestamp": "x", "input_length": 5, "output_length": 1}\n',
        2,
        "field 'timestamp' must be a number",
    ),
    (
        "mooncake",
        MC + '{"timestamp": 1, "input_length": 5, "output_length": 1, "hash_ids": [1, "a"]}\n',
        2,
        "'hash_ids' must be a list of integers",
    ),
    ("mooncake", MC + '{"timestamp": 1, "input_length": 5,\n', 2, "not valid JSON"),
    ("mooncake", MC + "[1, 2]\n", 2, "expected a JSON object, got list"),
    (
        "mooncake",
        MC + '{"timestamp": 1, "input_length": 5, "output_length": 2.5}\n',
        2,
        "'output_length' must be a whole number",
    ),
    (
        "mooncake",
        MC + '{"timestamp": 1, "input_length": 600, "output_length": 1, "hash_ids": [1]}\n',
        2,
        "hash_ids has 1 ids, but 600 input tokens make 2 chunks of 512",
    ),
    (
        "mooncake",
        MC + '{"timestamp": 1, "input_length": 5, "output_length": 1, "hash_ids": [1, 2]}\n',
        2,
        "hash_ids has 2 ids, but 5 input tokens make 1 chunks",
    ),
    (
        "mooncake_sessions",
        SS + '{"session_id": "a", "delay": -1, "input_length": 5, "output_length": 5}\n',
        2,
        "field 'delay' must be >= 0 ms, got -1",
    ),
    (
        "mooncake_sessions",
        SS + '{"session_id": "b", "delay": 10, "input_length": 5, "output_length": 5}\n',
        2,
        "session 'b' starts here without a 'timestamp' (ms): its first turn is missing",
    ),
    (
        "mooncake_sessions",
        SS + '{"session_id": "a", "timestamp": 9, "input_length": 5, "output_length": 5}\n',
        2,
        "session 'a' already started on line 1",
    ),
    (
        "mooncake_sessions",
        SS + '{"session_id": "a", "turn": 2, "delay": 1, "input_length": 5, "output_length": 5}\n',
        2,
        "turn 2 of session 'a' follows turn 0 (line 1): turn 1 missing",
    ),
    (
        "mooncake_sessions",
        SS + '{"session_id": "a", "turn": 0, "delay": 1, "input_length": 5, "output_length": 5}\n',
        2,
        "turns out of order or repeated",
    ),
    (
        "mooncake_sessions",
        '{"session_id": "a", "turn": 1, "timestamp": 0, "input_length": 5, "output_length": 5}\n',
        1,
        "session 'a' starts at turn 1: turns 0..0 are missing",
    ),
    (
        "mooncake_sessions",
        SS + '{"session_id": "a", "delay": 1, "input_length": 5, "output_length": 5, '
        '"hash_ids": [1, 2]}\n',
        2,
        "hash_ids has 2 ids, but 5 input tokens make 1 chunks",
    ),
    (
        "mooncake_sessions",
        SS + '{"session_id": "a", "delay": 1, "input_length": 5, "output_length": 0}\n',
        2,
        "output length must be >= 1 token, got 0",
    ),
    ("sharegpt", SG + sg(response_tokens_cl100k=0), 2, "output length must be >= 1 token, got 0"),
    ("sharegpt", SG + SG + sg(prompt_tokens_cl100k=None), 3, "'prompt_tokens_cl100k' must be a"),
    ("sharegpt", SG + json.dumps({"id": "q", "turn": 0}) + "\n", 2, "missing field"),
    (
        "llmsched",
        LS + '{"request_id": "b", "arrival": 0, "prompt_tokens": 5}\n',
        2,
        "missing field 'output_tokens'",
    ),
    ("llmsched", LS + LS, 2, "request_id 'a' repeats line 1"),
    (
        "llmsched",
        LS + '{"request_id": "b", "arrival": "soon", "prompt_tokens": 5, "output_tokens": 1}\n',
        2,
        "field 'arrival' must be a number",
    ),
    (
        "llmsched",
        LS + '{"request_id": "b", "arrival": -1, "prompt_tokens": 5, "output_tokens": 1}\n',
        2,
        "arrival time must be a finite number >= 0",
    ),
    (
        "llmsched",
        LS + '{"request_id": "b", "arrival": 1, "prompt_tokens": 5, '
        '"output_tokens": 3, "reasoning_tokens": 3}\n',
        2,
        "needs at least one answer token",
    ),
    (
        "llmsched",
        LS + '{"request_id": "b", "arival": 1, "prompt_tokens": 5, "output_tokens": 1}\n',
        2,
        "unknown field(s) arival",
    ),
    ("llmsched", '{"format": "llmsched", "version": 7}\n' + LS, 1, "version 7"),
    ("llmsched", '{"format": "llmsched", "timed": "no"}\n' + LS, 1, "'timed' must be true"),
    (
        "llmsched",
        LS + '{"request_id": "b", "arrival": 1, "prompt_tokens": 5, '
        '"output_tokens": 3, "ttft_slo": 0}\n',
        2,
        "field 'ttft_slo' must be > 0, got 0.0",
    ),
    (
        "llmsched",
        LS + '{"request_id": "b", "arrival": 1, "prompt_tokens": 5, '
        '"output_tokens": 3, "tool_time": -2}\n',
        2,
        "field 'tool_time' must be >= 0",
    ),
    (
        "llmsched",
        LS + '{"request_id": "b", "arrival": 1, "prompt_tokens": 5, '
        '"output_tokens": 3, "turn": 1.5}\n',
        2,
        "field 'turn' must be a whole number",
    ),
]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(("fmt", "text", "line", "what"), MALFORMED)
def test_malformed_row_names_file_and_line(tmp_path, fmt, text, line, what, gz):
    path = write(tmp_path / ("bad.trace" + (".gz" if gz else "")), text)
    with pytest.raises(TraceFormatError) as err:
        read_trace(path, fmt)
    message = str(err.value)
    assert message.startswith(f"{path}, line {line}: "), message
    assert what in message


def test_unreadable_bytes_name_the_file(tmp_path):
    junk = tmp_path / "junk.csv"
    junk.write_bytes(b"TIMESTAMP,ContextTokens,GeneratedTokens\n\xff\xfe\x00,1,2\n")
    with pytest.raises(TraceFormatError, match="junk.csv: cannot be read as UTF-8"):
        read_trace(junk, "azure")
    cut = make(tmp_path, "sharegpt", gz=True)
    cut.write_bytes(cut.read_bytes()[:-20])  # a truncated download
    with pytest.raises(TraceFormatError, match="pairs.jsonl.gz: cannot be read"):
        read_trace(cut, "sharegpt")
    nul = write(tmp_path / "nul.csv", AZ + "2023-11-16 18:15:47,\0,1\n")
    with pytest.raises(TraceFormatError, match="nul.csv, line 3"):
        read_trace(nul)


def test_csv_windows_line_endings_and_byte_order_mark(tmp_path):
    path = tmp_path / "w.csv"
    path.write_bytes("\ufeff".encode() + AZURE.replace("\n", "\r\n").encode())
    assert detect_format(path) == "azure"
    assert read_trace(path).columns["output_tokens"].tolist() == [44, 109, 18]
    path = tmp_path / "w.jsonl"
    path.write_bytes("\ufeff".encode() + jsonl(MOONCAKE_ROWS).replace("\n", "\r\n").encode())
    assert len(read_trace(path)) == 3


def test_invalid_row_suggests_skip_invalid(tmp_path):
    path = write(tmp_path / "p.jsonl", SG + sg(response_tokens_cl100k=0) + SG)
    with pytest.raises(TraceFormatError) as err:
        read_trace(path)
    message = str(err.value)
    assert "line 2" in message
    assert "skip_invalid=True" in message and "--skip-invalid" in message
    assert "not known" in message  # we stopped at the first one: no count is claimed


def test_a_run_of_the_first_rows_reads_only_those(tmp_path):
    """A run of a trace's first N rows reads N rows: a row past them is neither read nor
    checked (a bad tail does not stop a run of the head), while drawing rows at random, or
    counting the rows skipped, still reads the whole trace."""
    from llmsched.config import load_config
    from llmsched.experiment import load_workload

    trace = write(
        tmp_path / "t.csv", "num_prefill_tokens,num_decode_tokens\n10,5\n20,6\n30,0\n40,0\n"
    )
    run = {"trace": str(trace), "rate": 2.0, "num_requests": 2}
    assert load_workload(load_config(None, **run)).columns["prompt_tokens"].tolist() == [10, 20]
    with pytest.raises(TraceFormatError, match="line 4"):
        load_workload(load_config(None, **run, sample="random"))
    assert load_workload(load_config(None, **run, skip_invalid=True)).skipped == 2


def test_skip_invalid_counts_skipped_rows(tmp_path):
    rows = [
        sharegpt_row("a", 0, "x", 5, 10),
        sharegpt_row("a", 1, "", 0, 10),  # empty prompt
        sharegpt_row("a", 2, "y", 5, 0),  # empty response
        sharegpt_row("b", 0, "", 0, 0),
        sharegpt_row("b", 1, "z", 6, 7),
    ]
    path = write(tmp_path / "p.jsonl.gz", jsonl(rows))
    w = read_trace(path, skip_invalid=True)
    assert w.columns["request_id"].tolist() == ["a/0", "b/1"]
    assert w.skipped == 3


def test_skip_invalid_does_not_skip_malformed_rows(tmp_path):
    path = write(tmp_path / "t.csv", AZ + "2023-11-16 18:15:47,abc,4\n")
    with pytest.raises(TraceFormatError, match="line 3"):
        read_trace(path, skip_invalid=True)


def test_limit_counts_valid_rows(tmp_path):
    text = AZ + "".join(
        f"2023-11-16 18:15:{50 + i}.0,{i},{1 if i % 2 else 0}\n" for i in range(1, 8)
    )
    path = write(tmp_path / "t.csv", text)
    w = read_trace(path, limit=3, skip_invalid=True)
    assert w.columns["prompt_tokens"].tolist() == [374, 1, 3]
    assert w.skipped == 1  # the row with 2 prompt tokens and 0 output, seen before the limit
    assert len(read_trace(path, limit=0)) == 0
    assert len(read_trace(path, limit=1)) == 1  # rows after the limit are not read
    with pytest.raises(ValueError, match="limit"):
        read_trace(path, limit=-1)


# --- the real data ----------------------------------------------------------------------------

DATA = data_dir()
needs_data = pytest.mark.skipif(
    DATA is None, reason="shared data folder not found (set LLMSCHED_DATA to ../shared/data)"
)
AZURE_CONV = "traces/azure2023/AzureLLMInferenceTrace_conv.csv"
AZURE_CODE = "traces/azure2023/AzureLLMInferenceTrace_code.csv"
LENGTHS_REAL = "traces/sharegpt4-lengths/sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
SHAREGPT_REAL = "prompts/sharegpt/sharegpt_v3_prefix_pairs.jsonl.gz"
REAL = [
    (AZURE_CONV, "azure"),
    (AZURE_CODE, "azure"),
    (LENGTHS_REAL, "lengths"),
    (SHAREGPT_REAL, "sharegpt"),
]


@needs_data
@pytest.mark.parametrize(("relative", "fmt"), REAL)
def test_real_file_round_trip(tmp_path, relative, fmt):
    path = DATA / relative
    assert detect_format(path) == fmt
    w = read_trace(path, limit=300, skip_invalid=True)
    assert len(w) == 300
    back = read_trace(write_jsonl(w, tmp_path / "real.jsonl.gz"))
    assert_same(w, back)


@needs_data
def test_real_azure_conv():
    w = read_trace(DATA / AZURE_CONV)  # no invalid rows: reads without skip_invalid
    assert len(w) == 19_366 and w.skipped == 0
    assert w.timed
    span = w.arrivals[-1] - w.arrivals[0]
    assert 3400 < span < 3700  # about an hour (18:15:46 to 19:14:08)
    assert np.percentile(w.columns["prompt_tokens"], 50) == 1020
    assert np.percentile(w.columns["output_tokens"], 50) == 129


@needs_data
def test_real_azure_code_and_lengths():
    code = read_trace(DATA / AZURE_CODE)
    assert len(code) == 8_819 and code.timed
    lengths = read_trace(DATA / LENGTHS_REAL)
    assert len(lengths) == 30_731 and not lengths.timed
    assert np.median(lengths.columns["prompt_tokens"]) == 1730


@needs_data
def test_real_sharegpt():
    path = DATA / SHAREGPT_REAL
    with pytest.raises(TraceFormatError, match="line 111: prompt length must be >= 1"):
        read_trace(path)
    w = read_trace(path, skip_invalid=True)
    assert len(w) + w.skipped == 61_223
    assert w.skipped == 134  # 128 empty prompts, 7 empty responses, 1 both
    texts = w.columns["prompt_text"]
    assert all(isinstance(t, str) and t for t in texts)
    assert texts[0].startswith("Summarize the main ideas of Jeff Walker")
    assert len(set(w.columns["request_id"])) == len(w)


def test_prefix_runs_round_trip_through_llmsched_jsonl(tmp_path):
    from llmsched.workload.request import Request, Workload

    a = Request("a", 0.0, 100, 10, prefix=((("sys", 0), 32), ("doc", 16)))
    b = Request("b", 1.0, 150, 10, prefix=a.continuation)  # a's prompt, a's output, 40 new
    w = Workload.from_requests([a, b])
    back = read_trace(write_jsonl(w, tmp_path / "p.jsonl"))
    assert [r.prefix for r in back] == [a.prefix, a.continuation]
    assert back[1].runs == (*a.continuation, (("in", "b"), 40))


@pytest.mark.parametrize(
    "prefix, message",
    [
        ('[["sys", 0]]', "each run is [key, tokens >= 1]"),
        ("[[true, 16]]", "a prefix key is"),
        ('"sys"', "must be a list"),
        ('[["sys", 200]]', "more than the prompt's 100"),
    ],
)
def test_bad_prefix_runs_name_the_line(tmp_path, prefix, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"request_id": "a", "arrival": 0, "prompt_tokens": 10, "output_tokens": 1}\n'
        f'{{"request_id": "b", "arrival": 1, "prompt_tokens": 100, "output_tokens": 1, '
        f'"prefix": {prefix}}}\n'
    )
    with pytest.raises(ValueError, match=rf"bad.jsonl, line 2: .*{re.escape(message)}"):
        read_trace(path)
