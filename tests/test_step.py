"""The train step's non-finite guard: one decision per step, nothing of a bad update reaches the
state, the skip is counted; and the compiled program stays small (the guard used to triple it).
What it logs is what it did (the rate applied, the norm clipping sees), frozen parameters cost
no backward pass, and the EMA of bfloat16 params moves."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO_ROOT, python_env
from configs import quickstart
from vit_jax.data import device as device_data
from vit_jax.tools import benchmark
from vit_jax.train import build
from vit_jax.train import config as config_lib
from vit_jax.train import step as step_lib

GUARD_SCRIPT = r'''
import sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
from configs import quickstart
from vit_jax.train import build, config as config_lib
from vit_jax.train import step as step_lib
from vit_jax.tools import benchmark

config = quickstart.get_config()
config.model.update(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)
config.batch_size = 16
config.optimizer.ema_decay = 0.9
config.mesh.fsdp = int(sys.argv[2])
config = config_lib.resolve(config, jax.device_count())
same = lambda a, b: all(np.asarray(x).tobytes() == np.asarray(y).tobytes()
                        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
# Both guards, whichever the platform would pick: the CPU compiles the GPU's select as well.
for guard in ('cond', 'select'):
  step_lib.guard_for = lambda platform: guard
  parts = build.parts(config, 10)
  state = parts.new_state()
  batch = benchmark.synthetic_batch(config, 16, 10, parts.mesh, np.random.default_rng(0))
  state, _ = parts.train_fn(state, batch)  # One good step: the optimizer state is not all zeros.
  good_before = jax.device_get(state)
  # A NaN in the head's bias makes the loss and every gradient NaN.
  head = state.params['head']
  poisoned = state.replace(params=dict(state.params, head=dict(head, bias=head['bias'].at[0].set(np.nan))))
  before = jax.device_get(poisoned)
  after, metrics = parts.train_fn(poisoned, batch)
  after = jax.device_get(after)
  assert not np.isfinite(float(metrics['train_loss']))
  assert same(before.params, after.params), f'{guard}: params changed'
  assert same(before.opt_state, after.opt_state), f'{guard}: optimizer state changed'
  assert same(before.ema_params, after.ema_params), f'{guard}: EMA changed'
  assert int(after.skipped_updates) == 1 and int(after.first_nonfinite_step) == 1, guard
  assert int(after.step) == 2
  # And a finite step is taken: the guard is not a state that never moves.
  good_after, _ = parts.train_fn(jax.device_put(good_before, parts.state_shardings), batch)
  good_after = jax.device_get(good_after)
  assert not same(good_before.params, good_after.params), f'{guard}: a finite step moved nothing'
  assert not same(good_before.ema_params, good_after.ema_params), f'{guard}: the EMA did not move'
  assert int(good_after.skipped_updates) == 0, guard
  print(f'guard {guard} ok on', jax.device_count(), 'devices')
'''


@pytest.mark.parametrize('devices, fsdp', [(1, 1), (8, 2)])
def test_a_nan_gradient_changes_no_state_and_is_counted(devices, fsdp):
  env = python_env({'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'})
  result = subprocess.run([sys.executable, '-c', GUARD_SCRIPT, REPO_ROOT, str(fsdp)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  for guard in ('cond', 'select'):
    assert f'guard {guard} ok on {devices} devices' in result.stdout


def test_the_guard_is_the_cond_on_the_cpu_and_the_select_on_accelerators():
  # The choice measured (see step.guard_for): on the CPU the cond compiles smaller and faster,
  # on a GPU the select runs 7% faster for a small model. A step uses the one of its mesh.
  assert step_lib.guard_for('cpu') == 'cond'
  assert step_lib.guard_for('gpu') == step_lib.guard_for('tpu') == 'select'
  config = config_lib.resolve(quickstart.get_config(), jax.device_count())
  parts = build.parts(config, 10)
  program = parts.train_fn.lower(parts.abstract_state,
                                 build.abstract_batch(config, config.batch_size)).as_text()
  assert program.count('stablehlo.case') == 1  # the guard's one branch, on this CPU


def test_an_unknown_guard_is_refused():
  config, parts, batch = tiny_run()
  settings = step_lib.StepSettings(image_size=config.image_size, num_classes=10, seed=0,
                                   guard='maybe')
  with pytest.raises(ValueError, match="'cond' or 'select', not 'maybe'"):
    step_lib.train_step(parts.new_state(), batch, model=parts.model, tx=parts.tx,
                        schedule=parts.schedule, settings=settings)


# The quickstart train step compiled to 51,180 optimized HLO lines with a select per leaf as the
# guard, 20,109 with the update inside one lax.cond, 15,750 with the decision read from the
# gradients' global norm and the update outside the cond (the textbook step: 14,797; jax 0.10.2,
# CPU). The bound keeps the tax from coming back unseen.
QUICKSTART_STEP_HLO_LINE_BOUND = 18_500


def test_the_quickstart_train_step_stays_small():
  config = config_lib.resolve(quickstart.get_config(), jax.device_count())
  parts = build.parts(config, 10)
  compiled = parts.train_fn.lower(parts.abstract_state,
                                  build.abstract_batch(config, config.batch_size)).compile()
  lines = compiled.as_text().count('\n')
  assert lines < QUICKSTART_STEP_HLO_LINE_BOUND, lines


def tiny_run(accum_steps=1, **sections):
  """`(config, parts, batch)`: the quickstart at 2 blocks of width 16 (its warmup moves the rate
  every step), `sections` like optimizer=dict(trainable='^head/') applied."""
  config = quickstart.get_config()
  config.model.update(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)
  config.batch_size, config.accum_steps = 16, accum_steps
  for section, values in sections.items():
    config[section].update(values)
  config = config_lib.resolve(config, jax.device_count())
  parts = build.parts(config, 10)
  batch = benchmark.synthetic_batch(config, 16, 10, parts.mesh, np.random.default_rng(0))
  return config, parts, batch


def reference_grads(config, parts, params, batch):
  """The loss's gradients at `params`, computed here (the quickstart has no dropout or mixing)."""
  images = device_data.model_inputs(batch, config.image_size)
  targets = jax.nn.one_hot(batch['labels'], 10)
  loss = lambda p: step_lib.cross_entropy(
      parts.model.apply({'params': p}, images, train=False), targets)
  return jax.device_get(jax.grad(loss)(params))


