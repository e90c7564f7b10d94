"""The config's one owner (vit_jax.train.config): every key takes effect or is refused, the model
keys come from the model, derived values are computed once, and old workdirs still resume."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, run_train
from vit_jax import models
from vit_jax.errors import UserError
from vit_jax.train import checkpoint
from vit_jax.train import config as config_lib
from vit_jax.train import workdir as workdir_lib


def flat_keys(tree, prefix=''):
  keys = []
  for key, value in tree.items():
    if hasattr(value, 'items'):
      keys.extend(flat_keys(value, f'{prefix}{key}.'))
    else:
      keys.append(prefix + key)
  return keys


def get(config, key):
  for part in key.split('.'):
    config = config[part]
  return config


def with_value(config, key, value):
  copy = config.copy_and_resolve_references()
  *parents, leaf = key.split('.')
  node = copy
  for part in parents:
    node = node[part]
  node[leaf] = value
  return copy


def base(name):
  """Configs that between them give every key a context where it applies."""
  config = config_lib.defaults()
  config.model.update(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
  config.image_size, config.batch_size, config.total_steps = 16, 8, 100
  config.schedule.warmup_steps = 10
  if name == 'digits_adamw':
    config.model_name = 'ViT-Ti/4'
    config.data.source = 'digits'
    config.optimizer.name = 'adamw'
    config.optimizer.weight_decay = 0.05  # A context for optimizer.wd_multipliers.
  elif name == 'tfds_sgd':
    config.model_name = 'ViT-Ti/4'
    config.data.name = 'cifar10'
    config.aug.update(crop='random_crop', random_crop_pad=2, randaugment_layers=2)
    config.schedule.name = 'rsqrt'
    # A context for evals.knn_temperature, fewshot_l2, splits and max_train_examples.
    config.evals.update(knn_k=20, fewshot_shots=(5,))
  elif name == 'folder_lamb':
    config.model_name = 'ViT-Ti/8'
    config.data.update(source='folder', name='/data/images')
    config.aug.crop = 'inception_crop'
    config.optimizer.name = 'lamb'
    config.schedule.name = 'linear'
    config.pretrained.path = '/weights/vit.npz'
    config.flexi.patch_sizes = (4, 8)  # A context for flexi.weights and flexi.eval_patch_size.
    config.distill.update(teacher='/weights/teacher.npz', kind='soft')  # For the distill keys.
  elif name == 'mixer_tfds_cached':
    config.model_name = 'Mixer-S/4'
    config.model.update(num_heads=None, mlp_dim=None)
    config.data.update(name='cifar100', cache=True)
  return config


BASES = ('digits_adamw', 'tfds_sgd', 'folder_lamb', 'mixer_tfds_cached')

# Other valid values for keys whose type alone does not say one (the first that differs from
# the current value is taken).
ALTERNATIVES = {
    'prng_impl': ['rbg'], 'xla_flags': ['--xla_cpu_enable_fast_math=false'],
    'model_name': ['ViT-S/8', 'Mixer-B/4'], 'data.source': ['tfds', 'digits'],
    'data.name': ['cifar100', 'cifar10'], 'data.data_dir': ['/tmp/tfds'],
    'data.train_split': ['train[:50%]'], 'data.eval_split': ['train[50%:]'],
    'aug.crop': ['resize', 'inception_crop'], 'optimizer.name': ['sgd', 'adamw'],
    'optimizer.nan_policy': ['skip'], 'schedule.name': ['constant', 'cosine'],
    'pretrained.path': ['/weights/other.npz'], 'pretrained.url': ['http://127.0.0.1:9/vit.npz'],
    'pretrained.format': ['npz'], 'model.classifier': ['map'], 'model.posemb': ['sincos2d'],
    'model.dtype': ['bfloat16'], 'model.param_dtype': ['bfloat16'],
    'model.remat_policy': ['full'], 'model.attention_impl': ['xla'], 'mesh.data': [2],
    'mesh.fsdp': [2], 'image_size': [32], 'data.host_image_size': [12],
    'aug.random_crop_pad': [3, 4], 'eval_batch_size': [16], 'batch_size': [16],
    'accum_steps': [2], 'model.num_heads': [4], 'model.hidden_size': [64],
    'optimizer.lr_multipliers': ['head=10.0'], 'optimizer.wd_multipliers': ['head=2.0'],
    'optimizer.frozen': ['^embedding/'], 'optimizer.trainable': ['^head/'],
    'flexi.patch_sizes': [(2, 4), (4, 8)], 'flexi.weights': [(1.0, 3.0)],
    'flexi.eval_patch_size': [4, 8],
    'distill.teacher': ['/weights/other_teacher.npz'], 'distill.teacher_format': ['npz'],
    'distill.teacher_model': ['ViT-B/16'], 'distill.kind': ['hard', 'soft'],
    'evals.fewshot_shots': [(1, 5)], 'evals.splits': [('test', 'train[:2%]')],
}


def alternative(key, value, declared):
  """Another valid value for `key`, whose current (resolved) value is `value`."""
  for candidate in ALTERNATIVES.get(key, []):
    if candidate != value:
      return candidate
  *parents, leaf = key.split('.')
  for part in parents:
    declared = declared[part]
  kind = declared.get_type(leaf) if declared[leaf] is None else type(declared[leaf])
  if kind is bool:
    return not value
  if kind is int:
    return (value or 0) * 2 + 2
  if kind is float:
    return value / 2 if value else 0.05
  raise AssertionError(f'no alternative value for {key}={value!r} of {kind}: add one to '
                       f'ALTERNATIVES')


EVERY_KEY = flat_keys(config_lib.defaults())


@pytest.mark.parametrize('key', EVERY_KEY)
def test_every_key_changes_the_resolved_run_or_is_refused(key):
  """Each key of the defaults, set to another valid value in each base config: the resolved
  run description changes, or the key is refused naming itself; never silently ignored. And
  in at least one base it takes effect."""
  effective_in = []
  for name in BASES:
    config = base(name)
    before = config_lib.resolve(config, device_count=2)
    changed = with_value(config, key, alternative(key, get(before, key), config_lib.defaults()))
    try:
      after = config_lib.resolve(changed, device_count=2)
    except UserError as e:
      assert key.split('.')[-1] in str(e) or key in str(e), (name, str(e))
      assert '\n' not in str(e)
      continue
    assert after != before, f'{key} was accepted in {name} but changed nothing'
    effective_in.append(name)
  assert effective_in, f'{key} is refused in every base config'


def test_the_model_keys_are_the_models_own_fields():
  settable = {f.name for f in dataclasses.fields(models.VisionTransformer)
              if f.name not in models.ARCHITECTURE_FIELDS + ('parent', 'name')}
  settable |= {'hidden_size', 'num_layers', 'num_heads', 'mlp_dim'}
  assert set(config_lib.defaults().model.keys()) == settable
  # All unset: the defaults are the dataclass's, written nowhere else.
  assert all(value is None for value in config_lib.defaults().model.values())
  fields = config_lib.resolve(base('digits_adamw')).model_fields
  assert fields.classifier == models.VisionTransformer.classifier


@pytest.mark.parametrize('change, message', [
    (lambda c: c.optimizer.update(name='adamw', momentum=0.95),
     'optimizer.momentum=0.95|momentum=0.95 has no effect with optimizer.name=adamw'),
    (lambda c: c.optimizer.update(name='sgd', b1=0.8), 'b1=0.8 has no effect'),
    (lambda c: c.data.update(source='digits', cache=True), 'cache=True has no effect'),
    (lambda c: c.data.update(source='digits', name='digits'), "name='digits' has no effect"),
    (lambda c: c.data.update(source='folder', name='/x', shuffle_buffer=10),
     'shuffle_buffer=10 has no effect'),
    (lambda c: c.schedule.update(name='constant', end_lr=0.1), 'end_lr=0.1 has no effect'),
    (lambda c: c.aug.update(randaugment_magnitude=5), 'randaugment_magnitude=5 has no effect'),
    (lambda c: c.pretrained.update(url='http://x/y.npz'), 'url=.* without pretrained.path'),
    (lambda c: c.update(model_name='Mixer-S/4') or c.model.update(classifier='gap'),
     'model.classifier=.gap. does not apply to Mixer-S/4'),
    (lambda c: c.data.update(source='tfds'), 'data.name is required with data.source=tfds'),
    (lambda c: c.update(batch_size=6), 'batch_size=6 must divide'),
])
def test_a_key_that_would_do_nothing_is_a_one_line_error(change, message):
  config = base('digits_adamw')
  change(config)
  with pytest.raises(UserError, match=message) as error:
    config_lib.resolve(config, device_count=4)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('key, value, message', [
    ('drop_path_rate', 1.5, r'drop_path_rate must be a number in \[0, 1\], got 1.5'),
    ('drop_path_rate', -0.1, r'drop_path_rate must be a number in \[0, 1\], got -0.1'),
    ('dropout_rate', -0.1, r': dropout_rate must be a number in \[0, 1\), got -0.1'),
    ('attention_dropout_rate', 1.0,
     r'attention_dropout_rate must be a number in \[0, 1\), got 1.0'),
    ('layer_scale_init', -1e-5, r'layer_scale_init must be a number > 0 .*got -1e-05'),
    ('layer_scale_init', 0.0, r'layer_scale_init must be a number > 0 .*or None .*got 0.0'),
])
def test_a_model_rate_out_of_range_is_a_one_line_error(key, value, message):
  config = base('digits_adamw')
  config.model[key] = value
  with pytest.raises(UserError, match=message) as error:
    config_lib.resolve(config)
  assert '\n' not in str(error.value)


def test_the_model_rates_at_their_limits_are_accepted():
  config = base('digits_adamw')
  config.model.update(drop_path_rate=1.0, dropout_rate=0.0, attention_dropout_rate=0.99,
                      layer_scale_init=1e-6)
  fields = config_lib.resolve(config).model_fields
  assert fields.drop_path_rate == 1.0 and fields.layer_scale_init == 1e-6


def test_derived_values_are_filled_once():
  resolved = config_lib.resolve(base('digits_adamw'))
  assert resolved.eval_batch_size == resolved.batch_size
  assert resolved.data.host_image_size == 8  # digits' own size
  assert resolved.optimizer.b1 == 0.9 and resolved.optimizer.momentum is None
  assert resolved.schedule.end_lr == 0.0
  tfds = config_lib.resolve(base('tfds_sgd'))
  assert tfds.data.host_image_size == tfds.image_size
  assert tfds.data.shuffle_buffer == config_lib.DEFAULT_SHUFFLE_BUFFER
  assert tfds.data.download is True and tfds.optimizer.momentum == 0.9
  assert tfds.aug.randaugment_magnitude == 10 and tfds.schedule.end_lr is None
  assert config_lib.resolve(resolved) == resolved  # Resolving is idempotent.
  with pytest.raises(AttributeError):
    resolved.batch_size = 3  # Frozen: nothing downstream can change it.


def test_config_json_records_schema_provenance_and_reads_back(tmp_path):
  resolved = config_lib.resolve(base('digits_adamw'))
  files = workdir_lib.RunFiles(tmp_path / 'run')
  files.write_config(resolved)
  record = json.loads(files.config_json.read_text())
  assert record['schema_version'] == config_lib.SCHEMA_VERSION
  assert record['versions']['jax'] and record['versions']['python']
  assert 'git_commit' in record and record['written_at']
  assert files.read_config() == resolved


def test_corrupt_or_newer_config_json_is_one_line_and_untouched(tmp_path):
  files = workdir_lib.RunFiles(tmp_path)
  files.config_json.write_text('{"schema_version": 2, "config": {')
  with pytest.raises(UserError, match='config.json is corrupt'):
    files.read_config()
  newer = json.dumps({'schema_version': config_lib.SCHEMA_VERSION + 1, 'config': {}})
  files.config_json.write_text(newer)
  with pytest.raises(UserError, match='newer than this code knows'):
    files.read_config()
  assert files.config_json.read_text() == newer


V1_WORKDIR = os.path.join(REPO_ROOT, 'tests', 'fixtures', 'v1_quickstart_workdir')
V1_ARGS = ['--config', 'configs/quickstart.py', '--config.model.hidden_size=16',
           '--config.model.num_layers=1', '--config.model.num_heads=2',
           '--config.model.mlp_dim=32', '--config.total_steps=8',
           '--config.schedule.warmup_steps=2', '--config.schedule.base_lr=3e-3',
           '--config.log_every=2', '--config.eval_every=4',
           '--config.checkpoint_every=4', '--config.batch_size=32',
           '--config.plot_every_eval=False']


def test_a_schema_1_config_json_migrates():
  with open(os.path.join(V1_WORKDIR, 'config.json')) as f:
    record = json.load(f)
  assert 'schema_version' not in record and record['data']['name'] == 'digits'
  resolved = workdir_lib.RunFiles(V1_WORKDIR).read_config()
  assert resolved.data.name is None and resolved.data.cache is None  # No effect on digits.
  assert resolved.optimizer.momentum is None and resolved.optimizer.b1 == 0.9  # adamw's own.
  assert resolved.model_fields.hidden_size == 16


def _flat_params(workdir, step=None):
  state = checkpoint.restore_train_state(str(workdir), step=step)
  return np.concatenate([np.ravel(np.asarray(leaf, np.float64))
                         for leaf in jax.tree.leaves(state.params)])


@pytest.mark.slow
def test_a_workdir_of_the_previous_code_resumes_and_ends_as_a_fresh_run(tmp_path):
  old = tmp_path / 'old'
  shutil.copytree(V1_WORKDIR, old)
  resumed = run_train(V1_ARGS + ['--workdir', str(old)])
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'resuming from the checkpoint at step 4' in resumed.stdout
  fresh = tmp_path / 'fresh'
  fresh_run = run_train(V1_ARGS + ['--workdir', str(fresh)])
  assert fresh_run.returncode == 0, fresh_run.stderr[-2000:]
  # The fixture's first 4 steps were computed on another machine: another CPU (AVX2 against
  # AVX-512) or XLA level rounds them differently, so the two runs end equal up to rounding,
  # not bit for bit (tests/test_resilience.py checks bit-exact resumes on one machine). The
  # measured difference is 2e-4 of what steps 5-8 move the params (at XLA's default level and
  # at -O0, on an AVX-512 CPU); a resume that read other batches, or lost the optimizer's
  # moments or the schedule's step, would change each of those updates, not their last bits.
  resumed_params, fresh_params = _flat_params(old), _flat_params(fresh)
  movement = np.linalg.norm(fresh_params - _flat_params(fresh, step=4))
  assert np.linalg.norm(resumed_params - fresh_params) < 1e-2 * movement
  losses = lambda w: [r['train_loss']
                      for r in map(json.loads, (w / 'metrics.jsonl').read_text().splitlines())
                      if 'train_loss' in r and r['step'] > 4]
  np.testing.assert_allclose(losses(old), losses(fresh), rtol=1e-5)
  assert len(losses(old)) == 2  # Steps 6 and 8.
  assert json.loads((old / 'config.json').read_text())['schema_version'] == 2


@pytest.mark.parametrize('size', ['Ti', 'S', 'B', 'L', 'H', 'g'])
@pytest.mark.parametrize('patch', [8, 14, 16, 32])
def test_every_variant_of_the_vit_config_resolves_with_weights_only_where_published(size, patch):
  import configs.vit as vit_config
  config = vit_config.get_config(f'{size}/{patch},cifar10')
  resolved = config_lib.resolve(config, device_count=1)
  assert resolved.image_size % patch == 0 and resolved.image_size >= 384
  published = f'{size}/{patch}' in {'B/8', 'B/16', 'B/32', 'L/16', 'L/32', 'H/14'}
  assert bool(resolved.pretrained.url) == published
  if published:
    assert resolved.pretrained.url.endswith(f'/imagenet21k/ViT-{size}_{patch}.npz')
