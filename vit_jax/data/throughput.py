"""Host input-pipeline throughput: how many train images per second the host can deliver."""

import time

from vit_jax.data import datasets as datasets_lib
from vit_jax.errors import UserError


def measure_host_throughput(config, num_batches=20, warmup_batches=3, process_index=0,
                            process_count=1, datasets=None):
  """Images per second of `train_batches` alone (decode + augment + batch), after warm-up.

  Args:
    config: the run config (data, aug, batch_size, seed, image_size).
    num_batches: batches timed.
    warmup_batches: batches read and not timed (pipeline start, first-call tracing).
    process_index, process_count: the process layout (local batch = batch_size // count).
    datasets: an existing `Datasets` to measure instead of building one from `config`.

  Returns:
    float: local images per second on this process.
  """
  if num_batches < 1 or warmup_batches < 0:
    raise UserError(f'num_batches={num_batches} must be >= 1, warmup_batches >= 0')
  if datasets is None:
    datasets = datasets_lib.create_datasets(config, process_index, process_count)
  batches = datasets.train_batches(start_step=0)
  for _ in range(warmup_batches):
    next(batches)
  start = time.perf_counter()
  num_images = 0
  for _ in range(num_batches):
    num_images += len(next(batches)['labels'])
  return num_images / (time.perf_counter() - start)
