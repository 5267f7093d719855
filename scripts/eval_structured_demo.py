#!/usr/bin/env python
"""Structured output on pictures: the demo model fills ``{"shape": enum, "colour": enum}`` for held-out
single-shape pictures, under the engine's JSON-schema constraint; prints the share of right answers.

In-process (the real engine, family preprocessing and vision encoder; no server)::

    python scripts/eval_structured_demo.py                       # models/tritonvlm-shapes-demo, 100 pictures
    python scripts/eval_structured_demo.py --model DIR --n 200 --question "What is in this image?"

Greedy decoding. The pictures come from :mod:`tritonvlm.synthetic` with ``--seed`` (default 424242,
held out from training). The output always parses (the grammar allows nothing else); an answer counts
when both values equal the drawn shape's.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPES = ["circle", "square", "triangle", "star"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SCHEMA = {
    "type": "object",
    "properties": {
        "shape": {"type": "string", "enum": SHAPES},
        "colour": {"type": "string", "enum": COLOURS},
    },
    "required": ["shape", "colour"],
    "additionalProperties": False,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO_ROOT / "models" / "tritonvlm-shapes-demo")
    p.add_argument("--n", type=int, default=100, help="held-out pictures")
    p.add_argument("--seed", type=int, default=424_242)
    p.add_argument("--question", default=None, help="default: the training data's JSON question")
    p.add_argument("--batch", type=int, default=16, help="requests decoded together")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from tritonvlm import synthetic
    from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams
    from tritonvlm.preprocessing import ChatPreprocessor

    torch.set_num_threads(2)
    preprocess = ChatPreprocessor.from_pretrained(str(args.model))
    family = preprocess.family
    model = family.load_model(str(args.model))
    encoder = family.load_model(str(args.model))
    family.strip_for_vision(encoder)
    family.strip_for_decoder(model)
    engine = LLMEngine(model, preprocess.processor.tokenizer, EngineConfig(max_num_seqs=args.batch), family)
    args.question = args.question or synthetic.CANONICAL_QUESTIONS["json"]
    rng = random.Random(args.seed)
    scenes = [synthetic.random_scene(rng, n_shapes=1) for _ in range(args.n)]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
    params = SamplingParams(max_tokens=32, temperature=0.0, guided={"type": "json_schema", "schema": SCHEMA})
    answers: dict[str, str] = {}
    for start in range(0, args.n, args.batch):
        chunk = scenes[start : start + args.batch]
        inputs = []
        for scene in chunk:
            buf = io.BytesIO()
            scene.render().save(buf, format="PNG")
            inputs.append(preprocess(messages, [buf.getvalue()]))
        batch = [{k: torch.from_numpy(np.asarray(v)) for k, v in x.mm.items()} for x in inputs]
        for i, (x, mm) in enumerate(zip(inputs, family.encode(encoder, batch), strict=True)):
            rid = str(start + i)
            answers[rid] = ""

            def collect(out, rid: str = rid) -> None:
                answers[rid] += out.text

            engine.add_request(rid, x.input_ids.tolist(), params, collect, mm)
        while engine.scheduler.has_work() or not engine._incoming.empty():
            engine.step()
    right = {"shape": 0, "colour": 0, "both": 0}
    wrong = []
    for i, scene in enumerate(scenes):
        truth = scene.shapes[0]
        got = json.loads(answers[str(i)])
        ok_shape, ok_colour = got["shape"] == truth.kind, got["colour"] == truth.colour
        right["shape"] += ok_shape
        right["colour"] += ok_colour
        right["both"] += ok_shape and ok_colour
        if not (ok_shape and ok_colour) and len(wrong) < 5:
            wrong.append(f"  drawn {truth.colour} {truth.kind}, answered {answers[str(i)]}")
    print(f"{args.model.name}: {args.n} held-out pictures (seed {args.seed}), json_schema shape/colour enums")
    for key, value in right.items():
        print(f"  {key:7s} {value}/{args.n} = {100 * value / args.n:.1f}%")
    print("\n".join(wrong))
    return 0


if __name__ == "__main__":
    sys.exit(main())
