"""The image-embedding cache (tritonvlm.serving.image_cache): LRU by bytes, eviction, off at 0, thread
safety and one encoder call per new input; admission through it; its metrics and its serve flag."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import make_image
from family_harness import FAMILIES, Case, conversation
from test_engine import Collector
from test_serving import fake_models

from tritonvlm import wire
from tritonvlm.batch.launch import TritonOptions
from tritonvlm.cli import build_parser, triton_env
from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams
from tritonvlm.engine.engine_stats import EngineStats
from tritonvlm.preprocessing import ChatPreprocessor
from tritonvlm.serving.admission import StageError, model_inputs
from tritonvlm.serving.engine_metrics import EngineMetrics
from tritonvlm.serving.image_cache import ImageCache, content_key, images_key, parse_cache_memory
from tritonvlm.serving.preprocess_io import preprocess_outputs
from tritonvlm.wire import InvalidRequestError

KB = 1000


def tensors(nbytes: int, fill: float = 1.0) -> dict[str, np.ndarray]:
    """An encoder output of exactly ``nbytes`` bytes (float32)."""
    return {"image_embeds": np.full(nbytes // 4, fill, dtype=np.float32)}


def counting(value: dict[str, np.ndarray], calls: list[int]):
    def compute() -> dict[str, np.ndarray]:
        calls.append(1)
        return value

    return compute


# ---- configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1GiB", 2**30),
        ("512MB", 512 * 10**6),
        ("1e6", 10**6),
        ("2048", 2048),
        ("0.25", 250),
        (" 4 kib ", 4096),
    ],
)
def test_cache_memory_parses_sizes_and_fractions(text: str, expected: int) -> None:
    assert parse_cache_memory(text, available_bytes=1000) == expected


@pytest.mark.parametrize("bad", ["", "lots", "-1GiB", "-5", "nan", "inf"])
def test_cache_memory_refuses_nonsense(bad: str) -> None:
    with pytest.raises(ValueError, match="image_cache_memory"):
        parse_cache_memory(bad, available_bytes=1000)


def test_serve_flag_reaches_the_vlm_model(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "--image-cache-memory", "256MiB"])
    assert triton_env(args, "m")["TRITONVLM_IMAGE_CACHE_MEMORY"] == "256MiB"
    assert "TRITONVLM_IMAGE_CACHE_MEMORY" not in triton_env(parser.parse_args(["serve"]), "m")
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--image-cache-memory", "big"])
    assert "--image-cache-memory" in capsys.readouterr().err


def test_run_batch_and_the_offline_engine_pass_the_setting_on() -> None:
    """run-batch shares serve's flags and starts Triton from TritonOptions, which triton_env reads."""
    args = build_parser().parse_args(["run-batch", "-i", "in", "-o", "out", "--image-cache-memory", "0"])
    assert args.image_cache_memory == "0"
    assert triton_env(TritonOptions(model="m"), "m").get("TRITONVLM_IMAGE_CACHE_MEMORY") is None
    options = TritonOptions(model="m", image_cache_memory=args.image_cache_memory)
    assert triton_env(options, "m")["TRITONVLM_IMAGE_CACHE_MEMORY"] == "0"


# ---- the cache -----------------------------------------------------------------------------------------


def test_a_repeated_key_skips_the_computation_and_shares_read_only_arrays() -> None:
    cache, calls = ImageCache(10 * KB), []
    first = cache.get_or_compute(b"a", counting(tensors(KB), calls))
    again = cache.get_or_compute(b"a", counting(tensors(KB, fill=9.0), calls))
    assert len(calls) == 1 and again is first and again["image_embeds"][0] == 1.0
    assert not again["image_embeds"].flags.writeable
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes_held) == (1, 1, 1, KB)


def test_lru_eviction_by_bytes() -> None:
    cache, calls = ImageCache(3 * KB), []
    for key in (b"a", b"b", b"c"):
        cache.get_or_compute(key, counting(tensors(KB), calls))
    cache.get_or_compute(b"a", counting(tensors(KB), calls))  # a is now the most recent
    cache.get_or_compute(b"d", counting(tensors(2 * KB), calls))  # needs 2 KB: b and c go, a stays
    stats = cache.stats()
    assert (stats.evictions, stats.entries, stats.bytes_held) == (2, 2, 3 * KB)
    calls.clear()
    cache.get_or_compute(b"a", counting(tensors(KB), calls))
    cache.get_or_compute(b"d", counting(tensors(2 * KB), calls))
    assert calls == []
    cache.get_or_compute(b"b", counting(tensors(KB), calls))  # evicted: computed again
    assert calls == [1]


