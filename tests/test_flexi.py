"""FlexiViT (vit_jax/models/flexi.py): PI-resize's exactness when upsampling and its least-squares
error when downsampling, the model's patch-size hook against the explicit resize, and that the
default model (now embedding through flexi.PatchEmbedding) is what it was."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.models import flexi

TINY = dict(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2, patch_size=8)


def _images(size=32, batch=2, seed=0):
  return jax.random.uniform(jax.random.key(seed), (batch, size, size, 3), minval=-1, maxval=1)


def _kernel(patch_hw=(8, 8), channels=3, width=16, seed=0):
  return np.random.RandomState(seed).normal(size=patch_hw + (channels, width)).astype(np.float32)


def _tokens(patches, kernel):
  """(N, h, w, C) patches . (h, w, C, D) kernel -> (N, D): the patch embedding of each patch."""
  return np.einsum('nhwc,hwcd->nd', np.asarray(patches, np.float64),
                   np.asarray(kernel, np.float64))


def _resize_patches(patches, new_hw):
  """What the input pipeline does to an image: bilinear (antialiased when shrinking)."""
  return np.asarray(jax.image.resize(
      patches, (patches.shape[0],) + tuple(new_hw) + (patches.shape[-1],), 'bilinear',
      antialias=True))


@pytest.mark.parametrize('new_hw', [(12, 12), (16, 16), (8, 12), (9, 13)])
def test_upsampling_preserves_the_tokens_of_resized_patches(new_hw):
  kernel = _kernel()
  patches = np.random.RandomState(1).uniform(-1, 1, size=(64, 8, 8, 3)).astype(np.float32)
  resized_kernel = flexi.resize_patch_embedding(kernel, new_hw)
  assert resized_kernel.shape == new_hw + (3, 16) and resized_kernel.dtype == np.float32
  expected = _tokens(patches, kernel)
  np.testing.assert_allclose(_tokens(_resize_patches(patches, new_hw), resized_kernel),
                             expected, atol=1e-4)
  # The same through jax (what the model runs), in float32.
  jax_kernel = flexi.resize_patch_embedding(jnp.asarray(kernel), new_hw)
  np.testing.assert_allclose(jax_kernel, resized_kernel, atol=1e-5)
  # A plain bilinear resize of the kernel (scaled by the area) does not: PI-resize is the point.
  naive = np.asarray(jax.image.resize(kernel, new_hw + (3, 16), 'bilinear'))
  naive = naive * 64 / (new_hw[0] * new_hw[1])
  naive_error = np.abs(_tokens(_resize_patches(patches, new_hw), naive) - expected).max()
  assert naive_error > 0.1, naive_error


@pytest.mark.parametrize('new_hw', [(4, 4), (6, 6), (5, 7)])
def test_downsampling_is_the_least_squares_fit_within_its_stated_error(new_hw):
  kernel = _kernel()
  resized_kernel = flexi.resize_patch_embedding(kernel, new_hw).astype(np.float64)
  resize = flexi.bilinear_resize_matrix((8, 8), new_hw)  # B: (new pixels, old pixels)
  flat_kernel = kernel.reshape(64, -1).astype(np.float64)  # (old pixels, C * D)
  flat_resized = resized_kernel.reshape(resize.shape[0], -1)
  # Least squares: min ||w - B^T w'||, the same as numpy's solver, and the normal equations
  # B (w - B^T w') = 0 hold.
  residual = flat_kernel - resize.T @ flat_resized  # r = w - B^T w'
  lstsq = np.linalg.lstsq(resize.T, flat_kernel, rcond=None)[0]
  np.testing.assert_allclose(flat_resized, lstsq, atol=1e-5)
  np.testing.assert_allclose(resize @ residual, 0, atol=1e-4)
  assert np.linalg.norm(residual) > 0.1  # Not exact: there is an error to bound.

  # The stated error: the token error of feature d on a patch x is <x, r_d> (summed over the
  # channels), so |error| <= ||x|| ||r_d|| for every x (Cauchy-Schwarz) ...
  rng = np.random.RandomState(2)
  patches = rng.normal(size=(20_000, 8, 8, 3))
  error = _tokens(_resize_patches(patches.astype(np.float32), new_hw), resized_kernel) - _tokens(
      patches, kernel)
  residual_norms = np.linalg.norm(residual.reshape(64, 3, 16), axis=(0, 1))  # ||r_d||, (D,)
  bound = np.linalg.norm(patches.reshape(len(patches), -1), axis=1)[:, None] * residual_norms
  assert np.all(np.abs(error) <= bound * (1 + 1e-4) + 1e-4)
  # ... and for patches of i.i.d. unit-variance pixels its mean square is ||r_d||^2 (the
  # paper's criterion; 20k samples: about 1% standard error).
  np.testing.assert_allclose(np.mean(error**2, axis=0), residual_norms**2, rtol=0.06)
  # No other kernel does better: nudging the fit in any direction raises the residual.
  for seed in range(3):
    nudged = flat_resized + 1e-2 * np.random.RandomState(seed).normal(size=flat_resized.shape)
    assert np.linalg.norm(flat_kernel - resize.T @ nudged) > np.linalg.norm(residual)


def test_resize_patch_embedding_on_its_own():
  kernel = _kernel(width=4)
  assert flexi.resize_patch_embedding(kernel, (8, 8)) is kernel
  assert flexi.resize_patch_embedding(kernel, 16).shape == (16, 16, 3, 4)  # An int: square.
  assert models.resize_patch_embedding is flexi.resize_patch_embedding
  # Inside jit and differentiable (what the model does on the fly).
  grad = jax.jit(jax.grad(lambda k: jnp.sum(flexi.resize_patch_embedding(k, (12, 12)) ** 2)))(
      jnp.asarray(kernel))
  assert grad.shape == kernel.shape and np.all(np.isfinite(grad))
  # bfloat16 in, bfloat16 out (the resize itself runs in float32).
  assert flexi.resize_patch_embedding(jnp.asarray(kernel, jnp.bfloat16), 4).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match='positive'):
    flexi.resize_patch_embedding(kernel, (0, 4))


def _explicit_params(params, new_patch, base_grid, new_grid, num_prefix):
  """The base model's params turned by hand into those of a model with patch `new_patch`."""
  params = jax.tree.map(lambda leaf: leaf, params)
  params['embedding']['kernel'] = models.resize_patch_embedding(
      params['embedding']['kernel'], new_patch)
  table = params['Transformer']['posembed_input']['pos_embedding']
  params['Transformer']['posembed_input']['pos_embedding'] = models.resize_posemb(
      table, new_grid, num_prefix, old_grid_hw=base_grid)
  return params


