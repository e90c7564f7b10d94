"""Size of the compiled train step (optimized HLO lines) and its compile time, for a config.

  python tools/step_program_size.py --config configs/quickstart.py [--config.key=value ...]

Prints one JSON line: optimized_hlo_lines, compile_s (median of --repeats fresh compiles).
"""

import json
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)  # vit_jax and configs, when run as `python tools/...`

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file', lock_config=True)
_REPEATS = flags.DEFINE_integer('repeats', 3, 'fresh compiles to time')
_CLASSES = flags.DEFINE_integer('num_classes', 10, 'head size')


def main(argv):
  flags.FLAGS(argv)
  import jax
  jax.config.update('jax_enable_compilation_cache', False)
  from vit_jax.train import build
  from vit_jax.train import config as config_lib
  config = config_lib.resolve(_CONFIG.value, jax.device_count())
  parts = build.parts(config, _CLASSES.value)
  batch = build.abstract_batch(config, config.batch_size)
  times = []
  for _ in range(_REPEATS.value):
    jax.clear_caches()  # A fresh compile each time, not the memoised executable.
    lowered = parts.train_fn.lower(parts.abstract_state, batch)
    start = time.perf_counter()
    compiled = lowered.compile()
    times.append(time.perf_counter() - start)
  hlo = compiled.as_text()
  print(json.dumps({'optimized_hlo_lines': hlo.count('\n'), 'compile_s': statistics.median(times),
                    'compile_s_all': times}))


if __name__ == '__main__':
  main(sys.argv)
