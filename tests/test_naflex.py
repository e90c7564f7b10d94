"""NaFlex (vit_jax/models/naflex.py, vit_jax/data/naflex.py): images at their own aspect ratio as
padded patch sequences; the mask makes padding invisible, the square model's parameters serve
both inputs, and the batch contract reaches the step, the benchmark, the planner and predict."""

import fractions
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vit_jax import models
from vit_jax.errors import UserError
from vit_jax.models import naflex as model_naflex
from vit_jax.models import vit
from vit_jax.train import config as config_lib

TINY = dict(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2, patch_size=8)
IMAGE_SIZE = 32  # The learned table is stored for a 4x4 grid.
PATCH = (8, 8)


def _model(**options):
  return models.create_model('ViT-B/16', 5, **{**TINY, **options})


def _random_params(model, seed=1):
  """Params with random values everywhere (the zero-initialised head would hide differences)."""
  images = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
  params = model.init(jax.random.key(0), images)['params']
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      leaf + 0.2 * jax.random.normal(k, leaf.shape, leaf.dtype)
      for k, leaf in zip(keys, leaves)])


def _image(grid_hw, seed):
  height, width = grid_hw[0] * PATCH[0], grid_hw[1] * PATCH[1]
  return jax.random.uniform(jax.random.key(seed), (1, height, width, 3), minval=-1, maxval=1)


def _pad(inputs, num_tokens, seed):
  """An input of one or more images padded to `num_tokens` with noise: padding patches and
  positions that would change the logits if anything read them."""
  batch, count, flat = inputs['patches'].shape
  extra = num_tokens - count
  noise = jax.random.uniform(jax.random.key(seed), (batch, extra, flat), minval=-5, maxval=5)
  junk_positions = jax.random.randint(jax.random.key(seed + 1), (batch, extra, 2), 0, 9)
  return {
      'patches': jnp.concatenate([inputs['patches'], noise], axis=1),
      'positions': jnp.concatenate([inputs['positions'], junk_positions], axis=1),
      'patch_mask': jnp.concatenate([inputs['patch_mask'], jnp.zeros((batch, extra), bool)], 1),
      'grid_hw': inputs['grid_hw'],
  }


def _stack(inputs):
  return {key: jnp.concatenate([x[key] for x in inputs]) for key in inputs[0]}


# --- the model -------------------------------------------------------------------------------

@pytest.mark.parametrize('grid_hw', [(4, 4), (2, 7), (6, 3), (9, 9), (1, 1), (3, 5)])
def test_gathered_posemb_is_the_resized_table(grid_hw):
  table = jax.random.normal(jax.random.key(0), (1, 1 + 16, 12))
  expected = vit.resize_posemb(table, grid_hw, num_prefix_tokens=1)[0, 1:]
  rows, cols = np.meshgrid(np.arange(grid_hw[0]), np.arange(grid_hw[1]), indexing='ij')
  positions = np.stack([rows.ravel(), cols.ravel()], -1)[None].astype(np.int32)
  gathered = model_naflex.gather_posemb(table[0, 1:].reshape(4, 4, 12),
                                        np.int32([grid_hw]), positions)
  np.testing.assert_allclose(gathered[0], expected, atol=1e-6)


OPTIONS = {
    'token': {},
    'gap': dict(classifier='gap'),
    'map_registers': dict(classifier='map', num_registers=2),
    'sincos2d': dict(posemb='sincos2d'),
    'rope_mixed': dict(posemb='rope_mixed', classifier='gap'),
    'learn_rope_no_embed_class': dict(posemb='learn+rope', no_embed_class=True),
    'distilled': dict(distilled=True),
    'scan_remat': dict(scan=True, remat_policy='full', qk_norm=True),
}


@pytest.mark.parametrize('name', sorted(OPTIONS))
def test_a_square_image_as_patches_gives_the_image_paths_logits(name):
  model = _model(**OPTIONS[name])
  params = _random_params(model)
  images = jax.random.uniform(jax.random.key(3), (2, IMAGE_SIZE, IMAGE_SIZE, 3), minval=-1,
                              maxval=1)
  apply = jax.jit(lambda x: model.apply({'params': params}, x))
  from_images = apply(images)
  from_patches = apply(model_naflex.patchify(images, PATCH))
  np.testing.assert_allclose(from_patches, from_images, atol=1e-5)


