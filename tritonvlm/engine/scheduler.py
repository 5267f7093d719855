"""Which sequences run next: waiting/running queues, admission within the slot and token budgets."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from tritonvlm.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    """Keeps running sequences packed in slots ``0 .. n-1`` (``running[i].slot == i``).

    ``move_slot(src, dst, length)`` is called when a sequence leaves and the last one takes its slot.
    """

    def __init__(
        self,
        max_num_seqs: int,
        max_prefill_tokens: int,
        move_slot: Callable[[int, int, int], None],
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.move_slot = move_slot
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule_prefill(self) -> list[Sequence]:
        """Admit waiting sequences (FIFO) into free slots, within the prefill token budget; the first
        one is always admitted when a slot is free, however long its prompt."""
        batch: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            if batch and tokens + seq.prompt_len > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            seq.slot = len(self.running) + len(batch)
            tokens += seq.prompt_len
            batch.append(seq)
        return batch

    def admit(self, seqs: list[Sequence]) -> None:
        """Prefilled sequences join the running batch (their slots were given by schedule_prefill)."""
        for seq in seqs:
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)

    def drop_waiting(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def retire(self, leaving: list[Sequence]) -> None:
        """Remove finished or cancelled sequences from the running batch, compacting the slots."""
        for seq in sorted(leaving, key=lambda s: s.slot, reverse=True):
            last = self.running.pop()
            if last is not seq:
                self.move_slot(last.slot, seq.slot, last.num_tokens)
                last.slot = seq.slot
                self.running[seq.slot] = last
            seq.status = SequenceStatus.FINISHED
            seq.slot = -1
