"""The training framework end to end: quickstart accuracy, the CIFAR-10 fine-tune path, resume,
multi-device equivalence, gradient accumulation and compile counts."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_MODEL, run_python, run_train, train_losses_on_one_batch

from configs import quickstart

# Overrides that turn any ViT config into a tiny, fast one.
TINY_VIT = ['--config.model_name=ViT-Ti/16', '--config.model.hidden_size=32',
            '--config.model.num_layers=2', '--config.model.num_heads=2',
            '--config.model.mlp_dim=64']


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_quickstart_reaches_97_percent_and_restores(trained_quickstart):
  workdir, stdout = trained_quickstart  # python train.py --config configs/quickstart.py
  rows = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  evals = [r for r in rows if 'test_accuracy' in r]
  assert evals and evals[-1]['step'] == quickstart.get_config().total_steps
  assert evals[-1]['test_accuracy'] >= 0.97, evals
  train_rows = [r for r in rows if 'train_loss' in r]
  for key in ('train_loss', 'learning_rate', 'img_per_sec'):
    assert all(key in r for r in train_rows), key
  assert train_rows[-1]['train_loss'] < train_rows[0]['train_loss']
  assert 'compiled and ran in' in stdout
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))
  assert os.path.getsize(os.path.join(workdir, 'curves.png')) > 0  # Redrawn at each eval.

  # The notebook API gives the same model: its accuracy on the test split is the logged one.
  from vit_jax import restore
  from vit_jax.data import device, digits
  model, params, config = restore(workdir)
  test_split = digits.load('test')
  images = device.preprocess(jnp.asarray(test_split.pixels), config.image_size)
  logits = model.apply({'params': params}, images, train=False)
  accuracy = float(np.mean(np.argmax(logits, -1) == test_split.labels))
  assert accuracy == pytest.approx(evals[-1]['test_accuracy'], abs=1e-6)


def _write_pretrained_npz(path):
  """A tiny ViT's weights at 32 px with 1000 classes, in the published .npz layout."""
  from vit_jax import models
  from vit_jax.weights import convert
  model = models.create_model('ViT-Ti/16', 1000, hidden_size=32, num_layers=2, num_heads=2,
                              mlp_dim=64)
  params = model.init(jax.random.key(7), jnp.zeros((1, 32, 32, 3)), train=False)['params']
  params = jax.tree_util.tree_map(  # Non-zero everywhere, so a fresh init cannot match.
      lambda p: p + 0.5 * jax.random.normal(jax.random.key(3), p.shape), params)
  convert.save_weights(params, path, format='npz')
  return jax.device_get(params)


@pytest.mark.slow
def test_cifar10_config_runs_pretrained_path_on_mock_data(tmp_path):
  npz_path = str(tmp_path / 'ViT-tiny.npz')
  pretrained = _write_pretrained_npz(npz_path)
  workdir = str(tmp_path / 'cifar')
  script = (
      'import sys, tensorflow_datasets as tfds\n'
      'from vit_jax.train import main as train_main\n'
      'from vit_jax.data import tfds_source\n'
      'tfds_source.tfds_host_reachable = lambda *a, **k: True  # mock data needs no network\n'
      'with tfds.testing.mock_data(num_examples=32):\n'
      '  train_main.main(sys.argv)\n')
  result = run_python(
      ['-c', script, '--config', 'configs/vit_b16_cifar10.py', '--workdir', workdir,
       *TINY_VIT, '--config.image_size=64', '--config.batch_size=8', '--config.total_steps=2',
       '--config.eval_batch_size=8', f'--config.pretrained.path={npz_path}',
       '--config.schedule.warmup_steps=1'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'loading pretrained weights' in result.stdout
  rows = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert any(r['step'] == 2 and 'test_accuracy' in r for r in rows)
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '2'))

  from vit_jax import restore
  _, params, config = restore(workdir)
  assert config.image_size == 64 and params['head']['kernel'].shape == (32, 10)
  # 64 px with 16 px patches: a 4x4 grid (+ the class token), resized from the npz's 2x2.
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 17, 32)
  # Two SGD steps at a warmed-up lr of 0.03 move weights far less than re-initialising would.
  for path in (('embedding', 'kernel'), ('Transformer', 'encoder_norm', 'scale')):
    got = params[path[0]] if len(path) == 1 else params
    want = pretrained
    for key in path:
      got, want = got[key], want[key]
    assert np.max(np.abs(np.asarray(got) - want)) < 0.05, path


def _quickstart_args(workdir, steps, extra=()):
  """The quickstart for a few steps at a one-layer, 16-wide size (the loop is the point)."""
  return ['--config', 'configs/quickstart.py', '--workdir', workdir,
          f'--config.total_steps={steps}', '--config.log_every=1', '--config.eval_every=0',
          '--config.checkpoint_every=0', '--config.schedule.warmup_steps=2', *TINY_MODEL,
          '--config.batch_size=32', *extra]