@pytest.mark.parametrize('patch,options', [
    (4, {}), (16, {}),
    (16, dict(pre_norm=True, no_embed_class=True)),  # No embedding bias, no prefix in the table.
])
def test_a_model_at_another_patch_size_matches_the_explicit_resize(patch, options):
  images = _images(size=32)  # Base patch 8: a 4x4 grid.
  base = models.create_model('ViT-B/16', 3, num_registers=1, **options, **TINY)
  params = base.init(jax.random.key(0), images)['params']
  params['head']['kernel'] = jax.random.normal(jax.random.key(1), (32, 3))
  flexed = base.apply({'params': params}, images, patch_size=(patch, patch))
  grid = 32 // patch
  explicit_kwargs = dict(num_registers=1, **options, **dict(TINY, patch_size=patch))
  explicit_model = models.create_model('ViT-B/16', 3, **explicit_kwargs)
  num_prefix = models.posemb_prefix_tokens(models.model_kwargs('ViT-B/16', 3, **explicit_kwargs))
  explicit = explicit_model.apply(
      {'params': _explicit_params(params, (patch, patch), (4, 4), (grid, grid), num_prefix)},
      images)
  np.testing.assert_allclose(flexed, explicit, atol=1e-5)


def test_the_stored_base_is_what_a_flexi_call_reads_and_trains():
  images = _images(size=32)
  base = models.create_model('ViT-B/16', 3, **TINY)
  params = base.init(jax.random.key(0), images)['params']
  params['head']['kernel'] = jax.random.normal(jax.random.key(1), (32, 3))
  patch = 16
  # Gradients reach the base kernel and table.
  grads = jax.grad(lambda p: jnp.sum(base.apply({'params': p}, images, patch_size=patch) ** 2))(
      params)
  assert grads['embedding']['kernel'].shape == (8, 8, 3, 32)
  assert grads['Transformer']['posembed_input']['pos_embedding'].shape == (1, 17, 32)
  assert np.abs(grads['embedding']['kernel']).max() > 0
  # Init with another patch size still stores the base kernel and grid.
  shapes = jax.eval_shape(lambda: base.init(jax.random.key(0), images, patch_size=patch))
  assert shapes['params']['embedding']['kernel'].shape == (8, 8, 3, 32)
  assert shapes['params']['Transformer']['posembed_input']['pos_embedding'].shape == (1, 17, 32)


