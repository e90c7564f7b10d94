"""Fine-tuning as the weights' authors did: layer-wise lr decay (per-layer and scanned blocks),
lr and weight-decay multipliers by name, frozen parameters (a linear probe through the real train
step), and train.py starting from a timm file whose model options must match the config's."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_train, shared_fixtures
from vit_jax import models
from vit_jax.errors import UserError
from vit_jax.train import build
from vit_jax.train import checkpoint
from vit_jax.train import config as config_lib
from vit_jax.train import optim
from vit_jax.train import sharding
from vit_jax.weights import convert

NUM_LAYERS = 3
LR = 0.1
PLAIN_SGD = dict(name='sgd', momentum=0.0, grad_clip_norm=0.0, weight_decay=0.0)
TIMM_FILE = os.path.join(shared_fixtures('timm_vit'), 'plain_token.safetensors')
# The fixture's architecture (plain_token.json: 32 px, patch 8, width 48, depth 2, 3 heads,
# mlp_ratio 2) and timm's defaults for what its file does not store (exact GELU, eps 1e-6).
TIMM_MODEL = ['--config.model_name=ViT-Ti/8', '--config.model.hidden_size=48',
              '--config.model.num_layers=2', '--config.model.num_heads=3',
              '--config.model.mlp_dim=96', '--config.model.classifier=token']


def resolved(**optimizer):
  config = config_lib.defaults()
  config.data.source = 'digits'
  config.model_name = 'ViT-Ti/4'
  config.image_size = 8
  config.total_steps = 10
  config.schedule.update(name='constant', base_lr=LR, warmup_steps=0)
  config.optimizer.update(optimizer)
  return config_lib.resolve(config)


def tiny_params(scan=False):
  model = models.create_model('ViT-Ti/4', 3, hidden_size=8, num_layers=NUM_LAYERS, num_heads=2,
                              mlp_dim=16, classifier='token', num_registers=1, scan=scan)
  return model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']


def named(tree):
  return {optim.leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def one_update(config, params, grads):
  tx, _ = optim.create_optimizer(config, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return named(updates)


def random_like(params, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


# ---------------------------------------------------------------------------------------------
# Layer-wise decay.


def expected_layer_factor(name, decay, scan):
  """BEiT's convention written out by hand: embeddings decay^(L+1), block i decay^(L-i),
  everything after the blocks 1."""
  if name.startswith(('embedding/', 'Transformer/posembed_input/')) or name in ('cls',
                                                                               'registers'):
    return decay ** (NUM_LAYERS + 1)
  if scan and name.startswith('Transformer/encoderblock/'):
    return np.array([decay ** (NUM_LAYERS - i) for i in range(NUM_LAYERS)])
  if name.startswith('Transformer/encoderblock_'):
    block = int(name.split('/')[1].split('_')[1])
    return decay ** (NUM_LAYERS - block)
  assert name.startswith(('head/', 'Transformer/encoder_norm/')), name
  return 1.0


@pytest.mark.parametrize('scan', [False, True], ids=['per_layer', 'scan'])
def test_layer_decay_gives_block_i_the_rate_base_times_decay_to_the_L_minus_i(scan):
  params = tiny_params(scan)
  grads = jax.tree.map(jnp.ones_like, params)  # SGD: the update is -lr x factor x gradient.
  updates = one_update(resolved(**PLAIN_SGD, layer_decay=0.5), params, grads)
  assert any('encoderblock' in name for name in updates)
  for name, update in updates.items():
    factor = np.asarray(expected_layer_factor(name, 0.5, scan))
    if factor.ndim:  # Along the stacked layer axis of the scanned blocks.
      factor = factor.reshape((NUM_LAYERS,) + (1,) * (update.ndim - 1))
    np.testing.assert_allclose(update, np.broadcast_to(-LR * factor, update.shape), rtol=1e-6,
                               err_msg=name)


def test_scanned_and_per_layer_blocks_get_the_same_rates():
  from vit_jax.models import layout
  per_layer = tiny_params(scan=False)
  grads = random_like(per_layer)
  config = resolved(**PLAIN_SGD, layer_decay=0.7, lr_multipliers='MlpBlock_3=2')
  tx, _ = optim.create_optimizer(config, layout.layers_to_scan(per_layer))
  scanned, _ = tx.update(layout.layers_to_scan(grads), tx.init(layout.layers_to_scan(per_layer)))
  unscanned = one_update(config, per_layer, grads)
  for name, update in named(layout.scan_to_layers(scanned)).items():
    np.testing.assert_allclose(update, unscanned[name], rtol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Multipliers by name.


def test_lr_multipliers_change_exactly_the_matched_leaves():
  params = tiny_params()
  grads = random_like(params)
  base = one_update(resolved(**PLAIN_SGD), params, grads)
  scaled = one_update(resolved(**PLAIN_SGD, lr_multipliers='head=10,pos_embedding=0'), params,
                      grads)
  for name, update in base.items():
    if name.startswith('head/'):
      np.testing.assert_allclose(scaled[name], 10 * update, rtol=1e-6)
    elif name.endswith('pos_embedding'):
      assert not np.any(scaled[name])
    else:
      np.testing.assert_array_equal(scaled[name], update, err_msg=name)


def test_multipliers_and_layer_decay_multiply():
  params = tiny_params()
  grads = jax.tree.map(jnp.ones_like, params)
  updates = one_update(resolved(**PLAIN_SGD, layer_decay=0.5,
                                lr_multipliers='encoderblock_0=3,MlpBlock=2'), params, grads)
  name = 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'
  np.testing.assert_allclose(updates[name], -LR * 0.5 ** NUM_LAYERS * 3 * 2, rtol=1e-6)
  name = 'Transformer/encoderblock_1/LayerNorm_0/scale'
  np.testing.assert_allclose(updates[name], -LR * 0.5 ** (NUM_LAYERS - 1), rtol=1e-6)


def test_wd_multipliers_scale_the_decay_of_the_matched_kernels_only():
  params = tiny_params()
  zeros = jax.tree.map(jnp.zeros_like, params)  # Only the weight decay moves anything.
  config = resolved(**dict(PLAIN_SGD, weight_decay=0.5), wd_multipliers='head=3,MlpBlock_3=0')
  updates = one_update(config, params, zeros)
  for name, param in named(params).items():
    rate = 0.0 if not name.endswith('/kernel') else 3 * 0.5 if name.startswith('head/') else (
        0.0 if 'MlpBlock_3' in name else 0.5)
    np.testing.assert_allclose(updates[name], -LR * rate * np.asarray(param), rtol=1e-6,
                               atol=1e-9, err_msg=name)


@pytest.mark.parametrize('setting, pattern', [
    (dict(lr_multipliers='haed=2'), 'haed'),
    (dict(weight_decay=0.1, wd_multipliers='cls=2'), 'cls'),  # cls has no weight decay.
    (dict(frozen='^stem/'), '^stem/'),
    (dict(trainable='^heads/'), '^heads/'),
])
def test_a_pattern_that_matches_no_parameter_is_a_one_line_error(setting, pattern):
  key = next(iter(k for k in setting if k != 'weight_decay'))
  with pytest.raises(UserError, match=f'optimizer.{key}: pattern') as error:
    optim.create_optimizer(resolved(**setting), tiny_params())
  assert repr(pattern) in str(error.value) and '\n' not in str(error.value)


def test_freezing_everything_is_refused():
  with pytest.raises(UserError, match='leaves no parameter to train'):
    optim.create_optimizer(resolved(frozen='.'), tiny_params())


@pytest.mark.parametrize('setting, message', [
    (dict(wd_multipliers='head=2'), 'wd_multipliers=.* has no effect with '
                                    'optimizer.weight_decay=0'),
    (dict(lr_multipliers='head'), "lr_multipliers: 'head' is not PATTERN=X"),
    (dict(lr_multipliers='head=ten'), "lr_multipliers: 'head=ten' is not PATTERN=X"),
    (dict(lr_multipliers='head=-1'), 'X >= 0'),
    (dict(frozen='(unclosed'), 'optimizer.frozen=.* is not a regular expression'),
    (dict(layer_decay=0.0), r'optimizer.layer_decay=0.0 must be in \(0, 1\]'),
    (dict(layer_decay=1.5), 'optimizer.layer_decay=1.5'),
])
def test_bad_fine_tuning_settings_are_refused_by_resolve(setting, message):
  with pytest.raises(UserError, match=message) as error:
    resolved(**setting)
  assert '\n' not in str(error.value)


def test_multipliers_are_parsed_around_regex_commas_and_lookaheads():
  assert config_lib.parse_multipliers(r'encoderblock_\d{1,2}/=0.5, (?=h)head=2,') == [
      (r'encoderblock_\d{1,2}/', 0.5), ('(?=h)head', 2.0)]
  # One spelling, so a rerun with the same setting resumes.
  assert resolved(lr_multipliers='head=10 , cls=0').optimizer.lr_multipliers == (
      'head=10.0,cls=0.0')


def test_a_workdir_written_before_these_keys_reads_with_their_defaults():
  record = config_lib.workdir_record(resolved())
  for key in ('layer_decay', 'lr_multipliers', 'wd_multipliers', 'frozen', 'trainable'):
    del record['config']['optimizer'][key]
  assert config_lib.from_workdir_record(record) == resolved()


def test_checkpoints_written_before_per_parameter_options_still_restore():
  """A weight-decayed run of the previous code (adamw, weight_decay 0.05): its optimizer state
  has the structure this code builds, so it resumes."""
  from conftest import REPO_ROOT
  state = checkpoint.restore_train_state(
      os.path.join(REPO_ROOT, 'tests', 'fixtures', 'v1_quickstart_workdir'), step=4)
  assert int(state.step) == 4


# ---------------------------------------------------------------------------------------------
# Frozen parameters: a linear probe through the real train step.


def test_a_linear_probe_trains_the_head_alone_and_keeps_no_state_for_the_rest(tmp_path):
  config = config_lib.defaults()
  config.data.source = 'digits'
  config.model_name = 'ViT-Ti/4'
  config.model.update(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)
  config.image_size, config.batch_size, config.total_steps = 8, 8, 10
  config.schedule.warmup_steps = 0
  config.optimizer.update(name='adamw', weight_decay=0.1, ema_decay=0.9, trainable='^head/')
  config = config_lib.resolve(config, jax.device_count())
  run = build.parts(config, num_classes=10)
  state = run.new_state()
  before = named(jax.device_get(state.params))
  rng = np.random.default_rng(0)
  batch = sharding.global_batch({'images': rng.integers(0, 256, (8, 8, 8, 3), np.uint8),
                                 'labels': rng.integers(0, 10, (8,), np.int32)}, run.mesh)
  for _ in range(3):
    state, _ = run.train_fn(state, batch)
  after, ema = named(jax.device_get(state.params)), named(jax.device_get(state.ema_params))
  for name, value in before.items():
    if name.startswith('head/'):
      assert not np.array_equal(after[name], value), name
    else:  # Bit-identical, and so is their EMA.
      np.testing.assert_array_equal(after[name], value, err_msg=name)
      np.testing.assert_array_equal(ema[name], value, err_msg=name)
  # Adam's two moments of the head, and nothing (but scalar counters) for the frozen rest.
  arrays = [leaf for leaf in jax.tree.leaves(state.opt_state) if np.ndim(leaf)]
  assert sum(np.size(leaf) for leaf in arrays) == 2 * sum(
      np.size(value) for name, value in before.items() if name.startswith('head/'))

  # The state round-trips through a checkpoint as it is.
  from etils import epath
  saver = checkpoint.Checkpointer(epath.Path(tmp_path / 'checkpoints'), async_save=False)
  saver.save(state)
  restored = saver.restore(3, run.abstract_state)
  saver.close()
  assert checkpoint.tree_digest(restored) == checkpoint.tree_digest(state)


# ---------------------------------------------------------------------------------------------
# Fine-tuning from a timm file.


def test_model_options_of_the_weights_must_match_the_config():
  """The file's exact GELU against the model's default tanh one: named, with both values."""
  init = jax.eval_shape(lambda: models.create_model(
      'ViT-Ti/8', 10, hidden_size=48, num_layers=2, num_heads=3, mlp_dim=96).init(
          jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params'])
  model_kwargs = models.model_kwargs('ViT-Ti/8', 10, hidden_size=48, num_layers=2, num_heads=3,
                                     mlp_dim=96, layer_norm_eps=1e-5)
  with pytest.raises(UserError) as error:
    convert.load_for_finetune(TIMM_FILE, init, model_kwargs, options_hint=' (config.model.X)')
  message = str(error.value)
  assert 'gelu_approximate=False (the model: True)' in message
  assert 'layer_norm_eps=1e-06 (the model: 1e-05)' in message
  assert message.startswith(TIMM_FILE) and message.endswith('(config.model.X)')
  assert '\n' not in message


@pytest.mark.parametrize('source', ['timm', 'hf', 'npz'])
def test_every_weights_format_fine_tunes_with_a_fresh_head_and_resized_posemb(source, tmp_path):
  """What train.py does with `pretrained.path` (`vit_jax.weights.pretrained`), from a timm file
  with its NAME.json, an HF folder and an npz of the same architecture, at 48 px, 10 classes."""
  import ml_collections
  from vit_jax.weights import pretrained, tree
  path = {'timm': TIMM_FILE, 'hf': shared_fixtures('hf_vit_default'),
          'npz': str(tmp_path / 'w.npz')}[source]
  if source == 'npz':
    convert.save_weights(convert.load_weights(TIMM_FILE)[0], path)
  stored, _ = convert.load_weights(path)
  model_kwargs = models.model_kwargs(
      'ViT-Ti/8', 10, hidden_size=48, num_layers=2, num_heads=3, mlp_dim=96,
      gelu_approximate=False, layer_norm_eps=1e-12 if source == 'hf' else 1e-6)
  init = models.VisionTransformer(**model_kwargs).init(
      jax.random.key(0), jnp.zeros((1, 48, 48, 3)))['params']
  notes = []
  fitted = tree.flatten(pretrained.load_pretrained(
      ml_collections.ConfigDict(dict(path=path, url=None, format='auto')),
      jax.device_get(init), model_kwargs, log=notes.append))
  assert any('fresh head' in note for note in notes), notes
  np.testing.assert_array_equal(fitted['head/kernel'], init['head']['kernel'])
  assert fitted['Transformer/posembed_input/pos_embedding'].shape == (1, 37, 48)
  for name, value in stored.items():
    if not name.startswith(('head/', 'Transformer/posembed_input/')):
      np.testing.assert_array_equal(fitted[name], value, err_msg=name)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_train_py_fine_tunes_from_a_timm_safetensors_file(tmp_path):
  workdir = str(tmp_path / 'timm_finetune')
  args = ['--config', 'configs/quickstart.py', '--workdir', workdir, *TIMM_MODEL,
          '--config.image_size=48', f'--config.pretrained.path={TIMM_FILE}',
          '--config.total_steps=2', '--config.batch_size=32', '--config.schedule.warmup_steps=1',
          '--config.log_every=1', '--config.eval_every=0', '--config.checkpoint_every=0',
          '--config.plot_every_eval=False', '--config.optimizer.layer_decay=0.75',
          '--config.optimizer.lr_multipliers=head=10']
  # timm's exact GELU: left at the model's tanh default, the run stops at once, naming it.
  refused = run_train(args)
  assert refused.returncode == 2, refused.stderr[-2000:]
  error = [line for line in refused.stderr.splitlines() if line.startswith('error:')]
  assert len(error) == 1 and 'gelu_approximate=False (the model: True)' in error[0], error
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))

  result = run_train(args + ['--config.model.gelu_approximate=False'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'loading pretrained weights' in result.stdout
  assert 'fresh head' in result.stdout
  assert 'resized position embeddings (1, 17, 48) -> (1, 37, 48)' in result.stdout
  assert [r['step'] for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
          if 'train_loss' in r] == [1, 2]

  from vit_jax import restore
  _, params, config = restore(workdir)
  assert config.optimizer.lr_multipliers == 'head=10.0'
  assert params['head']['kernel'].shape == (48, 10)
  timm_params, _ = convert.load_weights(TIMM_FILE)
  # Two small steps from the timm weights (which carry N(0, 0.2) noise): still those weights.
  for name in ('embedding/kernel', 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel',
               'Transformer/encoder_norm/scale'):
    got = params
    for part in name.split('/'):
      got = got[part]
    assert np.max(np.abs(np.asarray(got) - timm_params[name])) < 0.02, name
