"""Where a config's compiled train step spends its time on the CPU, op by op.

  python tools/step_profile.py --config configs/quickstart.py [--config.key=value ...]
      [--steps 2] [--top 30]

Runs the trainer's own jitted step on one synthetic batch under `jax.profiler` with XLA's
per-thunk trace events on (`--xla_cpu_enable_xprof_traceme`, set here before JAX starts), then
sums each compiled op's time per step and groups it by what it computes: the op's kind (a
YNNPACK fusion, a loop fusion, a copy), its result shape, and the model line it came from
(`op_name`, with the layer index folded, so the twelve blocks of a ViT-B are one row). Prints
the rows, most time first, then one JSON line: `step_ms` (the ops' sum per step, as the trace
saw it) and the rows. Thunks that Eigen runs asynchronously (some plain `dot`s) show their
dispatch only: trust the YNNPACK fusions and the loop fusions, and compare a row's time with
its FLOPs before trusting a small one.
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)  # vit_jax and configs, when run as `python tools/...`

# The step as train.py runs it: with its huge pages, else every op that writes to the step's
# temporaries also pays their page faults (BENCHMARKS.md, "Page faults of a large step").
from vit_jax import cpu_allocator  # pylint: disable=g-import-not-at-top,wrong-import-position
cpu_allocator.start(__name__)

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 2, 'profiled steps (after two untimed ones)')
_TOP = flags.DEFINE_integer('top', 30, 'rows printed')
_CLASSES = flags.DEFINE_integer('num_classes', 10, 'head size')

# Trace events that wrap others (the executor, Python frames, thread pools), not compiled ops.
_WRAPPERS = ('ThunkExecutor', '$', 'SlinkyThreadPool', 'PjitFunction', 'end: ',
             'CommonPjRtLoadedExecutable', 'ParseArguments')


def op_durations(trace_folder):
  """{op name: summed duration in ms} of the compiled ops in a `jax.profiler` trace folder."""
  (path,) = glob.glob(os.path.join(trace_folder, '**', '*.trace.json.gz'), recursive=True)
  with gzip.open(path) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  durations = collections.Counter()
  for event in events:
    if event.get('ph') == 'X' and not event['name'].startswith(_WRAPPERS):
      durations[event['name']] += event.get('dur', 0) / 1e3  # Trace durations are in µs.
  return durations


def op_descriptions(optimized_hlo):
  """{op name: (kind, result shape, model line)} for the ops of an optimized HLO module."""
  descriptions = {}
  for line in optimized_hlo.splitlines():
    match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ', line)
    if not match:
      continue
    name, shape = match.groups()
    op_name = re.search(r'op_name="([^"]*)"', line)
    where = re.sub(r'(encoderblock|block|layer)_\d+', r'\1_N', op_name.group(1)) if op_name else ''
    descriptions[name] = (re.sub(r'\.\d+$', '', name), re.sub(r'\{[^}]*\}', '', shape),
                          where.replace('jit(train_step)/', ''))
  return descriptions


def main(argv):
  flags.FLAGS(argv)
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_cpu_enable_xprof_traceme=true').strip()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
  from vit_jax.train import build  # pylint: disable=g-import-not-at-top
  from vit_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.resolve(_CONFIG.value, jax.device_count())
  parts = build.parts(config, _CLASSES.value)
  state = parts.new_state()
  batch = benchmark.synthetic_batch(config, config.batch_size, _CLASSES.value, parts.mesh,
                                    np.random.default_rng(0))
  compiled = parts.train_fn.lower(state, batch).compile()
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder):
      for _ in range(_STEPS.value):
        state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
    durations = op_durations(folder)
  descriptions = op_descriptions(compiled.as_text())
  rows = collections.defaultdict(lambda: [0.0, 0])
  for name, milliseconds in durations.items():
    row = rows[descriptions.get(name, (re.sub(r'\.\d+$', '', name), '', ''))]
    row[0] += milliseconds / _STEPS.value
    row[1] += 1
  ranked = sorted(rows.items(), key=lambda item: -item[1][0])
  for (kind, shape, where), (milliseconds, count) in ranked[:_TOP.value]:
    print(f'{milliseconds:9.2f} ms {count:4d}x  {kind:26s} '
          f'{shape:26s} {where[:110]}')
  print(json.dumps({'step_ms': sum(row[0] for row in rows.values()),
                    'rows': [{'kind': kind, 'shape': shape, 'op_name': where, 'ms': ms,
                              'count': count} for (kind, shape, where), (ms, count) in ranked]}))


if __name__ == '__main__':
  main(sys.argv)
