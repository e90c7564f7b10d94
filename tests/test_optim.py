"""The optimizer module: each optimizer against optax's own, each schedule's shape, the decay
mask (which leaves get weight decay, and that they really do)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax import models
from vit_jax.train import config as config_lib
from vit_jax.train import optim


def resolved(total_steps=100, **sections):
  """A resolved config with `sections` like optimizer=dict(name='sgd') applied."""
  config = config_lib.defaults()
  config.data.source = 'digits'
  config.model_name = 'ViT-Ti/4'
  config.image_size = 8
  config.total_steps = total_steps
  config.schedule.warmup_steps = 0
  for section, values in sections.items():
    config[section].update(values)
  return config_lib.resolve(config)


def tiny_params():
  model = models.create_model('ViT-Ti/4', 3, hidden_size=8, num_layers=1, num_heads=2,
                              mlp_dim=16, classifier='token', num_registers=1,
                              layer_scale_init=0.1)
  return model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']


def updates_after(tx, params, steps=3, seed=0):
  """The updates of `steps` steps of `tx` on fixed random gradients."""
  rng = np.random.default_rng(seed)
  state = tx.init(params)
  out = []
  for _ in range(steps):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    updates, state = tx.update(grads, state, params)
    out.append(updates)
    params = optax.apply_updates(params, updates)
  return out


def assert_same_updates(ours, reference):
  for mine, theirs in zip(ours, reference):
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


CONSTANT_LR = dict(name='constant', base_lr=0.1)
NO_CLIP = dict(grad_clip_norm=0.0, weight_decay=0.0)


@pytest.mark.parametrize('optimizer, reference', [
    (dict(name='sgd'), optax.sgd(0.1, momentum=0.9)),
    (dict(name='sgd', momentum=0.0), optax.sgd(0.1)),
    (dict(name='adamw', b1=0.8, b2=0.95, eps=1e-6),
     optax.adamw(0.1, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.0)),
    (dict(name='lamb'), optax.lamb(0.1, eps=1e-8, weight_decay=0.0)),
    (dict(name='adafactor'), optax.adafactor(0.1)),
])
def test_each_optimizer_matches_optax(optimizer, reference):
  config = resolved(optimizer=dict(NO_CLIP, **optimizer), schedule=CONSTANT_LR)
  params = tiny_params()
  tx, _ = optim.create_optimizer(config, params)
  assert_same_updates(updates_after(tx, params), updates_after(reference, params))


def test_clipping_and_weight_decay_are_optax_chain_members():
  config = resolved(optimizer=dict(name='adamw', grad_clip_norm=0.5, weight_decay=0.1),
                    schedule=CONSTANT_LR)
  params = tiny_params()
  tx, _ = optim.create_optimizer(config, params)
  reference = optax.chain(optax.clip_by_global_norm(0.5), optax.scale_by_adam(eps=1e-8),
                          optax.add_decayed_weights(0.1, mask=optim.decay_mask),
                          optax.scale_by_learning_rate(0.1))
  assert_same_updates(updates_after(tx, params), updates_after(reference, params))


def test_decay_mask_picks_kernels_only():
  mask = optim.decay_mask(tiny_params())
  flat = {'/'.join(str(getattr(k, 'key', k)) for k in path): value
          for path, value in jax.tree_util.tree_flatten_with_path(mask)[0]}
  decayed = {name for name, value in flat.items() if value}
  assert 'embedding/kernel' in decayed  # The patch embedding is a conv kernel: decayed.
  assert 'head/kernel' in decayed
  assert all(name.endswith('/kernel') for name in decayed)
  for kept in ('cls', 'registers', 'Transformer/posembed_input/pos_embedding',
               'embedding/bias', 'Transformer/encoder_norm/scale',
               'Transformer/encoderblock_0/layer_scale_1'):
    assert kept in flat and not flat[kept], kept


def test_weight_decay_moves_exactly_the_masked_leaves():
  config = resolved(optimizer=dict(name='sgd', momentum=0.0, grad_clip_norm=0.0,
                                   weight_decay=0.5), schedule=CONSTANT_LR)
  params = tiny_params()
  tx, _ = optim.create_optimizer(config, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)  # Only the decay moves anything.
  mask = optim.decay_mask(params)
  for update, param, decays in zip(jax.tree.leaves(updates), jax.tree.leaves(params),
                                   jax.tree.leaves(mask)):
    expected = -0.1 * 0.5 * param if decays else jnp.zeros_like(param)
    np.testing.assert_allclose(update, expected, rtol=1e-6, atol=1e-9)


def schedule_values(name, steps=100, warmup=10, base_lr=1.0, **extra):
  config = resolved(total_steps=steps, schedule=dict(name=name, base_lr=base_lr,
                                                     warmup_steps=warmup, **extra))
  schedule = optim.create_schedule(config.schedule, config.total_steps)
  return np.array([float(schedule(step)) for step in range(steps + 1)])


def test_warmup_is_linear_from_base_over_warmup_steps_for_every_schedule():
  """Step 0 already takes base_lr / warmup_steps and step warmup_steps - 1 the full base_lr, as
  `create_schedule`'s docstring says (it said "from 0")."""
  for name in config_lib.SCHEDULES:
    values = schedule_values(name)
    np.testing.assert_allclose(values[:10], np.arange(1, 11) / 10, rtol=1e-6)


def test_schedule_shapes_after_warmup():
  cosine = schedule_values('cosine', end_lr=0.1)
  assert cosine[10] == pytest.approx(1.0) and cosine[100] == pytest.approx(0.1)
  assert cosine[55] == pytest.approx(0.55, abs=1e-6)  # Half way: the mean of the two ends.
  assert np.all(np.diff(cosine[10:]) <= 1e-7)
  linear = schedule_values('linear', end_lr=0.0)
  np.testing.assert_allclose(linear[10:], 1 - np.arange(91) / 90, atol=1e-6)
  rsqrt = schedule_values('rsqrt')
  np.testing.assert_allclose(rsqrt[10:], np.sqrt(10 / np.maximum(np.arange(11, 102), 10)),
                             rtol=1e-5)
  np.testing.assert_allclose(schedule_values('constant', base_lr=0.3)[10:], 0.3, rtol=1e-6)


def test_no_warmup_starts_at_the_base_rate():
  assert schedule_values('cosine', warmup=0)[0] == pytest.approx(1.0)


def test_the_trained_leaves_are_one_rule_for_the_optimizer_and_the_norm():
  params = tiny_params()
  assert optim.trained_labels(resolved().optimizer, params) is None
  config = resolved(optimizer=dict(trainable='^head/', weight_decay=0.0, grad_clip_norm=0.0))
  labels = optim.trained_labels(config.optimizer, params)
  assert labels == optim.per_parameter(config.optimizer, params).labels
  trained = optim.only_trained(params, labels)
  assert float(optax.tree.norm(trained)) == pytest.approx(float(optax.tree.norm(params['head'])))
  # The optimizer moves exactly the leaves the norm reads.
  tx, _ = optim.create_optimizer(config, params)
  (updates,) = updates_after(tx, params, steps=1)
  moved = jax.tree.map(lambda u: bool(np.any(np.asarray(u) != 0)), updates)
  assert moved == jax.tree.map(lambda label: label == optim.TRAINED, labels)
