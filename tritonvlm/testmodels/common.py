"""What every family's offline test-model builder shares: a BPE tokenizer trained in-process on a small
corpus, deterministic writing of a checkpoint directory, and the log line format.

A test model is a directory laid out like a real checkpoint of its family (config, safetensors weights,
tokenizer files, chat template, processor config), built offline from a seed: the same family and size
give the same bytes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers.utils import logging as hf_logging

SEED = 0

# Qwen2's pre-tokenizer split (the same regex transformers' Qwen2Tokenizer uses); fine for any family.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# A small English corpus (plus a little non-ASCII) the tokenizer is trained on. Byte-level BPE encodes
# any text whatever it was trained on; the corpus only decides which merges exist.
CORPUS = """\
You are a helpful assistant. Describe the image in one sentence.
What is in this picture? There is a red circle in the middle of a white square.
How many shapes can you see? I can see three shapes: a circle, a square and a triangle.
The blue square is on the left and the green triangle is on the right.
What color is the circle? The circle is red. The background is white.
Is there a cat in the photo? No, there is no cat. There is a small brown dog on the grass.
The dog is running across a park on a sunny afternoon, and two children are playing with a ball.
A yellow bus is parked next to a tall building with many windows.
The sky is clear and blue, with a few white clouds near the horizon.
Please answer the question about the image as briefly as you can.
Compare the two pictures. The first one shows a beach; the second one shows a snowy mountain.
In the first image the sun is setting over the sea. In the second image it is snowing.
Read the text on the sign. The sign says "Open every day from nine to five".
Count the apples on the table. There are four apples and one orange.
The kitchen has a wooden table, three chairs, a window and a green plant in a pot.
A man in a black coat is walking along the street while holding an umbrella.
The woman is reading a book under a tree; her bicycle leans against the fence.
Where was this photo taken? It looks like a busy market in a large city.
What time of day is it? Judging by the long shadows, it is early in the morning.
The chart shows that sales grew every month between January and June.
The table lists the names, ages and favourite colours of five students.
This is a diagram of a simple machine: a lever, a pulley and a wheel.
Thank you! Could you tell me more about the objects in the background?
Sure. Behind the car there is a small shop, a lamp post and a row of trees.
I am not sure what the object is, but it could be a lamp or a vase.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.
Red, orange, yellow, green, blue, purple, pink, brown, black, white and gray.
Circle, square, triangle, rectangle, star, heart, oval, diamond and hexagon.
Above, below, left, right, inside, outside, behind, in front of, next to, between.
Large, small, tiny, huge, long, short, wide, narrow, bright, dark, old and new.
The numbers are 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100, 2024 and 3.14.
def add(a, b):
    return a + b
