"""Write quantsuite/assets/captions_bundled.json: the project's own caption corpus in COCO captions format.

The captions are composed by this script from a small hand-written grammar (subjects with the actions that
suit them, places, details), five captions per made-up image like COCO. The corpus is regular enough for a
tiny model to learn in a couple of CPU minutes, so sensitivity and drift measured on it carry signal.

    python scripts/make_captions.py          # rewrites the asset deterministically (seed 2026)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = {
    "a man": [
        "riding a bicycle",
        "holding an umbrella",
        "throwing a frisbee",
        "reading a newspaper",
        "talking on a cell phone",
        "carrying a surfboard",
        "cutting a large cake",
    ],
    "a woman": [
        "holding a tennis racket",
        "walking a small dog",
        "sitting on a wooden bench",
        "eating a slice of pizza",
        "looking at her laptop",
        "flying a colorful kite",
    ],
    "a young boy": [
        "swinging a baseball bat",
        "kicking a soccer ball",
        "brushing his teeth",
        "playing a video game",
        "riding a skateboard",
    ],
    "a little girl": [
        "eating a donut",
        "hugging a teddy bear",
        "blowing out birthday candles",
        "holding a red balloon",
        "petting a brown horse",
    ],
    "two dogs": [
        "playing with a ball",
        "running across the grass",
        "sleeping on a couch",
        "chasing each other",
        "waiting by the door",
    ],
    "a black cat": [
        "sitting on a laptop",
        "sleeping in a suitcase",
        "looking out of a window",
        "lying on a bed",
        "drinking from a sink",
    ],
    "a group of people": [
        "standing around a table",
        "waiting for a train",
        "watching a baseball game",
        "sharing a large pizza",
        "skiing down a snowy hill",
    ],
    "a giraffe": [
        "eating leaves from a tree",
        "standing in a dirt field",
        "walking near a fence",
        "bending down to drink water",
    ],
    "an elephant": [
        "walking through tall grass",
        "spraying water with its trunk",
        "standing near a river",
        "carrying people on its back",
    ],
    "a red bus": [
        "driving down a city street",
        "parked at a bus stop",
        "turning at an intersection",
        "stopped in heavy traffic",
    ],
    "a surfer": ["riding a large wave", "paddling out to sea", "falling off a surfboard", "standing on the beach"],
    "a plate of food": [
        "with broccoli and rice",
        "topped with fresh vegetables",
        "next to a glass of wine",
        "with a sandwich and fries",
    ],
    "a train": [
        "pulling into a station",
        "crossing a metal bridge",
        "traveling through the countryside",
        "waiting on the tracks",
    ],
    "a flock of birds": [
        "flying over the ocean",
        "sitting on a power line",
        "eating bread crumbs",
        "standing in shallow water",
    ],
    "a kitchen": [
        "with white cabinets",
        "with a stainless steel refrigerator",
        "with a wooden table",
        "filled with dirty dishes",
    ],
    "a motorcycle": [
        "parked on the sidewalk",
        "leaning against a brick wall",
        "racing around a track",
        "covered in mud",
    ],
    "a teddy bear": ["sitting on a chair", "wearing a blue hat", "lying in the snow", "next to a pillow"],
    "a clock tower": ["standing over the town square", "lit up at night", "against a cloudy sky"],
    "a zebra": ["grazing in a grassy field", "standing next to another zebra", "walking toward a pond"],
    "a pizza": ["with pepperoni and cheese", "sitting on a wooden board", "cut into eight slices"],
}
PLACES = [
    "in a park",
    "on a busy street",
    "at the beach",
    "in a living room",
    "near a lake",
    "in front of a building",
    "on a sunny day",
    "at night",
    "in the snow",
    "inside a restaurant",
    "next to a fence",
    "in a field",
    "on a city sidewalk",
    "under a blue sky",
    "in a zoo",
]
OPENERS = ["", "", "", "there is ", "this is ", "a photo of ", "an image of "]
DETAILS = [
    "",
    "",
    "",
    " while people watch",
    " with trees in the background",
    " on a cloudy afternoon",
    " as the sun sets",
    " with a crowd nearby",
]


def make_corpus(seed: int = 2026, images: int = 96, captions_per_image: int = 5) -> dict:
    """Return a COCO captions document ({"info", "images", "annotations"}) built from the grammar."""
    rng = random.Random(seed)
    subjects = sorted(SUBJECTS)
    document = {
        "info": {
            "description": "quantsuite bundled captions (COCO captions format)",
            "version": "1.0",
            "year": 2026,
            "contributor": "quantsuite",
            "date_created": "2026-11-27",
        },
        "licenses": [],
        "images": [],
        "annotations": [],
    }
    seen: set[str] = set()
    annotation_id = 1
    for image_index in range(images):
        image_id = 100000 + rng.randrange(900000)
        subject = subjects[image_index % len(subjects)]
        document["images"].append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": 640, "height": 480})
        made = 0
        while made < captions_per_image:
            action = rng.choice(SUBJECTS[subject])
            caption = f"{rng.choice(OPENERS)}{subject} {action} {rng.choice(PLACES)}{rng.choice(DETAILS)}."
            caption = caption[0].upper() + caption[1:]
            if caption in seen:
                continue
            seen.add(caption)
            document["annotations"].append({"image_id": image_id, "id": annotation_id, "caption": caption})
            annotation_id += 1
            made += 1
    return document


if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / "quantsuite" / "assets" / "captions_bundled.json"
    target.write_text(json.dumps(make_corpus(), indent=1) + "\n")
    print(f"wrote {target}")