def test_an_entry_over_the_capacity_is_returned_but_not_kept() -> None:
    cache, calls = ImageCache(KB), []
    cache.get_or_compute(b"small", counting(tensors(KB), calls))
    big = cache.get_or_compute(b"big", counting(tensors(2 * KB), calls))
    assert big["image_embeds"].nbytes == 2 * KB
    stats = cache.stats()
    assert (stats.entries, stats.bytes_held, stats.evictions) == (1, KB, 0)  # the small one stays
    cache.get_or_compute(b"big", counting(tensors(2 * KB), calls))
    assert len(calls) == 3


def test_capacity_zero_turns_the_cache_off() -> None:
    cache, calls = ImageCache(0), []
    assert not cache.enabled
    for _ in range(3):
        cache.get_or_compute(b"a", counting(tensors(KB), calls))
    stats = cache.stats()
    assert len(calls) == 3 and (stats.hits, stats.entries, stats.bytes_held) == (0, 0, 0)
    with pytest.raises(ValueError):
        ImageCache(-1)


def test_concurrent_requests_for_one_new_input_compute_it_once() -> None:
    cache, calls = ImageCache(10 * KB), []
    release = threading.Event()

    def slow() -> dict[str, np.ndarray]:
        calls.append(1)
        release.wait(5)
        return tensors(KB)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(cache.get_or_compute, b"same", slow) for _ in range(8)]
        time.sleep(0.2)  # every thread is now in the cache: one computing, seven waiting
        release.set()
        results = [f.result(5) for f in futures]
    assert len(calls) == 1 and all(r is results[0] for r in results)
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (7, 1)


def test_a_failed_computation_reaches_its_caller_and_waiters_try_again() -> None:
    cache = ImageCache(10 * KB)
    started, release = threading.Event(), threading.Event()

    def failing() -> dict[str, np.ndarray]:
        started.set()
        release.wait(5)
        raise RuntimeError("encoder down")

    with ThreadPoolExecutor(2) as pool:
        leader = pool.submit(cache.get_or_compute, b"k", failing)
        assert started.wait(5)
        waiter = pool.submit(cache.get_or_compute, b"k", lambda: tensors(KB, fill=3.0))
        time.sleep(0.1)
        release.set()
        with pytest.raises(RuntimeError, match="encoder down"):
            leader.result(5)
        assert waiter.result(5)["image_embeds"][0] == 3.0
    assert cache.stats().entries == 1


def test_each_image_is_looked_up_and_only_the_missing_ones_computed_in_one_call() -> None:
    cache = ImageCache(10 * KB)
    calls: list[list[int]] = []

    def compute(indices: list[int]) -> list[dict[str, np.ndarray]]:
        calls.append(indices)
        return [tensors(KB, fill=float(i)) for i in indices]

    first = cache.get_or_compute_each([b"a", b"b"], compute)
    assert calls == [[0, 1]] and [v["image_embeds"][0] for v in first] == [0.0, 1.0]
    calls.clear()
    # b held, c new and given twice (computed once), a held
    again = cache.get_or_compute_each([b"b", b"c", b"a", b"c"], lambda idx: compute(idx))
    assert calls == [[1]]
    assert again[0] is first[1] and again[2] is first[0] and again[1] is again[3]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (3, 3, 3)
    with pytest.raises(ValueError):
        again[1]["image_embeds"][0] = 5.0  # shared: read-only
    off = ImageCache(0)
    assert len(off.get_or_compute_each([b"a", b"a"], compute)) == 2 and calls[-1] == [0, 1]


