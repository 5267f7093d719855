"""The prefix cache: its bookkeeping alone, then in the engine for every model family — a prompt that
starts from cached keys/values gets exactly the tokens transformers' generate() gives it, and an image
placeholder is never matched across different images."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_image
from family_harness import FAMILIES, Case, conversation, one_sequence_budget
from test_engine import Collector

from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams, prefix_cache
from tritonvlm.engine.block_manager import BlockAllocator
from tritonvlm.engine.prefix_cache import (
    MIN_MATCH_TOKENS,
    BatchSharing,
    PrefixCache,
    PrefixMatch,
    RingBranches,
    first_placeholder,
    image_marks,
    marks_differ_at,
    mm_digest,
)
from tritonvlm.engine.scheduler import Scheduler

MAX_NEW = 8
IMAGE_A = make_image(64, 48, "red")
IMAGE_B = make_image(64, 48, "blue", "square")  # same size: the same placeholder tokens
# Llama 3.2 Vision has one placeholder whatever the image, and its tiny model's answer depends on the
# tiles' layout (the image's shape) more than on colours.
IMAGE_B_MLLAMA = make_image(80, 30, "green")


# ---- bookkeeping ------------------------------------------------------------------------------------
BLOCK = 4


def stored(
    cache: PrefixCache, pool: BlockAllocator, tokens: list[int], digest=None, first_image=None
) -> list[int]:
    """Store ``tokens`` as a finished sequence would: from blocks it holds, which it then releases."""
    blocks = pool.allocate(-(-len(tokens) // BLOCK) + 1)  # (a sequence may hold one block more)
    cache.store(blocks, tokens, marks(digest, len(tokens) if first_image is None else first_image))
    pool.release(blocks)
    return blocks


def marks(digest: bytes | None, first_image: int) -> tuple:
    """One mark for all images (the digest of a request's whole set) at its first placeholder."""
    return () if digest is None else ((first_image, digest),)


def lookup_and_record(
    cache: PrefixCache, prompt: list[int], digest: bytes | None, first_image: int
) -> PrefixMatch | None:
    """What admission does: look the prompt up and record the result."""
    found = cache.lookup(prompt, marks(digest, first_image))
    cache.record(len(prompt), found)
    return found


def test_longest_match_wins_and_the_last_prompt_token_is_always_computed():
    pool = BlockAllocator(64)
    cache = PrefixCache(2, pool, BLOCK)
    short, long = list(range(20)), list(range(40))
    stored(cache, pool, short)
    blocks = stored(cache, pool, long + [99])
    assert len(cache.entries) == 1  # the longer one supersedes the one it extends
    assert cache.entries[0].blocks == blocks[:11]  # 41 tokens: 11 blocks kept, the spare one freed
    assert pool.free_blocks == 64 - 11
    stored(cache, pool, list(range(25)) + [5] * 10)
    match = lookup_and_record(cache, list(range(30)) + [7], None, 31)
    assert match is not None and match.length == 30 and match.entry is cache.entries[0]
    # The whole prompt is cached: all but its last token are taken.
    assert lookup_and_record(cache, list(range(40)), None, 40).length == 39
    assert cache.hits == 2 and cache.hit_tokens == 69 and cache.queries == 2
    assert cache.lookup(list(range(40)), ()).length == 39 and cache.queries == 2  # lookup: no count


def test_short_matches_are_not_worth_it():
    pool = BlockAllocator(64)
    cache = PrefixCache(1, pool, BLOCK)
    stored(cache, pool, list(range(30)))
    assert lookup_and_record(cache, list(range(MIN_MATCH_TOKENS - 1)) + [1000, 1001], None, 10) is None
    assert (
        lookup_and_record(cache, list(range(MIN_MATCH_TOKENS)) + [1000], None, 10).length == MIN_MATCH_TOKENS
    )


def test_other_images_match_only_up_to_the_first_placeholder():
    pool = BlockAllocator(64)
    cache = PrefixCache(1, pool, BLOCK)
    tokens = list(range(12)) + [7] * 10 + list(range(50, 60))  # placeholders (7) from index 12
    stored(cache, pool, tokens, b"image-a", 12)
    assert lookup_and_record(cache, tokens + [1], b"image-a", 12).length == len(tokens)
    assert lookup_and_record(cache, tokens + [1], b"image-b", 12).length == 12
    assert lookup_and_record(cache, tokens + [1], None, len(tokens) + 1).length == 12


def test_a_later_turn_adding_an_image_reuses_everything_before_it():
    """Per-image marks: turn 1 (image A) cached; turn 2 re-sends A and adds B after the answer: the
    match runs through A and the answer up to B's placeholders; with another first image it stops at
    the first placeholder; a whole-set mark (one digest for A+B) would stop at A."""
    pool = BlockAllocator(64)
    cache = PrefixCache(4, pool, BLOCK)
    ph = frozenset([999])
    turn1 = list(range(12)) + [999] * 10 + list(range(50, 70))  # A at 12..21, then text and the answer
    stored(cache, pool, turn1, b"a", 12)  # (an entry from a whole-set digest: one image, same mark)
    turn2 = turn1 + [80, 81] + [999] * 6 + [90, 91, 92]  # B's placeholders start at 44 (999: the placeholder)
    per_image = [(10, b"a"), (6, b"b")]
    assert image_marks(turn2, ph, None, per_image) == ((12, b"a"), (44, b"b"))
    assert cache.lookup(turn2, image_marks(turn2, ph, None, per_image)).length == len(turn1)
    assert cache.lookup(turn2, image_marks(turn2, ph, None, [(10, b"c"), (6, b"b")])).length == 12
    assert cache.lookup(turn2, image_marks(turn2, ph, b"a+b")).length == 12
    # Stored with its marks, turn 2 is found up to the end of B by a turn 3 (same images).
    stored_marks = image_marks(turn2, ph, None, per_image)
    blocks = pool.allocate(-(-len(turn2) // BLOCK) + 1)
    cache.store(blocks, turn2, stored_marks)
    pool.release(blocks)
    turn3 = turn2 + [95, 96, 97, 98]
    assert cache.lookup(turn3, image_marks(turn3, ph, None, per_image)).length == len(turn2)
    other_b = image_marks(turn3, ph, None, [(10, b"a"), (6, b"x")])
    assert cache.lookup(turn3, other_b).length == 44  # another second image: up to it


def test_image_marks_fall_back_to_one_mark_when_the_counts_do_not_fit():
    ph = frozenset([7])
    ids = [1, 2, 7, 7, 3, 7, 7, 7, 4]
    assert image_marks(ids, ph, None, [(2, b"a"), (3, b"b")]) == ((2, b"a"), (5, b"b"))
    (mark,) = image_marks(ids, ph, None, [(2, b"a"), (2, b"b")])  # 4 != 5 placeholders
    assert mark[0] == 2 and mark[1] not in (b"a", b"b")
    assert image_marks(ids, ph, b"all") == ((2, b"all"),)
    assert image_marks([1, 2, 3], ph, None) == ()
    assert marks_differ_at(((2, b"a"), (5, b"b")), ((2, b"a"),)) == 5
    assert marks_differ_at(((2, b"a"),), ((2, b"a"),)) is None


def test_entries_hold_their_blocks_until_evicted_superseded_or_pushed_out():
    pool = BlockAllocator(64)
    cache = PrefixCache(2, pool, BLOCK)
    a, b, c = [1] * 20, [2] * 20, [3] * 20
    stored(cache, pool, a)
    stored(cache, pool, b)
    assert pool.used_blocks == 10
    lookup_and_record(cache, a + [5], None, 21)  # a is now more recent than b
    stored(cache, pool, c)  # the cache is full: b (least recently used) goes, with its blocks
    assert sorted(e.tokens[0] for e in cache.entries) == [1, 3] and pool.used_blocks == 10
    stored(cache, pool, a + [9] * 5)  # a longer a supersedes a
    assert len(cache.entries) == 2 and any(len(e.tokens) == 25 for e in cache.entries)
    assert pool.used_blocks == 5 + 7
    used = pool.used_blocks
    stored(cache, pool, a)  # already covered: nothing new kept
    assert pool.used_blocks == used and len(cache.entries) == 2
    longer_a = next(e for e in cache.entries if e.tokens[0] == 1)
    c_entry = next(e for e in cache.entries if e.tokens[0] == 3)
    # Eviction gives back one block at a time, from the tail of the least recently used entry (the
    # one to keep last): c shrinks block by block and goes below MIN_MATCH_TOKENS.
    assert cache.evict(keep=longer_a) and len(c_entry.tokens) == 16 and pool.used_blocks == used - 1
    assert cache.lookup([3] * 21, ()).length == 16  # what is left of c still matches
    while cache.holds(c_entry):
        assert cache.evict(keep=longer_a)
    assert cache.entries == [longer_a] and len(longer_a.tokens) == 25 and pool.used_blocks == 7
    assert cache.evict(keep=longer_a) and len(longer_a.tokens) == 24  # its partial last block first
    assert cache.lookup(a + [9] * 5 + [1], ()).length == 24
    while cache.evict():
        pass
    assert cache.entries == [] and pool.used_blocks == 0 and cache.tokens_held == 0


def test_entries_with_rings_serve_only_what_their_rings_continue():
    """Entries with rings (sliding-window layers) serve matches of at least their ``ring_from`` tokens:
    a lookup falls back to a shorter entry whose rings can continue where a longer one's cannot; an
    entry covers or supersedes another only where it serves all the other serves; eviction drops such
    an entry whole, rings included."""
    pool = BlockAllocator(64)
    cache = PrefixCache(4, pool, BLOCK)

    def keep_rings(n: int):
        def keep() -> list[int]:
            blocks = pool.allocate(n)
            pool.share(blocks, cached=True)
            pool.release(blocks)
            return blocks

        return keep

    def store(tokens: list[int], ring_from: int) -> None:
        blocks = pool.allocate(-(-len(tokens) // BLOCK))
        cache.store(blocks, tokens, (), keep_rings(2), ring_from)
        pool.release(blocks)

    short, long = list(range(12)), list(range(40))
    store(short, 0)  # (within the window: any match)
    store(long, 40)  # (only its whole length)
    assert len(cache.entries) == 2 and pool.used_blocks == 3 + 10 + 2 * 2  # neither covers the other
    assert cache.lookup(list(range(30)) + [7], ()).entry.tokens == short  # long's rings cannot do 30
    match = cache.lookup(long + [7], ())
    assert match.entry.tokens == long and match.length == 40
    assert cache.lookup(long, ()).entry.tokens == short  # 39 tokens: long's rings cannot continue
    used = pool.used_blocks
    store(list(range(20)), 20)  # long holds its tokens, but its rings cannot serve 20: kept
    assert len(cache.entries) == 3 and pool.used_blocks == used + 5 + 2
    store(list(range(11)), 0)  # short serves all it would: nothing new
    assert len(cache.entries) == 3 and pool.used_blocks == used + 5 + 2
    store(list(range(14)), 0)  # serves all short does, and more: short goes
    assert sorted(len(e.tokens) for e in cache.entries) == [14, 20, 40]
    while cache.evict():
        pass
    assert cache.entries == [] and pool.used_blocks == 0


def test_a_demoted_entry_is_evicted_first_until_a_hit_touches_it():
    """``demote`` puts the entries holding exactly the given tokens first in the eviction order (the
    engine's use: a prompt's own entry with rings, once its finished sequence's entry is kept)."""
    pool = BlockAllocator(64)
    cache = PrefixCache(8, pool, BLOCK)

    def store(tokens: list[int], ring_from: int) -> None:
        def keep_ring() -> list[int]:
            ring = pool.allocate(1)
            pool.share(ring, cached=True)
            pool.release(ring)
            return ring

        blocks = pool.allocate(-(-len(tokens) // BLOCK))
        cache.store(blocks, tokens, (), keep_ring, ring_from)
        pool.release(blocks)

    prompt, finished, other = list(range(20)), list(range(26)), list(range(100, 120))
    for tokens, ring_from in ((other, 20), (prompt, 19), (finished, 26)):  # (other: the oldest)
        store(tokens, ring_from)
    cache.demote(prompt, ())
    cache.demote(list(range(21)), ())  # (no entry holds exactly these: nothing moves)
    assert cache.evict()  # (an entry with rings goes whole)
    assert {tuple(e.tokens) for e in cache.entries} == {tuple(finished), tuple(other)}

    store(prompt, 19)
    cache.demote(prompt, ())
    match = cache.lookup([*prompt, 5], ())
    assert match.entry.tokens == prompt
    cache.record(21, match)  # a hit: the entry is the most recently used again
    assert cache.evict() and prompt in [e.tokens for e in cache.entries]


def test_rings_kept_for_a_new_entry_push_out_the_least_recently_used_entries():
    """A pool too full to take a new entry's ring copy without eating into what running sequences may
    need: the least recently used entries go (rings and all) to make the room; where even the whole
    cache would not do, the new entry is not kept."""
    from tritonvlm.engine.kv_admission import KVAdmission
    from tritonvlm.engine.kv_cache import PagedKVCache
    from tritonvlm.families.base import FULL, LayerKind

    kinds = [LayerKind("sliding", 8), FULL, LayerKind("sliding", 8)]
    cache = PagedKVCache(
        3, 2, 4, 2, 64, torch.float32, torch.device("cpu"), kinds, num_blocks=40, block_size=BLOCK
    )
    entries = PrefixCache(8, cache.allocator, BLOCK)
    kv = KVAdmission(cache, entries)
    assert cache.ring_blocks_for(8) == 4 and kv.margin == 1

    def store(first: int) -> None:  # a 12-token prompt in slot 0, kept with its rings
        tokens = list(range(first, first + 12))
        blocks = cache.allocator.allocate(3)
        entries.store(blocks, tokens, (), lambda: kv.keep_ring(0, 12), 0)
        cache.allocator.release(blocks)

    for first in (100, 200, 300, 400, 500):  # 7 blocks each: 35 of 40
        store(first)
    assert len(entries.entries) == 5 and cache.allocator.free_blocks == 5
    entries.record(13, entries.lookup(list(range(100, 113)), ()))  # the first is used again
    store(600)  # 4 free after its 3 token blocks, too few for 4 ring blocks and the margin: 200 goes
    assert sorted(e.tokens[0] for e in entries.entries) == [100, 300, 400, 500, 600]
    # A prompt's entry and its finished sequence's share their last block (neither frees it alone):
    # with rings they still go first when least recently used.
    blocks = cache.allocator.allocate(4)
    entries.store(blocks, list(range(800, 813)), (), lambda: kv.keep_ring(0, 13), 0)
    entries.store(blocks, list(range(800, 815)), (), lambda: kv.keep_ring(0, 15), 15)
    cache.allocator.release(blocks)
    for entry in [e for e in entries.entries if e.tokens[0] != 800]:
        entries.record(13, entries.lookup(entry.tokens + [1], ()))  # the others are used again
    assert entries.evict() and sorted(len(e.tokens) for e in entries.entries if e.tokens[0] == 800) == [15]
    while entries.evict():
        pass
    spare = cache.allocator.allocate(cache.allocator.free_blocks - 3)  # (running sequences' blocks)
    store(700)  # nothing left to give back, and nothing free after its prompt's blocks: not kept
    assert entries.entries == [] and cache.allocator.used_blocks == len(spare)
    cache.allocator.release(spare)
    assert cache.allocator.used_blocks == 0


def test_many_conversations_each_find_their_own_through_the_block_index(monkeypatch):
    """300 conversations behind one shared system prompt: each next turn finds its own conversation,
    and a lookup compares tokens with a bounded number of entries, not with all of them."""
    pool = BlockAllocator(4096)
    cache = PrefixCache(1000, pool, BLOCK)
    system = list(range(1000, 1022))  # 22 tokens: five full blocks and two more
    conversations = [system + [5000 + n, 7, 7] + [n % 13] * 9 for n in range(300)]
    for tokens in conversations:
        stored(cache, pool, tokens)
    assert cache.num_entries == 300
    compared: list[int] = []
    real = prefix_cache.common_prefix
    monkeypatch.setattr(prefix_cache, "common_prefix", lambda *a, **k: compared.append(1) or real(*a, **k))
    for n, tokens in enumerate(conversations):
        match = cache.lookup(tokens + [42, 43], ())
        assert match is not None and match.entry.tokens == tokens and match.length == len(tokens), n
    assert len(compared) <= 300 * prefix_cache.MAX_TAIL_CANDIDATES
    compared.clear()
    stranger = system + [9999] * 10  # shares only the system prompt: at most 64 entries are compared
    assert cache.lookup(stranger, ()).length == len(system)
    assert 1 <= len(compared) <= prefix_cache.MAX_TAIL_CANDIDATES


def test_eviction_skips_tails_a_running_sequence_still_holds():
    """The least recently used entry's blocks are all shared with a sequence still running: letting go
    of its tail would free nothing, so the next entry's tail goes; once nothing else frees a block,
    the shared entry's tail goes after all."""
    pool = BlockAllocator(64)
    cache = PrefixCache(8, pool, BLOCK)
    stored(cache, pool, list(range(16)))
    running = cache.lookup([*range(16), 99], ())
    pool.share(running.entry.blocks)  # what admission does for the sequence starting from it
    stored(cache, pool, list(range(100, 116)))
    shared_entry, other = cache.entries
    free = pool.free_blocks
    assert cache.evict() and pool.free_blocks == free + 1
    assert len(shared_entry.tokens) == 16 and len(other.tokens) == 12
    while len(cache.entries) == 2:
        assert cache.evict()
    assert cache.entries == [shared_entry] and pool.free_blocks == free + 4
    assert cache.evict() and len(shared_entry.tokens) == 12 and pool.free_blocks == free + 4


def test_a_hash_collision_never_matches_other_tokens(monkeypatch):
    pool = BlockAllocator(64)
    cache = PrefixCache(4, pool, BLOCK)
    monkeypatch.setattr(prefix_cache, "hash", lambda value: 0, raising=False)  # every key collides
    stored(cache, pool, [1] * 40)
    assert cache.lookup([2] * 41, ()) is None
    assert cache.lookup([1] * 41, ()).length == 40


def waiting(name: str, tokens: list[int]) -> SimpleNamespace:
    """What the scheduler and BatchSharing read of a waiting sequence."""
    n = len(tokens)
    return SimpleNamespace(request_id=name, context_ids=tokens, prefill_target=n, image_marks=())


def test_prompts_sharing_uncached_blocks_wait_for_the_next_prefill():
    """``a``, ``b`` and ``d`` share 40 tokens nobody has cached: only ``a`` is prefilled with the
    unrelated ``c``; ``b`` and ``d`` keep their places and go next, once ``a``'s prompt is cached."""
    pool = BlockAllocator(64)
    cache = PrefixCache(8, pool, BLOCK)
    shared = list(range(40))
    a, b, c, d = (
        waiting("a", [*shared, 100]),
        waiting("b", [*shared, 200]),
        waiting("c", list(range(500, 541))),
        waiting("d", [*shared, 300]),
    )
    scheduler = Scheduler(8, 1000, lambda src, dst, n: None, defer=BatchSharing(cache))
    for seq in (a, b, c, d):
        scheduler.add(seq)
    assert [s.request_id for s in scheduler.schedule_prefill()] == ["a", "c"]
    assert [s.request_id for s in scheduler.waiting] == ["b", "d"]
    stored(cache, pool, a.context_ids)  # what a's prefill does
    scheduler.admit([a, c])
    assert [s.request_id for s in scheduler.schedule_prefill()] == ["b", "d"]  # cached now: together
    off = Scheduler(8, 1000, lambda src, dst, n: None, defer=BatchSharing(PrefixCache(0, pool, BLOCK)))
    for seq in (waiting("a", [*shared, 1]), waiting("b", [*shared, 2])):
        off.add(seq)
    assert len(off.schedule_prefill()) == 2  # no prefix cache: nothing to wait for


def test_prompts_leaving_a_ring_entry_past_its_start_are_prefilled_alone_to_keep_the_branch():
    """With rings (sliding-window layers) an entry serves only matches its rings continue: a prompt
    sharing 40 of its 60 tokens is served nothing, though 40 agree (``branch_point``). ``RingBranches``
    has such a prompt prefilled in a step of its own, stopping at 40 (``branch_at``); prompts behind
    it wait for that step. Without rings, or sharing little more than is served, nothing changes."""
    pool = BlockAllocator(64)
    cache = PrefixCache(8, pool, BLOCK)
    blocks = pool.allocate(15)
    first = list(range(60))
    cache.store(blocks, first, (), lambda: [], ring_from=59)  # (a prompt's entry with its rings)
    pool.release(blocks)
    shared = [*range(40), 100, 101]
    assert cache.lookup(shared, ()) is None
    assert cache.branch_point(shared, ()) == (0, 40)
    assert cache.branch_point(first, ()) == (59, 59)  # served all it shares
    assert cache.branch_point([*range(20), 7, 8], ()) == (0, 20)
    assert cache.branch_point(list(range(500, 540)), ()) == (0, 0)

    branch, other, behind = (
        waiting("branch", shared),
        waiting("other", list(range(500, 540))),
        waiting("b", shared),
    )
    for seq in (branch, other, behind):
        seq.resumed = False
    scheduler = Scheduler(8, 1000, lambda src, dst, n: None, alone=RingBranches(cache, sliding=True))
    scheduler.add(other)
    scheduler.add(branch)
    scheduler.add(behind)
    assert [s.request_id for s in scheduler.schedule_prefill()] == ["other"]  # branch waits for its own
    assert [s.request_id for s in scheduler.schedule_prefill()] == ["branch"] and branch.branch_at == 40
    assert [s.request_id for s in scheduler.waiting] == ["b"]
    assert not RingBranches(cache, sliding=False)(behind) and behind.branch_at == 0
    assert not RingBranches(cache, sliding=True, min_tokens=41)(behind) and behind.branch_at == 0
    behind.resumed = True  # (recomputed after preemption: no branch)
    assert not RingBranches(cache, sliding=True)(behind)


def test_digest_and_placeholder_helpers():
    x = {"image_embeds": torch.ones(3, 4), "grid": torch.tensor([[1, 2, 2]])}
    y = {"image_embeds": torch.ones(3, 4), "grid": torch.tensor([[1, 2, 2]])}
    z = {"image_embeds": torch.ones(3, 4) * 2, "grid": torch.tensor([[1, 2, 2]])}
    assert mm_digest(x) == mm_digest(y) != mm_digest(z)
    assert mm_digest({}) is None
    assert first_placeholder([1, 2, 7, 7], frozenset([7])) == 2
    assert first_placeholder([1, 2], frozenset([7])) == 2
    assert first_placeholder([1, 2], frozenset()) == 2


def test_disabled_cache_matches_nothing():
    pool = BlockAllocator(16)
    cache = PrefixCache(0, pool, BLOCK)
    stored(cache, pool, list(range(30)))
    assert (
        not cache.enabled
        and lookup_and_record(cache, list(range(30)), None, 30) is None
        and not cache.entries
    )
    assert pool.used_blocks == 0


# ---- in the engine ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=FAMILIES)
def kit(request, family_kit):
    return family_kit(request.param)


def serves_any_shared_start(kit) -> bool:
    """Whether the family's cache serves a prompt that shares only a start with a cached one. With
    sliding-window layers it does only while the cached tokens fit in the window, which the tiny
    Gemma 3's 16 do not here (``tests/test_gemma3.py`` checks what its cache serves)."""
    sliding = any(kind.is_sliding for kind in kit.family.layer_kinds())
    return kit.family.supports_prefix_cache and not sliding


def same_image_questions() -> tuple[Case, Case]:
    """Two questions about IMAGE_A: their prompts are the same up to where the questions differ."""
    return (
        Case("first", conversation("What is in this image? Answer in one short sentence.", 1), [IMAGE_A]),
        Case("again", conversation("What is in this image? Name its colour.", 1), [IMAGE_A]),
    )


def run(engine: LLMEngine, sink: Collector, rid: str, case: Case, kit) -> list[int]:
    ids, mm = kit.engine_inputs(case)
    engine.add_request(rid, ids, SamplingParams(max_tokens=MAX_NEW, temperature=0.0), sink, mm)
    while not sink.finished(rid):
        engine.step()
    assert sink.outputs[rid][-1].error is None
    return sink.tokens(rid)


def cached(sink: Collector, rid: str) -> int:
    return sink.outputs[rid][-1].cached_tokens


def test_cached_prefixes_are_token_exact(kit):
    """Same image, another question; another image, the same question; a second turn: each equals
    generate() on its own, and the cache is used wherever the family allows it."""
    engine = LLMEngine(kit.hf_model, kit.tokenizer, EngineConfig(max_model_len=1024), kit.family)
    sink = Collector()
    first, again = same_image_questions()
    image_b = IMAGE_B_MLLAMA if kit.name == "mllama" else IMAGE_B
    other = Case("other", conversation("What is in this image? Answer in one short sentence.", 1), [image_b])
    supported = kit.family.supports_prefix_cache
    assert engine.prefix_cache.enabled == supported

    assert run(engine, sink, "first", first, kit) == kit.reference_tokens(first, MAX_NEW)
    assert cached(sink, "first") == 0
    assert run(engine, sink, "again", again, kit) == kit.reference_tokens(again, MAX_NEW)
    ids_first, _ = kit.engine_inputs(first)
    ids_again, _ = kit.engine_inputs(again)
    if serves_any_shared_start(kit):
        shared = next(i for i, (a, b) in enumerate(zip(ids_first, ids_again, strict=False)) if a != b)
        assert cached(sink, "again") == shared  # through the image, up to where the questions differ
    else:
        assert cached(sink, "again") == 0

    other_tokens = run(engine, sink, "other", other, kit)
    assert other_tokens == kit.reference_tokens(other, MAX_NEW)
    if supported:  # the digest is what keeps the other image's placeholders from matching
        assert other_tokens != sink.tokens("first"), "the test model must make the image matter"
    ids_other, _ = kit.engine_inputs(other)
    placeholder = kit.family.image_token_id
    assert cached(sink, "other") <= ids_other.index(placeholder)  # never past the first placeholder

    answer = kit.tokenizer.decode(sink.tokens("first"), skip_special_tokens=True)
    turn2 = Case(
        "turn2",
        [
            *first.messages,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "Are you sure?"},
        ],
        [IMAGE_A],
    )
    assert run(engine, sink, "turn2", turn2, kit) == kit.reference_tokens(turn2, MAX_NEW)
    if supported:
        assert cached(sink, "turn2") >= ids_first.index(placeholder) + 1
    assert engine.stats.prefix_cache_hits == engine.prefix_cache.hits


def test_a_running_sequences_prompt_is_shared_with_later_arrivals(kit):
    """The prompt of a sequence still decoding is in the cache from its prefill on: a request with the
    same image arriving meanwhile starts from its blocks, and both get generate()'s tokens."""
    engine = LLMEngine(kit.hf_model, kit.tokenizer, EngineConfig(max_model_len=1024), kit.family)
    sink = Collector()
    first, again = same_image_questions()
    for case in (first, again):
        ids, mm = kit.engine_inputs(case)
        engine.add_request(case.name, ids, SamplingParams(max_tokens=MAX_NEW, temperature=0.0), sink, mm)
        engine.step()
        engine.step()
    assert not sink.finished("first")  # "again" arrived while "first" was decoding
    while not (sink.finished("first") and sink.finished("again")):
        engine.step()
    assert sink.tokens("first") == kit.reference_tokens(first, MAX_NEW)
    assert sink.tokens("again") == kit.reference_tokens(again, MAX_NEW)
    if serves_any_shared_start(kit):
        ids_first, _ = kit.engine_inputs(first)
        ids_again, _ = kit.engine_inputs(again)
        shared = next(i for i, (x, y) in enumerate(zip(ids_first, ids_again, strict=False)) if x != y)
        assert cached(sink, "again") == shared
    else:
        assert cached(sink, "again") == 0


def test_prompts_sharing_a_prefix_are_not_prefilled_together(kit):
    """Three questions about one image and an unrelated prompt arrive at once: the first question is
    prefilled with the unrelated prompt, the two others in the next step from the first's blocks
    (they would each compute the image again side by side); every output is generate()'s."""
    engine = LLMEngine(kit.hf_model, kit.tokenizer, EngineConfig(max_model_len=1024), kit.family)
    sink = Collector()
    lead = (
        "You are looking at a small test picture. Look closely at the shapes in it, at their colours, "
        "at their sizes and at the background, and take your time before you answer. Then tell me: "
    )
    first, again, third = (
        Case(name, conversation(lead + question, 1), [IMAGE_A])
        for name, question in (
            ("first", "what is in it?"),
            ("again", "which colour stands out?"),
            ("third", "how many shapes are there?"),
        )
    )
    unrelated = Case("unrelated", conversation("Tell me a story about a cat.", 0))
    cases = (first, again, unrelated, third)
    ids = {case.name: kit.engine_inputs(case)[0] for case in cases}
    for case in cases:
        case_ids, mm = kit.engine_inputs(case)
        engine.add_request(case.name, case_ids, SamplingParams(max_tokens=MAX_NEW, temperature=0.0), sink, mm)
    engine.step()
    in_first_step = {name for name in ids if sink.outputs.get(name)}
    block = engine.runner.cache.block_size

    def shared(a: str, b: str) -> int:
        return next((i for i, (x, y) in enumerate(zip(ids[a], ids[b], strict=False)) if x != y), 0)

    assert shared("first", "again") >= 3 * block  # the test must share more than DEFER_MIN_TOKENS
    if kit.family.supports_prefix_cache:
        unrelated_waits = shared("first", "unrelated") // block >= 2  # (a long common chat preamble)
        assert in_first_step == {"first"} | (set() if unrelated_waits else {"unrelated"})
    else:
        assert in_first_step == set(ids)
    while not all(sink.finished(name) for name in ids):
        engine.step()
    for case in cases:
        assert sink.tokens(case.name) == kit.reference_tokens(case, MAX_NEW), case.name
    if serves_any_shared_start(kit):
        assert cached(sink, "again") == shared("first", "again")
        assert cached(sink, "third") == max(shared("first", "third"), shared("again", "third"))
        computed = sum(len(v) for v in ids.values()) - sum(cached(sink, name) for name in ids)
        assert engine.stats.prefill_tokens == computed


def test_eviction_under_pressure_loses_no_request(kit):
    """One cache row, two slots, requests with three different prefixes arriving while others run:
    every request finishes with generate()'s tokens."""
    config = EngineConfig(max_model_len=1024, max_num_seqs=2, prefix_cache_slots=1)
    engine = LLMEngine(kit.hf_model, kit.tokenizer, config, kit.family)
    sink = Collector()
    texts = ["Tell me a story about a cat.", "Tell me a story about a dog.", "Write a poem about the sea."]
    cases = [Case(f"c{i}", conversation(texts[i % 3], 0)) for i in range(6)]
    refs = {case.name: kit.reference_tokens(case, MAX_NEW) for case in cases[:3]}
    for i, case in enumerate(cases):
        ids, mm = kit.engine_inputs(case)
        engine.add_request(case.name, ids, SamplingParams(max_tokens=MAX_NEW, temperature=0.0), sink, mm)
        engine.step()
        if i % 2:
            engine.step()
    steps = 0
    while not all(sink.finished(c.name) for c in cases):
        engine.step()
        steps += 1
        assert steps < 500
    for i, case in enumerate(cases):
        assert sink.tokens(case.name) == refs[f"c{i % 3}"], case.name
    if kit.family.supports_prefix_cache:
        assert len(engine.prefix_cache.entries) == 1
    if serves_any_shared_start(kit):
        assert engine.prefix_cache.hits >= 1


def test_entries_give_their_blocks_back_to_a_sequence_that_needs_them(kit):
    """A finished request's entry holds blocks; a request that grows into them while too few others
    are free takes them (the entry gives its tail back, nothing is preempted) and gets generate()'s
    tokens."""
    if not serves_any_shared_start(kit):
        pytest.skip("no prefix cache, or entries with rings (tests/test_gemma3.py)")
    engine = LLMEngine(
        kit.hf_model, kit.tokenizer, EngineConfig(max_model_len=512, max_num_seqs=2), kit.family
    )
    cache = engine.runner.cache
    sink = Collector()
    first = Case("first", conversation("Tell me a story about a cat.", 0))
    run(engine, sink, "first", first, kit)
    ids_first, _ = kit.engine_inputs(first)
    assert cache.allocator.used_blocks == cache.blocks_for(len(ids_first) + MAX_NEW - 1)  # the entry's
    long = Case("long", conversation("Write a poem about the sea.", 0))
    ids, mm = kit.engine_inputs(long)
    new = 40
    match = engine.prefix_cache.lookup(ids, ())
    shared = match.length // cache.block_size if match else 0
    # Leave one block too few for what "long" will write: it must take one of the entry's.
    spare = cache.allocator.allocate(
        cache.allocator.free_blocks - (cache.blocks_for(len(ids) + new) - shared - 1)
    )
    engine.add_request("long", ids, SamplingParams(max_tokens=new, temperature=0.0), sink, mm)
    while not sink.finished("long"):
        engine.step()
    assert sink.tokens("long") == kit.reference_tokens(long, new)
    # The entry gave its tail back, or went (what is left of a long prompt's entry may still hold it).
    kept = [e for e in engine.prefix_cache.entries if e.tokens[: len(ids_first)] == ids_first]
    assert all(len(e.tokens) < len(ids_first) + MAX_NEW - 1 for e in kept)
    assert engine.stats.preemptions == 0
    engine.prefix_cache.clear()
    assert cache.allocator.used_blocks == len(spare)  # nothing else held


def test_an_entry_cut_short_by_memory_pressure_still_serves_its_prefix(family_kit):
    """A request needing two blocks more than are free takes them from the tail of the least recently
    used entry, a finished conversation: the conversation's next turn then starts from what is left
    of it (fewer cached tokens than the full entry, more than none) and gets generate()'s tokens."""
    kit = family_kit("qwen2_5_vl")
    engine = LLMEngine(
        kit.hf_model, kit.tokenizer, EngineConfig(max_model_len=512, max_num_seqs=2), kit.family
    )
    cache = engine.runner.cache
    sink = Collector()
    story = "Tell me a long story about " + " ".join(f"cat{i}" for i in range(40)) + "."
    first = Case("first", conversation(story, 0))
    run(engine, sink, "first", first, kit)
    (entry,) = engine.prefix_cache.entries
    held = len(entry.tokens)
    other = Case("other", conversation("Write a poem about the sea.", 0))
    ids, mm = kit.engine_inputs(other)
    new = 40
    spare = cache.allocator.allocate(cache.allocator.free_blocks - (cache.blocks_for(len(ids) + new) - 2))
    engine.add_request("other", ids, SamplingParams(max_tokens=new, temperature=0.0), sink, mm)
    while not sink.finished("other"):
        engine.step()
    assert sink.tokens("other") == kit.reference_tokens(other, new)
    assert engine.prefix_cache.holds(entry) and held - 2 * cache.block_size <= len(entry.tokens) < held
    assert engine.stats.preemptions == 0
    cache.allocator.release(spare)
    answer = kit.tokenizer.decode(sink.tokens("first"), skip_special_tokens=True)
    later = Case("later", first.messages + [
        {"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}
    ])  # fmt: skip
    tokens = run(engine, sink, "later", later, kit)
    assert tokens == kit.reference_tokens(later, MAX_NEW)
    assert 0 < cached(sink, "later") <= len(entry.tokens) < held


def test_engine_config_defaults_by_device():
    from tritonvlm.engine.engine_config import engine_config

    gpu, cpu = engine_config({}, "cuda"), engine_config({"max_num_seqs": ""}, "cpu")
    assert (gpu.max_num_seqs, gpu.kv_cache_memory, gpu.cuda_graphs, gpu.prefix_cache_slots) == (
        256,
        "0.6",
        True,
        1024,
    )
    assert (cpu.max_num_seqs, cpu.kv_cache_memory, cpu.prefix_cache_slots) == (16, "", 256)
    given = engine_config({"max_num_seqs": "8", "kv_cache_memory": "2GiB", "cuda_graphs": "false"}, "cuda")
    assert (given.max_num_seqs, given.kv_cache_memory, given.cuda_graphs) == (8, "2GiB", False)
    assert engine_config({"prefix_cache_slots": "0"}, "cpu").prefix_cache_slots == 0
    assert (gpu.decode_attention, gpu.fused_ops) == ("auto", "auto")
    kernels = engine_config({"decode_attention": " Gather ", "fused_ops": "FALSE"}, "cuda")
    assert (kernels.decode_attention, kernels.fused_ops) == ("gather", "false")


def test_serve_hands_the_kernel_settings_to_the_triton_models():
    from tritonvlm import cli

    args = cli.build_parser().parse_args(["serve", "--decode-attention", "gather", "--fused-ops", "false"])
    env = cli.triton_env(args, "some/model")
    assert env["TRITONVLM_DECODE_ATTENTION"] == "gather" and env["TRITONVLM_FUSED_OPS"] == "false"
    defaults = cli.triton_env(cli.build_parser().parse_args(["serve"]), "some/model")
    assert "TRITONVLM_DECODE_ATTENTION" not in defaults  # the model's own default (auto)


def test_a_given_image_digest_replaces_hashing_the_embeddings(family_kit, monkeypatch):
    """The server passes the image cache's key of the encoder input: the engine then hashes nothing,
    and equal keys still match through the image."""
    kit = family_kit("qwen2_5_vl")
    import tritonvlm.engine.llm_engine as llm_engine

    def no_hashing(mm):
        raise AssertionError("the embeddings were hashed although a digest was given")

    monkeypatch.setattr(llm_engine, "tensors_digest", no_hashing)
    engine = LLMEngine(kit.hf_model, kit.tokenizer, EngineConfig(max_model_len=1024), kit.family)
    sink = Collector()
    first, again = same_image_questions()
    for case in (first, again):
        ids, mm = kit.engine_inputs(case)
        params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
        engine.add_request(case.name, ids, params, sink, mm, mm_digest=b"key of image A")
        while not sink.finished(case.name):
            engine.step()
        assert sink.tokens(case.name) == kit.reference_tokens(case, MAX_NEW)
    ids, _ = kit.engine_inputs(again)
    assert cached(sink, "again") > ids.index(kit.family.image_token_id)


def test_a_request_that_must_wait_anyway_leaves_the_cache_alone(family_kit):
    """Entries give their blocks back only where that makes room: while a long request waits for one
    that runs, the finished conversations stay cached; once it can run, it gets generate()'s tokens."""
    kit = family_kit("qwen2_5_vl")
    budget = one_sequence_budget(kit.family)  # the blocks of one 512-token sequence
    config = EngineConfig(max_model_len=512, max_num_seqs=4, kv_cache_memory=str(budget))
    engine = LLMEngine(kit.hf_model, kit.tokenizer, config, kit.family)
    allocator = engine.runner.cache.allocator
    sink = Collector()

    def run(name: str, text: str, max_tokens: int) -> None:
        ids, mm = kit.engine_inputs(Case(name, conversation(text, 0)))
        engine.add_request(name, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0), sink, mm)

    for n in range(3):
        run(f"short{n}", f"Short question number {n}?", 4)
        while not sink.finished(f"short{n}"):
            engine.step()
    cached = {id(e) for e in engine.prefix_cache.entries}
    assert len(cached) == 3 and allocator.cache_only_blocks > 0
    run("first", "Tell me about " + " ".join(f"topic{i}" for i in range(60)), 40)  # ~320 + 40 tokens
    engine.step()
    second = "Compare " + " ".join(f"item{i}" for i in range(60))
    run("second", second, MAX_NEW)  # ~320 tokens: no room until "first" is done, cache or no cache
    for _ in range(5):
        engine.step()
    assert "second" not in sink.outputs and not sink.finished("first")
    assert cached <= {id(e) for e in engine.prefix_cache.entries}, "entries evicted for a request that waits"
    while not sink.finished("second"):
        engine.step()
    assert sink.tokens("second") == kit.reference_tokens(Case("second", conversation(second, 0)), MAX_NEW)