print("hello, world")
{"name": "image", "width": 640, "height": 480}
The café on the corner serves crème brûlée and fresh croissants.
Grüße aus München! Das Wetter ist schön und die Straße ist voller Menschen.
¿Dónde está la estación? Está a la izquierda, junto al museo.
Les enfants jouent dans le jardin près de la rivière.
你好，世界。这是一张图片。图片里有一个红色的圆。
こんにちは。これは写真です。
Привет, мир! Это красный круг.
"""

# Syllables for deterministic pseudo-words that fill the BPE vocabulary up to the requested size.
_ONSETS = ["b", "br", "d", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "pl", "r", "s", "st", "t", "tr"]
_ONSETS += ["v", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "n", "r", "s", "l", "t"]


def log(msg: str) -> None:
    """A progress line of ``build-test-model``."""
    print(f"[build-test-model] {msg}", flush=True)


def pseudo_words(count: int, seed: int = SEED) -> list[str]:
    """``count`` distinct lower-case pseudo-words, the same ones on every run."""
    rng = random.Random(seed)
    seen: set[str] = set()
    words: list[str] = []
    while len(words) < count:
        syllables = rng.choice((2, 2, 3, 3, 4))
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
        )
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def training_texts(num_pseudo_words: int, extra: str = "") -> list[str]:
    """The lines a BPE is trained on: the corpus (weighted, so its merges come first), then pseudo-words."""
    lines = (CORPUS + extra).splitlines()
    texts = lines * 8
    words = pseudo_words(num_pseudo_words)
    # Each pseudo-word twice (with and without a leading space) so it clears min_frequency=2.
    for i in range(0, len(words), 12):
        chunk = words[i : i + 12]
        texts.append(" ".join(chunk))
        texts.append(" ".join(reversed(chunk)))
    return texts


def train_bpe(vocab_size: int, texts: list[str], special_tokens: list[tuple[str, bool]]) -> Tokenizer:
    """A byte-level BPE with exactly ``vocab_size`` tokens, the last ones ``special_tokens`` in order
    (``(token, special)``: special tokens are skipped when decoding, the others are plain added tokens).

    Raises ``RuntimeError`` if ``texts`` is too small for BPE to learn enough merges.
    """
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    bpe_size = vocab_size - len(special_tokens)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != bpe_size:
        raise RuntimeError(f"BPE learned {tok.get_vocab_size()} tokens, wanted {bpe_size}: corpus too small")
    for token, special in special_tokens:
        added = AddedToken(token, special=special, normalized=False)
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
    assert tok.get_vocab_size() == vocab_size
    return tok


def added_tokens_decoder(tok: Tokenizer, special_tokens: list[tuple[str, bool]]) -> dict[str, Any]:
    """The ``added_tokens_decoder`` entry of ``tokenizer_config.json`` for ``special_tokens``."""
    return {
        str(tok.token_to_id(token)): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for token, special in special_tokens
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """JSON with sorted keys, so the same data gives the same bytes."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def save_model(model: Any, out: Path) -> None:
    """``save_pretrained`` (safetensors) without progress bars, then ``config.json`` and
    ``generation_config.json`` rewritten sorted, so that the same weights give the same bytes."""
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    for name in ("config.json", "generation_config.json"):
        if (out / name).exists():
            write_json(out / name, json.loads((out / name).read_text(encoding="utf-8")))


def save_greedy_model(model: Any, out: Path, started: float, bos: int, eos: int | list[int], pad: int) -> int:
    """Give ``model`` a greedy generation config (``bos``/``eos``/``pad`` ids), save it with
    :func:`save_model` and log its size; returns its parameter count."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, do_sample=False
    )
    num_params = sum(p.numel() for p in model.parameters())
    save_model(model, out)
    log(f"model: {num_params / 1e6:.2f}M parameters ({time.perf_counter() - started:.1f}s)")
    return num_params


def build_sized(
    out_dir: str | os.PathLike[str],
    size: str,
    sizes: dict[str, Any],
    family_label: str,
    build_into: Callable[[Path, Any], Any],
) -> Path:
    """A family's ``build_test_model``: check ``size`` against ``sizes`` and build
    ``build_into(tmp, sizes[size])`` with :func:`write_model_dir`."""
    if size not in sizes:
        raise ValueError(f"unknown test model size {size!r}; use one of {sorted(sizes)}")
    label = f"{size} {family_label} test model"
    return write_model_dir(out_dir, label, lambda tmp: build_into(tmp, sizes[size]))


def write_model_dir(out_dir: str | os.PathLike[str], label: str, build_into: Callable[[Path], Any]) -> Path:
    """Build a checkpoint with ``build_into(tmp_dir)`` in a temporary directory next to ``out_dir``,
    then move the files in with ``config.json`` last, so a directory holding ``config.json`` is
    complete. Existing files of the same names are replaced; other files are left alone."""
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"building {label} into {out}")
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build_into(tmp)
        out.mkdir(parents=True, exist_ok=True)
        names = sorted(p.name for p in tmp.iterdir() if p.name != "config.json") + ["config.json"]
        for name in names:
            (tmp / name).chmod(0o644)  # some writers create 0600 files
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    log(f"done in {time.perf_counter() - t0:.1f}s ({total / 1e6:.1f} MB)")
    return out