@pytest.mark.slow
def test_stop_and_rerun_resumes_and_finishes(tmp_path):
  workdir = str(tmp_path / 'run')
  first = run_train(_quickstart_args(workdir, 12) + ['--stop_at_step=5'])
  assert first.returncode == 0, first.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['5']
  assert not os.path.exists(os.path.join(workdir, 'final_metrics.json'))
  second = run_train(_quickstart_args(workdir, 12))
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'resuming from the checkpoint at step 5' in second.stdout
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    assert json.load(f)['step'] == 12
  steps = [r['step'] for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
           if 'train_loss' in r]
  assert steps == list(range(1, 13))


@pytest.mark.slow
def test_eight_devices_give_the_same_loss_curve_as_one(tmp_path):
  curves = {}
  for devices in (1, 8):
    workdir = str(tmp_path / f'devices{devices}')
    env = {'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
    result = run_train(_quickstart_args(workdir, 8), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'on {devices} cpu device(s)' in result.stdout
    curves[devices] = [r['train_loss'] for r in read_jsonl(os.path.join(workdir,
                                                                         'metrics.jsonl'))
                       if 'train_loss' in r]
  assert len(curves[1]) == 8
  np.testing.assert_allclose(curves[8], curves[1], rtol=2e-4, atol=2e-5)
  assert curves[1][-1] != curves[1][0]  # It trained: the curve is not flat.


def _tiny_setup(accum_steps):
  """A tiny model, optimizer and state, and the jitted step with `accum_steps`."""
  import functools
  from vit_jax import models
  from vit_jax.train import config as config_lib
  from vit_jax.train import optim
  from vit_jax.train import step
  config = config_lib.defaults()
  config.data.source = 'digits'  # Any source that needs no name: no data is read here.
  config.total_steps = 10
  # SGD: the update is linear in the gradient, so it shows gradient differences as they are
  # (Adam's normalisation blows float noise in near-zero gradients up to the full step size).
  config.optimizer.name = 'sgd'
  config.schedule.warmup_steps = 0
  config.schedule.base_lr = 1e-2
  model = models.create_model('ViT-Ti/4', 10, hidden_size=16, num_layers=2, num_heads=2,
                              mlp_dim=32, dropout_rate=0.0)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)['params']
  tx, schedule = optim.create_optimizer(config_lib.resolve(config), params)
  state = step.create_train_state(params, tx, ema_decay=0.0)
  settings = step.StepSettings(image_size=8, num_classes=10, seed=0, accum_steps=accum_steps)
  train_fn = jax.jit(functools.partial(step.train_step, model=model, tx=tx, schedule=schedule,
                                       settings=settings))
  return state, train_fn


def test_accum_steps_4_matches_one_4x_batch():
  rng = np.random.default_rng(0)
  batch = {'images': rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8),
           'labels': rng.integers(0, 10, (32,), dtype=np.int32)}
  results = {}
  for accum_steps in (1, 4):
    state, train_fn = _tiny_setup(accum_steps)
    for _ in range(3):
      state, metrics = train_fn(state, batch)
    results[accum_steps] = (state.params, float(metrics['train_loss']))
  np.testing.assert_allclose(results[4][1], results[1][1], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(results[4][0]),
                  jax.tree_util.tree_leaves(results[1][0])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_twenty_steps_compile_train_and_eval_once(tmp_path, caplog):
  import logging
  from vit_jax.train import loop as trainer
  config = quickstart.get_config()
  config.total_steps = 20
  config.eval_every = 10
  config.log_every = 5
  config.checkpoint_every = 0
  config.plot_every_eval = False
  config.schedule.warmup_steps = 2
  jax.config.update('jax_log_compiles', True)
  jax.config.update('jax_enable_compilation_cache', False)  # A cache hit logs no compile.
  try:
    with caplog.at_level(logging.WARNING):
      trainer.train_and_evaluate(config, str(tmp_path / 'w'), log=lambda *a: None)
  finally:
    jax.config.update('jax_log_compiles', False)
    jax.config.update('jax_enable_compilation_cache', True)
  compiles = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith('Finished XLA compilation')]
  assert sum('jit(train_step)' in m for m in compiles) == 1, compiles
  assert sum('jit(eval_step)' in m for m in compiles) == 1, compiles


@functools.lru_cache(maxsize=None)  # threefry's losses serve both cases: computed once.
def _dropout_losses(prng_impl):
  config = quickstart.get_config()
  with config.unlocked():
    config.model.update(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                        dropout_rate=0.3, drop_path_rate=0.2)
    config.batch_size = 16
    config.schedule.warmup_steps = 0
    config.prng_impl = prng_impl
  return train_losses_on_one_batch(config, steps=3)[0]


@pytest.mark.parametrize('prng_impl', ['rbg', 'unsafe_rbg'])
def test_prng_impl_drives_init_and_dropout(prng_impl):
  losses = _dropout_losses.__wrapped__  # Uncached: the determinism check trains again.
  default, other = _dropout_losses('threefry2x32'), losses(prng_impl)
  assert np.all(np.isfinite(other))
  np.testing.assert_array_equal(other, losses(prng_impl))  # Deterministic for its generator,
  assert not np.allclose(other, default)  # and a different stream from threefry's.
