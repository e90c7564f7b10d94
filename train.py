"""Trains a ViT from a config file: `python train.py --config configs/quickstart.py`.

The command line is `vit_jax/train/main.py`; the loop is `vit_jax/train/loop.py`.
"""

import sys

from vit_jax import cpu_allocator

cpu_allocator.start(__name__)  # Before anything else is imported (see there).

from vit_jax.train import main  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  sys.exit(main.run())
