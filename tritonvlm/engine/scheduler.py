"""Which sequences run next: waiting/running queues, admission within the slot, token and KV budgets."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from tritonvlm.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    """Keeps running sequences packed in slots ``0 .. n-1`` (``running[i].slot == i``).

    ``move_slot(src, dst, length)`` is called when a sequence leaves and the last one takes its slot;
    ``release(seq)`` when a running sequence leaves for good (its slot still set); ``reserve(seq,
    slot)`` before a waiting sequence takes ``slot``: it returns False when the KV memory the sequence
    may need is not free now (the sequence, and those behind it, wait). ``defer(seq, batch)``: True
    when a waiting sequence is better prefilled in a later step than with ``batch`` (it shares a
    prefix with them that it can then take from the prefix cache); it keeps its place in line.
    ``alone(seq)``: True when a waiting sequence is to be prefilled in a step of its own (its prefill
    stops where the prefix cache keeps its start); it waits for one, with those behind it.
    """

    def __init__(
        self,
        max_num_seqs: int,
        max_prefill_tokens: int,
        move_slot: Callable[[int, int, int], None],
        release: Callable[[Sequence], None] = lambda seq: None,
        reserve: Callable[[Sequence, int], bool] = lambda seq, slot: True,
        defer: Callable[[Sequence, list[Sequence]], bool] = lambda seq, batch: False,
        alone: Callable[[Sequence], bool] = lambda seq: False,
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.move_slot = move_slot
        self.release = release
        self.reserve = reserve
        self.defer = defer
        self.alone = alone
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # A long prompt being prefilled in chunks (its slot is past the running ones; see admit).
        self.prefilling: Sequence | None = None

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    def schedule_prefill(self, budget: int | None = None) -> list[Sequence]:
        """The prompts to prefill now: the one being prefilled in chunks, if any, alone; otherwise
        waiting sequences (FIFO, but for those ``defer`` leaves for later; one ``alone`` wants its
        own batch) in free slots, within
        ``budget`` prompt tokens (default: the prefill token budget) and the KV memory ``reserve``
        grants. The first one is always taken when a slot and its memory are free, however long its
        prompt."""
        if self.prefilling is not None:
            return [self.prefilling]
        budget = self.max_prefill_tokens if budget is None else budget
        batch: list[Sequence] = []
        tokens = 0
        deferred = False
        for seq in self.waiting:
            if len(self.running) + len(batch) >= self.max_num_seqs:
                break
            if batch and tokens + seq.prefill_target > budget:
                break
            if batch and self.defer(seq, batch):
                deferred = True
                continue
            alone = self.alone(seq)
            if alone and batch:
                break
            slot = len(self.running) + len(batch)
            if not self.reserve(seq, slot):
                break
            seq.slot = slot
            tokens += seq.prefill_target
            batch.append(seq)
            if alone:
                break
        if deferred:
            taken = {id(seq) for seq in batch}
            self.waiting = deque(seq for seq in self.waiting if id(seq) not in taken)
        else:
            for _ in batch:
                self.waiting.popleft()
        return batch

    def admit(self, seqs: list[Sequence]) -> None:
        """Prefilled sequences join the running batch (their slots were given by schedule_prefill). A
        sequence prefilled in chunks may have been left past the end of the batch by sequences that
        finished meanwhile: its keys move down to the next running slot."""
        if self.prefilling is not None and self.prefilling in seqs:
            self.prefilling = None
        for seq in seqs:
            if seq.slot != len(self.running):
                self.move_slot(seq.slot, len(self.running), seq.prefilled)
                seq.slot = len(self.running)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)

    def preempt(self, seq: Sequence) -> None:
        """A running sequence gives its slot (and KV memory) back and waits first in line."""
        self.retire([seq])
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def drop_waiting(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def retire(self, leaving: list[Sequence]) -> None:
        """Remove finished or cancelled sequences from the running batch, compacting the slots."""
        for seq in leaving:
            self.release(seq)
        for seq in sorted(leaving, key=lambda s: s.slot, reverse=True):
            last = self.running.pop()
            if last is not seq:
                self.move_slot(last.slot, seq.slot, last.num_tokens)
                last.slot = seq.slot
                self.running[seq.slot] = last
            seq.status = SequenceStatus.FINISHED
            seq.slot = -1
