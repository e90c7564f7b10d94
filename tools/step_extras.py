r"""What each extra of our train step costs: the textbook step with one extra switched on at a time.

  python tools/step_extras.py --config configs/quickstart.py [--config.key=value ...] \
      [--only textbook,+guard,ours] [--repeats 2] [--time_steps 10]

The textbook step is `benchmark --baseline`'s (value_and_grad of the cross-entropy, `tx.update`,
`optax.apply_updates`, float images already normalised, one-hot labels), written here on the
TrainState so every variant has the trainer's shardings and donation. The extras, one at a time:
`+preprocess` (uint8 images at the host size, resized and normalised in the step), `+key` (the
dropout key from `fold_in(seed, step)`), `+metrics` (learning rate and gradient norm), `+guard`
(the non-finite decision as a test per gradient leaf, then one `lax.cond` around the update),
`+guard_norm` (the same decision read from the gradients' global norm), `+guard_pick` (that
decision, the update computed outside the cond and the cond only picking new or old state), the
guards with the metrics, and `ours` (the trainer's own `train_step`). One JSON line per variant:
optimized HLO lines, lowering and XLA compile seconds (medians of --repeats fresh compiles, the
persistent cache off), and with --time_steps the step's median ms, all variants timed in turns.
"""

import json
import os
import statistics
import sys
import time

from absl import flags
from ml_collections import config_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file', lock_config=True)
_REPEATS = flags.DEFINE_integer('repeats', 2, 'fresh compiles of each variant')
_ONLY = flags.DEFINE_string('only', '', 'comma-separated variants; default: all')
_CLASSES = flags.DEFINE_integer('num_classes', 10, 'head size')
_TIME_STEPS = flags.DEFINE_integer('time_steps', 0, 'steps per timed repeat (5 repeats); 0: none')
_DUMP = flags.DEFINE_string('dump', '', 'a folder to write each variant\'s optimized HLO into')

VARIANTS = ('textbook', '+preprocess', '+key', '+metrics', '+guard', '+guard_norm',
            '+guard_pick', '+guard+metrics', '+guard_norm+metrics', 'ours')


def variant_steps(config, run_parts, num_classes):
  """{name: (jitted step(state, batch) -> (state, metrics), wants uint8 batch)}."""
  import jax
  import jax.numpy as jnp
  import optax
  from vit_jax.data import device as device_data
  from vit_jax.train import sharding
  from vit_jax.train import step as step_lib
  model, tx, schedule = run_parts.model, run_parts.tx, run_parts.schedule

  def make(preprocess=False, key=False, metrics=False, guard=None):
    def step(state, batch):
      if preprocess:
        images = device_data.preprocess(batch['images'], config.image_size)
        targets = jax.nn.one_hot(batch['labels'], num_classes)
      else:
        images, targets = batch['images'], batch['labels']
      if key:
        dropout_key = jax.random.split(jax.random.fold_in(
            jax.random.key(config.seed, impl=config.prng_impl), state.step))[1]
      else:
        dropout_key = jax.random.key(0, impl=config.prng_impl)

      def loss_fn(params):
        logits = model.apply({'params': params}, images, train=True, rngs={'dropout': dropout_key})
        return step_lib.cross_entropy(logits, targets)

      loss, grads = jax.value_and_grad(loss_fn)(state.params)

      def update(_):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state

      grad_norm = optax.tree.norm(grads)
      if guard == 'leaf':
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack(
            [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(grads)]))
      elif guard == 'norm':
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      if guard == 'pick':  # The update outside, the cond only picks new or old.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = update(None)
        params, opt_state = jax.lax.cond(finite, lambda _: new,
                                         lambda _: (state.params, state.opt_state), None)
      elif guard:
        params, opt_state = jax.lax.cond(finite, update,
                                         lambda _: (state.params, state.opt_state), None)
      else:
        params, opt_state = update(None)
      metrics_out = {'train_loss': loss}
      if metrics:
        metrics_out.update(learning_rate=schedule(state.step), grad_norm=grad_norm)
      return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics_out

    return jax.jit(step, in_shardings=(run_parts.state_shardings,
                                       sharding.batch_sharding(run_parts.mesh)),
                   out_shardings=(run_parts.state_shardings, sharding.replicated(run_parts.mesh)),
                   donate_argnums=(0,))

  return {
      'textbook': (make(), False),
      '+preprocess': (make(preprocess=True), True),
      '+key': (make(key=True), False),
      '+metrics': (make(metrics=True), False),
      '+guard': (make(guard='leaf'), False),
      '+guard_norm': (make(guard='norm'), False),
      '+guard_pick': (make(guard='pick'), False),
      '+guard+metrics': (make(guard='leaf', metrics=True), False),
      '+guard_norm+metrics': (make(guard='norm', metrics=True), False),
      'ours': (run_parts.train_fn, True),
  }


