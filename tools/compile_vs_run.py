"""CPU time of one train-step compile and of one step, at whatever XLA_FLAGS says.

  XLA_FLAGS=--xla_backend_optimization_level=0 python tools/compile_vs_run.py tiny
  python tools/compile_vs_run.py quickstart

`tiny` is the quickstart at one 16-wide layer and batch 16 (the tests' size), `quickstart` the
quickstart itself. Prints the compile's CPU seconds (all threads, `time.process_time`) and the
CPU milliseconds of a step (30 steps after one), on a synthetic batch (BENCHMARKS.md, "The test
suite").
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from configs import quickstart
from vit_jax.tools import benchmark
from vit_jax.train import build
from vit_jax.train import config as config_lib


def main(size):
  config = quickstart.get_config()
  if size == 'tiny':
    config.model.update(num_layers=1, hidden_size=16, mlp_dim=32)
    config.batch_size = 16
  config = config_lib.resolve(config, jax.device_count())
  parts = build.parts(config, 10)
  lowered = parts.train_fn.lower(parts.abstract_state,
                                 build.abstract_batch(config, config.batch_size))
  start = time.process_time()
  compiled = lowered.compile()
  compile_cpu_s = time.process_time() - start
  state = parts.new_state()
  batch = benchmark.synthetic_batch(config, config.batch_size, 10, parts.mesh,
                                    np.random.default_rng(0))
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  start = time.process_time()
  for _ in range(30):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  step_cpu_ms = (time.process_time() - start) / 30 * 1000
  print(f'{size} XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}: compile {compile_cpu_s:.2f} '
        f'CPU s, step {step_cpu_ms:.1f} CPU ms')


if __name__ == '__main__':
  main(sys.argv[1] if len(sys.argv) > 1 else 'tiny')
