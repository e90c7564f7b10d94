"""scikit-learn's handwritten digits: 1797 real 8x8 images shipped in the wheel (no download).

The quickstart data set. A fixed stratified 80/20 split (independent of config.seed, so the
test set never changes) gives 'train' (1437) and 'test' (360). Pixels 0..16 are scaled to
0..255 and repeated over 3 channels; nothing else is thrown away.
"""

import importlib.util
import os

import numpy as np

from vit_jax.data import table as table_lib
from vit_jax.errors import UserError

SPLITS = ('train', 'test')
IMAGE_SIZE = 8
CLASS_NAMES = tuple(str(digit) for digit in range(10))
_TEST_FRACTION = 0.2
_SPLIT_SEED = 0


def split_rows(split, labels):
  """Sorted rows of the full set (with `labels`) that belong to `split`.

  The rows scikit-learn's `train_test_split(rows, test_size=0.2, stratify=labels,
  random_state=0)` gives (its StratifiedShuffleSplit, step for step), computed here because
  importing scikit-learn costs 2 s of every run's start; tests/test_data.py checks the two agree.
  """
  if split not in SPLITS:
    raise UserError(f'digits has no split {split!r}; valid: {", ".join(SPLITS)}')
  num_test = int(np.ceil(_TEST_FRACTION * len(labels)))
  num_train = len(labels) - num_test
  classes, class_of_row, class_counts = np.unique(labels, return_inverse=True,
                                                  return_counts=True)
  rows_of_class = np.split(np.argsort(class_of_row, kind='stable'), np.cumsum(class_counts)[:-1])
  rng = np.random.RandomState(_SPLIT_SEED)
  train_counts = _approximate_mode(class_counts, num_train, rng)
  test_counts = _approximate_mode(class_counts - train_counts, num_test, rng)
  train_rows, test_rows = [], []
  for c in range(len(classes)):
    shuffled = rows_of_class[c].take(rng.permutation(class_counts[c]), mode='clip')
    train_rows.extend(shuffled[:train_counts[c]])
    test_rows.extend(shuffled[train_counts[c]:train_counts[c] + test_counts[c]])
  return np.sort(np.array(train_rows if split == 'train' else test_rows))


def _approximate_mode(class_counts, num_draws, rng):
  """Per-class counts of a stratified draw of `num_draws` (scikit-learn's `_approximate_mode`):
  the floor of each class's share, the rest given by largest remainder, ties broken by `rng`."""
  continuous = class_counts / class_counts.sum() * num_draws
  floored = np.floor(continuous)
  need_to_add = int(num_draws - floored.sum())
  if need_to_add > 0:
    remainder = continuous - floored
    for value in np.sort(np.unique(remainder))[::-1]:
      (tied,) = np.where(remainder == value)
      add_now = min(len(tied), need_to_add)
      floored[rng.choice(tied, size=add_now, replace=False)] += 1
      need_to_add -= add_now
      if need_to_add == 0:
        break
  return floored.astype(int)


def _read_digits():
  """(images float (1797, 8, 8) in 0..16, labels int (1797,)): the CSV inside scikit-learn's
  wheel, read without importing scikit-learn."""
  spec = importlib.util.find_spec('sklearn')
  if spec is None or not spec.submodule_search_locations:
    raise UserError('the digits data set comes with scikit-learn: pip install scikit-learn')
  path = os.path.join(spec.submodule_search_locations[0], 'datasets', 'data', 'digits.csv.gz')
  table = np.loadtxt(path, delimiter=',')
  return table[:, :-1].reshape(-1, IMAGE_SIZE, IMAGE_SIZE), table[:, -1].astype(int)


def load(split):
  """The digits `split` ('train' or 'test') as an in-memory Table of uint8 (N, 8, 8, 3)."""
  images, labels = _read_digits()
  rows = split_rows(split, labels)
  pixels = np.round(images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
  pixels = np.repeat(pixels[..., None], 3, axis=-1)  # (1797, 8, 8, 3)
  return table_lib.Table(labels=labels[rows].astype(np.int32), pixels=pixels[rows])