GRIDS = ((2, 6), (5, 3), (3, 3))  # Three aspect ratios; none is the table's 4x4.
MAX_TOKENS = 16


@pytest.mark.parametrize('name', ['token', 'gap', 'map_registers', 'sincos2d', 'rope_mixed',
                                  'scan_remat'])
def test_mixed_aspect_ratios_match_each_image_alone_padded_and_unpadded(name):
  model = _model(**OPTIONS[name])
  params = _random_params(model)
  apply = jax.jit(lambda x: model.apply({'params': params}, x))
  alone = [model_naflex.patchify(_image(grid, seed), PATCH) for seed, grid in enumerate(GRIDS)]
  batch = _stack([_pad(x, MAX_TOKENS, seed=10 + i) for i, x in enumerate(alone)])
  batch_logits = apply(batch)
  for i, inputs in enumerate(alone):
    unpadded = apply(inputs)
    padded = apply(_pad(inputs, MAX_TOKENS, seed=20 + i))  # Other noise than in the batch.
    np.testing.assert_allclose(batch_logits[i], unpadded[0], atol=1e-5)
    np.testing.assert_allclose(padded[0], unpadded[0], atol=1e-5)
  # The padding is invisible, not the image: different images give different logits.
  assert np.abs(batch_logits[0] - batch_logits[1]).max() > 1e-3


def test_bfloat16_and_scan_forward_on_a_mixed_batch():
  options = dict(scan=True, classifier='map', dtype='bfloat16')
  model = _model(**options)
  params = _random_params(_model(**{**options, 'dtype': 'float32'}))
  alone = [model_naflex.patchify(_image(grid, seed), PATCH) for seed, grid in enumerate(GRIDS)]
  batch = _stack([_pad(x, MAX_TOKENS, seed=10 + i) for i, x in enumerate(alone)])
  # Jitted: a scanned bfloat16 model applied op by op takes half a minute on 2 CPU cores.
  apply = jax.jit(model.apply, static_argnames='mutable')
  logits, state = apply({'params': params}, batch, mutable=('intermediates',))
  assert logits.dtype == jnp.float32 and np.isfinite(logits).all()
  weights = jax.tree.leaves(state['intermediates'])
  assert {w.dtype for w in weights} == {jnp.dtype(jnp.bfloat16)}
  # The explicit attention path (sown weights) masks padding keys too: no weight on them.
  block_weights = state['intermediates']['Transformer']['encoderblock'][
      'MultiHeadDotProductAttention_1']['attention_weights'][0]  # (layers, batch, h, q, k)
  prefix = 0  # classifier='map': no class token.
  for i, grid in enumerate(GRIDS):
    real = prefix + grid[0] * grid[1]
    assert float(jnp.abs(block_weights[:, i, :, :, real:]).max()) == 0.0
  for i, inputs in enumerate(alone):
    np.testing.assert_allclose(logits[i], apply({'params': params}, inputs)[0],
                               atol=0.05, rtol=0.05)


@pytest.mark.parametrize('classifier', ['token', 'gap', 'map'])
def test_a_padding_example_with_no_real_patch_gives_finite_logits(classifier):
  model = _model(classifier=classifier)
  params = _random_params(model)
  empty = {'patches': jnp.zeros((2, MAX_TOKENS, 192)),
           'positions': jnp.zeros((2, MAX_TOKENS, 2), jnp.int32),
           'patch_mask': jnp.zeros((2, MAX_TOKENS), bool),
           'grid_hw': jnp.zeros((2, 2), jnp.int32)}
  assert np.isfinite(model.apply({'params': params}, empty)).all()