def test_flexi_with_rope_measures_positions_in_base_cells():
  from vit_jax.models import rope  # pylint: disable=g-import-not-at-top
  positions = np.asarray(rope.grid_positions((8, 4), base_grid_hw=(4, 4)))[0]
  np.testing.assert_allclose(positions[:5], [[0, 0], [0, 1], [0, 2], [0, 3], [0.5, 0]])
  model = models.create_model('ViT-B/16', 3, posemb='rope_mixed', **TINY)
  images = _images()
  params = model.init(jax.random.key(0), images)['params']
  for patch in (4, 16):
    assert np.all(np.isfinite(model.apply({'params': params}, images, patch_size=patch)))


def test_scan_remat_and_bf16():
  images = _images()
  per_layer = models.create_model('ViT-B/16', 3, **TINY)
  params = per_layer.init(jax.random.key(0), images)['params']
  params['head']['kernel'] = jax.random.normal(jax.random.key(1), (32, 3))
  expected = per_layer.apply({'params': params}, images, patch_size=16)
  scanned = models.create_model('ViT-B/16', 3, scan=True, remat_policy='full',
                                dtype='bfloat16', **TINY)
  scan_params = models.layers_to_scan(params)

  def loss_fn(p):
    logits = scanned.apply({'params': p}, images, train=True, patch_size=16,
                           rngs={'dropout': jax.random.key(0)})
    return jnp.sum(logits**2), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(scan_params)
  assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(logits, expected, atol=0.1)  # No dropout: as at eval.


def test_a_patch_that_does_not_divide_the_image_is_a_user_error():
  from vit_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  model = models.create_model('ViT-B/16', 3, **TINY)
  params = model.init(jax.random.key(0), _images())['params']
  with pytest.raises(UserError, match='patch size 12x12 does not divide the image size 32x32'):
    model.apply({'params': params}, _images(), patch_size=12)


# --- the default model is unchanged ----------------------------------------------------------

def test_patch_embedding_is_nn_conv_at_the_base_patch():
  images = _images()
  conv = nn.Conv(32, (8, 8), strides=(8, 8), padding='VALID', name='embedding')
  embedding = flexi.PatchEmbedding(32, (8, 8), name='embedding')
  conv_params = conv.init(jax.random.key(3), images)
  params = embedding.init(jax.random.key(3), images)
  jax.tree.map(np.testing.assert_array_equal, params, conv_params)  # Same names, same init.
  params = jax.tree.map(lambda p: p + 0.1, params)
  np.testing.assert_array_equal(embedding.apply(params, images), conv.apply(params, images))


# Recorded from the model before issue 16 (commit b7f64e8): its parameter paths and shapes, and
# its logits on fixed images with a random head.
BEFORE_PARAM_SHAPES = {
    'Transformer/encoder_norm/bias': (32,), 'Transformer/encoder_norm/scale': (32,),
    'Transformer/posembed_input/pos_embedding': (1, 17, 32), 'cls': (1, 1, 32),
    'embedding/bias': (32,), 'embedding/kernel': (8, 8, 3, 32), 'head/bias': (5,),
    'head/kernel': (32, 5),
    **{f'Transformer/encoderblock_{i}/{path}': shape for i in range(2) for path, shape in {
        'LayerNorm_0/bias': (32,), 'LayerNorm_0/scale': (32,), 'LayerNorm_2/bias': (32,),
        'LayerNorm_2/scale': (32,), 'MlpBlock_3/Dense_0/bias': (64,),
        'MlpBlock_3/Dense_0/kernel': (32, 64), 'MlpBlock_3/Dense_1/bias': (32,),
        'MlpBlock_3/Dense_1/kernel': (64, 32),
        **{f'MultiHeadDotProductAttention_1/{name}/bias': (2, 16)
           for name in ('query', 'key', 'value')},
        **{f'MultiHeadDotProductAttention_1/{name}/kernel': (32, 2, 16)
           for name in ('query', 'key', 'value')},
        'MultiHeadDotProductAttention_1/out/bias': (32,),
        'MultiHeadDotProductAttention_1/out/kernel': (2, 16, 32)}.items()},
}
BEFORE_PARAM_SUM = 179.96428804253094  # Sum of all initial parameters (init key 0).
BEFORE_LOGITS = [[13.003843, 5.7269154, 0.9117336, 2.4840734, -7.6509857],
                 [-9.982271, 1.1531367, 5.321136, 4.0398808, -5.8691397]]


