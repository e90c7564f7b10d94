"""2-D rotary position embeddings (vit_jax/models/rope.py): the relative-position property, the
wiring into attention (patch tokens only), new resolutions, layouts, scan, remat and bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.errors import UserError
from vit_jax.models import rope

TINY = dict(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2, patch_size=4)
HEAD_DIM = 16
MODES = ('axial', 'mixed')
POSEMB = {'axial': 'rope', 'mixed': 'rope_mixed'}


def _images(size=16, batch=2, seed=0):
  return jax.random.uniform(jax.random.key(seed), (batch, size, size, 3), minval=-1, maxval=1)


# One-off calls run eagerly: for models this small that is faster than compiling them.
def _init(model, images):
  return model.init(jax.random.key(0), images)['params']


def _apply(model, params, images, **kwargs):
  return model.apply({'params': params}, images, **kwargs)


def _angles(mode, positions, freqs):
  if mode == 'axial':
    return rope.axial_angles(positions, HEAD_DIM)
  return rope.mixed_angles(positions, freqs)


def _logit(mode, query, key, query_pos, key_pos, freqs):
  """q . k after rotating q at query_pos and k at key_pos; q, k: (1, 1, heads, D)."""
  as_positions = lambda pos: jnp.asarray([[pos]], jnp.float32)  # (1, 1, 2)
  q = rope.rotate(query, _angles(mode, as_positions(query_pos), freqs))
  k = rope.rotate(key, _angles(mode, as_positions(key_pos), freqs))
  return np.asarray(jnp.sum(q * k, axis=-1)[0, 0])  # one logit per head


@pytest.mark.parametrize('mode', MODES)
def test_logits_depend_only_on_the_offset(mode):
  q_key, k_key, f_key = jax.random.split(jax.random.key(0), 3)
  query = jax.random.normal(q_key, (1, 1, 2, HEAD_DIM))
  key = jax.random.normal(k_key, (1, 1, 2, HEAD_DIM))
  freqs = rope.init_mixed_freqs(f_key, (2, 2, HEAD_DIM // 2))
  rng = np.random.RandomState(0)
  for _ in range(5):
    query_pos = rng.randint(0, 14, size=2).astype(np.float32)
    offset = rng.randint(-6, 7, size=2).astype(np.float32)
    reference = _logit(mode, query, key, query_pos, query_pos + offset, freqs)
    for shift in ([1, 0], [0, 3], [5, -2], [0.5, 2.25]):  # Both axes, fractional too.
      shifted = query_pos + np.asarray(shift, np.float32)
      np.testing.assert_allclose(
          _logit(mode, query, key, shifted, shifted + offset, freqs), reference, atol=2e-5)
    for other in ([1, 0], [0, 1], [1, 1]):  # A different offset gives a different logit.
      changed = _logit(mode, query, key, query_pos, query_pos + offset + other, freqs)
      assert np.all(np.abs(changed - reference) > 1e-4), (other, changed, reference)


def _rope_calls(model, params, images):
  """{layer 0 name: (query, key) before and after rotation} from capture_intermediates."""
  wanted = ('query', 'key', 'rope')
  _, state = _apply(model, params, images, mutable=['intermediates'],
                    capture_intermediates=lambda mdl, _: mdl.name in wanted)
  attention = state['intermediates']['Transformer']['encoderblock_0'][
      'MultiHeadDotProductAttention_1']
  rotated_q, rotated_k = attention['rope']['__call__'][0]
  return (attention['query']['__call__'][0], attention['key']['__call__'][0],
          rotated_q, rotated_k)


@pytest.mark.parametrize('mode', MODES)
def test_patch_token_logits_in_the_model_depend_only_on_the_offset(mode):
  # A constant image: every patch token enters layer 0 alike (RoPE only, no table), so the
  # logits between patches differ only through their grid positions.
  model = models.create_model('ViT-B/16', 3, posemb=POSEMB[mode], **TINY)
  images = jnp.full((1, 24, 24, 3), 0.3)  # A 6x6 grid.
  params = _init(model, images)
  _, _, query, key = _rope_calls(model, params, images)
  logits = np.asarray(jnp.einsum('bqhd,bkhd->bhqk', query, key))[0, :, 1:, 1:]  # patches only
  index = lambda row, col: row * 6 + col  # Row-major, as the patches are flattened.
  for (row, col), (d_row, d_col) in [((0, 0), (2, 1)), ((1, 1), (-1, 2)), ((3, 3), (1, -2))]:
    reference = logits[:, index(row, col), index(row + d_row, col + d_col)]
    for s_row, s_col in [(1, 0), (0, 1), (1, 1)]:
      r, c = row + s_row, col + s_col
      np.testing.assert_allclose(
          logits[:, index(r, c), index(r + d_row, c + d_col)], reference, rtol=1e-4, atol=1e-4)
    other = logits[:, index(row, col), index(row + d_row, col + d_col - 1)]
    assert np.all(np.abs(other - reference) > 1e-4)


@pytest.mark.parametrize('mode,options', [
    ('axial', {}), ('mixed', {}),
    ('axial', dict(distilled=True, no_embed_class=True)),  # DeiT's token, no table in front
])
def test_class_and_register_tokens_are_not_rotated(mode, options):
  model = models.create_model('ViT-B/16', 3, posemb=POSEMB[mode], num_registers=2, **options,
                              **TINY)
  images = _images()
  params = _init(model, images)
  query, key, rotated_q, rotated_k = _rope_calls(model, params, images)
  prefix = 1 + options.get('distilled', 0) + 2  # Class (and distillation) token, 2 registers.
  np.testing.assert_array_equal(rotated_q[:, :prefix], query[:, :prefix])
  np.testing.assert_array_equal(rotated_k[:, :prefix], key[:, :prefix])
  # Patch (0, 0) sits at angle 0; every other patch turns, keeping its norm.
  np.testing.assert_allclose(rotated_q[:, prefix], query[:, prefix], atol=1e-6)
  moved = np.abs(np.asarray(rotated_q[:, prefix + 1:] - query[:, prefix + 1:])).max(axis=-1)
  assert np.all(moved > 1e-3)
  np.testing.assert_allclose(jnp.linalg.norm(rotated_k, axis=-1), jnp.linalg.norm(key, axis=-1),
                             rtol=1e-5)


@pytest.mark.parametrize('posemb', ['rope', 'rope_mixed'])
def test_a_rope_only_model_runs_at_a_resolution_it_was_not_made_for(posemb):
  model = models.create_model('ViT-B/16', 3, posemb=posemb, num_registers=1,
                              **dict(TINY, patch_size=8))
  params = _init(model, _images(16))  # A 2x2 grid.
  assert 'posembed_input' not in params['Transformer']
  logits = _apply(model, params, _images(24))  # 3x3, no weight surgery.
  assert logits.shape == (2, 3) and np.all(np.isfinite(logits))


def test_learn_plus_rope_keeps_a_table_that_is_resized_as_ever():
  model = models.create_model('ViT-B/16', 3, posemb='learn+rope', **TINY)
  params = _init(model, _images(16))
  table = params['Transformer']['posembed_input']['pos_embedding']
  assert table.shape == (1, 1 + 16, 32)
  with pytest.raises(UserError, match='resize_posemb'):
    model.apply({'params': params}, _images(24))
  params['Transformer']['posembed_input']['pos_embedding'] = models.resize_posemb(
      table, (6, 6), 1)
  assert np.all(np.isfinite(_apply(model, params, _images(24))))


def test_axial_rope_has_no_parameters_and_mixed_learns_named_frequencies():
  images = _images()
  axial = models.create_model('ViT-B/16', 3, posemb='rope', **TINY)
  plain = models.create_model('ViT-B/16', 3, posemb='sincos2d', **TINY)
  count = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree['params']))
  shapes = lambda model: jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  assert count(shapes(axial)) == count(shapes(plain))

  mixed = models.create_model('ViT-B/16', 3, posemb='rope_mixed', **TINY)
  params = _init(mixed, images)
  freqs = [params['Transformer'][f'encoderblock_{i}']['MultiHeadDotProductAttention_1']['rope'][
      'freqs'] for i in range(2)]
  assert freqs[0].shape == (2, 2, HEAD_DIM // 2)  # (x|y, heads, D/2)
  assert not np.allclose(freqs[0], freqs[1])  # Each layer and head has its own directions.
  # RoPE-ViT's initial magnitudes: theta^(-4i/D), in two perpendicular directions per head.
  magnitudes = np.asarray(rope.axial_frequencies(HEAD_DIM, rope.MIXED_THETA))
  np.testing.assert_allclose(np.linalg.norm(freqs[0], axis=0),
                             np.tile(np.concatenate([magnitudes, magnitudes]), (2, 1)),
                             rtol=1e-5)
  # They are trained: the loss has a gradient with respect to them.
  params['head']['kernel'] = jnp.ones_like(params['head']['kernel'])
  grads = jax.grad(lambda p: jnp.sum(mixed.apply({'params': p}, images) ** 2))(params)
  rope_grad = grads['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_1']['rope']
  assert np.abs(rope_grad['freqs']).max() > 0


@pytest.mark.parametrize('posemb', ['rope', 'learn+rope_mixed'])
def test_scan_remat_and_bf16(posemb):
  images = _images()
  per_layer = models.create_model('ViT-B/16', 3, posemb=posemb, num_registers=1, **TINY)
  params = _init(per_layer, images)
  params['head']['kernel'] = 0.1 * jax.random.normal(jax.random.key(1), (32, 3))
  expected = _apply(per_layer, params, images)
  scan_params = models.layers_to_scan(params)
  scanned = models.create_model('ViT-B/16', 3, posemb=posemb, num_registers=1, scan=True,
                                remat_policy='dots', **TINY)
  np.testing.assert_allclose(_apply(scanned, scan_params, images), expected,
                             atol=1e-5)
  bf16 = models.create_model('ViT-B/16', 3, posemb=posemb, num_registers=1, scan=True,
                             remat_policy='full', dtype='bfloat16', **TINY)

  def loss_fn(p):
    logits = bf16.apply({'params': p}, images, train=True, rngs={'dropout': jax.random.key(0)})
    return jnp.sum(logits**2), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(scan_params)
  assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(logits, expected, atol=0.05)  # No dropout: as at eval.


def test_rope_needs_a_head_width_divisible_by_4():
  with pytest.raises(UserError, match='divisible by 4, got 6'):
    models.create_model('ViT-B/16', 3, posemb='rope', hidden_size=24, num_heads=4)
  for posemb in ('rope', 'rope_mixed', 'learn+rope', 'learn+rope_mixed'):
    assert models.model_kwargs('ViT-S/16', 3, posemb=posemb)['posemb'] == posemb


@pytest.mark.slow
def test_a_rope_quickstart_reaches_97_percent_and_runs_at_another_resolution(tmp_path):
  """The README's quickstart with `model.posemb=rope`, its usual steps; then its weights
  at 24 px (a 6x6 grid where it trained on 4x4), with no weight surgery."""
  import json
  import os
  from conftest import XLA_DEFAULT_LEVEL, run_train
  from vit_jax import restore
  from vit_jax.data import device, digits
  workdir = str(tmp_path / 'rope')
  result = run_train(['--config', 'configs/quickstart.py', '--config.model.posemb=rope',
                      '--workdir', workdir], env=XLA_DEFAULT_LEVEL, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    final = json.load(f)
  from configs import quickstart
  assert final['step'] == quickstart.get_config().total_steps, final
  assert final['test_accuracy'] >= 0.97, final

  model, params, config = restore(workdir)
  assert config.model_fields['posemb'] == 'rope'
  assert 'posembed_input' not in params['Transformer']  # RoPE only: no table to resize.
  test_split = digits.load('test')
  at_training_size = model.apply(
      {'params': params}, device.preprocess(jnp.asarray(test_split.pixels), 16))
  accuracy = float(np.mean(np.argmax(at_training_size, -1) == test_split.labels))
  assert accuracy == pytest.approx(final['test_accuracy'], abs=1e-6)
  at_24px = model.apply({'params': params}, device.preprocess(jnp.asarray(test_split.pixels), 24))
  assert at_24px.shape == (360, 10) and np.all(np.isfinite(at_24px))
  # Not trained for it, yet it still reads digits (chance is 10%).
  assert float(np.mean(np.argmax(at_24px, -1) == test_split.labels)) > 0.3
