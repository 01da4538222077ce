"""The response-length rankers: pairs, losses, metrics, split, a real train/save/load round trip."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest

from llmsched.data import data_dir
from llmsched.metrics.ranking import kendall_tau
from llmsched.predict import PromptLengthPredictor, load_predictor
from llmsched.predict.data import LengthData, load_alpaca_eval, load_jsonl, split, split_of
from llmsched.predict.metrics import pairwise_accuracy
from llmsched.predict.pairs import make_pairs, relative_difference

torch = pytest.importorskip("torch", reason="the predictor needs the 'predict' extra")

needs_data = pytest.mark.skipif(
    data_dir() is None, reason="shared data folder (../shared/data or LLMSCHED_DATA) not found"
)


# --- pairs -------------------------------------------------------------------------------------


def test_pairs_respect_delta_and_label_direction():
    lengths = [100, 110, 50, 300, 0, 0, 119, 1000]
    pairs = make_pairs(lengths, k=10, delta=0.2, seed=1)
    assert len(pairs) > 0
    for i, j, label in pairs:
        assert i != j
        assert relative_difference(lengths[i], lengths[j]) >= 0.2
        assert label == (1 if lengths[i] > lengths[j] else 0)
    # 100 vs 110 (9 %) and 0 vs 0 never pair; 100 vs 50 (50 %) may.
    kept = {(int(i), int(j)) for i, j, _ in pairs}
    assert (0, 1) not in kept and (1, 0) not in kept and (4, 5) not in kept


def test_relative_difference_matches_released_rule():
    assert relative_difference(100, 80) == pytest.approx(0.2)
    assert relative_difference(80, 100) == pytest.approx(0.2)
    assert relative_difference(0, 0) == 0.0
    assert relative_difference(0, 5) == 1.0


def test_pairs_cap_per_prompt_and_attempts():
    lengths = list(range(1, 201))  # plenty of partners differ by >= 20 %
    pairs = make_pairs(lengths, k=3, delta=0.2, seed=0)
    counts = np.bincount(pairs[:, 0], minlength=len(lengths))
    assert counts.max() == 3
    assert (counts == 3).mean() > 0.9
    # All equal lengths: nothing passes the filter, and the 10*K attempt cap ends the loop.
    assert len(make_pairs([7] * 50, k=10, delta=0.2)) == 0


def test_pairs_are_deterministic_per_seed():
    lengths = np.random.default_rng(3).integers(1, 1000, size=300)
    a, b = make_pairs(lengths, seed=5), make_pairs(lengths, seed=5)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, make_pairs(lengths, seed=6))
    with pytest.raises(ValueError):
        make_pairs(lengths, k=0)


# --- losses and metrics ------------------------------------------------------------------------


def test_margin_ranking_loss_values():
    from llmsched.predict.losses import margin_ranking_loss

    s_a = torch.tensor([3.0, 0.0, 0.5])
    s_b = torch.tensor([1.0, 0.0, 1.0])
    label = torch.tensor([1, 1, 0])
    # max(0, -(3-1)+1)=0; max(0, -(0)+1)=1; y=-1: max(0, (0.5-1)+1)=0.5
    loss = margin_ranking_loss(s_a, s_b, label, margin=1.0)
    assert float(loss) == pytest.approx((0 + 1 + 0.5) / 3)


def test_listmle_loss_values():
    from llmsched.predict.losses import listmle_loss

    # Two items, the first is longer: loss = log(1 + exp(s2 - s1)).
    scores = torch.tensor([[2.0, 0.5]])
    lengths = torch.tensor([[300.0, 100.0]])
    assert float(listmle_loss(scores, lengths)) == pytest.approx(math.log1p(math.exp(-1.5)))
    # Order given by lengths, not by position: swapping both changes nothing.
    swapped = listmle_loss(scores.flip(-1), lengths.flip(-1))
    assert float(swapped) == pytest.approx(math.log1p(math.exp(-1.5)))
    # Three items, scores in the true order: sum of the two suffix terms.
    s = torch.tensor([[3.0, 2.0, 1.0]])
    expected = (math.log(math.exp(3) + math.exp(2) + math.exp(1)) - 3) + (
        math.log(math.exp(2) + math.exp(1)) - 2
    )
    assert float(listmle_loss(s, torch.tensor([[30.0, 20.0, 10.0]]))) == pytest.approx(expected)
    # The reversed scores are less likely, hence a larger loss.
    assert float(listmle_loss(s.flip(-1), torch.tensor([[30.0, 20.0, 10.0]]))) > expected


def test_pairwise_accuracy():
    pairs = np.array([[0, 1, 0], [3, 2, 1], [4, 3, 1]])
    assert pairwise_accuracy([1, 2, 3, 5, 4], pairs) == pytest.approx(2 / 3)


# --- data and split ----------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_by_group():
    groups = [f"conv{i // 3}" for i in range(3000)]  # three turns per conversation
    data = LengthData([f"p{i}" for i in range(3000)], np.arange(3000) + 1.0, groups)
    a, b = split(data), split(data)
    for s in ("train", "val", "test"):
        assert a[s].prompts == b[s].prompts
    seen = [set(a[s].groups) for s in ("train", "val", "test")]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert sum(len(a[s]) for s in a) == 3000
    assert 0.7 < len(a["train"]) / 3000 < 0.9
    assert split_of("conv1") == split_of("conv1")


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_jsonl(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no usable"):
        load_jsonl(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(ValueError, match="output_tokens"):
        load_jsonl(bad)
    with pytest.raises(FileNotFoundError, match="not a saved predictor"):
        load_predictor(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_alpaca_eval("gpt4", folder=tmp_path)


@needs_data
def test_unknown_generator_is_an_error():
    with pytest.raises(ValueError, match="unknown AlpacaEval generator"):
        load_alpaca_eval("no-such-model")
    data = load_alpaca_eval("gpt4_1106_preview")
    assert 790 <= len(data) <= 805 and (data.lengths > 0).all()


@needs_data
def test_sharegpt_split_keeps_conversations_together():
    from llmsched.predict.data import load_sharegpt

    data = load_sharegpt()
    parts = split(data)
    assert len(data) > 60_000 and all(p.strip() for p in data.prompts[:1000])
    train_groups, test_groups = set(parts["train"].groups), set(parts["test"].groups)
    assert not (train_groups & test_groups)
    assert 0.08 < len(parts["test"]) / len(data) < 0.12


# --- an end-to-end train on real MiniLM --------------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    from llmsched.predict.encoder import Encoder

    return Encoder()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One embedding cache for the module: the synthetic prompts are embedded once."""
    return tmp_path_factory.mktemp("cache")


