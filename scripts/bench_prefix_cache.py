#!/usr/bin/env python3
"""TTFT with and without a prefix-cache hit, through the whole server (Triton + frontend + OpenAI SDK).

Starts `tritonvlm serve` on the medium test model (built once, cached; or --model-dir), then for each
round sends a request with a new long shared prefix (a ~1,000-token system prompt: a miss) and
another with the same prefix and a different question (a hit; ``--followups N``: N of them, each
reported), streaming, one at a time; and the same with an image (the same picture, two questions).
Prints TTFT p50 of misses and hits, the reduction, and the cached tokens the server reported in
``usage``. Then ``--conversations`` conversations, each with a
system prompt of its own: every first turn, then every second turn (the first answer fed back); a
second turn finds its conversation's keys/values only if the cache kept all of them meanwhile.

    .venv/bin/python scripts/bench_prefix_cache.py
    .venv/bin/python scripts/bench_prefix_cache.py --rounds 5 --prefix-words 700 --json out.json
    .venv/bin/python scripts/bench_prefix_cache.py --rounds 0 --conversations 64
    .venv/bin/python scripts/bench_prefix_cache.py --model-dir GEMMA3_DIR --followups 2
    .venv/bin/python scripts/bench_prefix_cache.py --lookups    # the lookup alone, no server
    .venv/bin/python scripts/bench_prefix_cache.py --burst 8 --prefix-words 130   # engine alone
    .venv/bin/python scripts/bench_prefix_cache.py --pressure 8 --prefix-words 150  # engine alone

``--lookups`` times ``PrefixCache.lookup`` alone with 4 to 1,024 entries of 1,000 tokens behind a
shared 300-token system prompt (half the prompts continue an entry, half share only the system prompt).
``--burst N`` runs the engine alone: N requests with a new shared system prompt arrive at once, prefilled
with the engine's in-batch sharing (a prompt sharing uncached blocks with one in the step's batch waits
a step and starts from its cached blocks) and without it, three bursts each, interleaved (with
sliding-window layers also with sharing but without branch points: a prompt leaving a cached one past
the window stopping its prefill there for the cache to keep that start).
``--pressure N`` runs the engine alone too: N conversations, each with a system prompt of its own, take
turns in order (each turn re-sends its conversation with the answers so far and a new question) in a KV
budget of ``--pressure-tokens`` tokens, too small for all of them: the prefix cache gives blocks back
from the tail of the least recently used entry (the engine's policy) or drops that entry whole (the
policy before), side by side; it prints the prompt tokens computed and taken from the cache.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (scripts/bench.py: the managed server and the medium model)

WORDS = (
    "river",
    "mountain",
    "lantern",
    "copper",
    "violet",
    "harbor",
    "meadow",
    "thunder",
    "quiet",
    "orchard",
    "glacier",
    "ember",
    "marble",
    "falcon",
    "willow",
    "canyon",
    "saffron",
    "beacon",
    "timber",
    "pebble",
    "compass",
    "velvet",
    "horizon",
    "cedar",
    "prism",
    "nectar",
)


# The questions after a round's first ("what is the first word?"): they share all but the ordinal.
FOLLOWUPS = ("last", "second", "third", "fourth")


def system_prompt(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return "Context notes: " + " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def ttft(client, messages: list, max_tokens: int) -> tuple[float, int, int]:
    """Seconds to the first content chunk, prompt tokens, cached tokens."""
    return chat(client, messages, max_tokens)[:3]


def chat(client, messages: list, max_tokens: int) -> tuple[float, int, int, str]:
    """Seconds to the first content chunk, prompt tokens, cached tokens, the answer."""
    start = time.perf_counter()
    first = None
    usage = None
    text = ""
    stream = client.chat.completions.create(
        model=bench.SERVED_NAME,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start if first is None else first
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return (first if first is not None else time.perf_counter() - start), usage.prompt_tokens, cached, text


def conversations(client, count: int, words: int, max_tokens: int) -> dict:
    """``count`` conversations: all first turns, then all second turns. Second turns' TTFT p50, how
    many found their whole first turn cached, and the cached share of their prompts."""
    firsts, seconds, kept, shares = [], [], 0, []
    history = []
    for n in range(count):
        messages = [
            {"role": "system", "content": system_prompt(5000 + n, words)},
            {"role": "user", "content": f"Conversation {n}: what is the first word?"},
        ]
        t, prompt, _, answer = chat(client, messages, max_tokens)
        firsts.append(t)
        history.append((messages + [{"role": "assistant", "content": answer}], prompt))
    for n, (messages, first_prompt) in enumerate(history):
        t, prompt, cached, _ = chat(
            client, messages + [{"role": "user", "content": "And the last?"}], max_tokens
        )
        seconds.append(t)
        kept += cached >= first_prompt - 1
        shares.append(cached / prompt)
        if n % 8 == 7 or n == count - 1:
            bench.log(f"conversations: {n + 1}/{count} second turns, {kept} found their first turn cached")
    return {
        "conversations": count,
        "ttft_first_turn_ms": statistics.median(firsts) * 1000,
        "ttft_second_turn_ms": statistics.median(seconds) * 1000,
        "second_turns_with_first_turn_cached": kept,
        "cached_share_of_second_turns": statistics.mean(shares),
    }


def lookup_costs() -> None:
    """Microseconds per ``PrefixCache.lookup`` by number of entries (the engine's bookkeeping alone)."""
    from tritonvlm.engine.block_manager import BlockAllocator
    from tritonvlm.engine.prefix_cache import PrefixCache

    rng = random.Random(0)
    system = [rng.randrange(30000) for _ in range(300)]
    print("| entries | lookup us (1,000-token prompts) |\n|---|---|")
    for count in (4, 64, 256, 1024):
        pool = BlockAllocator(count * 64)
        cache = PrefixCache(count, pool, 16)
        entries = [system + [rng.randrange(30000) for _ in range(700)] for _ in range(count)]
        for tokens in entries:
            blocks = pool.allocate(-(-len(tokens) // 16))
            cache.store(blocks, tokens, ())
            pool.release(blocks)
        prompts = [tokens + [1, 2, 3] for tokens in entries[:50]] + [system + [5] * 700] * 50
        start = time.perf_counter()
        for prompt in prompts:
            cache.lookup(prompt, ())
        print(f"| {count} | {(time.perf_counter() - start) / len(prompts) * 1e6:.0f} |")


def burst_costs(args: argparse.Namespace) -> None:
    """The engine alone (medium model): bursts of ``--burst`` requests with a new shared system prompt
    of ``--prefix-words`` words and a question each, all added at once, with the engine's in-batch
    sharing (prompts sharing uncached blocks wait one step) and without it, interleaved; with
    sliding-window layers also with sharing but no branch points (``RingBranches``)."""
    import torch

    torch.set_num_threads(args.threads)
    from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams
    from tritonvlm.preprocessing import ChatPreprocessor

    model_dir = str(bench.ensure_model(args.model_dir))
    preprocess = ChatPreprocessor.from_pretrained(model_dir)
    family = preprocess.family
    model = family.strip_for_decoder(family.load_model(model_dir))
    config = EngineConfig(max_num_seqs=max(16, args.burst), max_model_len=4096)
    engine = LLMEngine(model, preprocess.processor.tokenizer, config, family)
    sharing, branches = engine.scheduler.defer, engine.scheduler.alone
    modes = ["off", "in-batch sharing"]
    if engine.runner.cache.has_sliding:  # (Gemma 3: a prompt leaving another past the window)
        modes.append("sharing, no branch points")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)

    def burst(seed: int) -> tuple[list[float], int, int]:
        system = {"role": "system", "content": system_prompt(seed, args.prefix_words)}
        prompts = [
            preprocess([system, {"role": "user", "content": f"Question {i}: which word comes {i}th?"}], [])
            for i in range(args.burst)
        ]
        start, firsts, done = time.perf_counter(), {}, set()
        computed = engine.stats.prefill_tokens
        for i, prompt in enumerate(prompts):

            def on_output(out, i=i) -> None:
                if out.token_ids and i not in firsts:
                    firsts[i] = time.perf_counter() - start
                if out.finished:
                    done.add(i)

            engine.add_request(f"burst-{seed}-{i}", prompt.input_ids.tolist(), params, on_output)
        while len(done) < len(prompts):
            engine.step()
        return sorted(firsts.values()), engine.stats.prefill_tokens - computed, len(prompts[0].input_ids)

    burst(0)  # warm-up
    rows = []
    for r in range(3):
        for m, mode in enumerate(modes):
            engine.scheduler.defer = sharing if mode != "off" else (lambda seq, batch: False)
            engine.scheduler.alone = branches if mode == "in-batch sharing" else (lambda seq: False)
            firsts, computed, prompt_len = burst(1 + len(modes) * r + m)
            rows.append((mode, statistics.median(firsts) * 1000, firsts[-1] * 1000, computed, prompt_len))
            bench.log(f"{mode}: TTFT p50 {rows[-1][1]:.0f} ms, prompt tokens computed {computed}")
    print(f"\n{args.burst} requests at once, each ~{rows[0][4]} prompt tokens sharing a new system prompt")
    print("| engine | TTFT p50 ms | TTFT max ms | prompt tokens computed |\n|---|---:|---:|---:|")
    for mode, p50, last, computed, _ in rows:
        print(f"| {mode} | {p50:.0f} | {last:.0f} | {computed} |")


def pressure_costs(args: argparse.Namespace) -> None:
    """The engine alone (medium model): ``--pressure`` conversations taking turns in a KV budget of
    ``--pressure-tokens`` tokens, with the prefix cache evicting tails of entries (the engine's policy)
    and whole entries (the policy before), interleaved by round."""
    import torch

    torch.set_num_threads(args.threads)
    from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams
    from tritonvlm.engine.kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache
    from tritonvlm.engine.prefix_cache import PrefixCache
    from tritonvlm.preprocessing import ChatPreprocessor

    model_dir = str(bench.ensure_model(args.model_dir))
    preprocess = ChatPreprocessor.from_pretrained(model_dir)
    family = preprocess.family
    model = family.strip_for_decoder(family.load_model(model_dir))
    heads, head_dim = family.kv_geometry()
    per_block = PagedKVCache.bytes_per_block(family.layer_kinds(), heads, head_dim, torch.float32)
    budget = (-(-args.pressure_tokens // DEFAULT_BLOCK_SIZE) + 1) * per_block
    config = EngineConfig(max_num_seqs=4, max_model_len=args.pressure_tokens, kv_cache_memory=str(budget))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    tail_first = PrefixCache.evict

    def whole_entries(cache, keep=None) -> bool:  # the policy before: the LRU entry goes whole
        if not cache._lru:
            return False
        cache._drop(next((e for e in cache._lru.values() if e is not keep), keep))
        return True

    def run(policy: str, seed: int) -> tuple[int, int, float]:
        PrefixCache.evict = tail_first if policy == "tail blocks first" else whole_entries
        engine = LLMEngine(model, preprocess.processor.tokenizer, config, family)
        conversations = [
            [{"role": "system", "content": system_prompt(seed * 100 + n, args.prefix_words)}]
            for n in range(args.pressure)
        ]
        prompt_tokens = cached = 0
        start = time.perf_counter()
        for turn in range(args.turns):
            for n, messages in enumerate(conversations):
                messages.append({"role": "user", "content": f"Turn {turn}: which word comes {turn + n}th?"})
                ids = preprocess(messages, []).input_ids.tolist()
                outs = []
                engine.add_request(f"c{n}-{turn}", ids, params, outs.append)
                while not (outs and outs[-1].finished):
                    engine.step()
                text = "".join(o.text for o in outs)
                messages.append({"role": "assistant", "content": text})
                prompt_tokens += len(ids)
                cached += outs[-1].cached_tokens
        PrefixCache.evict = tail_first
        return prompt_tokens, cached, time.perf_counter() - start

    rows = []
    for r in range(args.pressure_rounds):
        for policy in ("whole entries", "tail blocks first"):
            prompt_tokens, cached, seconds = run(policy, r)
            rows.append((policy, prompt_tokens, cached, seconds))
            bench.log(f"{policy}: {cached}/{prompt_tokens} prompt tokens cached, {seconds:.1f} s")
    print(
        f"\n{args.pressure} conversations x {args.turns} turns in turn, KV budget "
        f"{args.pressure_tokens} tokens"
    )
    print("| eviction | prompt tokens | cached | computed | wall s |\n|---|---:|---:|---:|---:|")
    for policy, prompt_tokens, cached, seconds in rows:
        print(f"| {policy} | {prompt_tokens} | {cached} | {prompt_tokens - cached} | {seconds:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, help="model to serve (default: the medium test model)")
    parser.add_argument("--rounds", type=int, default=4, help="miss/hit pairs per case (default 4)")
    parser.add_argument(
        "--followups",
        type=int,
        default=1,
        choices=range(1, len(FOLLOWUPS) + 1),
        help="questions after each round's miss (default 1); with sliding-window layers (Gemma 3) and a "
        "prefix longer than the window the second request keeps the shared start, the third on use it",
    )
    parser.add_argument("--prefix-words", type=int, default=350, help="system prompt words (~3 tokens each)")
    parser.add_argument("--image-size", type=int, default=448, help="image side in pixels (default 448)")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument(
        "--conversations",
        type=int,
        default=32,
        help="two-turn conversations, first turns all first (0: skip)",
    )
    parser.add_argument("--conversation-words", type=int, default=100, help="their system prompts' words")
    parser.add_argument("--serve-flags", default="", help='more serve flags, e.g. "--prefix-cache-slots 4"')
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--lookups", action="store_true", help="time the lookup alone (no server) and exit")
    parser.add_argument(
        "--burst", type=int, default=0, help="N requests sharing a new prefix at once (engine), exit"
    )
    parser.add_argument(
        "--pressure",
        type=int,
        default=0,
        help="N conversations taking turns in a small KV budget (engine), exit",
    )
    parser.add_argument("--pressure-tokens", type=int, default=2048, help="--pressure: KV budget in tokens")
    parser.add_argument("--turns", type=int, default=4, help="--pressure: turns per conversation")
    parser.add_argument("--pressure-rounds", type=int, default=2, help="--pressure: runs of each policy")
    args = parser.parse_args(argv)
    if args.lookups:
        lookup_costs()
        return 0
    if args.burst:
        burst_costs(args)
        return 0
    if args.pressure:
        pressure_costs(args)
        return 0
    args.server_log_level = "warning"
    args.model_repository = bench.REPO_ROOT / "model_repository"
    args.max_num_seqs = 4

    from openai import OpenAI

    model_dir = bench.ensure_model(args.model_dir)
    logs = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    server, base = bench.start_tritonvlm(model_dir, args, logs)
    try:
        client = OpenAI(base_url=base + "/v1", api_key="unused", timeout=600)
        ttft(client, [{"role": "user", "content": "warm up"}], args.max_tokens)
        png = bench.make_png(args.image_size)
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        results: dict[str, dict] = {}
        for case in ("text prefix", "image prefix") if args.rounds else ():
            misses, prompt = [], 0
            hits: list[list[float]] = [[] for _ in range(args.followups)]
            cached: list[list[int]] = [[] for _ in range(args.followups)]
            for r in range(args.rounds):
                if case == "text prefix":
                    system = {"role": "system", "content": system_prompt(1000 + r, args.prefix_words)}

                    def ask(question: str, system=system) -> list:
                        return [system, {"role": "user", "content": question}]
                else:
                    # A picture no earlier round used: the miss encodes and prefills it.
                    picture = (
                        url
                        if r == 0
                        else "data:image/png;base64,"
                        + base64.b64encode(bench.make_png(args.image_size - 4 * r)).decode()
                    )

                    def ask(question: str, picture=picture) -> list:
                        parts = [{"type": "image_url", "image_url": {"url": picture}}]
                        return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]

                t_miss, prompt, _ = ttft(client, ask(f"Round {r}: what is the first word?"), args.max_tokens)
                misses.append(t_miss)
                for n in range(args.followups):
                    t_hit, _, c = ttft(
                        client, ask(f"Round {r}: what is the {FOLLOWUPS[n]} word?"), args.max_tokens
                    )
                    hits[n].append(t_hit)
                    cached[n].append(c)
                bench.log(
                    f"{case} round {r}: miss {t_miss * 1000:.0f} ms, then "
                    + ", ".join(
                        f"{h[-1] * 1000:.0f} ms ({c[-1]} cached)" for h, c in zip(hits, cached, strict=True)
                    )
                )
            miss = statistics.median(misses)
            for n in range(args.followups):
                hit = statistics.median(hits[n])
                results[case if n == 0 else f"{case}, request {n + 2}"] = {
                    "prompt_tokens": prompt,
                    "cached_tokens": statistics.median(cached[n]),
                    "ttft_miss_ms": miss * 1000,
                    "ttft_hit_ms": hit * 1000,
                    "reduction": 1 - hit / miss,
                }
        if results:
            print("\nprefix cache, TTFT p50 (streaming, one request at a time)")
            print("| case | prompt tokens | cached tokens | TTFT miss ms | TTFT hit ms | reduction |")
            print("|---|---|---|---|---|---|")
            for case, r in results.items():
                print(
                    f"| {case} | {r['prompt_tokens']} | {r['cached_tokens']:.0f} | {r['ttft_miss_ms']:.0f} | "
                    f"{r['ttft_hit_ms']:.0f} | {100 * r['reduction']:.0f}% |"
                )
        if args.conversations:
            conv = conversations(client, args.conversations, args.conversation_words, args.max_tokens)
            results["conversations"] = conv
            print(
                f"\n{conv['conversations']} conversations, all first turns then all second turns: "
                f"{conv['second_turns_with_first_turn_cached']} second turns found their first turn cached "
                f"({100 * conv['cached_share_of_second_turns']:.0f}% of their prompt tokens on average); "
                f"TTFT p50 first turns {conv['ttft_first_turn_ms']:.0f} ms, "
                f"second turns {conv['ttft_second_turn_ms']:.0f} ms"
            )
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