def test_images_in_flight_for_another_request_are_waited_for_and_failures_retried() -> None:
    cache = ImageCache(10 * KB)
    started, release = threading.Event(), threading.Event()
    computed: list[list[int]] = []

    def slow_then_fail(indices: list[int]) -> list[dict[str, np.ndarray]]:
        started.set()
        release.wait(5)
        raise RuntimeError("encoder down")

    def works(indices: list[int]) -> list[dict[str, np.ndarray]]:
        computed.append(indices)
        return [tensors(KB, fill=7.0) for _ in indices]

    with ThreadPoolExecutor(2) as pool:
        leader = pool.submit(cache.get_or_compute_each, [b"x"], slow_then_fail)
        assert started.wait(5)
        waiter = pool.submit(cache.get_or_compute_each, [b"y", b"x"], works)
        deadline = time.monotonic() + 10
        while not computed and time.monotonic() < deadline:  # (its lookups come before computing)
            time.sleep(0.01)
        assert computed == [[0]]  # y computed at once; x waits for the leader's call
        release.set()
        with pytest.raises(RuntimeError, match="encoder down"):
            leader.result(5)
        assert [v["image_embeds"][0] for v in waiter.result(5)] == [7.0, 7.0]
    assert computed == [[0], [1]]  # x again, by the waiter, after the leader's call failed
    assert cache.stats().entries == 2


def test_many_threads_keep_the_bound_and_the_counts() -> None:
    # Five keys of 1-3 KB in 8 KB: entries are evicted, and held ones are found again. (With 23 keys
    # cycling in order, a hit needed two lookups of one key in flight at once: on a slow machine
    # there were none, and the test failed on timing alone.)
    cache = ImageCache(8 * KB)
    lookups, computed, keys = 2000, [], 5
    lock = threading.Lock()

    def look(i: int) -> None:
        key = b"k%d" % (i % keys)

        def compute() -> dict[str, np.ndarray]:
            with lock:
                computed.append(key)
            return tensors(KB * (1 + i % 3), fill=float(i % keys))

        value = cache.get_or_compute(key, compute)
        assert value["image_embeds"][0] == float(i % keys)  # never another key's tensors
        assert cache.stats().bytes_held <= 8 * KB

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(look, range(lookups)))
    stats = cache.stats()
    assert stats.hits + stats.misses == lookups and stats.misses == len(computed)
    assert stats.hits > 0 and stats.evictions > 0
    assert stats.bytes_held <= 8 * KB and stats.entries == len(cache._entries)
    assert stats.bytes_held == sum(size for _, size in cache._entries.values())


# ---- admission -----------------------------------------------------------------------------------------


def image_request() -> dict[str, np.ndarray]:
    return {wire.MESSAGES: np.array([b"[]"], dtype=object), wire.IMAGES: np.array([b"png"], dtype=object)}


def test_admission_encodes_a_repeated_image_once() -> None:
    cache, calls = ImageCache(10**6), []
    pixels = np.arange(6, dtype=np.float32).reshape(2, 3)
    first_ids, first, first_key = model_inputs(
        image_request(), fake_models({"pixel_values": pixels}, calls), cache
    )
    ids, again, key = model_inputs(image_request(), fake_models({"pixel_values": pixels}, calls), cache)
    assert calls == [wire.PREPROCESS_MODEL, wire.VISION_ENCODER_MODEL, wire.PREPROCESS_MODEL]
    assert ids == first_ids and key == first_key is not None  # the prefix cache's digest of the images
    np.testing.assert_array_equal(again["image_embeds"], pixels * 2)
    calls.clear()
    _, _, other_key = model_inputs(image_request(), fake_models({"pixel_values": pixels + 1}, calls), cache)
    assert other_key != key
    assert calls == [wire.PREPROCESS_MODEL, wire.VISION_ENCODER_MODEL]
    assert (cache.stats().hits, cache.stats().misses) == (1, 2)


def test_admission_key_is_the_whole_encoder_input() -> None:
    """Two inputs with the same pixels but another grid (or any other tensor) are different keys."""
    pixels = np.ones((2, 3), dtype=np.float32)
    a = wire.pack_tensors({"pixel_values": pixels, "image_grid_thw": np.array([[1, 1, 2]])})
    b = wire.pack_tensors({"pixel_values": pixels, "image_grid_thw": np.array([[1, 2, 1]])})
    assert content_key(a) != content_key(b)
    assert content_key(a) == content_key(bytes(a))


@pytest.mark.parametrize("cache", [None, ImageCache(0)])
def test_admission_without_a_cache_encodes_every_time(cache: ImageCache | None) -> None:
    calls: list[str] = []
    pixels = np.ones((2, 3), dtype=np.float32)
    for _ in range(2):
        model_inputs(image_request(), fake_models({"pixel_values": pixels}, calls), cache)
    assert calls.count(wire.VISION_ENCODER_MODEL) == 2