def main(argv):
  flags.FLAGS(argv)
  import jax
  jax.config.update('jax_enable_compilation_cache', False)  # Before anything compiles.
  import jax.numpy as jnp
  import numpy as np
  from vit_jax.tools import benchmark
  from vit_jax.train import build
  from vit_jax.train import config as config_lib
  config = config_lib.resolve(_CONFIG.value, jax.device_count())
  num_classes = _CLASSES.value
  run_parts = build.parts(config, num_classes)
  steps = variant_steps(config, run_parts, num_classes)
  names = [name for name in _ONLY.value.split(',') if name] or list(VARIANTS)
  unknown = sorted(set(names) - set(steps))
  if unknown:
    sys.exit(f'error: unknown variants {unknown}; valid: {",".join(VARIANTS)}')
  size = config.batch_size
  abstract_uint8 = build.abstract_batch(config, size)
  abstract_float = {
      'images': jax.ShapeDtypeStruct((size, config.image_size, config.image_size, 3), jnp.float32),
      'labels': jax.ShapeDtypeStruct((size, num_classes), jnp.float32)}
  timings = {name: [] for name in names}
  compiled, lines = {}, {}
  for _ in range(_REPEATS.value):
    for name in names:  # In turns, so the machine's load falls on every variant alike.
      step, wants_uint8 = steps[name]
      jax.clear_caches()  # A fresh compile each time, not the memoised executable.
      start = time.perf_counter()
      lowered = step.lower(run_parts.abstract_state,
                           abstract_uint8 if wants_uint8 else abstract_float)
      middle = time.perf_counter()
      compiled[name] = lowered.compile()
      timings[name].append((middle - start, time.perf_counter() - middle))
      text = compiled[name].as_text()
      lines[name] = text.count('\n')
      if _DUMP.value:
        with open(os.path.join(_DUMP.value, name.replace('+', 'plus_') + '.hlo'), 'w') as f:
          f.write(text)
  results = {name: {'variant': name, 'optimized_hlo_lines': lines[name],
                    'lower_s': statistics.median(t[0] for t in timings[name]),
                    'compile_s': statistics.median(t[1] for t in timings[name]),
                    'all_s': [[round(a, 2), round(b, 2)] for a, b in timings[name]]}
             for name in names}
  if _TIME_STEPS.value:
    uint8_batch = benchmark.synthetic_batch(config, size, num_classes, run_parts.mesh,
                                            np.random.default_rng(0))
    images, one_hot_labels, _ = benchmark.textbook_inputs(config, run_parts, uint8_batch,
                                                          num_classes)
    float_batch = {'images': images, 'labels': one_hot_labels}
    states, calls = {}, []
    for name in names:
      states[name] = run_parts.new_state()
      batch = uint8_batch if steps[name][1] else float_batch

      def call(name=name, batch=batch):
        states[name], metrics = compiled[name](states[name], batch)
        return metrics

      for _ in range(2):
        jax.block_until_ready(call())
      calls.append(call)
    for name, seconds in zip(names, benchmark.time_interleaved(calls, _TIME_STEPS.value, 5)):
      results[name]['step_ms'] = 1e3 * statistics.median(seconds)
  for name in names:
    print(json.dumps(results[name]), flush=True)


if __name__ == '__main__':
  main(sys.argv)
