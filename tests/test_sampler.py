"""The sampler keeps rows apart, and SamplingParams keeps numbers where sampling stays finite."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tritonvlm.engine import sampler
from tritonvlm.engine.sampling_params import MAX_SEED, MIN_SEED, SamplingParams, wrap_seed
from tritonvlm.engine.sequence import Sequence
from tritonvlm.wire import InvalidRequestError

VOCAB = 50


def seq(request_id: str, outputs: int = 0, **params: Any) -> Sequence:
    p = SamplingParams(**params)
    s = Sequence(request_id, [1, 2, 3], p, on_output=lambda out: None, detokenizer=None)  # type: ignore[arg-type]
    s.output_ids = list(range(outputs))
    s.generator = None if p.greedy else sampler.make_generator(p.seed, torch.device("cpu"))
    return s


def batch(rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(0))


MIXED = [
    {"temperature": 0.0},
    {"temperature": 0.7, "seed": 3},
    {"temperature": 0.0, "repetition_penalty": 1.3},
    {"temperature": 1.0, "top_p": 0.5, "top_k": 5, "seed": 9},
]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("row", range(4))
def test_a_non_finite_row_fails_alone(bad: float, row: int) -> None:
    logits = batch()
    clean = sampler.sample(logits.clone(), [seq(f"r{i}", **MIXED[i]) for i in range(4)])
    poisoned = logits.clone()
    poisoned[row, 7] = bad
    failures: dict[int, str] = {}
    tokens = sampler.sample(poisoned, [seq(f"r{i}", **MIXED[i]) for i in range(4)], failures)
    assert list(failures) == [row] and "NaN or inf" in failures[row]
    assert [t for i, t in enumerate(tokens) if i != row] == [t for i, t in enumerate(clean) if i != row]
    assert 0 <= tokens[row] < VOCAB


def test_sample_never_raises_for_a_bad_row_without_a_failures_dict() -> None:
    logits = batch()
    logits[2] = float("nan")
    tokens = sampler.sample(logits, [seq(f"r{i}", **MIXED[i]) for i in range(4)])
    assert len(tokens) == 4


def test_the_fault_hook_poisons_matching_requests_after_two_tokens() -> None:
    sampler.set_fault_pattern("poison-me")
    try:
        rows = [seq("a"), seq("x-poison-me-1", outputs=1), seq("x-poison-me-2", outputs=2), seq("b")]
        failures: dict[int, str] = {}
        sampler.sample(batch(), rows, failures)
        assert list(failures) == [2]
    finally:
        sampler.set_fault_pattern(None)
    failures = {}
    sampler.sample(batch(), rows, failures)
    assert failures == {}


# --------------------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 1e-300}, "temperature"),
        ({"temperature": 0.009}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"repetition_penalty": 1e-45}, "repetition_penalty"),
        ({"repetition_penalty": 101.0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_tokens": 10.0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": "0.5"}, "temperature"),
        ({"logprobs": "false"}, "logprobs"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"stop": [1]}, "stop"),
        ({"max_tokens": 2**31}, "max_tokens"),
    ],
)
def test_from_dict_refuses_unsafe_or_mistyped_values(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams.from_dict(fields)
    assert info.value.param == param


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 0},
        {"temperature": 0.01},
        {"temperature": 2},
        {"seed": MIN_SEED},
        {"seed": MAX_SEED},
        {"repetition_penalty": 0.01},
        {"repetition_penalty": 100},
        {"stop": "x"},
        {"request_id": "kept out"},
    ],
)
def test_from_dict_accepts_the_edges(fields: dict[str, Any]) -> None:
    params = SamplingParams.from_dict(fields)
    assert isinstance(params.temperature, float) and isinstance(params.repetition_penalty, float)


def test_edge_seeds_seed_a_generator() -> None:
    for value in (MIN_SEED, MAX_SEED, wrap_seed(MAX_SEED + 3)):
        sampler.make_generator(value, torch.device("cpu"))
    assert wrap_seed(MAX_SEED + 1) == 0 and wrap_seed(5) == 5


SHARED = [
    {"temperature": 0.7},
    {"temperature": 1.3, "top_k": 5},
    {"temperature": 1.0, "top_p": 0.5},
    {"temperature": 0.9, "top_k": 10, "top_p": 0.8},
]


@pytest.mark.parametrize("params", SHARED)
def test_shared_draws_follow_each_rows_own_distribution(params: dict[str, Any]) -> None:
    """Unseeded rows are drawn together in one batched pass: its frequencies match the distribution a
    row alone is drawn from (:func:`sampler.row_probabilities`), and tokens that distribution excludes
    (top-k, top-p) never come out."""
    row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(5)) * 2
    sampler.shared_generator(torch.device("cpu")).manual_seed(5)  # (else seeded from entropy: flaky)
    p = SamplingParams(**params)
    expected = sampler.row_probabilities(row.clone(), p)
    expected = expected / expected.sum()  # what torch.multinomial draws from
    draws = 20_000
    drawn = sampler.sample_shared(row.expand(draws, VOCAB).clone(), [p] * draws)
    counts = torch.bincount(torch.tensor(list(drawn.values())), minlength=VOCAB).float() / draws
    assert len(drawn) == draws
    assert counts[expected == 0].sum() == 0
    assert (counts - expected).abs().max() < 0.015, (counts - expected).abs().max()


def test_unseeded_rows_share_a_draw_seeded_rows_keep_their_own_and_a_bad_row_fails_alone() -> None:
    logits = batch(6)
    rows = [
        seq("a", temperature=0.8),
        seq("b", temperature=0.8, top_k=3),
        seq("c", temperature=0.7, seed=3),
        seq("d", temperature=1.0, top_p=0.5, frequency_penalty=0.5, outputs=2),
        seq("e", temperature=0.9),
        seq("f", temperature=0.9),
    ]
    assert [sampler.shares_a_draw(s.params) for s in rows] == [True, True, False, False, True, True]
    seeded_alone = sampler.sample(logits[2:3].clone(), [seq("c", temperature=0.7, seed=3)])
    logits[4, 1] = float("nan")
    failures: dict[int, str] = {}
    tokens = sampler.sample(logits.clone(), rows, failures)
    assert list(failures) == [4]
    assert tokens[2] == seeded_alone[0]  # the shared draw did not touch the seeded row's stream
    assert tokens[1] in torch.topk(logits[1], 3).indices.tolist()


def test_prompt_ids_past_the_logits_are_not_penalised() -> None:
    """Llama 3.2 Vision's ``<|image|>`` id lies past its LM head's width: a repetition penalty over a
    prompt holding it penalises the other prompt tokens and does not fail the request."""
    s = seq("mllama", temperature=0.0, repetition_penalty=2.0)
    s.prompt_ids = [1, 2, VOCAB + 3]
    logits = batch(1)[0].abs() + 1.0  # (positive: a repetition penalty divides them)
    penalised = sampler.apply_penalties(logits.clone(), s)
    assert torch.equal(penalised[[1, 2]], logits[[1, 2]] / 2.0)
    assert torch.equal(penalised[3:], logits[3:]) and torch.equal(penalised[:1], logits[:1])
    failures: dict[int, str] = {}
    assert sampler.sample(logits[None], [s], failures) == [int((penalised).argmax())] and failures == {}
