"""scripts/train_demo_model.py on a very small model: a run from scratch writes a loadable model directory,
and a run ``--init-from`` it continues from its weights with its tokenizer and architecture.

Two steps of two samples each; the real run's arguments are its defaults (see the README).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo_model.py"
SMALL = [
    "--steps", "2", "--batch-size", "2", "--micro-batches", "1", "--warmup", "1", "--eval-every", "2",
    "--eval-n", "1", "--log-every", "1", "--budget-minutes", "0", "--reserve-minutes", "0",
]  # fmt: skip
TINY = [
    "--hidden", "32", "--layers", "1", "--intermediate", "64", "--heads", "2", "--kv-heads", "1",
    "--vision-hidden", "32", "--vision-depth", "1", "--vision-intermediate", "64", "--vision-heads", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def trainer():
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_from_scratch_then_init_from(trainer, tmp_path: Path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    first = tmp_path / "first"
    assert trainer.main([*SMALL, *TINY, "--out", str(first)]) == 0
    info = json.loads((first / "training.json").read_text())
    assert info["steps_done"] == 2 and info["stopped_by"] == "steps"
    assert set(info["final_held_out_exact_match"]) == {"classic", "varied", "separate"}
    config = json.loads((first / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 32
    assert json.loads((first / "preprocessor_config.json").read_text())["size"]["longest_edge"] == 224 * 224

    # Continued: the first model's tokenizer and architecture win over the (default) size arguments.
    second = tmp_path / "second"
    assert trainer.main([*SMALL, "--init-from", str(first), "--out", str(second), "--seed", "5"]) == 0
    assert (second / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    assert json.loads((second / "config.json").read_text())["text_config"]["hidden_size"] == 32
    a = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(first)).state_dict()
    b = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(second)).state_dict()
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # trained further