def real_models(kit, preprocessor: ChatPreprocessor, calls: list[str]):
    """preprocess and vision_encoder as their Triton models run them (packed tensors in and out), on a
    family's tiny test model."""

    def call(name: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        calls.append(name)
        if name == wire.PREPROCESS_MODEL:
            calls.append(wire.CACHED_LAYOUT if wire.CACHED_LAYOUT in inputs else wire.IMAGES)
            return {k: v for k, v in preprocess_outputs(preprocessor, inputs).items() if k in outputs}
        unpacked = wire.unpack_tensors(inputs[wire.MM_INPUTS])
        result = kit.family.encode(kit.hf_model, [{k: torch.from_numpy(v) for k, v in unpacked.items()}])[0]
        embeds = {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in result.items()}
        return {wire.MM_EMBEDS: wire.pack_array(embeds)[None]}

    return call


# A family whose images are looked up one by one, and one whose images are looked up as a set.
BOTH_PATHS = ("qwen2_5_vl", "llava_onevision")


def refusing_layouts(real, calls: list[str]):
    """``real`` models, but `preprocess` fails (an internal error) on CACHED_LAYOUT, as a processor the
    layout replay does not suit would."""

    def call(name: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        if wire.CACHED_LAYOUT in inputs:
            calls.append("failed")
            raise StageError("preprocess failed: this processor reads pixel values")
        return real(name, inputs, outputs)

    return call


def as_triton(real):
    """``real`` models whose client errors come back as Triton sends them: a StageError in the wire shape."""

    def call(name: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        try:
            return real(name, inputs, outputs)
        except InvalidRequestError as exc:
            raise StageError(exc.to_wire()) from exc

    return call


def chat(messages: list[dict], images: list[bytes]) -> dict[str, np.ndarray]:
    return {
        wire.MESSAGES: np.array([json.dumps(messages).encode()], dtype=object),
        wire.IMAGES: np.array(images, dtype=object),
    }


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_hits_on_a_repeated_image(name: str, family_kit) -> None:
    """The key is each family's real encoder input: the same image through another preprocess instance
    hits and gives the very tensors the encoder made, and, sent as the same file, is neither decoded
    nor processed again (preprocess gets its layout); a later turn re-sending it hits too (Mllama's
    encoder input also holds the prompt's cross-attention mask: the key leaves it out and the request
    gets its own), and its image digests for the prefix cache are the first turn's (with the image
    cache off too); the same pixels in another file hit the encoder's entry after preprocessing;
    another image misses."""
    kit = family_kit(name)
    cache, calls = ImageCache(10**8), []
    own = kit.family.prompt_mm_tensors
    image = make_image(64, 48, "red")
    turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}
    first_ids, first, first_key = model_inputs(
        chat([turn], [image]), real_models(kit, kit.preprocessor, calls), cache, kit.family
    )
    assert calls == [wire.PREPROCESS_MODEL, wire.IMAGES, wire.VISION_ENCODER_MODEL] and first

    other_instance = ChatPreprocessor(kit.family, kit.family_cls.load_processor(str(kit.model_dir)))
    calls.clear()
    ids, again, key = model_inputs(
        chat([turn], [image]), real_models(kit, other_instance, calls), cache, kit.family
    )
    assert calls == [wire.PREPROCESS_MODEL, wire.CACHED_LAYOUT]  # no image decoded, processed, encoded
    assert ids == first_ids and key == first_key  # the prefix cache sees the same images
    assert again.keys() == first.keys()
    for key in first:
        np.testing.assert_array_equal(again[key], first[key])

    later = [turn, {"role": "assistant", "content": "A red circle."}, {"role": "user", "content": "Sure?"}]
    calls.clear()
    later_ids, later_mm, later_key = model_inputs(
        chat(later, [image]), real_models(kit, kit.preprocessor, calls), cache, kit.family
    )
    assert calls == [wire.PREPROCESS_MODEL, wire.CACHED_LAYOUT]
    assert later_key == first_key  # the prefix cache's match runs past the image into the later turn
    uncached = [
        model_inputs(chat(turns, [image]), real_models(kit, kit.preprocessor, []), None, kit.family)[2]
        for turns in ([turn], later)
    ]
    assert uncached[0] == uncached[1]  # (the image cache off: the same)
    assert later_mm.keys() == first.keys()
    fresh = kit.preprocessor(later, [image])  # what the later turn's own preprocess makes
    assert later_ids == fresh.input_ids.tolist()
    for key in first:
        if key in own:  # the request's own prompt tensors (the cached ones are the first turn's)
            assert len(later_ids) > len(first_ids) and later_mm[key].shape[0] == len(later_ids)
            np.testing.assert_array_equal(later_mm[key], fresh.mm[key])
        else:
            np.testing.assert_array_equal(later_mm[key], first[key])

    calls.clear()
    same_pixels = make_image(64, 48, "red", fmt="BMP")
    model_inputs(chat([turn], [same_pixels]), real_models(kit, kit.preprocessor, calls), cache, kit.family)
    assert calls == [wire.PREPROCESS_MODEL, wire.IMAGES]  # processed, but not encoded again
    assert cache.stats().preprocess_skips == 2

    model_inputs(
        chat([turn], [make_image(64, 48, "blue")]),
        real_models(kit, kit.preprocessor, calls),
        cache,
        kit.family,
    )
    assert calls.count(wire.VISION_ENCODER_MODEL) == 1


class Talk:
    """Requests through admission (the real preprocess and encoder, an image cache) into an engine,
    each checked against generate(); what the encoder got (its input split per image) and how many
    image files preprocess got, call by call."""

    def __init__(self, kit, max_model_len: int) -> None:
        self.kit, self.cache = kit, ImageCache(10**8)
        self.encoded: list[list] = []
        self.files: list[int] = []
        self.real = real_models(kit, kit.preprocessor, [])
        config = EngineConfig(max_model_len=max_model_len)
        self.engine = LLMEngine(kit.hf_model, kit.tokenizer, config, kit.family)
        self.sink = Collector()

    def models(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        if model == wire.VISION_ENCODER_MODEL:
            tensors = wire.unpack_tensors(inputs[wire.MM_INPUTS])
            self.encoded.append(self.kit.family.split_images(tensors) or [tensors])
        else:
            self.files.append(sum(1 for data in inputs.get(wire.IMAGES, []) if len(data)))
        return self.real(model, inputs, outputs)

    def ask(self, rid: str, messages: list[dict], images: list[bytes]) -> tuple[list[int], dict, list]:
        """``(ids, tensors, image digests)`` of one request, run in the engine to its end."""
        kit, sink = self.kit, self.sink
        ids, mm, digests = model_inputs(chat(messages, images), self.models, self.cache, kit.family)
        tensors = {k: torch.from_numpy(np.array(v)) for k, v in mm.items()}
        params = SamplingParams(max_tokens=8, temperature=0.0)
        self.engine.add_request(rid, ids, params, sink, tensors, None, None, digests)
        while not sink.finished(rid):
            self.engine.step()
        assert sink.tokens(rid) == kit.reference_tokens(Case(rid, messages, images), 8), rid
        return ids, mm, digests


@pytest.mark.parametrize("name", FAMILIES)
def test_a_later_turn_adding_an_image_encodes_it_alone_and_reuses_the_prefix(name: str, family_kit) -> None:
    """Turn 2 re-sends image A with the first answer and adds image B: only B's file is decoded and
    processed (A's layout is replayed) and only B is encoded (A's entry is its own), the joined
    embeddings are bit for bit those of encoding both at once, and the engine, given each image's
    digest, starts turn 2 from turn 1's keys/values past A (one digest for the set would stop at A's
    first placeholder) and answers what generate() answers. Sent again, neither file is processed."""
    kit = family_kit(name)
    if not kit.family.per_image_preprocessing:
        pytest.skip("this family keeps a request's images as one cache entry")
    talk = Talk(kit, max_model_len=1024)
    encoded, files, sink, cache = talk.encoded, talk.files, talk.sink, talk.cache
    a, b = make_image(64, 48, "red"), make_image(56, 84, "blue", "square")
    first = conversation("What is in this image?", 1)

    first_ids, _, first_digests = talk.ask("turn 1", first, [a])
    second = first + [
        {"role": "assistant", "content": [{"type": "text", "text": sink.text("turn 1")}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
    ]
    encoded.clear()
    files.clear()
    ids, _, digests = talk.ask("turn 2", second, [a, b])
    (only,) = encoded  # one encoder call, for B alone
    (b_input,) = only
    assert files == [1]  # A came as its layout
    whole = kit.engine_inputs(Case("both", second, [a, b]))[1]
    _, joined, again = model_inputs(chat(second, [a, b]), talk.models, cache, kit.family)
    assert files == [1, 0] and len(encoded) == 1 and again == digests
    for key, tensor in whole.items():
        np.testing.assert_array_equal(
            joined[key], tensor.float().numpy() if tensor.is_floating_point() else tensor
        )
    assert digests[0] == first_digests[0] and digests[1][1] != digests[0][1]
    assert digests[1][0] == kit.family.image_tokens(b_input)
    assert ids[: len(first_ids)] == first_ids
    if kit.family.supports_prefix_cache:
        image_a = ids.index(kit.family.image_token_id)
        assert sink.outputs["turn 2"][-1].cached_tokens >= len(first_ids) - 1 > image_a


@pytest.mark.parametrize("name", FAMILIES)
def test_images_processed_together_are_still_encoded_and_matched_one_by_one(name: str, family_kit) -> None:
    """Families whose processor must see a request's images together (LLaVA-OneVision tiles an image
    alone in its prompt, not one among others) still keep each image of a multi-image prompt as its own
    entry: turn 2 re-sends A and B and adds C; every file is processed again, but only C is encoded,
    the embeddings are bit for bit those of encoding all three at once, and turn 2 starts from turn 1's
    keys/values up to C, with generate()'s answer."""
    kit = family_kit(name)
    limit = kit.family.max_images_per_prompt
    two = conversation("Compare these.", 2)
    a, b, c = make_image(64, 48, "red"), make_image(56, 84, "blue", "square"), make_image(48, 48, "green")
    if kit.family.per_image_preprocessing or (limit is not None and limit < 3):
        pytest.skip("not a family that processes images together but encodes them one by one")
    assert kit.family.split_images(kit.preprocessor(two, [a, b]).mm) is not None
    talk = Talk(kit, max_model_len=2048)
    encoded, sink, ask = talk.encoded, talk.sink, talk.ask

    first_ids, _, first_digests = ask("turn 1", two, [a, b])
    second = two + [
        {"role": "assistant", "content": [{"type": "text", "text": sink.text("turn 1")}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
    ]
    encoded.clear()
    ids, joined, digests = ask("turn 2", second, [a, b, c])
    assert [len(parts) for parts in encoded] == [1]  # one encoder call, for C alone
    whole = kit.engine_inputs(Case("all", second, [a, b, c]))[1]
    for key, tensor in whole.items():
        np.testing.assert_array_equal(joined[key], tensor.float().numpy())
    assert digests[:2] == first_digests and len(digests) == 3
    if kit.family.supports_prefix_cache:
        assert sink.outputs["turn 2"][-1].cached_tokens >= len(first_ids) - 1


@pytest.mark.parametrize("name", BOTH_PATHS)
def test_image_files_of_an_evicted_entry_are_processed_again(name: str, family_kit) -> None:
    """The way from image files to an entry goes with the entry: the files are then preprocessed and
    encoded again, and the request gets the same ids and tensors."""
    kit = family_kit(name)
    calls: list[str] = []
    models = real_models(kit, kit.preprocessor, calls)
    turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}
    red, blue = make_image(64, 48, "red"), make_image(64, 48, "blue")
    ids, first, _ = model_inputs(chat([turn], [red]), models, ImageCache(10**8), kit.family)
    size = sum(v.nbytes for v in first.values())
    cache = ImageCache(size)  # room for one entry
    model_inputs(chat([turn], [red]), models, cache, kit.family)
    model_inputs(chat([turn], [blue]), models, cache, kit.family)  # evicts red's entry
    calls.clear()
    again_ids, again, _ = model_inputs(chat([turn], [red]), models, cache, kit.family)
    assert calls == [wire.PREPROCESS_MODEL, wire.IMAGES, wire.VISION_ENCODER_MODEL]
    assert again_ids == ids
    for key in first:
        np.testing.assert_array_equal(again[key], first[key])
    assert cache.stats().preprocess_skips == 0


@pytest.mark.parametrize("name", BOTH_PATHS)
def test_a_preprocess_that_cannot_replay_layouts_falls_back_to_the_images(name: str, family_kit) -> None:
    """A processor the layout replay does not suit (an internal error on CACHED_LAYOUT): the request
    is served from its images, and later ones do not try the layout again; a client error found on the
    layout path still reaches the client."""
    kit = family_kit(name)
    calls: list[str] = []
    real = real_models(kit, kit.preprocessor, calls)

    failing_layouts = refusing_layouts(real, calls)

    cache = ImageCache(10**8)
    turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}
    image = make_image(64, 48)
    ids, first, _ = model_inputs(chat([turn], [image]), failing_layouts, cache, kit.family)
    calls.clear()
    again_ids, again, _ = model_inputs(chat([turn], [image]), failing_layouts, cache, kit.family)
    assert calls == ["failed", wire.PREPROCESS_MODEL, wire.IMAGES]  # from the images; encoder: a hit
    assert again_ids == ids and all(np.array_equal(again[k], first[k]) for k in first)
    stats = cache.stats()  # one hit (the encoder's), not two: the files' lookup was not used
    assert (stats.hits, stats.misses, stats.preprocess_skips) == (1, 1, 0)
    calls.clear()
    model_inputs(chat([turn], [image]), failing_layouts, cache, kit.family)
    assert calls == [wire.PREPROCESS_MODEL, wire.IMAGES]  # the layout is not tried again
    assert (cache.stats().hits, cache.stats().preprocess_skips) == (2, 0)

    triton = as_triton(real)

    other = ImageCache(10**8)
    model_inputs(chat([turn], [image]), triton, other, kit.family)
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}]
    with pytest.raises(StageError, match="2 image parts but 1"):
        model_inputs(chat(two, [image]), triton, other, kit.family)
    assert other.lookup_files(images_key(np.array([image], dtype=object))) is not None  # still on


def test_a_refused_mixed_layout_falls_back_to_all_the_images(family_kit) -> None:
    """Per-image families: image A seen, then A and a new B, where preprocess refuses the layouts (an
    internal error): the request is served from both files, B alone is encoded (A's embeddings are
    found by its encoder input), and its ids and tensors are those of the full path."""
    kit = family_kit("qwen2_5_vl")
    calls: list[str] = []
    real = real_models(kit, kit.preprocessor, calls)

    failing_layouts = refusing_layouts(real, calls)

    cache = ImageCache(10**8)
    a, b = make_image(64, 48, "red"), make_image(56, 84, "blue", "square")
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}]
    model_inputs(chat(one, [a]), failing_layouts, cache, kit.family)
    calls.clear()
    ids, mm, _ = model_inputs(chat(two, [a, b]), failing_layouts, cache, kit.family)
    assert calls == ["failed", wire.PREPROCESS_MODEL, wire.IMAGES, wire.VISION_ENCODER_MODEL]
    assert cache.stats().misses == 2  # A, then B alone
    full_ids, full, _ = model_inputs(chat(two, [a, b]), real, ImageCache(0), kit.family)
    assert ids == full_ids and mm.keys() == full.keys()
    for key in full:
        np.testing.assert_array_equal(mm[key], full[key])


def test_a_bad_new_image_beside_a_known_one_is_the_clients_error_alone(family_kit) -> None:
    """A known image (its layout replayed) beside a new file that cannot be decoded: the client gets
    preprocess's 400, and layouts stay in use for the next requests (a client's bad file must not
    turn them off for everyone)."""
    kit = family_kit("qwen2_5_vl")
    calls: list[str] = []
    real = real_models(kit, kit.preprocessor, calls)

    triton = as_triton(real)

    cache = ImageCache(10**8)
    a = make_image(64, 48, "red")
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}]
    model_inputs(chat(one, [a]), triton, cache, kit.family)
    with pytest.raises(StageError, match="image 1 could not be decoded"):
        model_inputs(chat(two, [a, b"not an image"]), triton, cache, kit.family)
    calls.clear()
    model_inputs(chat(one, [a]), triton, cache, kit.family)
    assert calls == [wire.PREPROCESS_MODEL, wire.CACHED_LAYOUT]  # still replayed from its layout


