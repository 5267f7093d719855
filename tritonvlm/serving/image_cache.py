"""The image-embedding cache: the vision encoder's outputs kept by the content of its input, so that an
image seen before (asked about again, or re-sent with every turn of a conversation) skips the encoder,
and, sent as the same bytes, its decoding and preprocessing too.

The key of an entry is a digest of the packed ``MM_INPUTS`` bytes (:func:`content_key`): everything
the encoder reads (pixel tensors, grids, tile ratios, ...) and nothing else, whatever the family, so a
hit gives exactly the tensors an encoder call would. Where the family can split a request's encoder
input per image (``Family.split_images``), each image is an entry of its own (keyed by its part of the
input): a later turn that adds an image to those sent before encodes the new one alone
(:meth:`ImageCache.get_or_compute_each`). The cache is bounded by the bytes of the arrays it holds and
evicts the least recently used entries first. Concurrent requests with the same new input
wait for the one that encodes it instead of encoding it again.

Beside the entries, the digest of a request's image files (:func:`images_key`) maps to its entries and
to the images' layout (:mod:`tritonvlm.image_layout`): the same files again find their embeddings
before any preprocessing, and the prompt is rebuilt from the layout (:meth:`ImageCache.lookup_files`).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
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


def images_key(images: np.ndarray) -> bytes:
    """The key of a request's image files (a BYTES tensor of encoded images, in prompt order)."""
    digest = hashlib.sha256()
    for data in np.asarray(images, dtype=np.object_).reshape(-1):
        data = data if isinstance(data, bytes) else bytes(data)
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.digest()


def tensors_nbytes(tensors: Tensors) -> int:
    return sum(int(array.nbytes) for array in tensors.values())


@dataclass
class ImageCacheStats:
    """What the cache did since it started (counters) and what it holds now (gauges)."""

    # Lookups, one per image (per request where the family cannot split its images):
    hits: int = 0  # answered without an encoder call (a held entry, or another request's call)
    preprocess_skips: int = 0  # of the hits, those found by the image files (no preprocessing either)
    misses: int = 0  # that called the encoder
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

    MAX_FILE_KEYS = 4096  # image-file digests remembered (a few hundred bytes each)

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[bytes, tuple[Tensors, int]] = OrderedDict()
        self._pending: dict[bytes, _Pending] = {}
        # image files -> (their entries' keys, layout)
        self._files: OrderedDict[bytes, tuple[tuple[bytes, ...], bytes]] = OrderedDict()
        self._remember_files = True
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
        return self.get_or_compute_each([key], lambda indices: [compute()])[0]

    def get_or_compute_each(
        self, keys: Sequence[bytes], compute: Callable[[list[int]], list[Tensors]]
    ) -> list[Tensors]:
        """The tensors of each of ``keys`` (one per image): held ones, those of calls already running
        in other threads, and for the others one call ``compute(indices)`` that returns their tensors
        in the order of ``indices`` (a key given twice is computed once). Read-only, shared arrays, as
        :meth:`get_or_compute`'s. An exception of ``compute`` reaches its caller only."""
        if not self.enabled:
            with self._lock:
                self._stats.misses += len(keys)
            return compute(list(range(len(keys))))
        results: list[Tensors | None] = [None] * len(keys)
        waits: dict[int, _Pending] = {}
        mine: dict[bytes, int] = {}  # key -> index of its first occurrence, computed here
        with self._lock:
            for i, key in enumerate(keys):
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self._stats.hits += 1
                    results[i] = entry[0]
                elif key in mine or key in self._pending:
                    waits[i] = self._pending[key]
                else:
                    mine[key] = i
                    self._pending[key] = _Pending()
                    self._stats.misses += 1
        if mine:
            self._compute_each(mine, keys, compute, results)
        failed = []
        for i, pending in waits.items():
            pending.done.wait()
            if pending.value is None:  # that call failed: try again here
                failed.append(i)
                continue
            with self._lock:
                self._stats.hits += 1
            results[i] = pending.value
        if failed:
            again = self.get_or_compute_each(
                [keys[i] for i in failed], lambda indices: compute([failed[j] for j in indices])
            )
            for i, value in zip(failed, again, strict=True):
                results[i] = value
        return results  # type: ignore[return-value]

    def _compute_each(
        self,
        mine: dict[bytes, int],
        keys: Sequence[bytes],
        compute: Callable[[list[int]], list[Tensors]],
        results: list[Tensors | None],
    ) -> None:
        pendings = {key: self._pending[key] for key in mine}
        try:
            values = compute(list(mine.values()))
            if len(values) != len(mine):
                raise ValueError(f"{len(values)} encoder results for {len(mine)} images")
            for value in values:
                for array in value.values():
                    array.flags.writeable = False
        except BaseException:
            with self._lock:
                for key in mine:
                    del self._pending[key]
            for pending in pendings.values():
                pending.done.set()
            raise
        try:
            with self._lock:
                for key, value in zip(mine, values, strict=True):
                    del self._pending[key]
                    self._insert(key, value)
        finally:  # the waiters get the values even if keeping them failed
            for (key, i), value in zip(mine.items(), values, strict=True):
                results[i] = value
                pendings[key].value = value
                pendings[key].done.set()

    def lookup_files(self, files_key: bytes) -> tuple[list[Tensors], bytes, tuple[bytes, ...]] | None:
        """``(tensors of each entry, layout, keys)`` of the entries the image files with ``files_key``
        were encoded into (:meth:`remember_files`), while all of them are held; else None (nothing is
        counted: the caller goes on to preprocess and look its images up)."""
        with self._lock:
            known = self._files.get(files_key)
            if known is None:
                return None
            keys, layout = known
            entries = [self._entries.get(key) for key in keys]
            if any(entry is None for entry in entries):  # an entry went: so does the way to them
                del self._files[files_key]
                return None
            self._files.move_to_end(files_key)
            for key in keys:
                self._entries.move_to_end(key)
            self._stats.hits += len(keys)
            self._stats.preprocess_skips += len(keys)
            return [entry[0] for entry in entries], layout, keys  # type: ignore[index]

    def remember_files(self, files_key: bytes, keys: Sequence[bytes], layout: bytes) -> None:
        """Let the image files with ``files_key``, laid out as ``layout``, find the entries ``keys``
        (if they are held: an input too large to keep is not remembered either)."""
        if not self.enabled:
            return
        with self._lock:
            if not self._remember_files or any(key not in self._entries for key in keys):
                return
            self._files[files_key] = (tuple(keys), layout)
            self._files.move_to_end(files_key)
            while len(self._files) > self.MAX_FILE_KEYS:
                self._files.popitem(last=False)

    def stop_remembering_files(self, found: int = 0) -> None:
        """Forget every image-file digest and remember none from now on (the entries stay). ``found``:
        entries the caller's :meth:`lookup_files` counted as hits that it does not use after all (it
        looks its images up again, which counts them then)."""
        with self._lock:
            self._remember_files = False
            self._files.clear()
            self._stats.hits -= found
            self._stats.preprocess_skips -= found

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
