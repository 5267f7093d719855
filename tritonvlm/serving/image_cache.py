"""The image-embedding cache: the vision encoder's outputs kept by the content of its input, so that an
image seen before (asked about again, or re-sent with every turn of a conversation) skips the encoder.

The key is a digest of the packed ``MM_INPUTS`` bytes (:func:`content_key`): everything the encoder
reads (pixel tensors, grids, tile ratios, ...) and nothing else, whatever the family, so a hit gives
exactly the tensors an encoder call would. The cache is bounded by the bytes of the arrays it holds and
evicts the least recently used entries first. Concurrent requests with the same new input wait for
the one that encodes it instead of encoding it again.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Tensors = dict[str, np.ndarray]
DEFAULT_IMAGE_CACHE_MEMORY = "1GiB"
UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}


def parse_cache_memory(value: str, available_bytes: int) -> int:
    """A cache budget in bytes: ``"0"`` (off), a size (``"1GiB"``, ``"512MB"``, ``"1e9"`` bytes) or a
    fraction of ``available_bytes`` (``"0.1"``). Raises ValueError on anything else."""
    text = value.strip().lower()
    try:
        for suffix, scale in UNITS.items():
            if text.endswith(suffix):
                number, scale_by = float(text[: -len(suffix)]), scale
                break
        else:
            number = float(text)
            scale_by = available_bytes if number < 1.0 else 1
    except ValueError:
        raise ValueError(f"image_cache_memory={value!r} is not a size (1GiB, 512MB) or a fraction") from None
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"image_cache_memory={value!r} must be a finite size of at least 0")
    return int(number * scale_by)


def available_host_memory() -> int:
    """MemAvailable of this host in bytes (0 where /proc/meminfo cannot be read)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def content_key(packed: bytes | np.ndarray) -> bytes:
    """The cache key of one request's packed encoder input (its bytes, or its UINT8 tensor)."""
    return hashlib.sha256(packed).digest()


def tensors_nbytes(tensors: Tensors) -> int:
    return sum(int(array.nbytes) for array in tensors.values())


@dataclass
class ImageCacheStats:
    """What the cache did since it started (counters) and what it holds now (gauges)."""

    hits: int = 0  # lookups answered without an encoder call (a held entry, or another request's call)
    misses: int = 0  # lookups that called the encoder
    evictions: int = 0  # entries dropped to make room
    bytes_held: int = 0
    entries: int = 0
    capacity_bytes: int = 0


class _Pending:
    """An encoder call in flight for one key: requests with the same key wait on it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Tensors | None = None  # None once done: the call failed


class ImageCache:
    """A thread-safe LRU map ``key -> encoder output tensors``, bounded by the bytes of the tensors.
    ``capacity_bytes=0`` turns it off: every lookup calls the encoder and nothing is kept."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[bytes, tuple[Tensors, int]] = OrderedDict()
        self._pending: dict[bytes, _Pending] = {}
        self._lock = threading.Lock()
        self._stats = ImageCacheStats(capacity_bytes=capacity_bytes)

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    def stats(self) -> ImageCacheStats:
        """A snapshot of the counters and gauges."""
        with self._lock:
            return ImageCacheStats(**vars(self._stats))

    def get_or_compute(self, key: bytes, compute: Callable[[], Tensors]) -> Tensors:
        """The tensors for ``key``: held ones, or those of a call for the same key already running in
        another thread, or ``compute()``'s (kept if they fit). The returned arrays are read-only and
        shared: copy before writing. An exception of ``compute`` reaches its caller only; requests
        that waited on it try again themselves."""
        if not self.enabled:
            with self._lock:
                self._stats.misses += 1
            return compute()
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self._stats.hits += 1
                    return entry[0]
                pending = self._pending.get(key)
                leader = pending is None
                if leader:
                    pending = self._pending[key] = _Pending()
                    self._stats.misses += 1
            if leader:
                return self._compute(key, pending, compute)
            pending.done.wait()
            if pending.value is not None:
                with self._lock:
                    self._stats.hits += 1
                return pending.value

    def _compute(self, key: bytes, pending: _Pending, compute: Callable[[], Tensors]) -> Tensors:
        try:
            value = compute()
            for array in value.values():
                array.flags.writeable = False
        except BaseException:
            with self._lock:
                del self._pending[key]
            pending.done.set()
            raise
        try:
            with self._lock:
                del self._pending[key]
                self._insert(key, value)
        finally:  # the waiters get the value even if keeping it failed
            pending.value = value
            pending.done.set()
        return value

    def _insert(self, key: bytes, value: Tensors) -> None:
        """Keep ``value`` unless it alone is over the capacity; evict the oldest entries to fit it.
        Called with the lock held."""
        size = tensors_nbytes(value)
        if size > self.capacity_bytes:
            return
        stats = self._stats
        while stats.bytes_held + size > self.capacity_bytes:
            _, (_, old_size) = self._entries.popitem(last=False)
            stats.bytes_held -= old_size
            stats.evictions += 1
        self._entries[key] = (value, size)
        stats.bytes_held += size
        stats.entries = len(self._entries)
