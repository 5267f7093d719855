"""Next-token choice for a batch of sequences, each with its own sampling parameters."""

from __future__ import annotations

import torch

from tritonvlm.engine.sequence import Sequence


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A per-request random stream: seeded requests reproduce whatever else shares the batch."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """Repetition (HF semantics, over prompt + output), presence and frequency (OpenAI, over output)."""
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.prompt_ids) | set(seq.output_ids)), device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
        ids, counts = torch.tensor(seq.output_ids, device=logits.device).unique(return_counts=True)
        logits[ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty
    return logits


def sample_row(logits: torch.Tensor, seq: Sequence) -> int:
    """Pick one token from a row of logits (float32, [vocab])."""
    p = seq.params
    if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
        logits = apply_penalties(logits.clone(), seq)
    if p.greedy:
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
        drop = cumulative - sorted_probs > p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=seq.generator))


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """One token per row. Greedy rows without penalties share a single argmax."""
    logits = logits.float()
    plain_greedy = [
        s.params.greedy
        and s.params.repetition_penalty == 1.0
        and not s.params.presence_penalty
        and not s.params.frequency_penalty
        for s in seqs
    ]
    argmax = torch.argmax(logits, dim=-1).tolist() if any(plain_greedy) else None
    return [argmax[i] if plain_greedy[i] else sample_row(logits[i], s) for i, s in enumerate(seqs)]
