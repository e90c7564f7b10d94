"""Shared test set-up: CPU only, the repository root importable, a helper to run train.py."""

import os
import subprocess
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)


def run_python(args, env=None, timeout=600, cwd=REPO_ROOT):
  """Runs `python <args>` from the repository root; returns the CompletedProcess."""
  full_env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu', **(env or {}))
  return subprocess.run([sys.executable] + list(args), cwd=cwd, env=full_env, timeout=timeout,
                        capture_output=True, text=True)


def run_train(args, env=None, timeout=600):
  """Runs `python train.py <args>`."""
  return run_python(['train.py'] + list(args), env=env, timeout=timeout)


def train_losses_on_one_batch(config, steps=5, num_classes=10):
  """(losses, skipped updates) of the trainer's own jitted train step, `steps` times on one
  fixed synthetic batch from one init: how a config's step behaves, without any data set."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_jax import build, optim, sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.create_mesh(config.mesh)
  model = build.model_from_config(config, num_classes)
  tx, schedule = optim.create_optimizer(config)
  init_state, _, state_shardings = build.state_initializer(config, model, tx, mesh)
  state = jax.jit(init_state, out_shardings=state_shardings)(
      jax.random.key(config.seed, impl=config.prng_impl))
  train_fn, _ = build.step_functions(config, model, tx, schedule, num_classes, mesh,
                                     state_shardings)
  rng = np.random.default_rng(0)
  host_size = config.data.host_image_size or config.image_size
  batch = sharding.global_batch(
      {'images': rng.integers(0, 256, (config.batch_size, host_size, host_size, 3), np.uint8),
       'labels': rng.integers(0, num_classes, (config.batch_size,), np.int32)}, mesh)
  losses = []
  for _ in range(steps):
    state, metrics = train_fn(state, batch)
    losses.append(float(metrics['train_loss']))
  return np.array(losses), int(state.skipped_updates)