@pytest.mark.parametrize("name", BOTH_PATHS)
def test_image_files_are_not_remembered_with_the_cache_off(name: str, family_kit) -> None:
    kit = family_kit(name)
    calls: list[str] = []
    cache = ImageCache(0)
    turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}
    for _ in range(2):
        model_inputs(
            chat([turn], [make_image(64, 48)]), real_models(kit, kit.preprocessor, calls), cache, kit.family
        )
    assert calls.count(wire.IMAGES) == 2 and calls.count(wire.VISION_ENCODER_MODEL) == 2


# ---- metrics -------------------------------------------------------------------------------------------


class FakeMetric:
    def __init__(self, labels: dict[str, str]) -> None:
        self.labels, self.value, self.calls = labels, 0.0, 0

    def set(self, value: float) -> None:
        self.value = value
        self.calls += 1

    def increment(self, value: float) -> None:
        assert value > 0
        self.value += value

    def observe(self, value: float) -> None:
        pass


class FakeFamily:
    GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"
    created: dict[str, FakeFamily] = {}

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.metrics: list[FakeMetric] = []
        FakeFamily.created[name] = self

    def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> FakeMetric:  # noqa: N802
        self.metrics.append(FakeMetric(labels))
        return self.metrics[-1]


class FakePbUtils:
    MetricFamily = FakeFamily


