"""The bundled generated scenes (quantsuite.scenes): what the generator writes, and captions that say what is drawn."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from quantsuite.scenes import COLOURS, PLACES, SCENES_DIR, SIZE, make_scene, write_scenes


def test_the_bundled_scenes_are_what_the_generator_writes(tmp_path):
    """quantsuite/assets/scenes is `python -m quantsuite.scenes`'s output: the same captions and the same pixels."""
    fresh = write_scenes(tmp_path / "scenes")
    assert json.loads((fresh / "captions.json").read_text()) == json.loads((SCENES_DIR / "captions.json").read_text())
    for name in ("000000000001.png", "000000000050.png", "000000000096.png"):
        assert np.array_equal(np.asarray(Image.open(fresh / "images" / name)),
                              np.asarray(Image.open(SCENES_DIR / "images" / name)))  # fmt: skip


def test_captions_name_what_is_drawn():
    """Each caption names the first shape's colour and the background or the first shape's kind; the drawing has
    the background colour in its corner and the first shape's colour at its centre."""
    for image_id in (1, 2, 33, 96):
        scene = make_scene(image_id)
        first = scene.shapes[0]
        for caption in scene.captions:
            assert first.colour in caption or scene.background in caption, caption
        pixels = np.asarray(scene.draw())
        assert tuple(pixels[0, 0]) == COLOURS[scene.background]
        x, y = (int(v * SIZE) for v in PLACES[first.place])
        assert tuple(pixels[y, x]) == COLOURS[first.colour], (scene, first)
