"""Data: sources (tfds, image folder, digits), host augmentation, device preprocessing.

`create_datasets(config)` builds the host pipelines; `vit_jax.data.device` holds the jittable
resize/normalise/mixup that the train step runs. TensorFlow is imported only when a pipeline is
built, so importing `vit_jax.data.device` from the step stays light.
"""


def create_datasets(config, process_index=0, process_count=1):
  """See `vit_jax.data.datasets.create_datasets`."""
  from vit_jax.data import datasets  # pylint: disable=g-import-not-at-top
  return datasets.create_datasets(config, process_index, process_count)


def measure_host_throughput(config, num_batches=20, warmup_batches=3, **kwargs):
  """See `vit_jax.data.throughput.measure_host_throughput`."""
  from vit_jax.data import throughput  # pylint: disable=g-import-not-at-top
  return throughput.measure_host_throughput(config, num_batches, warmup_batches, **kwargs)
