#!/usr/bin/env python
"""Accuracy of the shapes demo model per question type, on pictures it was not trained on.

Three sets of pictures (``--sets``, default all):

- ``eval``: the separate evaluation renderer (:mod:`tritonvlm.eval_renderer`: its own rasteriser,
  palette, proportions, sizes and layout; never used for training), every type of
  :data:`~tritonvlm.eval_renderer.EVAL_TYPES`, including the seed's own two-image request
  (``two_images_seed``: two images, then "I have two very different images. ...");
- ``training``: held-out pictures of the training renderer (:mod:`tritonvlm.synthetic`'s classic
  style, the pictures the first demo model was scored on), canonical questions;
- ``outside``: ``--n-outside`` pictures outside the model's world (4-6 shapes, coloured and noisy
  backgrounds, up to 1024x1024), each asked "What is in this image?" and, paired with the next one, the
  seed's two-image request. No exact answer exists: an answer passes when it ends with a stop (not the
  token limit) and repeats no word or phrase more than twice in a row.

Through a running server (the OpenAI SDK; images travel as ``data:`` URLs, so no flag is needed)::

    tritonvlm serve &
    python scripts/eval_demo_model.py --model tritonvlm-shapes-demo --n 100

In-process with transformers ``generate()`` (no server; quick checks while training)::

    python scripts/eval_demo_model.py --direct models/tritonvlm-shapes-demo --n 50

Greedy decoding (``temperature=0``); an answer counts when it equals the expected answer exactly
(surrounding whitespace ignored). Prints a table; ``--show-errors N`` also prints up to N wrong answers
per type; ``--json FILE`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tritonvlm import eval_renderer, synthetic

DEFAULT_SEED = 424_242
MAX_TOKENS = 64
SETS = ("eval", "training", "outside")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL")
    p.add_argument("--model", default="tritonvlm-shapes-demo", help="model name the server serves")
    p.add_argument("--api-key", default="unused")
    p.add_argument("--sets", default=",".join(SETS), help="picture sets to score: " + ",".join(SETS))
    p.add_argument("--n", type=int, default=100, help="samples per question type (eval and training sets)")
    p.add_argument("--n-outside", type=int, default=20, help="pictures of the outside set")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of every set")
    p.add_argument("--types", default="", help="only these question types (comma-separated)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (server mode)")
    p.add_argument("--direct", type=Path, metavar="MODEL_DIR", help="evaluate in-process with generate()")
    p.add_argument("--batch-size", type=int, default=16, help="generate() batch size (--direct)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (--direct)")
    p.add_argument("--show-errors", type=int, default=3, help="wrong answers to print per type")
    p.add_argument("--json", type=Path, help="write the results (per set and type) to this file")
    return p.parse_args(argv)


class Item:
    """One request: a sample (question, images, expected answer or None) and, after the run, the reply."""

    def __init__(self, set_name: str, sample: Any) -> None:
        self.set_name = set_name
        self.sample = sample
        self.answer = ""
        self.finish = ""

    @property
    def key(self) -> tuple[str, str]:
        """``(set, question type)``."""
        return self.set_name, self.sample.qtype

    def passed(self) -> bool:
        """Exact match; for the outside set, a stop and no repetition loop."""
        if self.sample.answer is None:
            return self.finish == "stop" and not eval_renderer.repeats_too_much(self.answer)
        return self.finish == "stop" and self.answer.strip() == self.sample.answer


class OutsideSample:
    """A question about pictures outside the model's world (no expected answer)."""

    answer = None

    def __init__(self, qtype: str, question: str, pictures: list[Any], text_first: bool) -> None:
        self.qtype, self.question, self.pictures, self.text_first = qtype, question, pictures, text_first

    @property
    def images(self) -> list[Any]:
        """The pictures, rendered."""
        return [p.render() for p in self.pictures]

    def messages(self, image_parts: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """A one-turn conversation."""
        parts = image_parts if image_parts is not None else [{"type": "image"} for _ in self.pictures]
        text = [{"type": "text", "text": self.question}]
        return [{"role": "user", "content": text + parts if self.text_first else parts + text}]


def outside_samples(seed: int, n: int) -> list[OutsideSample]:
    """``n`` outside pictures, each described alone and, with the next one, by the seed's request."""
    rng = random.Random(f"outside/{seed}")
    pictures = [eval_renderer.outside_picture(rng) for _ in range(n)]
    single = [OutsideSample("outside_describe", "What is in this image?", [p], True) for p in pictures]
    pairs = [
        OutsideSample(
            "outside_two_images", eval_renderer.SEED_TWO_IMAGE_PROMPT, [p, pictures[(i + 1) % n]], False
        )
        for i, p in enumerate(pictures)
    ]
    return single + pairs


def build_items(args: argparse.Namespace) -> list[Item]:
    """Every request of the chosen sets, in a fixed order."""
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    only = {t.strip() for t in args.types.split(",") if t.strip()}
    unknown = set(sets) - set(SETS)
    if unknown:
        raise SystemExit(f"unknown sets {sorted(unknown)}; use {SETS}")
    items: list[Item] = []
    if "eval" in sets:
        types = [t for t in eval_renderer.EVAL_TYPES if not only or t in only]
        items += [Item("eval", s) for s in eval_renderer.eval_set(args.seed, args.n, types)]
    if "training" in sets:
        types = [t for t in synthetic.QUESTION_TYPES if not only or t in only]
        items += [
            Item("training", synthetic.make_sample(args.seed, i, t)) for t in types for i in range(args.n)
        ]
    if "outside" in sets and args.n_outside > 0:
        items += [Item("outside", s) for s in outside_samples(args.seed, args.n_outside)]
    return items


def run_server(args: argparse.Namespace, items: list[Item]) -> None:
    """Every item through the server (images as PNG/JPEG data URLs), ``--concurrency`` at a time."""
    import openai

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=300, max_retries=0)

    def one(item: Item) -> None:
        parts = [
            {"type": "image_url", "image_url": {"url": synthetic.to_data_url(im)}}
            for im in item.sample.images
        ]
        response = client.chat.completions.create(
            model=args.model, messages=item.sample.messages(parts), temperature=0, max_tokens=MAX_TOKENS
        )
        item.answer = response.choices[0].message.content or ""
        item.finish = response.choices[0].finish_reason or ""

    with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool:
        list(pool.map(one, items))