STYLES = [  # the response length is set by the request's wording
    ("Answer with one word: is this about", 3),
    ("Give a short one-sentence answer about", 25),
    ("Write a paragraph explaining", 120),
    ("Write a detailed multi-section essay with examples about", 600),
    ("Write a very long, exhaustive book chapter covering every aspect of", 2000),
]
TOPICS = [
    "cats", "the ocean", "tax law", "jazz", "volcanoes", "chess", "bread", "rockets", "python",
    "gardens", "the moon", "trains", "coffee", "bees", "glaciers", "poetry", "bridges", "salt",
    "maps", "violins", "deserts", "clocks", "wolves", "paper",
]  # fmt: skip


def synthetic_jsonl(path, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as fh:
        for topic in TOPICS:
            for style, length in STYLES:
                n = int(length * rng.uniform(0.9, 1.1)) + 1
                fh.write(json.dumps({"prompt": f"{style} {topic}.", "output_tokens": n}) + "\n")
    return path


def test_frozen_pairwise_learns_and_round_trips(tmp_path, monkeypatch, encoder, cache):
    from llmsched.predict.train import TrainConfig, train_predictor

    monkeypatch.setenv("LLMSCHED_CACHE", str(cache))
    data = load_jsonl(synthetic_jsonl(tmp_path / "synth.jsonl"))
    rng = np.random.default_rng(1)
    order = rng.permutation(len(data))
    train, val = data.subset(order[:90]), data.subset(order[90:])
    config = TrainConfig(method="pairwise", mode="frozen", epochs=3, batch_size=32, progress=False)
    predictor = train_predictor(train, val, config, encoder=encoder)
    scores = predictor.score(val.prompts)
    assert kendall_tau(scores, val.lengths) > 0.7
    assert predictor.meta["val_pairwise_accuracy"] > 0.85
    assert list(cache.glob("embeddings/*.npy"))  # embeddings were cached
    loaded = load_predictor(predictor.save(tmp_path / "model"))
    again = loaded.score(val.prompts)
    assert again.dtype == np.float64
    np.testing.assert_allclose(again, scores, rtol=1e-5, atol=1e-6)
    # One prompt alone scores as it does in a batch (padding must not change the score).
    assert loaded.score(val.prompts[:1])[0] == pytest.approx(scores[0], abs=1e-4)


@pytest.mark.parametrize("method", ["listmle", "pointwise", "tfidf"])
def test_baselines_train_and_round_trip(tmp_path, monkeypatch, method, encoder, cache):
    from llmsched.predict.train import TrainConfig, train_predictor

    monkeypatch.setenv("LLMSCHED_CACHE", str(cache))
    data = load_jsonl(synthetic_jsonl(tmp_path / "synth.jsonl"))
    order = np.random.default_rng(2).permutation(len(data))
    train, val = data.subset(order[:90]), data.subset(order[90:])
    config = TrainConfig(method=method, mode="frozen", batch_size=32, list_size=8, progress=False)
    predictor = train_predictor(train, val, config, encoder=encoder)
    scores = predictor.score(val.prompts)
    assert kendall_tau(scores, val.lengths) > 0.5
    loaded = load_predictor(predictor.save(tmp_path / method))
    np.testing.assert_allclose(loaded.score(val.prompts), scores, rtol=1e-5, atol=1e-6)


def test_full_mode_takes_a_few_steps(tmp_path):
    from llmsched.predict.train import TrainConfig, train_predictor

    data = load_jsonl(synthetic_jsonl(tmp_path / "synth.jsonl"))
    train, val = data.subset(range(0, 20)), data.subset(range(100, 110))
    config = TrainConfig(mode="full", batch_size=4, epochs=1, max_steps=2, progress=False)
    predictor = train_predictor(train, val, config)
    assert predictor.meta["history"][0]["steps"] == 2
    assert predictor.meta["train_config"]["lr"] == 2e-5
    loaded = load_predictor(predictor.save(tmp_path / "full"))
    assert (tmp_path / "full" / "encoder").is_dir()
    np.testing.assert_allclose(
        loaded.score(val.prompts), predictor.score(val.prompts), rtol=1e-4, atol=1e-5
    )


def test_prompt_length_predictor_orders_by_tokens(tmp_path):
    p = PromptLengthPredictor()
    scores = p.score(["hi", "a somewhat longer prompt here", "one two three"])
    assert scores.dtype == np.float64
    assert scores[1] > scores[2] > scores[0]
    loaded = load_predictor(p.save(tmp_path / "plen"))
    np.testing.assert_array_equal(loaded.score(["hi", "one two three"]), scores[[0, 2]])
    assert PromptLengthPredictor("words").score(["a b c"])[0] == 3.0


def test_cli_train_and_eval_ranker(tmp_path, monkeypatch, capsys):
    from llmsched.cli import main

    monkeypatch.setenv("LLMSCHED_CACHE", str(tmp_path / "cache"))
    rows = tmp_path / "rows.jsonl.gz"
    with gzip.open(rows, "wt") as fh:
        fh.write(open(synthetic_jsonl(tmp_path / "s.jsonl")).read())
    out = tmp_path / "m"
    assert main(["train-ranker", "--data", str(rows), "--method", "tfidf", "--out", str(out)]) == 0
    assert main(["eval-ranker", "--model", str(out), "--data", str(rows), "--split", "all"]) == 0
    printed = capsys.readouterr().out
    assert "kendall_tau" in printed and "latency_ms_batch1" in printed
    assert main(["eval-ranker", "--model", str(tmp_path / "nope"), "--data", str(rows)]) == 2


@needs_data
def test_cross_model_table(tmp_path, capsys):
    from llmsched.cli import main
    from llmsched.predict.data import alpaca_table
    from llmsched.predict.evaluate import cross_model

    gens = ["gpt4_1106_preview", "Meta-Llama-3-8B-Instruct", "claude-2.1"]
    table = alpaca_table()
    assert table.lengths.shape == (805, len(table.generators)) and len(table.generators) > 200
    reference = load_alpaca_eval(gens[0])
    truth = dict(zip(reference.prompts, reference.lengths))
    rows = cross_model(None, gens, score_fn=lambda ts: np.array([truth[t] for t in ts]))
    assert [r["generator"] for r in rows] == gens
    assert rows[0]["kendall_tau"] == pytest.approx(1.0)  # a generator ranks itself perfectly
    assert 0.2 < rows[1]["kendall_tau"] < 1.0 and 200 < rows[1]["prompts"] < 300
    with pytest.raises(ValueError, match="unknown AlpacaEval generator"):
        cross_model(PromptLengthPredictor(), ["no-such-model"])
    model = PromptLengthPredictor().save(tmp_path / "plen")
    argv = ["eval-ranker", "--model", str(model), "--data", "alpaca_eval", "--cross-model"]
    assert main([*argv, "--generators", ",".join(gens)]) == 0
    assert "Meta-Llama-3-8B-Instruct" in capsys.readouterr().out


def test_one_trace_trains_the_ranker_and_is_simulated_with_it(tmp_path, capsys):
    """A user's llmsched JSONL with prompt text is both the ranker's training data and the
    trace a comparison replays with that ranker's scores; its sessions stay in one split."""
    from llmsched.cli import main
    from llmsched.predict.data import load_dataset, split
    from llmsched.workload.readers import write_jsonl
    from llmsched.workload.request import Workload

    rows = load_jsonl(synthetic_jsonl(tmp_path / "rows.jsonl"))
    n = len(rows)
    workload = Workload(
        {
            "request_id": np.array([f"r{i}" for i in range(n)], dtype=object),
            "arrival": np.zeros(n),
            "prompt_tokens": np.array([len(p.split()) for p in rows.prompts]),
            "output_tokens": rows.lengths.astype(int),
            "prompt_text": np.array(rows.prompts, dtype=object),
            "session_id": np.array([f"user{i % 40}_{i}" for i in range(n)], dtype=object),
        },
        timed=False,
    )
    trace = write_jsonl(workload, tmp_path / "trace.jsonl")
    data = load_dataset(str(trace))
    assert data.prompts == rows.prompts and list(data.lengths) == list(rows.lengths)
    parts = split(data)
    seen = {g: name for name, part in parts.items() for g in part.groups}
    assert len(seen) == 40 and all(g.startswith("user") for g in seen)  # `_N` cut, as ShareGPT's
    model = tmp_path / "ranker"
    assert (
        main(["train-ranker", "--data", str(trace), "--method", "tfidf", "--out", str(model)]) == 0
    )
    argv = ["compare", "--trace", str(trace), "--rate", "50", "--policies", "fcfs,pars"]
    assert main([*argv, "--scores", f"model:{model}", "--out", str(tmp_path / "run")]) == 0
    assert "pars" in capsys.readouterr().out
    no_text = write_jsonl(workload.with_columns(prompt_text=None), tmp_path / "bare.jsonl")
    with pytest.raises(ValueError, match="without prompt text"):
        load_dataset(str(no_text))