def value(name: str, **labels: str) -> float:
    return next(m.value for m in FakeFamily.created[name].metrics if m.labels == {"model": "vlm", **labels})


def test_image_cache_metrics_follow_the_cache() -> None:
    cache = ImageCache(2 * KB)
    metrics = EngineMetrics(FakePbUtils, model="vlm", image_cache=cache)
    for key in (b"a", b"a", b"b", b"c"):
        cache.get_or_compute(key, lambda: tensors(KB))
    metrics.update(EngineStats(), force=True)
    assert value("tritonvlm_image_cache_hits_total") == 1
    assert value("tritonvlm_image_cache_misses_total") == 3
    assert value("tritonvlm_image_cache_evictions_total") == 1
    assert value("tritonvlm_image_cache_bytes", state="used") == 2 * KB
    assert value("tritonvlm_image_cache_bytes", state="capacity") == 2 * KB
    assert value("tritonvlm_image_cache_entries") == 2
    cache.get_or_compute(b"c", lambda: tensors(KB))
    cache.remember_files(b"files of c", [b"c"], b"layout")
    assert cache.lookup_files(b"files of c") is not None
    metrics.update(EngineStats(), force=True)
    metrics.update(EngineStats(), force=True)  # counters advance by the gain only
    assert value("tritonvlm_image_cache_hits_total") == 3
    assert value("tritonvlm_image_cache_preprocess_skips_total") == 1


