"""scikit-learn's handwritten digits: 1797 real 8x8 images shipped in the wheel (no download).

The quickstart data set. A fixed stratified 80/20 split (independent of config.seed, so the
test set never changes) gives 'train' (1437) and 'test' (360). Pixels 0..16 are scaled to
0..255 and repeated over 3 channels; nothing else is thrown away.
"""

import numpy as np

from vit_jax.data import table as table_lib
from vit_jax.errors import UserError

SPLITS = ('train', 'test')
IMAGE_SIZE = 8
CLASS_NAMES = tuple(str(digit) for digit in range(10))
_TEST_FRACTION = 0.2
_SPLIT_SEED = 0


def split_rows(split, labels):
  """Sorted rows of the full set (with `labels`) that belong to `split`."""
  if split not in SPLITS:
    raise UserError(f'digits has no split {split!r}; valid: {", ".join(SPLITS)}')
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  train_rows, test_rows = model_selection.train_test_split(
      np.arange(len(labels)), test_size=_TEST_FRACTION, stratify=labels,
      random_state=_SPLIT_SEED)
  return np.sort(train_rows if split == 'train' else test_rows)


def load(split):
  """The digits `split` ('train' or 'test') as an in-memory Table of uint8 (N, 8, 8, 3)."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  rows = split_rows(split, digits.target)
  pixels = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
  pixels = np.repeat(pixels[..., None], 3, axis=-1)  # (1797, 8, 8, 3)
  return table_lib.Table(labels=digits.target[rows].astype(np.int32), pixels=pixels[rows])
