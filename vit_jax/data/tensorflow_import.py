"""TensorFlow for the host pipeline: `from vit_jax.data.tensorflow_import import tf`.

TensorFlow's own import also imports Keras (to register Keras' optimizers for SavedModel),
and Keras imports scikit-learn and SciPy: on a 2-core CPU that was 12 s of every `train.py`
start, against 4.4 s without it. Nothing here uses Keras, so Keras is hidden while TensorFlow
is imported (TensorFlow's import expects and tolerates its absence) and visible again after,
so `tf.keras` and `import keras` still work for a user who wants them later in the process.

The pipeline is CPU work: TensorFlow is also kept off any GPU that JAX is using.
"""

import sys


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
  return tensorflow


tf = _import_tensorflow()
