"""Prompts rebuilt from a recorded image layout (tritonvlm.image_layout): for every family, the same ids
and prompt tensors as from the images themselves, without decoding or processing an image."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_image
from family_harness import FAMILIES

from tritonvlm import image_layout
from tritonvlm.image_layout import (
    join_layouts,
    layout_images,
    pack_image_layouts,
    record_layout,
    replay_features,
    unpack_image_layouts,
)
from tritonvlm.preprocessing import ChatPreprocessor, decode_image
from tritonvlm.wire import InvalidRequestError


def turn(text: str, num_images: int) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_rebuilds_the_prompt_from_the_layout(name: str, family_kit, monkeypatch) -> None:
    """Two images of different sizes (one where the family takes one), then a later turn with more text:
    ids and prompt-dependent tensors equal the full path's, and no image is decoded on the way."""
    kit = family_kit(name)
    limit = kit.family.max_images_per_prompt
    images = [make_image(96, 64, "red"), make_image(40, 120, "blue", "square")][: limit or 2]
    first = [turn("What is in these pictures?", len(images))]
    later = [*first, {"role": "assistant", "content": "Shapes."}, turn("Which colors?", 0)]
    preprocessor = ChatPreprocessor(kit.family, kit.family_cls.load_processor(str(kit.model_dir)))
    full = preprocessor(first, images)
    assert full.layout is not None and len(full.layout) < 4096  # grids and sizes, not pixels
    if kit.family.per_image_preprocessing:  # one layout per image: joined, they are the set's
        per_image = unpack_image_layouts(full.layout)
        full.layout = join_layouts([per_image[i] for i in range(len(images))])
    assert layout_images(full.layout) == len(images)
    expected = {"first": full, "later": kit.preprocessor(later, images)}

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr("tritonvlm.preprocessing.decode_image", no_decoding)
    for label, messages in (("first", first), ("later", later)):
        rebuilt = preprocessor(messages, [], layout=full.layout)
        want = expected[label]
        np.testing.assert_array_equal(rebuilt.input_ids, want.input_ids, err_msg=label)
        assert rebuilt.mm.keys() == set(kit.family.prompt_mm_tensors) & want.mm.keys()
        for key in rebuilt.mm:
            np.testing.assert_array_equal(rebuilt.mm[key], want.mm[key], err_msg=f"{label}: {key}")
    assert not isinstance(preprocessor.processor.image_processor, image_layout._ImageProcessorTap)


@pytest.mark.parametrize("name", FAMILIES)
def test_images_seen_before_are_replayed_beside_new_ones(name: str, family_kit, monkeypatch) -> None:
    """Per-image families: three images, the first and last sent as their layouts. Only the middle
    one is decoded and processed; the ids equal the full path's, the multimodal tensors are the
    middle image's part of the full path's, its layout is its own; and processing the images one by
    one gives what the processor gives for all of them at once."""
    kit = family_kit(name)
    if not kit.family.per_image_preprocessing:
        pytest.skip("this family processes a request's images together")
    images = [make_image(96, 64, "red"), make_image(40, 120, "blue", "square"), make_image(64, 64, "green")]
    messages = [turn("What is in these pictures?", 3)]
    full = kit.preprocessor(messages, images)
    together = kit.family.process(
        kit.processor, messages, [decode_image(data, i) for i, data in enumerate(images)]
    )
    assert full.mm.keys() == together.mm.keys()
    for key in full.mm:
        np.testing.assert_array_equal(full.mm[key], together.mm[key])
    np.testing.assert_array_equal(full.input_ids, together.input_ids)
    layouts = unpack_image_layouts(full.layout)
    assert sorted(layouts) == [0, 1, 2]

    decoded = []
    real_decode = decode_image
    monkeypatch.setattr(
        "tritonvlm.preprocessing.decode_image",
        lambda data, i, *a: decoded.append(i) or real_decode(data, i, *a),
    )
    known = pack_image_layouts({0: layouts[0], 2: layouts[2]})
    mixed = kit.preprocessor(messages, [b"", images[1], b""], layout=known)
    assert decoded == [1]
    np.testing.assert_array_equal(mixed.input_ids, full.input_ids)
    middle = kit.family.split_images(full.mm)[1]
    assert mixed.mm.keys() == middle.keys()
    for key in middle:
        np.testing.assert_array_equal(mixed.mm[key], middle[key])
    assert unpack_image_layouts(mixed.layout) == {1: layouts[1]}
    with pytest.raises(InvalidRequestError, match="without its file"):
        kit.preprocessor(messages, images, layout=known)
    # Forged layouts whose stand-ins are each within the bound but not together: refused.
    big = record_layout({"pixel_values": np.broadcast_to(np.float32(0), (1 << 18, 1 << 10))}, 1)
    with pytest.raises(ValueError, match="stand-in elements in all"):
        kit.preprocessor(messages, [b"", images[1], b""], layout=pack_image_layouts({0: big, 2: big}))


def test_layout_keeps_small_values_and_only_the_shape_of_pixels() -> None:
    pixels = np.ones((1024, 1176), dtype=np.float32)
    features = {"pixel_values": pixels, "image_grid_thw": np.array([[1, 32, 32]]), "num_tiles": [[4]]}
    layout = record_layout(features, num_images=1)
    assert layout is not None and len(layout) < 1024
    replay = replay_features(layout)
    assert replay["pixel_values"].shape == pixels.shape and replay["pixel_values"].dtype == np.float32
    assert replay["pixel_values"].strides == (0, 0) and not replay["pixel_values"].flags.writeable
    np.testing.assert_array_equal(replay["image_grid_thw"], features["image_grid_thw"])
    assert replay["num_tiles"] == [[4]]
    assert record_layout({"names": ["a", "b"]}, 1) is None  # not numeric: no layout
    forged = record_layout({"pixel_values": np.broadcast_to(np.float32(0), (1 << 20, 1 << 10))}, 1)
    with pytest.raises(ValueError, match="impossible shape"):
        replay_features(forged)


def test_layout_and_images_together_are_refused(family_kit) -> None:
    kit = family_kit(FAMILIES[0])
    layout = kit.preprocessor([turn("Hi", 1)], [make_image(32, 32)]).layout
    per_image = unpack_image_layouts(layout)
    layout = join_layouts(list(per_image.values())) if per_image else layout  # one layout of the set
    with pytest.raises(InvalidRequestError, match="not both"):
        kit.preprocessor([turn("Hi", 1)], [make_image(32, 32)], layout=layout)
    with pytest.raises(InvalidRequestError, match="2 image parts but 1"):
        kit.preprocessor([turn("Hi", 2)], [], layout=layout)
