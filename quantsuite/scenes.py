"""The bundled image–caption pairs: generated scenes whose captions say what is in them, in COCO's own layout.

Each scene is a plain background with one to three coloured shapes (circle, square, triangle) of a few sizes in a
few places; its five captions name the shapes, their colours, sizes and places, and the background, in varied words.
A model that reads the image can predict those words; one that does not can only guess. The files in
`quantsuite/assets/scenes/` (`captions.json`, COCO captions format with its `images` list, and `images/*.png`) are what
this module writes; `python -m quantsuite.scenes` writes them again, identically for a given seed.

    >>> scene = make_scene(7)
    >>> scene.captions[0]                              # doctest: +SKIP
    'a large red circle at the top left on a white background'
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SCENES_DIR = Path(__file__).resolve().parent / "assets" / "scenes"
SCENES_CAPTIONS = SCENES_DIR / "captions.json"
SCENES_IMAGES = SCENES_DIR / "images"
SIZE = 224  # pixels per side of a scene as written (the data layer resizes to its image size)
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40),
           "black": (20, 20, 20), "white": (245, 245, 245), "purple": (140, 60, 180),
           "orange": (245, 140, 30)}  # fmt: skip
BACKGROUNDS = ("white", "black", "yellow", "blue", "green")
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.14, "large": 0.3}  # radius as a share of the side
PLACES = {"at the top left": (0.27, 0.27), "at the top right": (0.73, 0.27), "at the bottom left": (0.27, 0.73),
          "at the bottom right": (0.73, 0.73), "in the middle": (0.5, 0.5)}  # fmt: skip


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    place: str

    def phrase(self, with_place: bool = True) -> str:
        return f"a {self.size} {self.colour} {self.kind}" + (f" {self.place}" if with_place else "")

    def named(self) -> str:
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    image_id: int
    background: str
    shapes: tuple[Shape, ...]
    captions: tuple[str, ...]

    @property
    def file_name(self) -> str:
        return f"{self.image_id:012d}.png"

    def draw(self) -> Image.Image:
        image = Image.new("RGB", (SIZE, SIZE), COLOURS[self.background])
        pen = ImageDraw.Draw(image)
        for shape in self.shapes:
            x, y = (v * SIZE for v in PLACES[shape.place])
            r = SIZES[shape.size] * SIZE
            box = (x - r, y - r, x + r, y + r)
            fill = COLOURS[shape.colour]
            if shape.kind == "circle":
                pen.ellipse(box, fill=fill)
            elif shape.kind == "square":
                pen.rectangle(box, fill=fill)
            else:
                pen.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
        return image


def _captions(background: str, shapes: tuple[Shape, ...], rng: random.Random) -> tuple[str, ...]:
    listed = [s.phrase() for s in shapes]
    joined = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
    count = {1: "one shape", 2: "two shapes", 3: "three shapes"}[len(shapes)]
    first = shapes[0]
    options = [
        f"{joined} on a {background} background",
        f"a {background} background with {joined}",
        f"{count} on {background}: {', '.join(s.phrase(False) for s in shapes)}",
        f"there is {first.phrase()} and the background is {background}",
        f"a picture of {', '.join(s.named() for s in shapes)} on {background}",
        f"the {first.kind} {first.place} is {first.colour} and {first.size}",
    ]
    rng.shuffle(options)
    return tuple(options[:5])


def make_scene(image_id: int, seed: int = 0) -> Scene:
    """The scene of `image_id` (deterministic): a background and 1-3 shapes in distinct places, and 5 captions."""
    rng = random.Random(f"{seed}:{image_id}")
    background = rng.choice(BACKGROUNDS)
    places = rng.sample(list(PLACES), rng.randint(1, 3))
    colours = [colour for colour in COLOURS if colour != background]
    size = rng.choice(list(SIZES)) if len(places) == 1 else "small"  # large shapes alone, so none overlap
    shapes = tuple(Shape(rng.choice(SHAPES), rng.choice(colours), size, place) for place in places)
    return Scene(image_id, background, shapes, _captions(background, shapes, rng))


def write_scenes(directory: Path = SCENES_DIR, count: int = 96, seed: int = 0) -> Path:
    """Write `count` scenes as a COCO-layout folder (`captions.json`, `images/`), replacing `directory` whole."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".scenes-", dir=directory.parent))
    try:
        (staging / "images").mkdir()
        images, annotations = [], []
        for image_id in range(1, count + 1):
            scene = make_scene(image_id, seed)
            scene.draw().save(staging / "images" / scene.file_name, optimize=True)
            images.append({"id": image_id, "file_name": scene.file_name, "width": SIZE, "height": SIZE})
            for caption in scene.captions:
                annotations.append({"image_id": image_id, "id": len(annotations) + 1, "caption": caption})
        document = {"info": {"description": "quantsuite generated scenes (COCO captions format)", "seed": seed},
                    "licenses": [], "images": images, "annotations": annotations}  # fmt: skip
        (staging / "captions.json").write_text(json.dumps(document, indent=1) + "\n")
        staging.chmod(0o755)
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


if __name__ == "__main__":
    print(f"wrote {write_scenes()}")
