"""The in-flight batching loop: new requests join the running batch at the next step, finished and
cancelled ones leave at once. Runs in a background thread; results go out through callbacks."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from tritonvlm.engine.detokenizer import IncrementalDetokenizer
from tritonvlm.engine.device_sampling import awaits_its_grammar, sample_on_device
from tritonvlm.engine.engine_config import (
    EngineConfig,
    async_output_wanted,
    async_scheduling_wanted,
    kv_layout,
)
from tritonvlm.engine.engine_stats import EngineStats
from tritonvlm.engine.guided import GuidedDecoding
from tritonvlm.engine.kv_admission import KVAdmission
from tritonvlm.engine.logprobs import LogprobsRow, TokenTexts
from tritonvlm.engine.model_runner import ModelRunner
from tritonvlm.engine.outputs import OutputPath
from tritonvlm.engine.overlap import InflightPart, InflightStep, PendingOutput
from tritonvlm.engine.prefix_cache import BatchSharing, PrefixCache, RingBranches, image_marks, ring_start
from tritonvlm.engine.prefix_cache import mm_digest as tensors_digest
from tritonvlm.engine.sampler import make_generator, sample
from tritonvlm.engine.sampling_params import SamplingParams
from tritonvlm.engine.scheduler import Scheduler
from tritonvlm.engine.sequence import OutputCallback, Sequence
from tritonvlm.families import Family, family_for_config
from tritonvlm.modeling.device import device_tensor
from tritonvlm.wire import InvalidRequestError

log = logging.getLogger("tritonvlm.engine")


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids: the generation config's (int or list) and the tokenizer's."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


class LLMEngine:
    """Continuous batching over the language model of a vision-language model of any family.

    A decode step's tokens are recorded in their sequences at once (what the next step needs: the
    token, the grammar state, the end of a sequence by token or length), but with async output their
    text is made and sent while the next step runs on the device: the host's per-row work then costs no
    step time. A stop string is only seen in the text, so a sequence it ends has already been given
    the next step; that step's token for it is dropped. With async scheduling the next step is launched
    before the last one's tokens are read back (it takes them on the device), and they are recorded
    while it runs: between two steps the host only prepares the next one's inputs. A sequence those
    tokens end (by end of sequence, length or text) has been given the next step too; its token there
    is dropped the same way. A batch with a constrained row (a grammar, whose mask needs the last
    token) records them after the next step's forward is launched and before its sampling.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        config: EngineConfig | None = None,
        family: Family | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.family = family or family_for_config(model.config)
        slots, blocks = kv_layout(model, self.family, self.config)
        self.runner = ModelRunner(
            model,
            self.family,
            slots,
            self.config.max_model_len,
            max_batch=slots,
            cuda_graphs=self.config.cuda_graphs,
            num_blocks=blocks,
            decode_attention=self.config.decode_attention,
            fused_ops=self.config.fused_ops,
        )
        cache = self.runner.cache
        self.async_scheduling = async_scheduling_wanted(self.config, self.runner.device)
        self.async_output = self.async_scheduling or async_output_wanted(
            self.config.async_output, self.runner.device
        )
        log.info(
            "%s: KV cache %d blocks of %d tokens (%d tokens, up to %d sequences), %.1f MiB; "
            "decode attention: %s; fused RMSNorm layers: %d, rotary functions: %d; async output: %s, "
            "async scheduling: %s",
            self.family.name,
            blocks,
            cache.block_size,
            blocks * cache.block_size,
            slots,
            cache.nbytes / 2**20,
            self.runner.decode_attention,
            self.runner.fused_norms,
            self.runner.fused_rotary,
            self.async_output,
            self.async_scheduling,
        )
        # Chunked prefill needs a prefill that starts after keys already in the slot.
        self._chunk = self.config.prefill_chunk_tokens if self.family.supports_chunked_prefill else 0
        entries = self.config.prefix_cache_slots if self.family.supports_prefix_cache else 0
        self.prefix_cache = PrefixCache(entries, cache.allocator, cache.block_size)
        self.kv = KVAdmission(cache, self.prefix_cache)
        self.scheduler = Scheduler(
            slots,
            self.config.max_prefill_tokens,
            cache.move,
            release=self.kv.release,
            reserve=self.kv.reserve,
            defer=BatchSharing(self.prefix_cache),
            # (a prefill that stops mid-prompt needs one that starts after keys in the slot)
            alone=RingBranches(self.prefix_cache, cache.has_sliding and self.family.supports_chunked_prefill),
        )
        image_token = self.family.image_token_id
        self._placeholders = frozenset() if image_token is None else frozenset([image_token])
        self.stop_ids = stop_token_ids(model, tokenizer)
        # Prompt ids index the input embeddings, which may have rows past the LM head's vocabulary
        # (Mllama's <|image|> is one).
        self.num_embeddings = int(self.runner.embed_tokens.num_embeddings)
        self.vocab_size = int(model.config.get_text_config().vocab_size)  # the logits' width
        self.stats = EngineStats()
        self.out = OutputPath(self.stop_ids, TokenTexts(tokenizer), self.stats)
        self.on_step_end: Callable[[EngineStats], None] | None = None
        self._incoming: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self._cancels: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._early_cancels: dict[str, None] = {}  # cancelled before they arrived (ordered, capped)
        self._last_decode_end: float | None = None
        self._guided: GuidedDecoding | None = None
        self._guided_lock = threading.Lock()
        self._inflight: InflightStep | None = None  # (async scheduling)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        config: EngineConfig | None = None,
        device: str = "auto",
        dtype: str = "auto",
        keep_vision_tower: bool = False,
    ) -> LLMEngine:
        """Load the checkpoint with its family's ``from_pretrained`` and build an engine on it."""
        from transformers import AutoTokenizer

        from tritonvlm.families import family_for_model
        from tritonvlm.modeling.device import resolve_device

        family = family_for_model(path_or_id)
        dev, dt = resolve_device(device, dtype)
        model = family.load_model(path_or_id, device=str(dev), dtype=dt)
        if not keep_vision_tower:
            family.strip_for_decoder(model)  # images arrive as embeddings from the vision encoder
        return cls(model, AutoTokenizer.from_pretrained(path_or_id), config, family)

    @property
    def guided(self) -> GuidedDecoding:
        """Constrained decoding with this model's tokenizer, built on first use (about a second)."""
        with self._guided_lock:
            if self._guided is None:
                self._guided = GuidedDecoding(self.tokenizer, self.vocab_size, self.stop_ids)
            return self._guided

    # ---- public API (any thread) -------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        on_output: OutputCallback,
        mm: dict[str, torch.Tensor] | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        mm_digest: bytes | None = None,
        image_digests: list[tuple[int, bytes]] | None = None,
    ) -> None:
        """Queue a request. ``mm``: the family's multimodal tensors from the vision encoder (image
        embeddings and what else the decoder needs); ``mm_digest``: a digest that is equal only for
        equal ``mm`` (e.g. of the encoder's input), else the prefix cache hashes ``mm`` itself;
        ``image_digests``: better, each image's number of placeholder tokens and a digest of it alone,
        in prompt order, so that a prompt sharing only some of the images (a later turn that adds one)
        still starts from the cached keys/values before the first image that differs.
        Raises InvalidRequestError if it can never be served."""
        mm = mm or {}
        self.validate(prompt_ids, params, mm)
        seq = Sequence(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            params=params,
            on_output=on_output,
            detokenizer=IncrementalDetokenizer(self.tokenizer, params.stop),
            mm=dict(mm),  # the sequence's own: family hooks may replace entries (e.g. drop used inputs)
            is_cancelled=is_cancelled,
            generator=None if params.greedy else make_generator(params.seed, self.runner.device),
            guide=None if params.guided is None else self.guided.start(params.guided),
        )
        if self.prefix_cache.enabled:  # here, on the caller's thread: hashing images takes a while
            per_image = image_digests if seq.mm else None
            digest = mm_digest if seq.mm and mm_digest is not None else None
            if digest is None and not per_image:  # (not of tensors that depend on the prompt)
                own = self.family.prompt_mm_tensors
                digest = tensors_digest({name: t for name, t in seq.mm.items() if name not in own})
            seq.image_marks = image_marks(seq.prompt_ids, self._placeholders, digest, per_image)
        self._incoming.put(seq)
        self._wakeup.set()

    def cancel(self, request_id: str) -> None:
        """Drop a request (waiting or running); it gets a final output with finish reason "cancelled"."""
        self._cancels.put(request_id)
        self._wakeup.set()

    def validate(self, prompt_ids: list[int], params: SamplingParams, mm: dict[str, torch.Tensor]) -> None:
        """Reject what could never run: empty or out-of-vocabulary prompts, too long, bad image data."""
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", "messages")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.num_embeddings:
            raise InvalidRequestError("prompt token ids out of the vocabulary range", "prompt")
        total = len(prompt_ids) + params.max_tokens
        if total > self.config.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.config.max_model_len} tokens; the prompt "
                f"has {len(prompt_ids)} tokens and max_tokens is {params.max_tokens} ({total} in all). "
                "Shorten the prompt or lower max_tokens.",
                "max_tokens",
            )
        self.family.validate(prompt_ids, mm)

    def start(self) -> None:
        """Run the loop in a daemon thread (a server builds its engine with :meth:`launch` instead)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
            self._thread.start()

    @classmethod
    def launch(cls, build: Callable[[], LLMEngine]) -> LLMEngine:
        """Build an engine with ``build()`` in a new daemon thread and run its loop in that same
        thread; returns once it is built (``build``'s exception is raised here).

        Why one thread for both: on CPU, libgomp gives every thread that starts OpenMP parallel
        regions a team of workers of its own, and once a process has more OpenMP threads than cores,
        the workers stop spinning between regions and sleep; every small kernel then pays a futex
        wake-up. A model loaded on one thread and stepped on another made each decode step ~40%
        slower (medium model, 2 cores: 20 ms instead of 14.5 ms)."""
        built: list[LLMEngine] = []
        failed: list[BaseException] = []
        ready = threading.Event()

        def run() -> None:
            try:
                built.append(build())
            except BaseException as exc:  # re-raised in the caller's thread
                failed.append(exc)
                return
            finally:
                ready.set()
            built[0]._loop()

        thread = threading.Thread(target=run, name="llm-engine", daemon=True)
        thread.start()
        ready.wait()
        if failed:
            thread.join()
            raise failed[0]
        built[0]._thread = thread
        return built[0]

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still in flight are finished with an error."""
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for seq in list(self.out.open.values()):
            self.out.finish(seq, "error", error="the server is shutting down")

    # ---- the loop (engine thread) ----------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            if not self.scheduler.has_work() and self._incoming.empty() and self._cancels.empty():
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            try:
                self.step()
            except Exception:  # the loop must survive anything: a dead engine thread hangs every request
                log.exception("engine step failed; failing the running requests")
                self._fail_all_running()
        try:
            self._settle()  # outputs of the last step
        except Exception:
            log.exception("could not send the last outputs")

    def _fail_all_running(self) -> None:
        error = "internal error in the decoding engine"
        try:
            self._settle()  # what the steps before recorded still goes out
        except Exception:
            log.exception("could not send the last step's outputs")
        self._inflight = None
        pending, self.out.pending, self.out.stopped = self.out.pending, [], []
        for entry in pending:  # (sequences the last step ended included: their final output is owed)
            self.out.finish(entry.seq, "error", error=error)
        for seq in list(self.scheduler.running):
            self.out.finish(seq, "error", error=error)
        self.scheduler.retire(list(self.scheduler.running))
        partial, self.scheduler.prefilling = self.scheduler.prefilling, None
        if partial is not None:
            self.kv.release(partial)
            self.out.finish(partial, "error", error=error)

    def step(self) -> None:
        """One iteration: take arrivals and cancellations, prefill what fits, decode everyone once."""
        self._take_incoming()
        self._drop_cancelled()
        # With decodes running, a step's prefill is bounded so that they are not stalled for long.
        budget = self._chunk if self.scheduler.running and self._chunk else None
        new = self.scheduler.schedule_prefill(budget)
        if new:
            self._prefill(new, budget)
        running = self.scheduler.running
        overlap = bool(running) and self._overlaps(running)
        if self._inflight is not None and not overlap:
            self._settle()  # this step needs the tokens of the one in flight on the host first
        if running:
            self.kv.grow(running, self._preempt)  # (may preempt: the list shrinks)
        gauges_updated = bool(running) and self.async_output  # (during the device's step)
        if running:
            self._decode(list(running), overlap)
        else:
            self._last_decode_end = None
        if not self.async_output or not self.scheduler.running:
            self._settle()
        if not gauges_updated or not self.scheduler.running:
            self._update_gauges()

    def _overlaps(self, running: list[Sequence]) -> bool:
        """Whether the next decode step of ``running`` can be launched before the step in flight is
        recorded (async scheduling): none can be preempted (a sequence must be recorded to be
        recomputed; each row may take a block this step)."""
        if not self.async_scheduling:
            return False
        allocator = self.runner.cache.allocator
        return allocator.free_blocks + allocator.cache_only_blocks >= len(running)

    def _decode(self, batch: list[Sequence], overlap: bool = False) -> None:
        """One decode step of the running ``batch``; with async output, the previous step's outputs are
        sent (and the gauges updated) while the device computes this one. With ``overlap`` (async
        scheduling) its tokens stay on the device until the next step has been launched; the step
        before's are recorded now: once this step's forward is launched, and before its sampling where
        a row has a grammar (whose mask needs the last token)."""
        started = time.monotonic()
        if overlap:
            before = self._inflight
            previous = before.tokens if before is not None else None
            logits = self.runner.decode(batch, previous)
            if before is not None and any(awaits_its_grammar(seq) for seq in batch):
                self._inflight = None
                self._record_step(before)  # (the device computes the forward meanwhile)
                before = None
            sampled = sample_on_device(logits, batch, previous)
            self._inflight = None
            self._in_flight(InflightPart(batch, sampled, started))
            if before is not None:  # the device is computing this step meanwhile
                self._record_step(before)
            self.out.publish()
            self._retire_stopped()  # (the device's work on their slots is queued before any reuse)
            self._update_gauges()
            return
        logits = self.runner.decode(batch)
        if self.async_output:  # the device is computing the step meanwhile
            self.out.publish()
            self._update_gauges()
        failures: dict[int, str] = {}
        tokens = sample(logits, batch, failures)
        self._count_step(batch, started)
        self._retire_stopped()  # (ended by their text: this step's token for them is dropped)
        self._commit(batch, tokens, logits, failures)

    def _in_flight(self, part: InflightPart) -> None:
        """``part``'s tokens stay on the device, after those already there: each sequence's next input
        is its row there."""
        step = self._inflight or InflightStep([])
        offset = step.rows
        for row, seq in enumerate(part.batch):
            seq.inflight += 1
            seq.inflight_row = offset + row
        step.parts.append(part)
        self._inflight = step

    def _record_step(self, step: InflightStep) -> None:
        """Record the tokens of a step launched with async scheduling (waits for the device to be done
        with it); rows of sequences that ended since are dropped."""
        for part in step.parts:
            tokens, failures, logprobs = part.sample.result()
            for seq in part.batch:
                seq.inflight -= 1
            if part.prefill:
                self._count_prefill(part.batch, part.started)
            else:
                self._count_step(part.batch, part.started)
            self._commit(part.batch, tokens, None, failures, logprobs)

    def _settle(self) -> None:
        """Record the step in flight, if any (async scheduling), send every recorded token's text and
        retire the sequences it ends."""
        step, self._inflight = self._inflight, None
        if step is not None:
            self._record_step(step)
        self._flush()

    def _count_step(self, batch: list[Sequence], started: float) -> None:
        now = time.monotonic()
        self.stats.decode_step_seconds.append(now - started)
        if self._last_decode_end is not None:
            self.stats.step_intervals.append(now - self._last_decode_end)
        self._last_decode_end = now
        self.stats.decode_steps += 1
        self.stats.decode_tokens += sum(1 for seq in batch if not seq.closed)
        self.stats.max_decode_batch = max(self.stats.max_decode_batch, len(batch))

    def _take_incoming(self) -> None:
        while not self._incoming.empty():
            seq = self._incoming.get()
            if seq.request_id in self._early_cancels:
                del self._early_cancels[seq.request_id]
                seq.cancel_requested = True
            self.out.open[seq.request_id] = seq
            self.scheduler.add(seq)
        while not self._cancels.empty():
            request_id = self._cancels.get()
            seq = self.out.open.get(request_id)
            if seq is not None:
                seq.cancel_requested = True
            else:
                self._early_cancels[request_id] = None
                if len(self._early_cancels) > 10000:
                    self._early_cancels.pop(next(iter(self._early_cancels)))

    def _drop_cancelled(self) -> None:
        partial = self.scheduler.prefilling
        if partial is not None and partial.wants_cancel():
            self.scheduler.prefilling = None
            self.kv.release(partial)
            partial.slot = -1
            self.out.finish(partial, "cancelled")
        for seq in [s for s in self.scheduler.waiting if s.wants_cancel()]:
            self.scheduler.drop_waiting(seq)
            self.out.finish(seq, "cancelled")
        leaving = [s for s in self.scheduler.running if s.wants_cancel()]
        if leaving:
            self.scheduler.retire(leaving)
            for seq in leaving:
                log.info("dropped cancelled request %s after %d tokens", seq.request_id, len(seq.output_ids))
                self.out.finish(seq, "cancelled")

    def _preempt(self, seq: Sequence) -> None:
        """Take ``seq``'s KV blocks back; it waits first in line and is recomputed when resumed."""
        if seq.inflight:  # (steps that may preempt record the step in flight first: see _overlaps)
            raise RuntimeError(f"{seq.request_id} preempted with a token still on the device")
        self.scheduler.preempt(seq)
        seq.prefilled = seq.prefill_end = 0
        if self.out.publish(only=seq):  # its last token's text ended it: it does not come back
            self.scheduler.drop_waiting(seq)
            return
        self.stats.preemptions += 1
        log.info(
            "preempted %s after %d tokens (%d KV blocks free)",
            seq.request_id,
            len(seq.output_ids),
            self.runner.cache.allocator.free_blocks,
        )

    def _remember(self, seq: Sequence, prompt_only: bool = False, length: int | None = None) -> None:
        """Keep a sequence's keys/values in the prefix cache: a finished one's prompt and output fed
        back; with ``prompt_only``, a prompt just prefilled (its blocks are shared with the running
        sequence, which writes only past the prompt), so requests arriving while it runs start from it;
        with ``length`` too, only its first ``length`` tokens, prefilled so far (a branch point, see
        ``RingBranches``). The cache is an optimisation: a failure here never fails the request."""
        held = seq.prompt_ids if prompt_only else seq.prompt_ids + seq.output_ids[:-1]  # (last: never fed)
        held = held if length is None else held[:length]
        cache = self.runner.cache
        blocks = cache.slot_blocks[seq.slot]
        keep_ring, ring_from = None, 0
        if cache.has_sliding:  # the entry keeps the rings too
            if prompt_only and seq.prefilled != len(held):  # (resumed: its rings are past its prompt)
                return
            keep_ring = partial(self.kv.keep_ring, seq.slot, len(held))
            ring_from = ring_start(len(held), cache.ring_columns, exact=prompt_only)
        try:
            self.prefix_cache.store(blocks, held, seq.image_marks, keep_ring, ring_from)
            # Past the window its prompt's entry now serves only that prompt again: it goes first.
            if keep_ring and not prompt_only and ring_start(seq.prompt_len, cache.ring_columns, exact=True):
                self.prefix_cache.demote(seq.prompt_ids, seq.image_marks)
        except Exception:
            log.exception("could not keep %s in the prefix cache", seq.request_id)

    def _prefill(self, seqs: list[Sequence], budget: int | None = None) -> None:
        """Prefill ``seqs`` (from their cached prefixes); those whose prompt is done join the running
        batch with their first token. A single prompt longer than ``budget`` gets its next chunk only;
        one with a branch point ahead (``seq.branch_at``) stops there, and the prefix cache keeps its
        start."""
        started = time.monotonic()
        chunked = self.scheduler.prefilling is not None
        if not chunked:
            self.stats.queue_seconds.extend(started - s.arrival_time for s in seqs if not s.resumed)
        try:
            for seq in seqs:
                seq.prefill_end = seq.prefill_target
            first = seqs[0]
            if len(seqs) == 1:
                end = first.prefill_target
                if budget and end - first.prefilled > budget:
                    end = self.family.chunk_end(first, first.prefilled + budget)
                if first.prefilled < first.branch_at < end:
                    end = self.family.chunk_end(first, first.branch_at)
                if end < first.prefill_target:
                    first.prefill_end = end
                    self.scheduler.prefilling = first
            logits = self.runner.prefill(seqs, seqs[0].slot)
        except Exception as exc:
            log.exception("prefill failed for %s", [s.request_id for s in seqs])
            self.scheduler.prefilling = None
            for seq in seqs:
                self.kv.release(seq)
                seq.slot = -1
                self.out.finish(seq, "error", error=f"prefill failed: {exc}")
            return
        # With async scheduling the prompts join the running batch with their first token on the
        # device. Otherwise the last step's tokens are recorded and their text goes out while the
        # device computes the prefill; the sequences they end give their slots back before the new
        # ones join.
        on_device = self.async_scheduling
        if not on_device:
            self._settle()
        self.stats.prefill_steps += 1
        self.stats.prefill_tokens += sum(s.prefill_end - s.prefilled for s in seqs)
        for seq in seqs:
            seq.prefilled = seq.prefill_end
        if seqs[0].prefilled < seqs[0].prefill_target:  # a chunk of a long prompt: the rest later
            if seqs[0].prefilled == seqs[0].branch_at and self.prefix_cache.enabled:
                self._remember(seqs[0], prompt_only=True, length=seqs[0].branch_at)
            self.stats.prefill_step_seconds.append(time.monotonic() - started)
            return
        self.scheduler.admit(seqs)
        if self.prefix_cache.enabled:
            for seq in seqs:
                self._remember(seq, prompt_only=True)
        # A resumed sequence has its next token already (the last output, fed by the next decode).
        rows = [i for i, seq in enumerate(seqs) if not seq.resumed]
        fresh = [seqs[i] for i in rows]
        if len(rows) < len(seqs):
            logits = logits.index_select(0, device_tensor(rows, torch.long, logits.device))
        if on_device:
            if fresh:
                self._in_flight(InflightPart(fresh, sample_on_device(logits, fresh), started, prefill=True))
            else:
                self.stats.prefill_step_seconds.append(time.monotonic() - started)
            return
        failures: dict[int, str] = {}
        tokens = sample(logits, fresh, failures) if fresh else []
        self._count_prefill(fresh, started)
        self._commit(fresh, tokens, logits, failures)
        self._flush()  # first tokens go out at once

    def _count_prefill(self, fresh: list[Sequence], started: float) -> None:
        """A prefill's time, and its prompts' time to first token (their first tokens are known now)."""
        now = time.monotonic()
        self.stats.prefill_step_seconds.append(now - started)
        for seq in fresh:
            seq.first_token_time = now
            self.stats.ttft_seconds.append(now - seq.arrival_time)

    def _commit(
        self,
        seqs: list[Sequence],
        tokens: list[int],
        logits: torch.Tensor | None,
        failures: dict[int, str],
        logprobs: dict[int, LogprobsRow] | None = None,
    ) -> None:
        """Record one new token per sequence (but those that ended since the step was launched: their
        row is dropped) and retire those it ends; their text is made and sent by ``self.out.publish``,
        but a sequence's last output at once. A row whose sampling failed (``failures``), or whose token
        cannot be recorded, ends that sequence alone with an error: the other rows of the step go on.
        Rows with logprobs take them from ``logits`` (the step's), or from ``logprobs`` (by row: those
        computed on the device)."""
        finals: list[PendingOutput] = []
        failed: list[tuple[Sequence, str]] = []
        for row, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            if seq.closed:
                continue
            if row in failures:
                failed.append((seq, f"sampling failed for this request: {failures[row]}"))
                continue
            try:
                row_logits = logits[row] if logits is not None and seq.params.logprobs else None
                entry = self.out.record(seq, token, row_logits, logprobs.get(row) if logprobs else None)
            except Exception as exc:
                log.exception("could not append a token to %s", seq.request_id)
                failed.append((seq, f"internal error while decoding this request: {exc}"))
                continue
            (finals if entry.finish else self.out.pending).append(entry)
        self._leave([entry.seq for entry in finals], [seq for seq, _ in failed])
        for entry in finals:  # (a request's last output does not wait for the next step)
            self.out.publish_one(entry)
        for seq, message in failed:
            log.warning("request %s ends with an error: %s", seq.request_id, message)
            self.out.finish(seq, "error", error=message)

    def _leave(self, done: list[Sequence], failed: list[Sequence]) -> None:
        """Retire running sequences that are done (kept in the prefix cache first) or failed."""
        if self.prefix_cache.enabled:
            for seq in done:  # before retiring: their slots are refilled then
                self._remember(seq)
        if done or failed:
            self.scheduler.retire(done + failed)

    def _retire_stopped(self) -> None:
        """Retire the running sequences their text ended (the device must be done with their slots)."""
        stopped = self.out.take_stopped()
        if stopped:
            self._leave([seq for seq, ok in stopped if ok], [seq for seq, ok in stopped if not ok])

    def _flush(self) -> None:
        """Send every recorded token's text now and retire the sequences it ends."""
        self.out.publish()
        self._retire_stopped()

    def _update_gauges(self) -> None:
        self.stats.num_running = len(self.scheduler.running)
        self.stats.num_waiting = len(self.scheduler.waiting)
        running = self.scheduler.running
        partial = self.scheduler.prefilling
        # (inline Sequence.num_tokens: at batch 256 the gauges are a host cost of every step)
        held = [len(s.prompt_ids) + len(s.output_ids) + s.inflight for s in running]
        if partial:
            held.append(partial.prefilled)
        self.stats.kv_tokens_used = sum(held)
        self.stats.kv_bytes_used = self.runner.cache.total_bytes_held(held)
        self.stats.kv_bytes_capacity = self.runner.cache.nbytes
        self.stats.kv_blocks_used = self.runner.cache.allocator.used_blocks
        self.stats.kv_blocks_free = self.runner.cache.allocator.free_blocks
        self.stats.kv_tokens_peak = max(self.stats.kv_tokens_peak, self.stats.kv_tokens_used)
        self.stats.kv_bytes_peak = max(self.stats.kv_bytes_peak, self.stats.kv_bytes_used)
        self.stats.extra_state_bytes = self.runner.cache.state_bytes_held(len(running))
        cache = self.prefix_cache
        self.stats.prefix_cache_queries = cache.queries
        self.stats.prefix_cache_hits = cache.hits
        self.stats.prefix_cache_hit_tokens = cache.hit_tokens
        self.stats.prefix_cache_entries = cache.num_entries
        self.stats.prefix_cache_tokens = cache.tokens_held
        if self.on_step_end is not None:
            self.on_step_end(self.stats)
