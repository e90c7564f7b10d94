"""A folder of images: `<root>/<split>/<class>/*.{jpg,jpeg,png,bmp,webp}`.

Class names are the sorted class folder names of the train split (the eval split may lack some
but not add any). Every file is decoded once at start, in threads, so that a corrupt file is
found, warned about and counted before training instead of crashing the pipeline mid-run; this
costs about one decode per image (roughly a minute per 100k small JPEGs on a few cores). A file
that vanishes or turns unreadable later, during training, is skipped, warned about and counted
too (`vit_jax.data.table.Table.rows`).
"""

import concurrent.futures
import dataclasses
import logging
import os

import numpy as np
from PIL import Image

from vit_jax.data import table as table_lib
from vit_jax.errors import UserError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


@dataclasses.dataclass(frozen=True)
class Loaded:
  """An image folder's two splits as Tables, its class names, and the unreadable files skipped."""
  train: table_lib.Table
  eval: table_lib.Table
  class_names: list
  num_skipped_files: int
  skipped_files: list


def _class_folders(split_dir):
  return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def _image_files(class_dir):
  return sorted(os.path.join(class_dir, name) for name in os.listdir(class_dir)
                if name.lower().endswith(IMAGE_EXTENSIONS))


def _is_readable(path):
  try:
    with Image.open(path) as image:
      image.load()
    return True
  except Exception:  # pylint: disable=broad-except  # any decoder failure means unreadable
    return False


def _scan_split(root, split, class_names=None):
  """(paths, labels) of one split; with class_names given, folders must be among them."""
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    available = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    raise UserError(f'split folder {split_dir} does not exist; available splits in {root}: '
                    f'{", ".join(available) or "none"}')
  folders = _class_folders(split_dir)
  if not folders:
    raise UserError(f'{split_dir} has no class folders; expected {split_dir}/<class>/<image>')
  if class_names is None:
    class_names = folders
  unknown = sorted(set(folders) - set(class_names))
  if unknown:
    raise UserError(f'{split_dir} has class folders not in the train split: '
                    f'{", ".join(unknown)}')
  paths, labels = [], []
  for name in folders:
    files = _image_files(os.path.join(split_dir, name))
    if not files:
      raise UserError(f'class folder {os.path.join(split_dir, name)} holds no images '
                      f'({", ".join(IMAGE_EXTENSIONS)})')
    paths += files
    labels += [class_names.index(name)] * len(files)
  return paths, labels, class_names


def _drop_unreadable(paths, labels):
  """Removes files no decoder can read; returns (paths, labels, skipped paths)."""
  workers = min(32, (os.cpu_count() or 1) * 4)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    readable = list(pool.map(_is_readable, paths))
  skipped = [path for path, ok in zip(paths, readable) if not ok]
  for path in skipped:
    logging.warning('skipping unreadable image file %s', path)
  kept = [(path, label) for path, label, ok in zip(paths, labels, readable) if ok]
  return [path for path, _ in kept], [label for _, label in kept], skipped


def _to_table(paths, labels, cache):
  labels = np.asarray(labels, np.int32)
  if cache:
    encoded = np.empty((len(paths),), object)
    for i, path in enumerate(paths):
      with open(path, 'rb') as f:
        encoded[i] = f.read()
    return table_lib.Table(labels=labels, encoded=encoded)
  return table_lib.Table(labels=labels, paths=np.asarray(paths, dtype=str))


def load(root, train_split, eval_split, cache=False):
  """Both splits of the image folder `root`, as Tables of file paths (or bytes with cache)."""
  if not os.path.isdir(root):
    raise UserError(f'config.data.name={root!r} is not a folder; source=folder expects '
                    '<dir>/<split>/<class>/<image>')
  train_paths, train_labels, class_names = _scan_split(root, train_split)
  eval_paths, eval_labels, _ = _scan_split(root, eval_split, class_names)
  train_paths, train_labels, train_skipped = _drop_unreadable(train_paths, train_labels)
  eval_paths, eval_labels, eval_skipped = _drop_unreadable(eval_paths, eval_labels)
  skipped = train_skipped + eval_skipped
  if skipped:
    logging.warning('skipped %d unreadable image files under %s', len(skipped), root)
  for split, paths in ((train_split, train_paths), (eval_split, eval_paths)):
    if not paths:
      raise UserError(f'no readable images in {os.path.join(root, split)}')
  return Loaded(train=_to_table(train_paths, train_labels, cache),
                eval=_to_table(eval_paths, eval_labels, cache),
                class_names=class_names, num_skipped_files=len(skipped), skipped_files=skipped)


def load_split(root, split, class_names, cache=False):
  """One more split of the folder `root` (for evaluators), labelled by the train split's
  `class_names`; unreadable files are skipped with a warning, as `load` does."""
  paths, labels, _ = _scan_split(root, split, class_names)
  paths, labels, skipped = _drop_unreadable(paths, labels)
  if skipped:
    logging.warning('skipped %d unreadable image files under %s', len(skipped),
                    os.path.join(root, split))
  if not paths:
    raise UserError(f'no readable images in {os.path.join(root, split)}')
  return _to_table(paths, labels, cache)
