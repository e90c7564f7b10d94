"""TensorFlow for the host pipeline: `from vit_jax.data.tensorflow_import import tf, tfds`.

Both names are imported at their first use (an attribute read), not at this module's import:
a run whose mistake shows before the pipeline is built (a missing image folder, a folder
without classes) ends in about 2 s, not after the 4-5 s of TensorFlow's import. The first use
imports TensorFlow exactly as described below.

TensorFlow's own import also imports Keras (to register Keras' optimizers for SavedModel),
and Keras imports scikit-learn and SciPy: on a 2-core CPU that was 12 s of every `train.py`
start, against 4.4 s without it. Nothing here uses Keras, so Keras is hidden while TensorFlow
is imported (TensorFlow's import expects and tolerates its absence) and visible again after,
so `tf.keras` and `import keras` still work for a user who wants them later in the process.

The pipeline is CPU work: TensorFlow is also kept off any GPU that JAX is using.

TensorFlow's first `Dataset.from_generator` sets glibc's M_MMAP_THRESHOLD for the rest of the
process, which slows XLA's CPU kernels (`vit_jax.cpu_allocator`): in a process that set that
module's settings, one empty generator is run here, so that happens now and not in the middle
of a run, and the settings are put back.
"""

import functools
import importlib
import sys
import types

from vit_jax import cpu_allocator


@functools.cache  # Once per process: the GPU hiding and the mallopt below are one-time work.
def _import_tensorflow():
  if 'tensorflow' not in sys.modules and 'keras' not in sys.modules:
    sys.modules['keras'] = None  # `import keras` raises ImportError while this is set.
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top
    finally:
      if sys.modules.get('keras', 0) is None:
        del sys.modules['keras']
  import tensorflow  # pylint: disable=g-import-not-at-top,redefined-outer-name
  tensorflow.config.set_visible_devices([], 'GPU')
  if cpu_allocator.is_tuned():  # Elsewhere TensorFlow's mallopt stays where it was, if at all.
    empty = tensorflow.data.Dataset.from_generator(
        lambda: iter(()), output_signature=tensorflow.TensorSpec((), tensorflow.int32))
    for _ in empty:  # Builds the generator's kernel: TensorFlow's one-time mallopt is done here.
      pass
    cpu_allocator.reapply_after_tensorflow()
  return tensorflow


class _ImportedAtFirstUse(types.ModuleType):
  """A module that `import_module()` imports at the first read of one of its attributes."""

  def __init__(self, name, import_module):
    super().__init__(name)
    self._import_module = import_module

  def __getattr__(self, attribute):  # Only called for what this object does not hold itself.
    return getattr(self._import_module(), attribute)


@functools.cache
def _import_tensorflow_datasets():
  _import_tensorflow()  # First: tensorflow_datasets imports TensorFlow (and Keras) itself.
  return importlib.import_module('tensorflow_datasets')


tf = _ImportedAtFirstUse('tensorflow', _import_tensorflow)
tfds = _ImportedAtFirstUse('tensorflow_datasets', _import_tensorflow_datasets)