def run_direct(args: argparse.Namespace, items: list[Item]) -> None:
    """Every item through transformers ``generate()`` in this process (left-padded batches, greedy)."""
    import torch

    from tritonvlm.modeling.processor import load_model, load_processor

    torch.set_num_threads(args.threads)
    processor = load_processor(str(args.direct))
    processor.tokenizer.padding_side = "left"
    model = load_model(str(args.direct))
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    for start in range(0, len(items), args.batch_size):
        chunk = items[start : start + args.batch_size]
        prompts = [
            processor.apply_chat_template(it.sample.messages(), tokenize=False, add_generation_prompt=True)
            for it in chunk
        ]
        images = [im for it in chunk for im in it.sample.images]
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        for it, row in zip(chunk, out[:, inputs["input_ids"].shape[1] :].tolist(), strict=True):
            ended = next((k for k, t in enumerate(row) if t in stops), None)
            it.finish = "length" if ended is None else "stop"
            it.answer = processor.tokenizer.decode(row[:ended], skip_special_tokens=True)


def results(items: list[Item]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{set: {type: {"n", "correct", "accuracy"}}}`` (outside: passed = stop and no loop)."""
    counts: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for it in items:
        counts[it.key].append(it.passed())
    out: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (set_name, qtype), oks in counts.items():
        out[set_name][qtype] = {"n": len(oks), "correct": sum(oks), "accuracy": sum(oks) / len(oks)}
    return dict(out)


def table(res: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The results as a fixed-width table, one row per set and type, with a total per set."""
    lines = [f"{'set':<9} {'question type':<19} {'n':>5} {'correct':>8} {'accuracy':>9}", "-" * 54]
    for set_name, types in res.items():
        for qtype, r in types.items():
            lines.append(f"{set_name:<9} {qtype:<19} {r['n']:>5} {r['correct']:>8} {r['accuracy']:>9.1%}")
        n = sum(r["n"] for r in types.values())
        ok = sum(r["correct"] for r in types.values())
        lines += [f"{set_name:<9} {'all':<19} {n:>5} {ok:>8} {ok / n:>9.1%}", "-" * 54]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    items = build_items(args)
    where = f"direct generate() on {args.direct}" if args.direct else f"server {args.base_url} ({args.model})"
    print(f"evaluating {len(items)} requests (seed {args.seed}) via {where}", flush=True)
    t0 = time.perf_counter()
    (run_direct if args.direct else run_server)(args, items)
    elapsed = time.perf_counter() - t0
    shown: dict[tuple[str, str], int] = defaultdict(int)
    for it in items:
        if not it.passed() and shown[it.key] < args.show_errors:
            shown[it.key] += 1
            expected = it.sample.answer if it.sample.answer is not None else "(a stop, no repetition)"
            print(
                f"  wrong [{it.set_name}/{it.sample.qtype}] {it.sample.question[:60]!r}: got {it.answer!r} "
                f"({it.finish}), expected {expected!r}"
            )
    for it in items:
        if it.set_name == "outside" and shown[("outside-ok", "")] < args.show_errors:
            shown[("outside-ok", "")] += 1
            print(f"  outside example [{it.sample.qtype}]: {it.answer!r} ({it.finish})")
    res = results(items)
    print(table(res))
    print(f"{len(items)} requests in {elapsed:.1f}s ({len(items) / elapsed:.1f}/s)")
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