def test_patch_dropout_and_gradients_on_padded_patches():
  model = _model(patch_dropout=0.5, classifier='gap', posemb='learn+rope')
  params = _random_params(model)
  alone = [model_naflex.patchify(_image(grid, seed), PATCH) for seed, grid in enumerate(GRIDS)]
  batch = _stack([_pad(x, MAX_TOKENS, seed=10 + i) for i, x in enumerate(alone)])

  def loss(p):
    logits = model.apply({'params': p}, batch, train=True, rngs={'dropout': jax.random.key(0)})
    return jnp.mean(logits**2)

  value, grads = jax.value_and_grad(loss)(params)
  assert np.isfinite(value)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_a_model_initialised_on_patches_has_the_square_models_params():
  model = _model()
  from_images = jax.eval_shape(model.init, jax.random.key(0),
                               jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)))
  patches = model_naflex.patchify(jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)), PATCH)
  from_patches = jax.eval_shape(model.init, jax.random.key(0), patches)
  assert jax.tree.map(lambda x: x.shape, from_images) == jax.tree.map(lambda x: x.shape,
                                                                        from_patches)


def test_patch_input_mistakes_are_user_errors():
  model = _model()
  params = _random_params(model)
  inputs = model_naflex.patchify(_image((2, 2), 0), PATCH)
  with pytest.raises(UserError, match='missing grid_hw'):
    model.apply({'params': params}, {k: v for k, v in inputs.items() if k != 'grid_hw'})
  with pytest.raises(UserError, match='patch_mask'):
    model.apply({'params': params}, dict(inputs, patch_mask=inputs['patch_mask'][:, :2]))
  hybrid = models.create_model('R50+ViT-B/16', 3, hidden_size=32, num_heads=2, mlp_dim=64,
                               num_layers=1)
  with pytest.raises(UserError, match='hybrid'):
    hybrid.init(jax.random.key(0), inputs)


# --- the host pipeline -----------------------------------------------------------------------

