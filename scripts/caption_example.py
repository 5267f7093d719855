#!/usr/bin/env python
"""The README's batch example: caption a folder of pictures with ``tritonvlm run-batch``.

``make`` draws N pictures of shapes (:mod:`tritonvlm.synthetic`, the built-in demo model's world) into
``DIR/images/``, and writes ``DIR/requests.jsonl`` (one OpenAI Batch line per picture, the image as a
``file://`` URL) and ``DIR/answers.json`` (the true caption of each). ``score`` reads
``DIR/results.jsonl`` (what run-batch wrote) and prints how many captions are exactly right::

    python scripts/caption_example.py make /tmp/photos --n 1000
    tritonvlm run-batch -i /tmp/photos/requests.jsonl -o /tmp/photos/results.jsonl \\
        --allowed-local-media-path /tmp/photos
    python scripts/caption_example.py score /tmp/photos
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tritonvlm import synthetic

SEED = 515_151  # a stream the demo model's training never saw
MODEL = "tritonvlm-shapes-demo"
QUESTION = "What is in this image?"


def make(folder: Path, n: int, seed: int) -> None:
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    answers = {}
    with open(folder / "requests.jsonl", "w") as requests:
        for i in range(n):
            sample = synthetic.make_sample(seed, i, "describe")
            path = (images / f"{i:05d}.png").resolve()
            sample.images[0].save(path)
            custom_id = f"img-{i:05d}"
            answers[custom_id] = sample.answer
            body = {
                "model": MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": QUESTION},
                            {"type": "image_url", "image_url": {"url": path.as_uri()}},
                        ],
                    }
                ],
                "max_tokens": 32,
                "temperature": 0,
            }
            line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
            requests.write(json.dumps(line) + "\n")
    (folder / "answers.json").write_text(json.dumps(answers, indent=1))
    print(f"{n} pictures in {images}, requests in {folder / 'requests.jsonl'}")


def score(folder: Path, show: int) -> int:
    answers = json.loads((folder / "answers.json").read_text())
    right = wrong = failed = 0
    examples = []
    for line in (folder / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        response = record.get("response") or {}
        if response.get("status_code") != 200:
            failed += 1
            continue
        caption = response["body"]["choices"][0]["message"]["content"].strip()
        if caption == answers[record["custom_id"]]:
            right += 1
        else:
            wrong += 1
        if len(examples) < show:
            examples.append(f"{record['custom_id']}: {caption}")
    total = right + wrong + failed
    print(
        f"{total} results for {len(answers)} pictures: {right} captions right, {wrong} wrong, {failed} failed"
    )
    if total:
        print(f"exact-match accuracy {100 * right / total:.1f}%")
    print("\n".join(examples))
    return 0 if total == len(answers) else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="draw the pictures and write the batch file")
    m.add_argument("folder", type=Path)
    m.add_argument("--n", type=int, default=1000)
    m.add_argument("--seed", type=int, default=SEED)
    s = sub.add_parser("score", help="check the captions in FOLDER/results.jsonl")
    s.add_argument("folder", type=Path)
    s.add_argument("--show", type=int, default=3, help="captions to print")
    args = parser.parse_args()
    if args.command == "make":
        make(args.folder, args.n, args.seed)
        return 0
    return score(args.folder, args.show)


if __name__ == "__main__":
    sys.exit(main())