def schedule_count(opt_state):
  """The count the optimizer reads its learning-rate schedule at."""
  is_schedule_state = lambda node: isinstance(node, optax.ScaleByScheduleState)
  (found,) = [node for node in jax.tree.leaves(opt_state, is_leaf=is_schedule_state)
              if is_schedule_state(node)]
  return int(found.count)


def test_the_logged_learning_rate_is_the_one_applied_after_a_skipped_step():
  # Plain SGD: an update is exactly -learning_rate * gradient.
  config, parts, batch = tiny_run(optimizer=dict(name='sgd', momentum=0.0, weight_decay=0.0,
                                                 grad_clip_norm=0.0))
  state, _ = parts.train_fn(parts.new_state(), batch)  # Step 0, applied.
  good_head = jax.device_get(state.params['head'])
  head = state.params['head']
  poisoned = state.replace(params=dict(state.params, head=dict(
      head, bias=head['bias'].at[0].set(np.nan))))
  state, _ = parts.train_fn(poisoned, batch)  # Step 1, skipped.
  state = state.replace(params=dict(state.params, head=good_head))
  assert int(state.skipped_updates) == 1
  assert schedule_count(state.opt_state) == 1 == int(state.step) - int(state.skipped_updates)

  before = jax.device_get(state.params)
  grads = reference_grads(config, parts, before, batch)
  state, metrics = parts.train_fn(state, batch)  # Step 2, applied at the schedule's count 1.
  after = jax.device_get(state.params)
  logged = float(metrics['learning_rate'])
  assert logged == pytest.approx(float(parts.schedule(1)), rel=1e-6)
  assert logged != pytest.approx(float(parts.schedule(2)), rel=1e-3)  # What was logged before.
  applied = (before['head']['kernel'] - after['head']['kernel']) / grads['head']['kernel']
  np.testing.assert_allclose(applied, logged, rtol=1e-3)
  assert schedule_count(state.opt_state) == 2