def test_the_default_model_is_what_it_was_before():
  model = models.create_model('ViT-B/16', 5, **TINY)
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  params = model.init(jax.random.key(0), images)['params']
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  assert {'/'.join(k.key for k in path): leaf.shape for path, leaf in flat} == \
      BEFORE_PARAM_SHAPES
  np.testing.assert_allclose(sum(float(jnp.sum(leaf)) for _, leaf in flat), BEFORE_PARAM_SUM,
                             rtol=1e-6)
  params['head']['kernel'] = jax.random.normal(jax.random.key(3), params['head']['kernel'].shape)
  np.testing.assert_allclose(model.apply({'params': params}, images), BEFORE_LOGITS, rtol=1e-5,
                             atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Training with a patch size per step (vit_jax/train/flexi.py and the loop).


def _flexi_quickstart(total_steps, patch_sizes=(2, 4), **flexi_options):
  """The quickstart (base patch 4 at 16 px), small, with FlexiViT's per-step patch sizes."""
  from configs import quickstart
  config = quickstart.get_config()
  config.model.update(num_layers=2, hidden_size=32, mlp_dim=64, num_heads=2)
  config.update(total_steps=total_steps, batch_size=32, log_every=1, eval_every=0,
                checkpoint_every=0, plot_every_eval=False)
  config.schedule.warmup_steps = 10
  config.flexi.patch_sizes = patch_sizes
  config.flexi.update(flexi_options)
  return config


def test_a_flexi_run_compiles_one_step_per_patch_size_and_evaluates_at_each(tmp_path):
  import json
  from vit_jax.train import loop
  lines = []
  final = loop.train_and_evaluate(_flexi_quickstart(300), str(tmp_path / 'run'),
                                  log=lambda *a, **k: lines.append(' '.join(map(str, a))))
  assert any('compiled 2 train steps, one per patch size 2, 4' in line for line in lines), lines
  # Each size evaluated; test_accuracy is the eval patch size's (the model's own 4 by default).
  for size in (2, 4):
    assert 0.5 < final[f'test_accuracy_p{size}'] <= 1.0, final  # Far above chance (0.1).
    assert f'test_loss_p{size}' in final
  assert final['test_accuracy'] == final['test_accuracy_p4']
  assert final['test_loss'] == final['test_loss_p4']
  # Both sizes trained: every step logs its size, and both were drawn.
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  drawn = [row['patch_size'] for row in rows if 'train_loss' in row]
  assert len(drawn) == 300 and set(drawn) == {2, 4}


def test_patch_sizes_are_drawn_by_weight_from_the_step_alone():
  from vit_jax.train import config as config_lib
  from vit_jax.train import flexi as train_flexi
  config = config_lib.resolve(_flexi_quickstart(100, patch_sizes=(2, 4, 8), weights=(1, 0, 3)))
  draws = [train_flexi.patch_size_at(config, step) for step in range(1, 2001)]
  assert set(draws) == {2, 8}  # Weight 0: never drawn.
  assert 0.70 < draws.count(8) / len(draws) < 0.80  # 3 to 1.
  # A function of (seed, step): a resumed run draws what an uninterrupted one did.
  assert draws[500:] == [train_flexi.patch_size_at(config, step) for step in range(501, 2001)]
  assert config.flexi.eval_patch_size == 4  # The model's own patch, stated in config.json.
  assert train_flexi.eval_patch_sizes(config) == (2, 4, 8)


@pytest.mark.parametrize('change, message', [
    (dict(patch_sizes=(3, 4)), 'patch size 3 does not divide image_size=16'),
    (dict(patch_sizes=(2, 4), weights=(1,)), 'weights=.* one number >= 0 per patch size'),
    (dict(patch_sizes=(2, 2)), 'lists a size twice'),
    (dict(patch_sizes=(), weights=(1, 2)), 'weights=.* has no effect without'),
    (dict(patch_sizes=(), eval_patch_size=4), 'eval_patch_size=4 has no effect'),
    (dict(patch_sizes=(2, 4), eval_patch_size=3), 'eval_patch_size: patch size 3 does not'),
])
def test_bad_flexi_settings_are_one_line_errors(change, message):
  from vit_jax.errors import UserError
  from vit_jax.train import config as config_lib
  config = _flexi_quickstart(10)
  config.flexi.update(change)
  with pytest.raises(UserError, match=message) as error:
    config_lib.resolve(config)
  assert '\n' not in str(error.value)


def test_flexi_needs_a_plain_vit():
  from vit_jax.errors import UserError
  from vit_jax.train import config as config_lib
  config = _flexi_quickstart(10)
  config.model_name = 'Mixer-S/4'
  config.model.update(num_heads=None, mlp_dim=None, classifier=None)
  with pytest.raises(UserError, match="needs a plain ViT; model_name='Mixer-S/4'"):
    config_lib.resolve(config)
