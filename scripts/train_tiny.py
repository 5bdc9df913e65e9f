"""Rebuild the embedded tiny Qwen2.5-VL (quantsuite/assets/tiny-qwen2.5-vl) from the bundled captions.

python scripts/train_tiny.py            # ~1-2 CPU minutes, deterministic from --seed
"""

import argparse
import json

import torch

from quantsuite.models import TINY_DIR, train_tiny

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--steps", type=int, default=600)
    arguments = parser.parse_args()
    torch.set_num_threads(2)
    print(json.dumps(train_tiny(TINY_DIR, seed=arguments.seed, steps=arguments.steps), indent=1))
