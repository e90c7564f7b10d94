"""Beyond one device: FSDP on 8 fake CPU devices, and 2 processes x 2 devices over gloo."""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, python_env, run_train


# AdamW divides by sqrt(v): where a gradient is near zero (the zero-initialised head after a few
# steps), float noise from another reduction order moves the update by up to its full size
# (lr ~1e-3 here), so params are compared to 1e-4 absolute, losses far tighter.
ADAM_TOLERANCE = dict(rtol=1e-3, atol=1e-4)


# The quickstart at 2 of its 4 layers: what is compared is how the arrays are laid out and
# reduced, not the depth. Each layer keeps 6 arrays of >= 4,096 elements (the FSDP threshold),
# so FSDP still has 12 to split.
TWO_LAYERS = ['--config.model.num_layers=2']


def _args(workdir, steps=6, extra=()):
  return ['--config', 'configs/quickstart.py', '--workdir', workdir,
          f'--config.total_steps={steps}', '--config.log_every=1', '--config.eval_every=0',
          '--config.checkpoint_every=0', '--config.schedule.warmup_steps=2', *TWO_LAYERS,
          *extra]


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [row['train_loss'] for row in map(json.loads, f) if 'train_loss' in row]


def _params(workdir):
  from vit_jax import restore
  return jax.device_get(restore(workdir)[1])


def _assert_trees_close(a, b, **tolerance):
  flat_a, tree_a = jax.tree_util.tree_flatten(a)
  flat_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_allclose(x, y, **tolerance)


@pytest.mark.slow
def test_fsdp_matches_data_parallel_and_shards_params(tmp_path):
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  runs = {'dp': [], 'fsdp': ['--config.mesh.data=2', '--config.mesh.fsdp=4']}
  outputs = {}
  for name, extra in runs.items():
    result = run_train(_args(str(tmp_path / name), extra=extra), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs[name] = result.stdout
  # Data parallel replicates every array; FSDP really splits the large ones over 4 devices.
  assert re.search(r'arrays, 0 sharded over fsdp', outputs['dp'])
  sharded = int(re.search(r'arrays, (\d+) sharded over fsdp', outputs['fsdp']).group(1))
  per_device, total = map(float, re.search(
      r'([\d.]+) MiB per device of ([\d.]+) MiB', outputs['fsdp']).groups())
  assert sharded >= 8 and per_device < 0.6 * total
  np.testing.assert_allclose(_losses(tmp_path / 'fsdp'), _losses(tmp_path / 'dp'),
                             rtol=2e-4, atol=2e-5)
  _assert_trees_close(_params(tmp_path / 'fsdp'), _params(tmp_path / 'dp'), **ADAM_TOLERANCE)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_two_processes(args):
  """`train.py args` as processes 0 and 1 of a 2-process run (2 CPU devices each, gloo);
  returns their `(returncode, stdout, stderr)`."""
  port = _free_port()
  env = python_env({'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
  processes = [
      subprocess.Popen(
          [sys.executable, 'train.py', *args, f'--coordinator_address=127.0.0.1:{port}',
           '--num_processes=2', f'--process_id={process_id}'],
          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for process_id in (0, 1)]
  outputs = [p.communicate(timeout=600) for p in processes]
  return [(p.returncode, out, err) for p, (out, err) in zip(processes, outputs)]


@pytest.mark.slow
def test_two_processes_match_one_process_and_restore(tmp_path):
  single = str(tmp_path / 'single')
  result = run_train(_args(single, steps=5),
                     env={'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})
  assert result.returncode == 0, result.stderr[-3000:]

  multi = str(tmp_path / 'multi')
  outputs = _run_two_processes(_args(multi, steps=5))
  for returncode, _, err in outputs:
    assert returncode == 0, err[-3000:]
  assert 'on 4 cpu device(s)' in outputs[0][1]
  assert outputs[1][1].count('step 5/5') == 0  # Only process 0 prints progress...
  assert len(_losses(multi)) == 5              # ...and writes metrics, once per step.

  np.testing.assert_allclose(_losses(multi), _losses(single), rtol=2e-4, atol=2e-5)
  # The checkpoint the two processes wrote together restores in this single process.
  _assert_trees_close(_params(multi), _params(single), **ADAM_TOLERANCE)


@pytest.mark.slow
def test_two_processes_set_an_unreadable_checkpoint_aside_together(tmp_path):
  """A damaged newest checkpoint under a 2-process run: process 0 renames it, both resume from
  the one before (one rename, no process left waiting) and save that step anew."""
  workdir = tmp_path / 'multi'
  every_2 = ['--config.checkpoint_every=2']
  args = _args(str(workdir), steps=6, extra=every_2)
  for returncode, _, err in _run_two_processes(args + ['--stop_at_step=4']):
    assert returncode == 0, err[-3000:]
  damaged, step_4 = {}, workdir / 'checkpoints' / '4'
  for path in sorted(step_4.rglob('*')):
    if path.is_file() and path.stat().st_size and path.name != 'commit_success.txt':
      half = path.read_bytes()[:path.stat().st_size // 2]
      path.write_bytes(half)
      damaged[path.relative_to(step_4)] = half
  assert damaged

  results = _run_two_processes(args)
  for returncode, _, err in results:
    assert returncode == 0, err[-3000:]
  out0 = results[0][1]
  assert 'resuming from the checkpoint at step 2' in out0, out0[-3000:]
  assert f'moved aside to {workdir}/checkpoints/4.unreadable' in out0
  aside = workdir / 'checkpoints' / '4.unreadable'
  for relative, data in damaged.items():  # moved whole, as it was
    assert (aside / relative).read_bytes() == data
  assert not (workdir / 'checkpoints' / '4.unreadable.2').exists()  # renamed once, not per process
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert 4 in steps and 6 in steps  # step 4 saved anew
  assert len(_losses(workdir)) == 6  # steps 1-2, then 3-6 again after the resume: each once
