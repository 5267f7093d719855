#!/usr/bin/env python
"""Train the built-in demonstration model: a tiny Qwen2.5-VL that really sees shapes and colours.

The model is ``Qwen2_5_VLForConditionalGeneration`` (the family of the random test model, so the
serving pipeline is unchanged), trained on CPU on the synthetic pictures and questions of
:mod:`tritonvlm.synthetic` (varied pictures, ``--classic-frac`` of classic ones):

- from scratch (a Qwen2-style byte-level BPE, ``build_tokenizer`` from
  :mod:`tritonvlm.modeling.testmodel`, trained on ordinary English plus the synthetic questions and
  answers, with Qwen's special tokens and chat template; the size flags set the architecture), or with
  ``--init-from`` continuing from a model this script (or its first version) wrote, with that model's
  tokenizer and architecture;
- the loss is on the assistant's answer tokens and its closing ``<|im_end|>`` only, plus (``--aux-weight``)
  a training-only per-image-token shape/colour loss on the vision tower;
- AdamW with a separate (higher) learning rate for the vision tower, linear warm-up then a cosine that
  ends with ``--steps`` or with the time budget, whichever comes first; gradient clipping 1.0;
- every ``--eval-every`` steps, exact-match accuracy per question type on held-out pictures (classic,
  varied, and the separate renderer's, :mod:`tritonvlm.eval_renderer`, watched only). It is computed
  teacher-forced in one forward pass: greedy decoding reproduces the answer exactly if and only if every
  answer token (and ``<|im_end|>``) is the arg-max given the right prefix;
- a hard wall-clock budget (``--budget-minutes``, default 57, of which ``--reserve-minutes`` are kept
  for the final evaluation and saving): the whole run fits in an hour.

The output is a normal ``from_pretrained`` directory (``config.json``, ``model.safetensors``,
``generation_config.json`` with eos ``<|im_end|>``, ``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``, ``preprocessor_config.json``) plus ``training.json`` (arguments, steps, time,
held-out accuracies). Other files in the directory (its README.md) are left alone.

Reproduce the committed model from its stage-2 weights (commit 3982b9c; the README's "built-in demo
model" section has the whole history)::

    git archive 3982b9c models/tritonvlm-shapes-demo | tar -x -C /tmp
    python scripts/train_demo_model.py --init-from /tmp/models/tritonvlm-shapes-demo --out /tmp/stage3 \
        --data-offset 20000 --lr 3e-4 --vision-lr 6e-4 --budget-minutes 56
    python scripts/train_demo_model.py --init-from /tmp/stage3 --out models/tritonvlm-shapes-demo \
        --data-offset 60000 --lr 1.5e-4 --vision-lr 3e-4 --warmup 20 --mix 4,1,2,1,6,1 \
        --budget-minutes 27 --reserve-minutes 2.5

Seeded: the same arguments give the same data and initial weights; the updates are the same only when
the lr schedule does not depend on time (``--budget-minutes 0 --steps N``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from tritonvlm import eval_renderer, synthetic
from tritonvlm.modeling.processor import ImageOnlyQwen2_5_VLProcessor
from tritonvlm.modeling.testmodel import (
    CHAT_TEMPLATE,
    CORPUS,
    MIN_PIXELS,
    SIZES,
    ModelSize,
    _model_config,
    _tokenizer_config,
    _training_texts,
    build_tokenizer,
    save_model,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "models" / "tritonvlm-shapes-demo"
EVAL_SEED_OFFSET = 7_919  # the held-out stream is seed + this (the eval script uses yet another seed)
IGNORE = -100

# More ordinary English for the tokenizer, so common words get their own merges.
EXTRA_ENGLISH = """\
Hello! How can I help you today? I can answer questions about pictures of simple shapes.
This model was trained on synthetic images of circles, squares, triangles and stars.
Each shape is drawn in one colour: red, green, blue, yellow, purple or orange.
The first picture has a single shape in the middle; the second one has two shapes side by side.
There is nothing else in the picture except a plain background with a little noise.
Please describe what you see, count the objects, and say which one is on the left.
It was a bright cold day in April, and the clocks were striking thirteen.
The weather today is warm and sunny, with a light breeze from the west.
She opened the door, looked outside, and decided to take a walk to the river.
Our team will meet on Friday morning to discuss the results of the experiment.
The answer is short because the question is simple: there are three shapes.
We would like to know more about your order, your address and your phone number.
Computers, phones and cameras all have small chips that process images very quickly.
He said that the train would arrive at the station at half past seven in the evening.
Learning a new language takes time, patience and a lot of practice every day.
The museum is open from Tuesday to Sunday, and entry is free for children under twelve.
If you have any questions, please do not hesitate to contact us by email.
The results were better than expected, so the project will continue next year.
A good photograph tells a story about the people, the place and the moment.
Water boils at one hundred degrees and freezes at zero degrees on the Celsius scale.
"""


def log(msg: str) -> None:
    """Progress output, flushed at once (the run is usually logged to a file)."""
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (defaults are those of the committed model)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model directory to write")
    p.add_argument("--seed", type=int, default=1234, help="seed of the weights and the training stream")
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=57.0,
        help="hard wall-clock budget, then save (0: none); the lr schedule follows it (see --steps)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=100_000,
        help="at most this many steps; the lr schedule ends with whichever ends first, these steps or the "
        "budget (the default: the budget)",
    )
    p.add_argument(
        "--reserve-minutes",
        type=float,
        default=3.0,
        help="end of the budget kept for the final evaluation and saving; the lr schedule runs on "
        "whichever ends first, the steps or the budget less this reserve",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of the text decoder")
    p.add_argument("--vision-lr", type=float, default=1e-3, help="peak learning rate of the vision tower")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak")
    p.add_argument("--warmup", type=int, default=40, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--micro-batches", type=int, default=4, help="length-sorted chunks per step")
    p.add_argument(
        "--mix",
        default="3,1,2,1,5,2",
        help="weights of the question types " + ",".join(synthetic.QUESTION_TYPES),
    )
    p.add_argument(
        "--aux-weight",
        type=float,
        default=0.5,
        help="weight of the auxiliary per-vision-token shape/colour loss (0: off; the head is not saved)",
    )
    p.add_argument("--paraphrase-frac", type=float, default=0.5, help="share of reworded questions")
    p.add_argument(
        "--classic-frac",
        type=float,
        default=0.15,
        help="share of classic pictures (the rest are varied: synthetic.varied_scene)",
    )
    # Architecture.
    p.add_argument(
        "--max-pixels",
        type=int,
        default=synthetic.PROCESSOR_MAX_PIXELS,
        help="the image processor's max_pixels (larger pictures are shrunk to it)",
    )
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=128, help="text decoder width")
    p.add_argument("--layers", type=int, default=4, help="text decoder layers")
    p.add_argument("--intermediate", type=int, default=384, help="text decoder MLP width")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vision-hidden", type=int, default=192)
    p.add_argument("--vision-depth", type=int, default=5)
    p.add_argument("--vision-intermediate", type=int, default=384)
    p.add_argument("--vision-heads", type=int, default=4)
    # Monitoring and runtime.
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-n", type=int, default=16, help="held-out samples per question type and set")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a busy 2-core machine two threads spin-wait, ~7x the CPU per step)",
    )
    p.add_argument(
        "--init-from",
        type=Path,
        help="start from the weights of a model this script wrote (to continue training), not from scratch",
    )
    p.add_argument(
        "--data-offset", type=int, default=0, help="index of the first training sample (continued runs)"
    )
    p.add_argument("--device", default="cpu", help="cpu (the committed model) or cuda for quick experiments")
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="resumable state written at every evaluation; an existing one (same arguments) is resumed",
    )
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# Tokenizer, processor and model
# ---------------------------------------------------------------------------------------------------


def tokenizer_texts(seed: int) -> list[str]:
    """What the BPE learns its merges from: English (weighted first), synthetic Q&A, then filler words."""
    synthetic_lines = []
    for i in range(800):
        sample = synthetic.make_sample(seed, i, paraphrase=i % 2 == 0, varied=i % 4 < 2)
        synthetic_lines.append(f"{sample.question} {sample.answer}")
    english = (CORPUS.splitlines() + EXTRA_ENGLISH.splitlines()) * 4
    return english + synthetic_lines + _training_texts(SIZES["tiny"])


def model_size(args: argparse.Namespace) -> ModelSize:
    """The architecture as the test-model builder describes one (all vision blocks attend fully)."""
    return ModelSize(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vision_hidden_size=args.vision_hidden,
        vision_intermediate_size=args.vision_intermediate,
        vision_depth=args.vision_depth,
        vision_num_heads=args.vision_heads,
        fullatt_block_indexes=tuple(range(args.vision_depth)),
        pseudo_words=0,
    )


def use_matmul_patch_embedding(model: Any) -> None:
    """Run the vision tower's patch embedding as a matrix product (training speed only).

    It is a ``Conv3d`` whose kernel equals its stride, i.e. one matrix product per patch; on CPU oneDNN's
    3-D convolution takes many times longer (about a tenth of a training step). Same weights, same
    results, and the saved checkpoint is unchanged.
    """
    embed = model.model.visual.patch_embed

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        weight = embed.proj.weight
        flat = hidden_states.to(weight.dtype).reshape(-1, weight[0].numel())
        return torch.nn.functional.linear(flat, weight.reshape(weight.shape[0], -1))

    embed.forward = forward


def build_components(args: argparse.Namespace, work: Path) -> tuple[Any, Any, Any]:
    """Write tokenizer, chat template and image processor files into ``work``; build a fresh model.

    Returns ``(processor, model, generation_config)``.
    """
    if args.init_from is None:
        tok = build_tokenizer(args.vocab_size, tokenizer_texts(args.seed))
        tok.save(str(work / "tokenizer.json"))
        (work / "tokenizer_config.json").write_text(
            json.dumps(_tokenizer_config(tok), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
    else:
        # Continue from a model this script wrote: its tokenizer and architecture, not the arguments'.
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(args.init_from / name, work / name)
    (work / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS, max_pixels=args.max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    (work / "preprocessor_config.json").write_text(
        json.dumps(image_processor.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(work))
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = ImageOnlyQwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    processor.tokenizer.padding_side = "left"

    torch.manual_seed(args.seed)
    if args.init_from is None:
        config = _model_config(model_size(args), tok)
        # Windows as large as any training picture: every block sees the whole image anyway.
        config.vision_config.window_size = 448
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    else:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(args.init_from), dtype=torch.float32)
        config = model.config
    eos, pad = config.text_config.eos_token_id, config.text_config.pad_token_id
    generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[eos, pad],
        pad_token_id=pad,
        do_sample=False,
    )
    model.generation_config = generation_config
    use_matmul_patch_embedding(model)
    return processor, model, generation_config


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------


def training_sample(
    seed: int,
    index: int,
    paraphrase_frac: float,
    mix: tuple[float, ...] | None = None,
    classic_frac: float = 0.0,
) -> synthetic.Sample:
    """The ``index``-th training sample: canonical or reworded question, question before or after images,
    a varied picture (or a classic one, ``classic_frac`` of the time)."""
    rng = random.Random(seed * 7_368_787 + index)
    paraphrase = rng.random() < paraphrase_frac
    text_first = rng.random() < 0.5
    varied = rng.random() >= classic_frac
    return synthetic.make_sample(
        seed, index, paraphrase=paraphrase, text_first=text_first, weights=mix, varied=varied
    )


def vision_targets(
    samples: list[synthetic.Sample], grid_thw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per merged vision token (a 28x28 cell of the resized image): which shape and colour covers it.

    Class 0 is background (no shape covers 15% of the cell); shapes are ``1 + SHAPES.index(kind)``,
    colours ``1 + list(COLOURS).index(colour)``. The order is the vision tower's output order (images in
    batch order, cells row-major), so these line up with the merger's output.
    """
    colours = list(synthetic.COLOURS)
    shape_t: list[np.ndarray] = []
    colour_t: list[np.ndarray] = []
    scenes = [scene for sample in samples for scene in sample.scenes]
    for scene, (_, gh, gw) in zip(scenes, grid_thw.tolist(), strict=True):
        if not scene.shapes:
            shape_t.append(np.zeros(gh * gw // 4, dtype=np.int64))
            colour_t.append(np.zeros(gh * gw // 4, dtype=np.int64))
            continue
        mask = np.asarray(scene.render_mask().resize((gw * 14, gh * 14), Image.NEAREST))
        cells = mask.reshape(gh // 2, 28, gw // 2, 28).transpose(0, 2, 1, 3).reshape(-1, 28 * 28)
        counts = np.stack([(cells == v).sum(1) for v in range(1, len(scene.shapes) + 1)], axis=1)
        best = counts.argmax(1)
        covered = counts.max(1) >= 0.15 * 28 * 28
        kinds = np.array([1 + synthetic.SHAPES.index(s.kind) for s in scene.shapes])
        cols = np.array([1 + colours.index(s.colour) for s in scene.shapes])
        shape_t.append(np.where(covered, kinds[best], 0))
        colour_t.append(np.where(covered, cols[best], 0))
    return torch.from_numpy(np.concatenate(shape_t)), torch.from_numpy(np.concatenate(colour_t))


def encode(processor: Any, samples: list[Any], aux: bool = True) -> dict[str, torch.Tensor]:
    """Prompt + answer + ``<|im_end|>`` for each sample, left-padded, with ``labels`` on the answer only.

    ``samples`` have ``messages()``, ``answer`` and ``images`` (:class:`synthetic.Sample` or any alike);
    ``aux``: also the per-vision-token targets (synthetic samples only).
    """
    texts, images, answer_ids = [], [], []
    tokenizer = processor.tokenizer
    for sample in samples:
        prompt = processor.apply_chat_template(sample.messages(), tokenize=False, add_generation_prompt=True)
        texts.append(prompt + sample.answer + "<|im_end|>")
        images.extend(sample.images)
        answer_ids.append(tokenizer(sample.answer + "<|im_end|>", add_special_tokens=False)["input_ids"])
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    labels = torch.full_like(batch["input_ids"], IGNORE)
    for row, ids in enumerate(answer_ids):
        tail = batch["input_ids"][row, -len(ids) :]
        if tail.tolist() != ids:  # the answer must tokenize the same inside the whole text
            raise RuntimeError(f"answer tokens differ in context: {samples[row].answer!r}")
        labels[row, -len(ids) :] = tail
    batch["labels"] = labels
    if aux:
        batch["aux_shape"], batch["aux_colour"] = vision_targets(samples, batch["image_grid_thw"])
    return dict(batch)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move every tensor of ``batch`` to ``device``."""
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------
# Evaluation (teacher-forced exact match == greedy exact match)
# ---------------------------------------------------------------------------------------------------


def eval_set(seed: int, n_per_type: int, varied: bool = False) -> list[synthetic.Sample]:
    """Held-out samples: ``n_per_type`` of each question type, canonical questions, question first;
    classic or varied pictures."""
    samples = []
    for qtype in synthetic.QUESTION_TYPES:
        samples += [synthetic.make_sample(seed, i, qtype, varied=varied) for i in range(n_per_type)]
    return samples


def answer_logits(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict answer tokens only (the LM head skips the prompt).

    Returns ``(logits, targets, rows)``: one row per answer token, with its target id and batch row.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels" and not k.startswith("aux_")}
    hidden = model.model(**inputs).last_hidden_state[:, :-1]
    target = batch["labels"][:, 1:]
    mask = target != IGNORE
    rows = torch.arange(target.shape[0], device=target.device)[:, None].expand_as(target)[mask]
    return model.lm_head(hidden[mask]), target[mask], rows


@torch.no_grad()
def exact_match(
    model: Any, processor: Any, samples: list[Any], device: torch.device, batch_size: int = 32
) -> dict[str, float]:
    """Exact-match accuracy per question type (and ``all``), teacher-forced in one pass per batch."""
    was_training = model.training
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    order = sorted(range(len(samples)), key=lambda i: sample_length(samples[i]))
    samples = [samples[i] for i in order]  # similar lengths together: less padding
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        logits, target, rows = answer_logits(model, to_device(encode(processor, chunk, aux=False), device))
        wrong = torch.zeros(len(chunk), dtype=torch.long, device=target.device)
        wrong.index_add_(0, rows, (logits.argmax(-1) != target).long())
        for sample, bad in zip(chunk, wrong.tolist(), strict=True):
            hits[sample.qtype].append(bad == 0)
    model.train(was_training)
    result = {qtype: sum(v) / len(v) for qtype, v in sorted(hits.items())}
    result["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return result


def format_accuracy(acc: dict[str, float]) -> str:
    """``describe 0.98  colour 1.00 ...``."""
    return "  ".join(f"{k} {v:.3f}" for k, v in acc.items())


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def param_groups(model: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """AdamW groups: vision tower vs the rest, each split into decayed matrices and undecayed vectors."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = defaultdict(list)
    for name, param in model.named_parameters():
        vision = name.startswith("model.visual.")
        decay = param.ndim >= 2 and "embed_tokens" not in name
        groups[(vision, decay)].append(param)
    return [
        {
            "params": params,
            "lr": args.vision_lr if vision else args.lr,
            "peak_lr": args.vision_lr if vision else args.lr,
            "weight_decay": args.weight_decay if decay else 0.0,
        }
        for (vision, decay), params in sorted(groups.items())
    ]


def lr_factor(step: int, args: argparse.Namespace, time_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine from 1 down to ``min_lr_ratio``.

    The cosine follows the steps (``args.steps``) or, when it is further along, ``time_progress`` (the
    share of the budget used): on a slow or busy machine the run still anneals before the budget ends.
    """
    if step < args.warmup:
        return (step + 1) / args.warmup
    progress = min(1.0, max((step - args.warmup) / max(1, args.steps - args.warmup), time_progress))
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def save(model: Any, work: Path, out: Path, info: dict[str, Any]) -> None:
    """Write the weights and configs into ``work`` and move every file into ``out`` (config.json last)."""
    save_model(model, work)
    (work / "training.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in work.iterdir() if p.name != "config.json") + ["config.json"]
    for name in names:
        shutil.copyfile(work / name, out / name)


def train_step(
    model: Any,
    processor: Any,
    optimizer: torch.optim.Optimizer,
    samples: list[synthetic.Sample],
    args: argparse.Namespace,
    device: torch.device,
    aux: AuxHead | None,
) -> tuple[float, float]:
    """One optimizer step on ``samples``: mean cross-entropy over all their answer tokens (+ aux loss).

    The samples are sorted by length and cut into ``args.micro_batches`` chunks (less left padding); the
    gradients of the chunks add up to those of the whole batch. Returns ``(answer loss, aux loss)``.
    """
    order = sorted(range(len(samples)), key=lambda i: (sample_length(samples[i]), i))
    size = math.ceil(len(order) / max(1, args.micro_batches))
    chunks = [order[k : k + size] for k in range(0, len(order), size)]
    batches = [to_device(encode(processor, [samples[i] for i in chunk]), device) for chunk in chunks]
    total = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    total_cells = sum(int(b["aux_shape"].numel()) for b in batches)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = aux_sum = 0.0
    for batch in batches:
        logits, target, _ = answer_logits(model, batch)
        loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum") / total
        loss_sum += loss.item()
        if aux is not None:
            aux_loss = aux.loss(batch["aux_shape"], batch["aux_colour"]) / total_cells
            aux_sum += aux_loss.item()
            loss = loss + args.aux_weight * aux_loss
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss_sum, aux_sum


class AuxHead(torch.nn.Module):
    """Training-only linear probes on the vision tower's merged tokens: shape and colour per token.

    A dense auxiliary loss gives the vision tower a direct signal about what is where, instead of only
    what trickles back through the language model. The head is not part of the saved model.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        dim = model.config.vision_config.out_hidden_size
        self.shape = torch.nn.Linear(dim, 1 + len(synthetic.SHAPES))
        self.colour = torch.nn.Linear(dim, 1 + len(synthetic.COLOURS))
        self.features: torch.Tensor | None = None
        model.model.visual.register_forward_hook(self._capture)

    def _capture(self, module: Any, inputs: Any, output: Any) -> None:
        self.features = output.pooler_output

    def loss(self, shape_t: torch.Tensor, colour_t: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of both probes on the tokens of the last vision forward."""
        assert self.features is not None and self.features.shape[0] == shape_t.shape[0]
        ce = torch.nn.functional.cross_entropy
        return ce(self.shape(self.features), shape_t, reduction="sum") + ce(
            self.colour(self.features), colour_t, reduction="sum"
        )


def vision_tokens(width: int, height: int) -> int:
    """Merged vision tokens of a ``width`` x ``height`` picture after the demo processor's resize."""
    h, w = smart_resize(
        height, width, factor=28, min_pixels=MIN_PIXELS, max_pixels=synthetic.PROCESSOR_MAX_PIXELS
    )
    return (h // 28) * (w // 28)


def sample_length(sample: Any) -> int:
    """A cheap proxy for a sample's token count: its vision tokens plus its text length."""
    vision = sum(vision_tokens(*im.size) for im in sample.images)
    return vision + len(sample.question + sample.answer) // 4


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a resumable checkpoint atomically (a crash mid-write leaves the previous one)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole training; returns the summary written to ``training.json``."""
    t_start = time.monotonic()
    cpu_start = time.process_time()
    budget = args.budget_minutes * 60 if args.budget_minutes > 0 else math.inf
    deadline = t_start + budget
    schedule_end = deadline - args.reserve_minutes * 60
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="shapes-demo-"))
    try:
        processor, model, _ = build_components(args, work)
        model.to(device).train()
        n_params = sum(p.numel() for p in model.parameters())
        n_vision = sum(p.numel() for p in model.model.visual.parameters())
        log(f"model: {n_params / 1e6:.2f}M parameters ({n_vision / 1e6:.2f}M vision), device {device}")
        mix = tuple(float(w) for w in args.mix.split(","))
        aux = AuxHead(model).to(device) if args.aux_weight > 0 else None
        groups = param_groups(model, args)
        if aux is not None:
            groups.append({"params": list(aux.parameters()), "lr": args.vision_lr, "peak_lr": args.vision_lr})
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        held_out = eval_set(args.seed + EVAL_SEED_OFFSET, args.eval_n)
        held_out_varied = eval_set(args.seed + EVAL_SEED_OFFSET, args.eval_n, varied=True)
        # Progress on the separate renderer's pictures (watched only, never trained on; another seed
        # than the eval script's and the tests').
        separate = eval_renderer.eval_set(args.seed + EVAL_SEED_OFFSET, max(4, args.eval_n // 2))

        def evaluate() -> dict[str, dict[str, float]]:
            return {
                "classic": exact_match(model, processor, held_out, device),
                "varied": exact_match(model, processor, held_out_varied, device),
                "separate": exact_match(model, processor, separate, device),
            }

        history: list[dict[str, Any]] = []
        losses: list[float] = []
        aux_losses: list[float] = []
        step = 0
        earlier_minutes = earlier_cpu = 0.0  # time spent before a resumed checkpoint
        if args.checkpoint is not None and args.checkpoint.exists():
            state = torch.load(args.checkpoint, map_location=device, weights_only=False)
            if state["args"] != checkpoint_args(args):
                raise SystemExit(f"{args.checkpoint} was written by a run with other arguments")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if aux is not None:
                aux.load_state_dict(state["aux"])
            step, history = state["step"], state["history"]
            earlier_minutes, earlier_cpu = state["minutes"], state["cpu_minutes"]
            log(f"resumed from {args.checkpoint} at step {step}")

        def minutes() -> float:
            return earlier_minutes + (time.monotonic() - t_start) / 60

        def cpu_minutes() -> float:
            return earlier_cpu + (time.process_time() - cpu_start) / 60

        t_log = time.monotonic()
        stopped_by = "steps"
        while step < args.steps:
            if time.monotonic() >= deadline:
                stopped_by = "budget"
                log(f"wall-clock budget of {args.budget_minutes} min reached at step {step}")
                break
            time_progress = (time.monotonic() - t_start) / max(1.0, schedule_end - t_start)
            if step >= args.warmup and time_progress >= 1.0:
                stopped_by = "budget"
                log(f"time budget for training reached at step {step} (lr schedule done)")
                break
            factor = lr_factor(step, args, time_progress)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * factor
            start = args.data_offset + step * args.batch_size
            samples = [
                training_sample(args.seed, start + i, args.paraphrase_frac, mix, args.classic_frac)
                for i in range(args.batch_size)
            ]
            loss, aux_loss = train_step(model, processor, optimizer, samples, args, device, aux)
            losses.append(loss)
            aux_losses.append(aux_loss)
            step += 1
            if step % args.log_every == 0:
                now = time.monotonic()
                rate = len(losses) / (now - t_log)
                t_log = now
                log(
                    f"step {step}/{args.steps} loss {sum(losses) / len(losses):.4f} "
                    f"aux {sum(aux_losses) / len(aux_losses):.4f} "
                    f"lr {args.lr * factor:.2e} {rate:.3f} steps/s elapsed {minutes():.1f} min "
                    f"cpu {cpu_minutes():.1f} min"
                )
                losses.clear()
                aux_losses.clear()
            if step % args.eval_every == 0 or step == args.steps:
                acc = evaluate()
                history.append({"step": step, "minutes": minutes(), **acc})
                for name, value in acc.items():
                    log(f"held-out exact match @ {step}, {name}: {format_accuracy(value)}")
                if args.checkpoint is not None:
                    save_checkpoint(
                        args.checkpoint,
                        {
                            "args": checkpoint_args(args),
                            "step": step,
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "aux": aux.state_dict() if aux is not None else None,
                            "history": history,
                            "minutes": minutes(),
                            "cpu_minutes": cpu_minutes(),
                        },
                    )
        if history and history[-1]["step"] == step:
            final = {k: history[-1][k] for k in ("classic", "varied", "separate")}
        else:
            final = evaluate()
        for name, value in final.items():
            log(f"final held-out exact match @ {step}, {name}: {format_accuracy(value)}")
        info = {
            "args": checkpoint_args(args),
            "steps_done": step,
            "stopped_by": stopped_by,
            "minutes": round(minutes(), 2),
            "cpu_minutes": round(cpu_minutes(), 2),
            "parameters": n_params,
            "vision_parameters": n_vision,
            "final_held_out_exact_match": final,
            "history": history,
            "torch": torch.__version__,
        }
        model.to("cpu").eval()
        save(model, work, args.out, info)
        size = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
        log(f"saved to {args.out} ({size / 1e6:.1f} MB) after {info['minutes']:.1f} min")
        return info
    finally:
        shutil.rmtree(work, ignore_errors=True)


def checkpoint_args(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments that define a run (a checkpoint resumes only a run with the same ones)."""
    skip = {"out", "checkpoint", "log_every"}
    return {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items()) if k not in skip}


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    args.out = args.out.expanduser().resolve()
    log(f"arguments: {json.dumps({k: str(v) for k, v in vars(args).items()})}")
    log(f"python {sys.version.split()[0]}, torch {torch.__version__}, pid {os.getpid()}")
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
