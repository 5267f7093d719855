"""KV memory by use: fixed-size blocks of token positions, handed out as sequences grow, with a prefix
cache (nano-vllm's block manager in spirit).

A sequence holds ``ceil(tokens / block_size)`` blocks, listed in its block table. A block that is full
of prompt tokens gets a hash chained from the previous block's hash, its token ids and whatever else
decides its keys and values (the content hashes of the images whose embeddings sit in it): a later
prompt that starts with the same blocks reuses them (their reference count grows) and only the rest
of it is prefilled. A freed block keeps its hash while it waits in the free list, so it can still be
found; the least recently freed ones are reused first.

Only token bookkeeping lives here: the tensors are the KV cache's, indexed by block id.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full of prompt tokens (cacheable)


@dataclass
class BlockTable:
    """The blocks of one sequence, in position order, and how many of its prompt tokens were cached."""

    blocks: list[int] = field(default_factory=list)
    cached_tokens: int = 0


def block_hash(parent: bytes | None, token_ids: Sequence[int], extra: bytes = b"") -> bytes:
    """The identity of a full block: what came before it, its tokens and anything else its keys depend on."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(parent or b"\0" * 16)
    digest.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in token_ids))
    digest.update(extra)
    return digest.digest()


class BlockManager:
    """Hands out blocks of ``block_size`` positions from a pool of ``num_blocks``."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need at least one block of at least one position")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_cache = enable_prefix_cache
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in reuse order (least recently freed first); a free block may still be cached.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[bytes, int] = {}
        self.hits = 0  # prompt tokens served from the prefix cache
        self.queries = 0  # prompt tokens looked up

    # ---- accounting -----------------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prompts ---------------------------------------------------------------------------------------
    def prompt_hashes(self, token_ids: Sequence[int], extras: Sequence[bytes] = ()) -> list[bytes]:
        """The chained hashes of the prompt's full blocks (``extras[i]``: block i's extra identity)."""
        hashes: list[bytes] = []
        parent = None
        for i in range(len(token_ids) // self.block_size):
            chunk = token_ids[i * self.block_size : (i + 1) * self.block_size]
            parent = block_hash(parent, chunk, extras[i] if i < len(extras) else b"")
            hashes.append(parent)
        return hashes

    def cached_prefix(self, hashes: Sequence[bytes], max_tokens: int) -> list[int]:
        """Block ids of the longest cached prefix of ``hashes``, covering at most ``max_tokens`` tokens."""
        found: list[int] = []
        if not self.enable_prefix_cache:
            return found
        for h in hashes[: max_tokens // self.block_size]:
            block_id = self._by_hash.get(h)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def can_allocate(self, num_tokens: int, hashes: Sequence[bytes] = (), reusable_tokens: int = 0) -> bool:
        """Whether a prompt of ``num_tokens`` fits now (its cached blocks cost nothing new, unless they
        are free-but-cached, which then leave the free list)."""
        cached = self.cached_prefix(hashes, reusable_tokens)
        new = self.blocks_for(num_tokens) - len(cached)
        revived = sum(1 for b in cached if b in self._free)
        return new + revived <= len(self._free)

    def allocate(self, num_tokens: int, hashes: Sequence[bytes] = (), reusable_tokens: int = 0) -> BlockTable:
        """Blocks for a prompt of ``num_tokens``: the cached prefix (at most ``reusable_tokens`` tokens of
        it) shared, fresh blocks for the rest. Raises ``MemoryError`` if they do not fit."""
        if not self.can_allocate(num_tokens, hashes, reusable_tokens):
            raise MemoryError(f"no room for {num_tokens} tokens ({len(self._free)} free blocks)")
        cached = self.cached_prefix(hashes, reusable_tokens)
        self.queries += num_tokens
        self.hits += len(cached) * self.block_size
        table = BlockTable(cached_tokens=len(cached) * self.block_size)
        for block_id in cached:
            self._take(block_id)
            table.blocks.append(block_id)
        for _ in range(self.blocks_for(num_tokens) - len(cached)):
            table.blocks.append(self._take(self._pop_free()))
        return table

    def register_prompt(self, table: BlockTable, hashes: Sequence[bytes]) -> None:
        """After a prefill: the prompt's full blocks become findable by their hashes."""
        if not self.enable_prefix_cache:
            return
        for block_id, h in zip(table.blocks, hashes, strict=False):
            block = self.blocks[block_id]
            if block.hash is None and h not in self._by_hash:
                block.hash = h
                self._by_hash[h] = block_id

    # ---- growth and release --------------------------------------------------------------------------
    def can_append(self, table: BlockTable, num_tokens: int) -> bool:
        """Whether the sequence can hold ``num_tokens`` tokens in all (one more block at most here)."""
        return self.blocks_for(num_tokens) - len(table.blocks) <= len(self._free)

    def append(self, table: BlockTable, num_tokens: int) -> None:
        """Grow the table to hold ``num_tokens`` tokens. Raises ``MemoryError`` when out of blocks."""
        while len(table.blocks) < self.blocks_for(num_tokens):
            if not self._free:
                raise MemoryError("no free KV block")
            table.blocks.append(self._take(self._pop_free()))

    def free(self, table: BlockTable) -> None:
        """Release a sequence's blocks (cached ones stay findable until their block is reused)."""
        for block_id in reversed(table.blocks):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        table.blocks.clear()

    # ---- internals -----------------------------------------------------------------------------------
    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # reused for something else: no longer cached
            if self._by_hash.get(block.hash) == block_id:
                del self._by_hash[block.hash]
            block.hash = None
        self._free[block_id] = None  # _take removes it
        return block_id

    def _take(self, block_id: int) -> int:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self._free.pop(block_id, None)
        block.ref_count += 1
        return block_id
