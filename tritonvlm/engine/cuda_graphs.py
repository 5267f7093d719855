"""Decode steps replayed from CUDA graphs: one graph per (batch-size bucket, attention-length bucket),
captured the first time that shape is met, then replayed with new inputs (where the decode-attention
kernel attends in every layer, the runner always gives the full length: one graph per batch bucket).
A decode step of a small batch is hundreds of small kernels launched one by one from Python; a replay
launches them all at once, so the step costs about what the GPU needs to read the weights.

The inputs live in static buffers (token, cache position and rope position per row; the KV cache's
block table is a static device tensor the graph reads); a batch smaller than its bucket is padded
with dummy rows, which sit in the slots after the running ones and write their key at position
``max_len - 1``. No sequence ever writes that position (the last token of a sequence of ``max_len``
tokens is sampled, never fed back): in the full-attention layers it falls in the scratch block the
table points at for blocks a slot does not hold, or in a block of a long prompt being prefilled in
chunks at a position it never uses, so the keys such a slot holds survive the step. Everything the
forward computes from the inputs (masks, positions, block lookups, the KV cache writes) is recorded
in the graph.

Capturing needs a forward with no host synchronisation; if a model's forward has one, capture fails
once, a warning is logged and the engine decodes eagerly from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger("tritonvlm.engine")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)

# forward(tokens [b], cache positions [b], rope positions [b], kv_len) -> float32 logits [b, vocab]
DecodeForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def take_previous(tokens: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """``tokens`` with each entry ``-1 - j`` replaced by ``previous[j]`` (a token the step before
    sampled, still on the device: async scheduling), on the device, without waiting for it."""
    if previous is None:
        return tokens
    return torch.where(tokens < 0, previous.index_select(0, (-1 - tokens).clamp(min=0)), tokens)


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes graphs are captured for, up to ``max_batch`` (which is always one)."""
    sizes = [b for b in BATCH_BUCKETS if b < max_batch]
    return [*sizes, max_batch]


class DecodeGraphs:
    """Captures and replays ``forward`` for decode steps of up to ``max_batch`` rows."""

    def __init__(self, forward: DecodeForward, max_batch: int, device: torch.device, max_len: int) -> None:
        self.forward = forward
        self.spare_column = max_len - 1  # where dummy rows write (see the module docstring)
        self.sizes = batch_buckets(max_batch)
        self.device = device
        self.inputs = torch.zeros(3, self.sizes[-1], dtype=torch.long, device=device)
        # Two pinned input buffers taken in turn, each with the event of its last copy to the device:
        # with async scheduling a step is prepared before the one before has begun, but not before
        # the one before that has ended.
        self._hosts = [torch.zeros(3, self.sizes[-1], dtype=torch.long).pin_memory() for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.failed = False
        self.replays = 0

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.sizes if b >= n), None)

    def run(
        self,
        tokens: list[int],
        cache_pos: list[int],
        rope: list[int],
        kv_len: int,
        previous: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Logits ``[len(tokens), vocab]`` of one decode step, or None when graphs cannot serve it
        (the caller then runs the step eagerly). A token ``-1 - j`` is ``previous[j]``
        (:func:`take_previous`)."""
        n = len(tokens)
        b = self.bucket(n)
        if self.failed or b is None:
            return None
        turn = self._turn = 1 - self._turn
        host, copied = self._hosts[turn], self._copied[turn]
        if copied is not None and not copied.query():
            copied.synchronize()
        host[:, n:b] = 0  # dummy rows: token 0, rope position 0, key in the spare column
        host[1, n:b] = self.spare_column
        host[0, :n] = torch.tensor(tokens)
        host[1, :n] = torch.tensor(cache_pos)
        host[2, :n] = torch.tensor(rope)
        self.inputs[:, :b].copy_(host[:, :b], non_blocking=True)
        self._copied[turn] = torch.cuda.Event()
        self._copied[turn].record()
        if previous is not None:
            self.inputs[0, :n] = take_previous(self.inputs[0, :n], previous)
        key = (b, kv_len)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(b, kv_len)
            if graph is None:
                return None
        graph.replay()
        self.replays += 1
        return self.outputs[key][:n]

    def _step(self, b: int, kv_len: int) -> torch.Tensor:
        return self.forward(self.inputs[0, :b], self.inputs[1, :b], self.inputs[2, :b], kv_len)

    def _capture(self, b: int, kv_len: int) -> torch.cuda.CUDAGraph | None:
        # The warm-up steps run for real with the step's own inputs: they write the same keys/values
        # the replay writes again, so running them is harmless.
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(b, kv_len)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads of the process (admission) may use CUDA meanwhile.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = self._step(b, kv_len)
        except Exception:
            log.warning("capturing a CUDA graph for the decode step failed; decoding eagerly", exc_info=True)
            self.failed = True
            torch.cuda.synchronize(self.device)
            return None
        self.graphs[(b, kv_len)] = graph
        self.outputs[(b, kv_len)] = out
        log.info("captured the decode step for batch %d, attention length %d", b, kv_len)
        return graph
