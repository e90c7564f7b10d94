"""The package installs and works from anywhere: a fresh virtual environment (over the test
environment's packages), `pip install --no-deps -e .`, then from a folder outside the checkout:
train with the console script and a config given by path, restore in Python, run a tool."""

import os
import site
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def _run(args, cwd, env=None, timeout=600):
  full_env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  full_env.update(JAX_PLATFORMS='cpu', **(env or {}))
  result = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
  assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-3000:])
  return result


@pytest.mark.slow
def test_installed_package_trains_restores_and_plots_from_another_folder(tmp_path):
  venv = tmp_path / 'venv'
  _run([sys.executable, '-m', 'venv', '--system-site-packages', str(venv)], cwd=tmp_path)
  bin_dir = venv / 'bin'
  # --system-site-packages sees the base interpreter's packages only: where the tests run in a
  # virtual environment themselves (Python 3.12's venvs have no setuptools of their own), the
  # new one reads this environment's site folders too, their .pth files included.
  (new_site,) = venv.glob('lib/python*/site-packages')
  (new_site / 'test_environment.pth').write_text(''.join(
      f'import site; site.addsitedir({folder!r})\n' for folder in site.getsitepackages()))
  # No build isolation: setuptools comes from the test environment, nothing from the network.
  _run([str(bin_dir / 'python'), '-m', 'pip', 'install', '--quiet', '--no-deps',
        '--no-build-isolation', '-e', REPO_ROOT], cwd=tmp_path)
  elsewhere = tmp_path / 'notebooks_elsewhere'
  elsewhere.mkdir()

  where = _run([str(bin_dir / 'python'), '-c', 'import vit_jax; print(vit_jax.__file__)'],
               cwd=elsewhere)
  assert where.stdout.strip().startswith(os.path.join(REPO_ROOT, 'vit_jax'))

  workdir = tmp_path / 'run'
  _run([str(bin_dir / 'vit-train'), '--config',
        os.path.join(REPO_ROOT, 'configs', 'quickstart.py'), '--workdir', str(workdir),
        '--config.model.hidden_size=16', '--config.model.num_layers=1',
        '--config.model.num_heads=2', '--config.model.mlp_dim=32', '--config.total_steps=4',
        '--config.schedule.warmup_steps=1', '--config.log_every=2', '--config.eval_every=4',
        '--config.checkpoint_every=4', '--config.batch_size=32'], cwd=elsewhere)

  restored = _run([str(bin_dir / 'python'), '-c', (
      'import sys, numpy as np, vit_jax\n'
      'model, params, config = vit_jax.restore(sys.argv[1])\n'
      'logits = model.apply({"params": params}, np.zeros((2, 16, 16, 3), np.float32))\n'
      'print(config.model_name, logits.shape)\n'), str(workdir)], cwd=elsewhere)
  assert restored.stdout.split() == ['ViT-Ti/4', '(2,', '10)']

  _run([str(bin_dir / 'vit-plot'), str(workdir), '--out', str(elsewhere / 'curves.png')],
       cwd=elsewhere)
  assert (elsewhere / 'curves.png').stat().st_size > 0
  assert not (elsewhere / 'workdirs').exists()


@pytest.mark.slow
def test_a_config_imports_its_siblings_from_any_folder(tmp_path):
  # configs/vit_b16_cifar10.py imports configs/vit.py; the sweep loader reads it from elsewhere.
  result = _run([sys.executable, '-c', (
      'import sys\n'
      'from vit_jax.tools import sweep\n'
      'config = sweep.load_base_config(sys.argv[1])\n'
      'print(config.model_name, config.data.name)\n'),
      os.path.join(REPO_ROOT, 'configs', 'vit_b16_cifar10.py')], cwd=tmp_path,
      env={'PYTHONPATH': REPO_ROOT})
  assert result.stdout.split() == ['ViT-B/16', 'cifar10']
