"""Patch dropout (model.patch_dropout): how many tokens the encoder sees, the FLOPs it saves, its
randomness, RoPE positions of the kept tokens, and scan/remat/bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.errors import UserError
from vit_jax.models import patch_dropout, rope
from vit_jax.train import flops

TINY = dict(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2, patch_size=8)
PATCHES = 16  # 32 px images: a 4x4 grid.


def _images(size=32, batch=2, seed=0):
  return jax.random.uniform(jax.random.key(seed), (batch, size, size, 3), minval=-1, maxval=1)


def _init(model, images):
  return model.init(jax.random.key(0), images)['params']


def test_number_of_kept_patches():
  assert patch_dropout.num_kept_patches(16, 0.25) == 12
  assert patch_dropout.num_kept_patches(196, 0.5) == 98
  assert patch_dropout.num_kept_patches(10, 0.33) == 7  # round(6.7)
  assert patch_dropout.num_kept_patches(4, 0.99) == 1  # Never none.


def _attention_tokens(model, params, images, train, key=0):
  """(query tokens, key tokens) of every attention layer, from the sown attention weights."""
  _, state = model.apply({'params': params}, images, train=train,
                         rngs={'dropout': jax.random.key(key)}, mutable=['intermediates'])
  weights = jax.tree.leaves(state['intermediates'])
  return {tuple(w.shape[-2:]) for w in weights}


@pytest.mark.parametrize('rate,scan', [(0.25, False), (0.5, True), (0.75, False)])
def test_the_encoder_sees_the_kept_patches_and_prefix_in_training_and_all_at_eval(rate, scan):
  model = models.create_model('ViT-B/16', 3, patch_dropout=rate, num_registers=2, scan=scan,
                              **TINY)
  images = _images()
  params = _init(model, images)
  prefix = 1 + 2  # The class token and two registers, always kept.
  kept = round((1 - rate) * PATCHES) + prefix
  assert _attention_tokens(model, params, images, train=True) == {(kept, kept)}
  assert _attention_tokens(model, params, images, train=False) == {(PATCHES + prefix,) * 2}


def test_distillation_token_and_no_embed_class_prefix_is_kept():
  # With no_embed_class the class and distillation tokens skip the table and join after the
  # drop, with the registers: all four are kept, and 8 of the 16 patches.
  model = models.create_model('ViT-B/16', 3, patch_dropout=0.5, num_registers=2, distilled=True,
                              no_embed_class=True, **TINY)
  images = _images()
  params = _init(model, images)
  assert _attention_tokens(model, params, images, train=True) == {(8 + 4, 8 + 4)}
  assert _attention_tokens(model, params, images, train=False) == {(PATCHES + 4,) * 2}


def test_same_key_same_patches_other_key_other_patches():
  tokens = jax.random.normal(jax.random.key(0), (4, 1 + PATCHES, 8))
  drop = lambda seed: patch_dropout.drop_patches(jax.random.key(seed), tokens, None, 1, 0.5)
  _, _, keep_a = drop(0)
  _, _, keep_b = drop(0)
  _, _, keep_c = drop(1)
  np.testing.assert_array_equal(keep_a, keep_b)
  assert not np.array_equal(keep_a, keep_c)
  assert keep_a.shape == (4, 8)
  assert len({tuple(row) for row in np.asarray(keep_a)}) > 1  # Each example draws its own.
  # In the model: training with the same key repeats itself; another key differs.
  model = models.create_model('ViT-B/16', 3, patch_dropout=0.5, **TINY)
  images = _images()
  params = _init(model, images)
  params['head']['kernel'] = jax.random.normal(jax.random.key(1), (32, 3))
  train = jax.jit(lambda k: model.apply({'params': params}, images, train=True,
                                         rngs={'dropout': jax.random.key(k)}))
  np.testing.assert_array_equal(train(0), train(0))
  assert not np.allclose(train(0), train(1))
  # At eval nothing is dropped: the same as a model without patch dropout.
  plain = models.create_model('ViT-B/16', 3, **TINY)
  np.testing.assert_allclose(model.apply({'params': params}, images),
                             plain.apply({'params': params}, images), atol=1e-6)


def test_with_padding_the_rate_applies_to_each_examples_real_patches():
  # NaFlex: 16 slots, of which 16, 10, 3 and 1 real patches; rate 0.5 keeps 8 slots.
  num_real = np.array([16, 10, 3, 1])
  patch_mask = jnp.asarray(np.arange(PATCHES)[None] < num_real[:, None])
  tokens = jax.random.normal(jax.random.key(0), (4, 1 + PATCHES, 8))
  seen = [set() for _ in num_real]
  for seed in range(20):
    _, _, keep = patch_dropout.drop_patches(jax.random.key(seed), tokens, None, 1, 0.5,
                                            patch_mask)
    kept_real = np.take_along_axis(np.asarray(patch_mask), np.asarray(keep), axis=1)
    # round(0.5 * n) real patches kept, never none: 8, 5, 2 (round half to even), 1.
    np.testing.assert_array_equal(kept_real.sum(axis=1), [8, 5, 2, 1])
    for b, row in enumerate(np.asarray(keep)):
      assert np.all(np.diff(row) > 0)  # Distinct, in their original order.
      seen[b].add(tuple(row[kept_real[b]]))
  # Which real patches are kept is drawn: 20 draws give several subsets where there is a choice.
  assert [len(s) > 1 for s in seen] == [True, True, True, False]


def test_kept_tokens_are_themselves_with_their_positions():
  tokens = jax.random.normal(jax.random.key(0), (3, 2 + PATCHES, 8))
  positions = rope.grid_positions((4, 4))
  dropped, kept_positions, keep = patch_dropout.drop_patches(
      jax.random.key(5), tokens, positions, 2, 0.25)
  assert dropped.shape == (3, 2 + 12, 8) and kept_positions.shape == (3, 12, 2)
  np.testing.assert_array_equal(dropped[:, :2], tokens[:, :2])  # The prefix stays in front.
  for b in range(3):
    assert np.all(np.diff(np.asarray(keep[b])) > 0)  # Distinct, in their original order.
    np.testing.assert_array_equal(dropped[b, 2:], tokens[b, 2 + keep[b]])
    np.testing.assert_array_equal(kept_positions[b], positions[0, keep[b]])


@pytest.mark.parametrize('posemb', ['learn+rope', 'rope_mixed'])
def test_with_rope_each_kept_token_turns_by_its_own_grid_position(posemb):
  # Layer 0's queries are per-token functions of (patch + table, grid position): every kept
  # token's rotated query in training must be the one that patch has in the full eval pass.
  model = models.create_model('ViT-B/16', 3, posemb=posemb, patch_dropout=0.5, **TINY)
  images = _images(batch=1)
  params = _init(model, images)

  def layer0(train):
    _, state = model.apply(
        {'params': params}, images, train=train, rngs={'dropout': jax.random.key(3)},
        mutable=['intermediates'],
        capture_intermediates=lambda mdl, _: mdl.name in ('query', 'rope'))
    attention = state['intermediates']['Transformer']['encoderblock_0'][
        'MultiHeadDotProductAttention_1']
    return (np.asarray(attention['query']['__call__'][0][0]),
            np.asarray(attention['rope']['__call__'][0][0][0]))

  full_query, full_rotated = layer0(train=False)
  kept_query, kept_rotated = layer0(train=True)
  assert kept_query.shape[0] == 1 + 8
  for i in range(1, 1 + 8):
    # Which patch is this? Its unrotated query says (the image is random: no two alike).
    distances = np.abs(full_query[1:] - kept_query[i]).max(axis=(-2, -1))
    patch = int(np.argmin(distances))
    assert distances[patch] < 1e-5
    np.testing.assert_allclose(kept_rotated[i], full_rotated[1 + patch], atol=1e-5)


def _train_flops(rate, images):
  model = models.create_model('ViT-B/16', 10, patch_dropout=rate, **TINY)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), images))['params']

  def loss(p, x, key):
    return jnp.mean(model.apply({'params': p}, x, train=True, rngs={'dropout': key}) ** 2)

  return flops.compiled_flops(
      jax.jit(jax.grad(loss)).lower(params, images, jax.random.key(0)))


def _expected_train_flops(rate, batch, patches, width=32, mlp_dim=64, layers=2, classes=10,
                          patch=8):
  """The matrix products by hand: the encoder's shrink with the kept tokens, the patch
  embedding does not; backward: 2x the forward, but no input gradient for the images."""
  tokens = patch_dropout.num_kept_patches(patches, rate) + 1
  encoder = layers * (4 * tokens * width * width + 2 * tokens * tokens * width
                      + 2 * tokens * width * mlp_dim) + width * classes
  embedding = patches * patch * patch * 3 * width
  return 2 * batch * (3 * encoder + 2 * embedding)


def test_the_train_step_flops_fall_with_the_rate():
  images = _images(size=64, batch=4)  # 64 patches, so the encoder dominates.
  full = _train_flops(0.0, images)
  previous = full
  for rate in (0.25, 0.5, 0.75):
    measured = _train_flops(rate, images)
    expected_ratio = (_expected_train_flops(rate, 4, 64) / _expected_train_flops(0.0, 4, 64))
    # XLA also counts norms, softmax and GELU (linear in the tokens too): a few % of slack.
    assert abs(measured / full - expected_ratio) < 0.03, (rate, measured / full, expected_ratio)
    assert measured < previous
    previous = measured
  assert _train_flops(0.5, images) / full < 0.55


def test_scan_remat_and_bf16():
  images = _images()
  model = models.create_model('ViT-B/16', 3, patch_dropout=0.5, scan=True, remat_policy='dots',
                              dtype='bfloat16', posemb='learn+rope', **TINY)
  params = _init(model, images)
  params['head']['kernel'] = jax.random.normal(jax.random.key(1), (32, 3))  # Not zero: a loss.
  step = jax.jit(jax.value_and_grad(lambda p, k: jnp.sum(model.apply(
      {'params': p}, images, train=True, rngs={'dropout': k}) ** 2)))
  loss, grads = step(params, jax.random.key(0))
  assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert float(step(params, jax.random.key(0))[0]) == float(loss)  # Same key, same tokens.
  assert float(step(params, jax.random.key(1))[0]) != float(loss)


@pytest.mark.parametrize('overrides,message', [
    (dict(patch_dropout=1.0), r'patch_dropout must be in \[0, 1\), got 1.0'),
    (dict(patch_dropout=-0.1), r'patch_dropout must be in \[0, 1\)'),
    (dict(patch_dropout=0.5, classifier='unpooled'), 'use token, gap or map'),
])
def test_bad_rates_are_user_errors(overrides, message):
  with pytest.raises(UserError, match=message):
    models.create_model('ViT-B/16', 3, **overrides)
