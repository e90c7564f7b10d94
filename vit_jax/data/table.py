"""A split held in host memory, and the index arithmetic that makes its batches resumable.

The train stream of an in-memory split is the concatenation of per-epoch permutations, each
seeded by (seed, epoch). Global step `s` covers stream positions [s * B, (s + 1) * B) of the
global batch B, and process p takes the slice [s * B + p * b, s * B + (p + 1) * b) of local
batch b. So every batch is a pure function of (seed, step, process_index, process_count), the
processes' batches are disjoint and together form the single-process batch, and no data is
skipped over on resume.
"""

import concurrent.futures
import dataclasses
import functools
import logging
from typing import Optional

import numpy as np
from vit_jax.data.tensorflow_import import tf

from vit_jax.data import augment
from vit_jax.errors import EnvironmentFault


@dataclasses.dataclass(frozen=True)
class Table:
  """Labels plus exactly one of: decoded pixels, encoded image bytes, or image file paths."""
  labels: np.ndarray                     # int32 (N,)
  pixels: Optional[np.ndarray] = None    # uint8 (N, h, w, 3), all the same size
  encoded: Optional[np.ndarray] = None   # object (N,) of bytes (JPEG/PNG/...)
  paths: Optional[np.ndarray] = None     # str (N,)
  # True when the table is only this process's shard of the split (tfds with data.cache).
  local_shard: bool = False
  global_num_examples: Optional[int] = None  # the whole split, when local_shard

  def __len__(self):
    return len(self.labels)

  # The files of a paths table that could not be read during training (see `rows`).
  unreadable: set = dataclasses.field(default_factory=set, compare=False)

  def payload(self, indices):
    """The image part of the rows `indices`, as the tf.data generator yields it."""
    return self.rows(indices, keep_count=True)[0]

  def rows(self, indices, keep_count):
    """(payloads, labels) of the rows `indices`, as the tf.data generators yield them.

    The files of a paths table are read here, in threads, rather than inside tf.data, so that
    a file that vanished or turned unreadable since the start is skipped with a warning and
    counted instead of stopping the run. With `keep_count` (train batches, whose size and
    stream positions are fixed) its row is replaced by another row of the same batch that
    reads; otherwise (eval) it is left out.
    """
    labels = self.labels[indices]
    if self.pixels is not None:
      return self.pixels[indices], labels
    if self.encoded is not None:
      return self.encoded[indices], labels
    paths = self.paths[indices]
    contents = list(_READERS.map(_read_or_error, paths))
    readable = [i for i, content in enumerate(contents) if not isinstance(content, OSError)]
    for path, content in zip(paths, contents):
      if isinstance(content, OSError) and path not in self.unreadable:
        self.unreadable.add(path)
        logging.warning('skipping image file %s, which can no longer be read (%s); %d such '
                        'files so far', path, content.strerror or content, len(self.unreadable))
    if not readable:
      raise EnvironmentFault(f'none of the {len(paths)} image files of a batch can be read '
                             f'(e.g. {paths[0]}: {contents[0].strerror or contents[0]})')
    if len(readable) < len(paths):
      keep = (np.array([i if i in readable else readable[i % len(readable)]
                        for i in range(len(paths))]) if keep_count else np.array(readable))
      contents, labels = [contents[i] for i in keep], labels[keep]
    encoded = np.empty((len(contents),), object)
    encoded[:] = contents
    return encoded, labels

  def payload_spec(self):
    """tf.TensorSpec of a batch of payloads."""
    if self.pixels is not None:
      return tf.TensorSpec((None,) + self.pixels.shape[1:], tf.uint8)
    return tf.TensorSpec((None,), tf.string)

  def decode(self, payload):
    """One payload -> uint8 (H, W, 3) (inside tf.data)."""
    if self.pixels is not None:
      return payload
    return augment.decode(payload)  # encoded bytes, read from memory or from the file


_READERS = concurrent.futures.ThreadPoolExecutor(8)  # file reads release the GIL


def _read_or_error(path):
  try:
    with open(path, 'rb') as f:
      return f.read()
  except OSError as e:
    return e


class StreamIndex:
  """Which rows of a table each train step reads, from (seed, step) alone.

  With `shared=True` every process holds the whole table and reads its slice of the global
  batch; with `shared=False` the table is this process's own shard and the process walks its own
  permutation (seeded with the process index too).
  """

  def __init__(self, num_rows, seed, global_batch, process_index, process_count, shared):
    self.num_rows = num_rows
    self.seed = seed % 2**63
    self.global_batch = global_batch
    self.local_batch = global_batch // process_count
    self.process_index = process_index
    self.shared = shared

  @functools.lru_cache(maxsize=4)
  def permutation(self, epoch):
    """int64 (num_rows,): the order of the table in `epoch`."""
    key = [self.seed, epoch] if self.shared else [self.seed, self.process_index, epoch]
    return np.random.default_rng(key).permutation(self.num_rows)

  def global_positions(self, step):
    """int64 (local_batch,): this process's examples' positions in the global stream."""
    start = step * self.global_batch + self.process_index * self.local_batch
    return start + np.arange(self.local_batch, dtype=np.int64)

  def rows(self, step):
    """int64 (local_batch,): the table rows of this process's batch at `step`."""
    if self.shared:
      positions = self.global_positions(step)
    else:
      positions = step * self.local_batch + np.arange(self.local_batch, dtype=np.int64)
    epochs, offsets = np.divmod(positions, self.num_rows)
    rows = np.empty_like(positions)
    for epoch in np.unique(epochs):
      here = epochs == epoch
      rows[here] = self.permutation(int(epoch))[offsets[here]]
    return rows


def eval_rows(table, local_batch, process_index, process_count, max_examples=None):
  """This process's eval rows of `table` and how many padded batches every process yields.

  The rows are a contiguous shard (the whole table when it is already this process's shard);
  every process yields the same number of batches, padded, so a multi-host eval step never
  waits on a process that has run out. `max_examples` (None: all) keeps at most that many of
  the split's examples, over all processes: a random subset drawn from `SUBSET_SEED` alone
  (so every run reads the same one), in table order.
  """
  if table.local_shard:
    largest_shard = -(-table.global_num_examples // process_count)
    rows = np.arange(len(table))
    if max_examples is not None:
      largest_shard = min(largest_shard, -(-max_examples // process_count))
      rows = _subset(rows, largest_shard, [SUBSET_SEED, process_index])
    return rows, -(-largest_shard // local_batch)
  rows = np.arange(len(table))
  if max_examples is not None:
    rows = _subset(rows, max_examples, [SUBSET_SEED])
  shards = np.array_split(rows, process_count)
  return shards[process_index], -(-len(shards[0]) // local_batch)  # shard 0 is the largest


SUBSET_SEED = 0


def _subset(rows, count, seed):
  """`count` of `rows` drawn without replacement by `seed`, in their order (all if fewer)."""
  if count >= len(rows):
    return rows
  return np.sort(np.random.default_rng(seed).choice(rows, count, replace=False))
