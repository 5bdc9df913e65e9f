"""Rebuild the embedded tiny Qwen2.5-VL (quantsuite/assets/tiny-qwen2.5-vl): its language model on the bundled
captions, then vision tower and language model together on the bundled scenes' image prompts, alternating with
text batches (quantsuite.models.train_tiny, train_tiny_vision).

python scripts/train_tiny.py                 # both, ~2-3 CPU minutes, deterministic from --seed
python scripts/train_tiny.py --images-only   # only the second part, on the committed model
"""

import argparse
import json

import torch

from quantsuite.models import TINY_DIR, train_tiny, train_tiny_vision

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--steps", type=int, default=600, help="language-model steps")
    parser.add_argument("--image-steps", type=int, default=600, help="joint image + text steps")
    parser.add_argument("--images-only", action="store_true")
    arguments = parser.parse_args()
    torch.set_num_threads(2)
    if not arguments.images_only:
        train_tiny(TINY_DIR, seed=arguments.seed, steps=arguments.steps)
    print(json.dumps(train_tiny_vision(TINY_DIR, seed=arguments.seed, steps=arguments.image_steps), indent=1))
