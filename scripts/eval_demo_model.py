#!/usr/bin/env python
"""Exact-match accuracy of the shapes demo model, per question type, on held-out synthetic pictures.

Through a running server (the OpenAI SDK; images travel as ``data:`` URLs, so no flag is needed)::

    tritonvlm serve --model models/tritonvlm-shapes-demo &
    python scripts/eval_demo_model.py --base-url http://127.0.0.1:8000/v1 \\
        --model models/tritonvlm-shapes-demo --n 100

In-process with transformers ``generate()`` (no server; quick checks while training)::

    python scripts/eval_demo_model.py --direct models/tritonvlm-shapes-demo --n 50

The pictures come from :mod:`tritonvlm.synthetic` with ``--seed`` (default 424242, a stream neither the
training nor its held-out monitoring uses), the canonical question of each type, question first. Greedy
decoding (``temperature=0``); an answer counts when it equals the canonical answer exactly (surrounding
whitespace ignored). Prints a table; ``--show-errors N`` also prints up to N wrong answers per type.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tritonvlm import synthetic

DEFAULT_SEED = 424_242
MAX_TOKENS = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL")
    p.add_argument("--model", default="models/tritonvlm-shapes-demo", help="model name the server serves")
    p.add_argument("--api-key", default="unused")
    p.add_argument("--n", type=int, default=100, help="held-out samples per question type")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the held-out pictures")
    p.add_argument("--types", default=",".join(synthetic.QUESTION_TYPES), help="question types to score")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (server mode)")
    p.add_argument("--direct", type=Path, metavar="MODEL_DIR", help="evaluate in-process with generate()")
    p.add_argument("--batch-size", type=int, default=16, help="generate() batch size (--direct)")
    p.add_argument("--show-errors", type=int, default=3, help="wrong answers to print per type")
    return p.parse_args(argv)


def held_out(seed: int, n: int, types: list[str]) -> list[synthetic.Sample]:
    """``n`` samples of each type from the stream ``seed``: canonical questions, question first."""
    return [synthetic.make_sample(seed, i, qtype) for qtype in types for i in range(n)]


def answer_via_server(client: Any, model: str, sample: synthetic.Sample) -> str:
    """The server's greedy answer to one sample (images sent as PNG data URLs)."""
    parts = [{"type": "image_url", "image_url": {"url": synthetic.to_data_url(im)}} for im in sample.images]
    response = client.chat.completions.create(
        model=model, messages=sample.messages(parts), temperature=0, max_tokens=MAX_TOKENS
    )
    return response.choices[0].message.content or ""


def answers_via_server(args: argparse.Namespace, samples: list[synthetic.Sample]) -> list[str]:
    """Every sample through the server, ``--concurrency`` at a time, in order."""
    import openai

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=300, max_retries=0)
    with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool:
        return list(pool.map(lambda s: answer_via_server(client, args.model, s), samples))


def answers_direct(args: argparse.Namespace, samples: list[synthetic.Sample]) -> list[str]:
    """Every sample through transformers ``generate()`` in this process (left-padded batches, greedy)."""
    import torch

    from tritonvlm.modeling.processor import load_model, load_processor

    processor = load_processor(str(args.direct))
    processor.tokenizer.padding_side = "left"
    model = load_model(str(args.direct))
    answers: list[str] = []
    for start in range(0, len(samples), args.batch_size):
        chunk = samples[start : start + args.batch_size]
        prompts = [
            processor.apply_chat_template(s.messages(), tokenize=False, add_generation_prompt=True)
            for s in chunk
        ]
        images = [im for s in chunk for im in s.images]
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        answers += processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    return answers


def score(
    samples: list[synthetic.Sample], answers: list[str]
) -> dict[str, list[tuple[synthetic.Sample, str]]]:
    """Wrong answers per type (an empty list for a perfect type); every type of ``samples`` is a key."""
    wrong: dict[str, list[tuple[synthetic.Sample, str]]] = defaultdict(list)
    for sample, answer in zip(samples, answers, strict=True):
        wrong.setdefault(sample.qtype, [])
        if answer.strip() != sample.answer:
            wrong[sample.qtype].append((sample, answer))
    return wrong


def table(samples: list[synthetic.Sample], wrong: dict[str, list[Any]]) -> str:
    """The results as a fixed-width table, one row per type and a total."""
    counts: dict[str, int] = defaultdict(int)
    for sample in samples:
        counts[sample.qtype] += 1
    lines = [f"{'question type':<14} {'n':>5} {'correct':>8} {'accuracy':>9}", "-" * 39]
    for qtype in counts:
        ok = counts[qtype] - len(wrong[qtype])
        lines.append(f"{qtype:<14} {counts[qtype]:>5} {ok:>8} {ok / counts[qtype]:>9.1%}")
    total = sum(counts.values())
    ok = total - sum(len(v) for v in wrong.values())
    lines += ["-" * 39, f"{'all':<14} {total:>5} {ok:>8} {ok / total:>9.1%}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = sorted(set(types) - set(synthetic.QUESTION_TYPES))
    if unknown:
        print(f"unknown question types {unknown}; use {synthetic.QUESTION_TYPES}", file=sys.stderr)
        return 2
    samples = held_out(args.seed, args.n, types)
    where = f"direct generate() on {args.direct}" if args.direct else f"server {args.base_url} ({args.model})"
    print(f"evaluating {len(samples)} held-out samples (seed {args.seed}) via {where}", flush=True)
    t0 = time.perf_counter()
    answers = answers_direct(args, samples) if args.direct else answers_via_server(args, samples)
    elapsed = time.perf_counter() - t0
    wrong = score(samples, answers)
    for qtype, errors in wrong.items():
        for sample, answer in errors[: args.show_errors]:
            print(f"  wrong [{qtype}] {sample.question!r}: got {answer!r}, expected {sample.answer!r}")
    print(table(samples, wrong))
    print(f"{len(samples)} requests in {elapsed:.1f}s ({len(samples) / elapsed:.1f}/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