def test_engine_metrics_publish_only_changes_and_sum_responses() -> None:
    """Each metric update is an IPC round trip holding the GIL: an unchanged gauge is not set again,
    and sent responses add up in two counters instead of one histogram sample each."""
    metrics = EngineMetrics(FakePbUtils, model="vlm")
    stats = EngineStats(num_running=3, kv_bytes_capacity=1000)
    metrics.update(stats, force=True)
    gauge = next(
        m for m in FakeFamily.created["tritonvlm_engine_sequences"].metrics if m.labels["state"] == "running"
    )
    capacity = next(
        m
        for m in FakeFamily.created["tritonvlm_engine_kv_cache_bytes"].metrics
        if m.labels["state"] == "capacity"
    )
    assert (gauge.value, gauge.calls, capacity.value) == (3, 1, 1000)
    stats.num_running = 4
    metrics.update(stats, force=True)
    assert (gauge.value, gauge.calls, capacity.calls) == (4, 2, 1)
    for seconds in (0.001, 0.002, 0.003):
        metrics.add_response(seconds)
    metrics.update(stats)  # within the publish interval: nothing yet
    assert value("tritonvlm_vlm_responses_total") == 0
    metrics.update(stats, force=True)
    assert value("tritonvlm_vlm_responses_total") == 3
    assert value("tritonvlm_vlm_response_send_seconds_total") == pytest.approx(0.006)
    metrics.update(stats, force=True)
    assert value("tritonvlm_vlm_responses_total") == 3