def test_grad_norm_is_over_the_trained_parameters_only():
  config, parts, batch = tiny_run(optimizer=dict(trainable='^head/'))
  state = parts.new_state()
  # A random head: it starts at zero, and so would every gradient behind it.
  head = state.params['head']
  kernel = np.random.default_rng(1).normal(size=head['kernel'].shape).astype(np.float32)
  state = state.replace(params=dict(state.params, head=dict(head, kernel=kernel)))
  grads = reference_grads(config, parts, jax.device_get(state.params), batch)
  head_norm, all_norm = float(optax.tree.norm(grads['head'])), float(optax.tree.norm(grads))
  assert all_norm > 1.05 * head_norm  # The frozen backbone's gradients are not negligible.
  _, metrics = parts.train_fn(state, batch)
  assert float(metrics['grad_norm']) == pytest.approx(head_norm, rel=1e-4)


@pytest.mark.parametrize('accum_steps', [1, 2])
def test_a_frozen_backbone_costs_no_backward_pass(accum_steps):
  """With the head alone trained, no gradient of the backbone is read (not by the optimizer,
  not by the norm), and XLA drops its backward pass: about a forward pass is left."""
  def step_flops(**optimizer):
    config, parts, _ = tiny_run(accum_steps, optimizer=optimizer)
    compiled = parts.train_fn.lower(parts.abstract_state,
                                    build.abstract_batch(config, config.batch_size)).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)['flops']

  # Measured (jax 0.10.2, CPU): 0.36 of the full step's FLOPs, 0.99 with the norm over all.
  assert step_flops(trainable='^head/') < 0.6 * step_flops()


def test_the_ema_of_bfloat16_params_is_float32_and_moves():
  # A rate of 1e-2 from the first step: Adam moves each param by about that, which bfloat16
  # keeps; the EMA's step towards it, 1e-5, it would round away.
  config, parts, batch = tiny_run(model=dict(param_dtype='bfloat16'),
                                  optimizer=dict(ema_decay=0.999),
                                  schedule=dict(name='constant', base_lr=1e-2, warmup_steps=0))
  state = parts.new_state()
  assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
  assert {leaf.dtype for leaf in jax.tree.leaves(state.ema_params)} == {jnp.dtype(jnp.float32)}
  # A step first: the head starts at zero, and no gradient behind it moves the backbone.
  state, _ = parts.train_fn(state, batch)
  params_before, ema_before = jax.device_get((state.params, state.ema_params))
  state, _ = parts.train_fn(state, batch)
  params, ema = jax.device_get((state.params, state.ema_params))
  for got, before, param in zip(*map(jax.tree.leaves, (ema, ema_before, params))):
    param = param.astype(np.float32)
    # XLA may read a param before its rounding to bfloat16 (excess precision): the EMA's step
    # is then off by up to 1e-3 of half a bfloat16 ulp of the param.
    slack = 1e-3 * np.abs(param) * 2.0**-8 + 1e-9
    assert np.all(np.abs(got - (before + 0.001 * (param - before))) <= slack)
  moved = lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b)))
  params_moved = jax.tree.leaves(jax.tree.map(moved, params, params_before))
  ema_moved = jax.tree.leaves(jax.tree.map(moved, ema, ema_before))
  assert sum(params_moved) > len(params_moved) // 2
  assert ema_moved == params_moved
  # Evaluated (and restored) in the params' dtype.
  evaluated = step_lib.weights_to_evaluate(state)
  assert {leaf.dtype for leaf in jax.tree.leaves(evaluated)} == {jnp.dtype(jnp.bfloat16)}
