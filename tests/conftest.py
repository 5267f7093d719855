"""Shared fixtures: the tiny test model (built once per session) and the reference transformers model."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, ImageDraw


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tritonvlm.modeling.testmodel import build_test_model

    return build_test_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny")


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir: Path):
    from tritonvlm.modeling.processor import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def processor(tiny_model_dir: Path):
    from tritonvlm.modeling.processor import load_processor

    return load_processor(str(tiny_model_dir))


def make_image(width: int, height: int, color: str = "red", shape: str = "circle", fmt: str = "PNG") -> bytes:
    """A small synthetic picture, encoded."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.rectangle(box, fill=color)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()
