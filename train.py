"""Trains a ViT from a config file: `python train.py --config configs/quickstart.py`.

The command line is `vit_jax/train/main.py`; the loop is `vit_jax/train/loop.py`.
"""

import sys

from vit_jax.train import main

if __name__ == '__main__':
  sys.exit(main.run())