def _exact_grid(height, width, patch_hw, max_tokens):
  """The largest grid within max_tokens, by exact arithmetic over every scale where a side
  reaches a whole number of patches (written apart from vit_jax.data.naflex.grid_for)."""
  def grid_at(scale):
    return (max(1, -(-scale * height // patch_hw[0])), max(1, -(-scale * width // patch_hw[1])))
  scales = [fractions.Fraction(k * patch_hw[0], height) for k in range(1, max_tokens + 1)]
  scales += [fractions.Fraction(k * patch_hw[1], width) for k in range(1, max_tokens + 1)]
  fitting = [s for s in scales if grid_at(s)[0] * grid_at(s)[1] <= max_tokens]
  return grid_at(max(fitting))


@pytest.mark.parametrize('height,width,patch_hw,max_tokens', [
    (32, 32, (8, 8), 16), (32, 32, (8, 8), 17), (20, 24, (4, 4), 16), (480, 640, (16, 16), 256),
    (640, 480, (16, 16), 256), (8, 8, (8, 8), 16), (10, 1000, (8, 8), 12), (999, 3, (4, 4), 9),
    (375, 500, (14, 14), 729), (50, 50, (4, 8), 10), (1, 1, (16, 16), 1)])
def test_grid_for_is_the_largest_grid_within_max_tokens(height, width, patch_hw, max_tokens):
  from vit_jax.data import naflex as data_naflex
  grid = tuple(data_naflex.grid_for(height, width, data_naflex.Spec(patch_hw, max_tokens))
               .numpy())
  assert grid == _exact_grid(height, width, patch_hw, max_tokens)
  assert grid[0] * grid[1] <= max_tokens


def test_host_patches_are_the_models_layout():
  from vit_jax.data import naflex as data_naflex
  image = np.random.default_rng(0).integers(0, 256, (24, 40, 3), np.uint8)
  spec = data_naflex.Spec(PATCH, 20)  # 3x5 patches fit as they are: no resize.
  example = {k: v.numpy() for k, v in data_naflex.eval_preprocess(image, spec).items()}
  expected = model_naflex.patchify(jnp.asarray(image)[None], PATCH)
  np.testing.assert_array_equal(example['patches'][:15], expected['patches'][0])
  np.testing.assert_array_equal(example['positions'][:15], expected['positions'][0])
  np.testing.assert_array_equal(example['patch_mask'], np.arange(20) < 15)
  np.testing.assert_array_equal(example['grid_hw'], [3, 5])
  assert not example['patches'][15:].any() and not example['positions'][15:].any()


def write_mixed_folder(root, shapes=((20, 24), (30, 16), (8, 40), (40, 12))):
  """A two-class folder whose images all have different shapes (cat dark, dog bright)."""
  rng = np.random.default_rng(0)
  for split, count in (('train', 4), ('test', 3)):
    for label, name in enumerate(('cat', 'dog')):
      os.makedirs(root / split / name)
      for i in range(count):
        height, width = shapes[(i + label) % len(shapes)]
        pixels = rng.integers(0, 60, (height, width, 3)) + 150 * label
        Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f'{i}.png')


def naflex_folder_config(root, **changes):
  config = config_lib.defaults()
  config.model_name = 'ViT-Ti/4'
  config.model.update(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
  config.data.update(source='folder', name=str(root), naflex_max_tokens=12)
  config.image_size, config.batch_size, config.eval_batch_size = 12, 4, 4
  config.aug.update(crop='inception_crop', randaugment_layers=1)
  config.update(changes)
  return config


def test_a_folder_of_mixed_shapes_gives_patch_batches(tmp_path):
  from vit_jax import data
  write_mixed_folder(tmp_path)
  config = config_lib.resolve(naflex_folder_config(tmp_path))
  datasets = data.create_datasets(config)
  batch = next(datasets.train_batches())
  assert batch['patches'].shape == (4, 12, 4 * 4 * 3) and batch['patches'].dtype == np.uint8
  counts = batch['patch_mask'].sum(axis=1)
  np.testing.assert_array_equal(counts, batch['grid_hw'].prod(axis=1))
  assert (counts <= 12).all() and (counts >= 6).all()
  assert not batch['patches'][~batch['patch_mask']].any()
  # Resumable as square batches are: batch 1 of a resumed stream is batch 1 of the first.
  again = next(datasets.train_batches(start_step=1))
  second = list(zip(range(2), datasets.train_batches()))[1][1]
  for key in again:
    np.testing.assert_array_equal(again[key], second[key])
  # Eval: one padded pass; 6 test images make a full and a half batch; grids kept per shape.
  evals = list(datasets.eval_batches())
  assert [list(b['mask']) for b in evals] == [[1, 1, 1, 1], [1, 1, 0, 0]]
  assert not evals[1]['patch_mask'][2:].any() and not evals[1]['grid_hw'][2:].any()
  grids = {tuple(g) for b in evals for g, m in zip(b['grid_hw'], b['mask']) if m}
  assert grids == {(3, 4), (4, 3), (2, 6), (6, 2)}  # 20x24, 30x16, 8x40, 40x12 in 12 tokens.


def test_tfds_and_digits_give_patch_batches(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds
  from vit_jax import data
  from vit_jax.data import tfds_source
  monkeypatch.setattr(tfds_source, 'tfds_host_reachable', lambda: True)
  config = config_lib.defaults()
  config.model_name = 'ViT-Ti/8'
  config.data.update(source='tfds', name='cifar10', data_dir=str(tmp_path), shuffle_buffer=16,
                     naflex_max_tokens=10)
  config.image_size, config.batch_size = 32, 8
  with tfds.testing.mock_data(num_examples=20):
    batch = next(data.create_datasets(config_lib.resolve(config)).train_batches())
  assert batch['patches'].shape == (8, 10, 8 * 8 * 3)
  np.testing.assert_array_equal(batch['grid_hw'], np.tile([3, 3], (8, 1)))  # Square 32x32.
  config.data.update(source='digits', name=None, data_dir=None, shuffle_buffer=None)
  config.data.update(train_split='train', eval_split='test', naflex_max_tokens=4)
  config.model_name = 'ViT-Ti/4'
  digits = next(data.create_datasets(config_lib.resolve(config)).eval_batches())
  np.testing.assert_array_equal(digits['grid_hw'], np.tile([2, 2], (8, 1)))  # 8x8 digits.
  assert digits['patch_mask'].all()


# --- the config, the step and the tools ------------------------------------------------------

@pytest.mark.parametrize('change, message', [
    (lambda c: c.aug.update(mixup_alpha=0.2), 'mixup_alpha=0.2.*naflex_max_tokens'),
    (lambda c: c.aug.update(cutmix_alpha=1.0), 'cutmix_alpha=1.0.*naflex_max_tokens'),
    (lambda c: c.aug.update(crop='random_crop', random_crop_pad=2), 'random_crop.*naflex'),
    (lambda c: c.update(model_name='Mixer-S/4') or c.model.update(num_heads=None, mlp_dim=None),
     'naflex_max_tokens=12 needs a ViT'),
    (lambda c: c.update(model_name='R50+ViT-Ti/16'), 'ResNet root'),
    (lambda c: c.data.update(host_image_size=16), 'host_image_size=16 has no effect'),
    (lambda c: c.data.update(naflex_max_tokens=0), 'naflex_max_tokens=0 must be positive'),
    (lambda c: c.flexi.update(patch_sizes=(2, 4)), 'flexi.patch_sizes=.*naflex_max_tokens'),
])
def test_config_refuses_what_naflex_cannot_do_in_one_line(change, message):
  config = naflex_folder_config('/data/images')
  change(config)
  with pytest.raises(UserError, match=message) as error:
    config_lib.resolve(config)
  assert '\n' not in str(error.value)


def test_the_config_fills_no_host_image_size_with_naflex():
  resolved = config_lib.resolve(naflex_folder_config('/data/images'))
  assert resolved.data.naflex_max_tokens == 12 and resolved.data.host_image_size is None


def test_benchmark_batch_and_memory_plan_take_patches():
  from conftest import train_losses_on_one_batch
  from vit_jax.tools import memory
  config = naflex_folder_config('/data/images', accum_steps=2)
  config.data.update(source='digits', name=None, train_split='train', eval_split='test')
  config.aug.update(crop='resize', randaugment_layers=0)
  config.total_steps, config.schedule.warmup_steps = 10, 1
  losses, skipped = train_losses_on_one_batch(config, steps=2)
  assert np.isfinite(losses).all() and skipped == 0
  planned = memory.train_step_planner(config_lib.resolve(config), 10)(4)
  assert planned is None or planned > 0


def test_a_folder_of_mixed_shapes_trains_and_predicts(tmp_path, capsys):
  from vit_jax.tools import predict
  from vit_jax.train import loop
  write_mixed_folder(tmp_path / 'images')
  config = naflex_folder_config(tmp_path / 'images', total_steps=6, log_every=2, eval_every=3,
                                checkpoint_every=6, plot_every_eval=False)
  config.model.update(scan=True, remat_policy='full')
  config.schedule.update(warmup_steps=1, base_lr=0.01)
  final = loop.train_and_evaluate(config, str(tmp_path / 'run'), log=lambda *a: None)
  assert final['step'] == 6 and np.isfinite(final['test_loss'])
  metrics = (tmp_path / 'run' / 'metrics.jsonl').read_text()
  rows = [json.loads(line) for line in metrics.splitlines()]
  assert all(np.isfinite(r['train_loss']) for r in rows if 'train_loss' in r)
  assert sum('test_accuracy' in r for r in rows) == 2
  # predict takes an image of any shape as the run's eval did: as patches.
  wide = tmp_path / 'wide.png'
  Image.fromarray(np.full((10, 70, 3), 200, np.uint8)).save(wide)
  assert predict.main(['--workdir', str(tmp_path / 'run'), str(wide)]) == 0
  output = capsys.readouterr().out
  assert 'wide.png' in output and ('cat' in output and 'dog' in output)
  assert predict.main(['--workdir', str(tmp_path / 'run'), '--heads', str(tmp_path / 'h.png'),
                       str(wide)]) != 0
