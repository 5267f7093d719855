"""Grammar-constrained decoding inside the batched engine (llguidance).

:class:`GuidedDecoding` (one per engine) compiles a constraint (:mod:`tritonvlm.engine.grammar`) with
the model's own tokenizer into a matcher, caching one pristine matcher per constraint so a repeated
schema costs a copy, not a compile. Each constrained sequence holds a :class:`Guide` (its matcher
state). Every step, :meth:`GuidedDecoding.apply_masks` sets the logits of the tokens the grammar
forbids to ``-inf`` in the constrained rows only (free rows are not touched, so they stay token-exact),
and :meth:`Guide.advance` feeds the chosen token to the matcher. When the grammar is complete the
mask allows only the stop tokens, so the sequence ends; one whose grammar cannot complete within
``max_tokens`` ends with ``length``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from typing import Any

import llguidance
import llguidance.hf
import torch

from tritonvlm.engine.grammar import PARAM, check_grammar, grammar_for
from tritonvlm.modeling.device import device_tensor
from tritonvlm.wire import InvalidRequestError

log = logging.getLogger("tritonvlm.engine.guided")
CACHE_SIZE = 256


class Guide:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, owner: GuidedDecoding) -> None:
        self.matcher = matcher
        self.owner = owner

    def advance(self, token: int) -> bool:
        """Feed the chosen token; True when the sequence must end (its grammar is complete)."""
        if not self.matcher.consume_token(token):
            log.warning("guided sequence left its grammar: %s", self.matcher.get_error())
            return True
        return self.matcher.is_stopped()


class GuidedDecoding:
    """Compiles constraints for one tokenizer and masks the constrained rows of a batch's logits."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_ids: Collection[int], cache_size: int = CACHE_SIZE
    ) -> None:
        self.vocab_size = vocab_size
        self.stop_ids = sorted(stop_ids)
        # The tokenizer may know ids past the logits' width (tokens the model reads but never writes,
        # e.g. Llama 3.2 Vision's <|image|>): the matcher counts them, the masks cut them off.
        n_vocab = max(vocab_size, len(tokenizer))
        self.ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=self.stop_ids)
        self.special_tokens = tuple(tokenizer.get_added_vocab())
        self.executor = llguidance.LLExecutor()
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # start() runs on request threads, the cache is shared
        words = (n_vocab + 31) // 32
        self._stop_mask = torch.zeros(words, dtype=torch.int32)
        for token in self.stop_ids:
            # int32 two's complement: bit 31 is the sign bit
            bit = 1 << (token % 32)
            self._stop_mask[token // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit
        self._bits: dict[torch.device, torch.Tensor] = {}

    def start(self, spec: Any) -> Guide:
        """A fresh matcher for a constraint; InvalidRequestError if it does not compile."""
        key = json.dumps(spec, sort_keys=True)
        with self._lock:
            pristine = self._cache.get(key)
            if pristine is not None:
                self._cache.move_to_end(key)
        if pristine is None:
            pristine = self._compile(spec)
            with self._lock:
                self._cache[key] = pristine
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return Guide(pristine.deep_copy(), self)

    def _compile(self, spec: Any) -> llguidance.LLMatcher:
        try:
            grammar = grammar_for(spec, self.special_tokens)
        except (ValueError, TypeError) as exc:
            if isinstance(exc, InvalidRequestError):
                raise
            raise InvalidRequestError(f"the output constraint is not valid: {exc}", PARAM) from None
        check_grammar(grammar)
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"the output constraint cannot be used: {matcher.get_error()}", PARAM)
        return matcher

    def apply_masks(self, logits: torch.Tensor, guides: Sequence[Guide | None]) -> torch.Tensor:
        """``logits`` [batch, vocab] with the forbidden tokens of each constrained row at ``-inf``.

        Returns ``logits`` itself when no row is constrained, else a masked copy (the caller's tensor
        is left as it was, e.g. for log probabilities).
        """
        rows = [i for i, g in enumerate(guides) if g is not None]
        if not rows:
            return logits
        # (pinned on CUDA: its copy to the device then does not wait for the device)
        pinned = logits.device.type == "cuda"
        bitmask = torch.empty((len(rows), self._stop_mask.shape[0]), dtype=torch.int32, pin_memory=pinned)
        # (not llguidance.torch: importing it runs torch.compile, which pulls in inductor)
        self.executor.unsafe_compute_mask_ptr(
            [(guides[r].matcher, k) for k, r in enumerate(rows)],
            bitmask.data_ptr(),
            bitmask.shape[1] * 4,
            bitmask.shape[0],
        )
        allows_some = bitmask.any(dim=1).tolist()  # (one check for all rows: this is per step)
        for k, r in enumerate(rows):
            if guides[r].matcher.is_error() or not allows_some[k]:
                bitmask[k] = self._stop_mask  # nothing allowed: end the sequence rather than fail
        masked = logits.clone()
        index = device_tensor(rows, torch.long, logits.device)
        sub = masked.index_select(0, index)
        allowed = self._unpack(bitmask.to(logits.device, non_blocking=True), sub.shape[-1])
        masked.index_copy_(0, index, sub.masked_fill_(~allowed, float("-inf")))
        return masked

    def _unpack(self, bitmask: torch.Tensor, width: int) -> torch.Tensor:
        """[rows, words] int32 bits → [rows, width] bool."""
        bits = self._bits.get(bitmask.device)
        if bits is None:
            bits = device_tensor([1 << i for i in range(31)] + [-(1 << 31)], torch.int32, bitmask.device)
            self._bits[bitmask.device] = bits
        allowed = (bitmask.unsqueeze(-1) & bits) != 0
        allowed = allowed.reshape(bitmask.shape[0], -1)
        if allowed.shape[1] >= width:
            return allowed[:, :width]
        # logits wider than the matcher's vocabulary: the extra ids are never allowed
        pad = torch.zeros(
            (bitmask.shape[0], width - allowed.shape[1]), dtype=torch.bool, device=allowed.device
        )
        return torch.cat([allowed, pad], dim=1)


def mask_logits(logits: torch.Tensor, guides: Sequence[Guide | None]) -> torch.Tensor:
    """The sampler's hook: ``logits`` as is when no row is constrained, else a copy with each
    constrained row masked by its grammar (see :meth:`GuidedDecoding.apply_masks`)."""
    for guide in guides:
        if guide is not None:
            return guide.owner.apply_masks(logits, guides)
    return logits
