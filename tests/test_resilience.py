"""Training that survives: kill -9 and resume bit-exactly, SIGTERM saves, a corrupt newest
checkpoint falls back to the previous one, and a non-finite loss stops or is skipped."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, run_train

STEPS = 14


def _args(workdir, extra=()):
  # Dropout, drop-path, mixup and EMA on: every source of randomness and state is exercised.
  # A one-layer, 16-wide model: what is tested is the run's state, not the model's size.
  return ['--config', 'configs/quickstart.py', '--workdir', workdir,
          '--config.model.num_layers=1', '--config.model.hidden_size=16',
          '--config.model.mlp_dim=32', '--config.batch_size=32',
          f'--config.total_steps={STEPS}', '--config.log_every=1', '--config.eval_every=0',
          '--config.checkpoint_every=2', '--config.schedule.warmup_steps=2',
          '--config.model.dropout_rate=0.1', '--config.model.drop_path_rate=0.1',
          '--config.aug.mixup_alpha=0.2', '--config.optimizer.ema_decay=0.9', *extra]


def _start(args):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  return subprocess.Popen([sys.executable, 'train.py', *args], cwd=REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_line(process, text, timeout=300):
  """Reads the process's output until a line contains `text`; returns everything read."""
  deadline = time.time() + timeout
  seen = []
  for line in process.stdout:
    seen.append(line)
    if text in line:
      return ''.join(seen)
    assert time.time() < deadline, ''.join(seen)[-3000:]
  raise AssertionError(f'process ended before printing {text!r}:\n' + ''.join(seen)[-3000:])


def _wait_for_checkpoint_write(process, checkpoint_dir, timeout=300):
  """Polls until Orbax has a checkpoint half-written (its temporary folder exists)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.isdir(checkpoint_dir) and any('tmp' in name for name in os.listdir(checkpoint_dir)):
      return
    assert process.poll() is None, 'the run ended before a checkpoint write was caught'
    time.sleep(0.005)
  raise AssertionError('no checkpoint write seen')


def _state_digest(workdir):
  from vit_jax.train import checkpoint
  state = checkpoint.restore_train_state(workdir)
  assert int(state.step) == STEPS
  return checkpoint.tree_digest(state)


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_is_bit_exact(tmp_path):
  reference = str(tmp_path / 'reference')
  result = run_train(_args(reference))
  assert result.returncode == 0, result.stderr[-3000:]

  workdir = str(tmp_path / 'killed')
  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  # Killed after step 3 (between checkpoints), in the middle of an async checkpoint write,
  # and after step 11; each time the same command is simply run again.
  kill_points = [('line', 'step 3/'), ('write', None), ('line', 'step 11/')]
  for kind, text in kill_points:
    process = _start(_args(workdir))
    if kind == 'line':
      _wait_for_line(process, text)
    else:
      _wait_for_checkpoint_write(process, checkpoint_dir)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
  final = run_train(_args(workdir))
  assert final.returncode == 0, final.stderr[-3000:]
  assert 'resuming from the checkpoint at step' in final.stdout
  assert _state_digest(workdir) == _state_digest(reference)


@pytest.mark.slow
def test_sigterm_saves_within_10_s_and_the_rerun_continues(tmp_path):
  workdir = str(tmp_path / 'run')
  args = _args(workdir, ['--config.checkpoint_every=0'])
  process = _start(args)
  _wait_for_line(process, 'step 4/')
  sent = time.time()
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=60)
  assert time.time() - sent < 10, output[-2000:]
  assert process.returncode == 0, output[-3000:]
  saved = [int(name) for name in os.listdir(os.path.join(workdir, 'checkpoints'))
           if name.isdigit()]
  assert len(saved) == 1 and 4 <= saved[0] < STEPS
  assert f'SIGTERM: saved a checkpoint at step {saved[0]}' in output

  rerun = run_train(args)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'resuming from the checkpoint at step {saved[0]}' in rerun.stdout
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    assert json.load(f)['step'] == STEPS


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
  workdir = str(tmp_path / 'run')
  first = run_train(_args(workdir, ['--stop_at_step=6']))
  assert first.returncode == 0, first.stderr[-3000:]
  newest = os.path.join(workdir, 'checkpoints', '6')
  truncated = 0
  for folder, _, files in os.walk(newest):
    for name in files:
      path = os.path.join(folder, name)
      size = os.path.getsize(path)
      with open(path, 'r+b') as f:
        f.truncate(size // 2)
      truncated += 1
  assert truncated > 0

  rerun = run_train(_args(workdir))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert 'warning: checkpoint at step 6' in rerun.stdout
  assert 'resuming from the checkpoint at step 4' in rerun.stdout
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    assert json.load(f)['step'] == STEPS


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step_or_is_skipped(tmp_path):
  blow_up = ['--config.schedule.base_lr=1e30', '--config.optimizer.name=sgd',
             '--config.optimizer.grad_clip_norm=0', '--config.checkpoint_every=1']
  stopped = str(tmp_path / 'stop')
  result = run_train(_args(stopped, blow_up))
  assert result.returncode == 3  # Diverged (errors.DIVERGED_STATUS), not a user mistake.
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith('error: the loss or a gradient became NaN/Inf at step ')
  assert 'Traceback' not in result.stderr
  bad_step = int(last_line.split('at step ')[1].split(';')[0])
  saved = sorted(int(n) for n in os.listdir(os.path.join(stopped, 'checkpoints')) if n.isdigit())
  assert saved and saved[-1] < bad_step  # Nothing at or after the bad step was kept.

  skipped = str(tmp_path / 'skip')
  result = run_train(_args(skipped, blow_up + ['--config.optimizer.nan_policy=skip']))
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(skipped, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert max(r.get('skipped_updates', 0) for r in rows) >= 1


def _tiny_config():
  """The quickstart at one 16-wide layer for 6 steps, a checkpoint every 2 (kept: 2, 4, 6)."""
  import configs.quickstart as quickstart
  config = quickstart.get_config()
  config.total_steps, config.checkpoint_every, config.eval_every, config.log_every = 6, 2, 0, 1
  config.schedule.warmup_steps, config.batch_size, config.plot_every_eval = 1, 16, False
  config.model.num_layers, config.model.hidden_size, config.model.mlp_dim = 1, 16, 32
  return config


def _train_here(workdir, **kwargs):
  """`train_and_evaluate` of `_tiny_config()` in this process: (its result, what it logged)."""
  from vit_jax.train import loop
  lines = []
  result = loop.train_and_evaluate(_tiny_config(), str(workdir), log=lines.append, **kwargs)
  return result, '\n'.join(map(str, lines))


def _train_steps(workdir):
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [row['step'] for row in rows if 'train_loss' in row]


def test_an_unreadable_last_checkpoint_is_set_aside_and_saved_again(tmp_path):
  """The run falls back past a truncated step 6 and trains to 6 again: that step is saved anew
  (it was never saved again, so every later restore fell back or failed), and the damaged one
  is kept under another name that no restore reads."""
  from vit_jax.train import checkpoint
  workdir = tmp_path / 'run'
  _train_here(workdir)
  damaged = workdir / 'checkpoints' / '6'
  sizes = {}
  for path in damaged.rglob('*'):
    if path.is_file() and path.stat().st_size:
      sizes[path.relative_to(damaged)] = path.stat().st_size // 2
      os.truncate(path, path.stat().st_size // 2)
  assert sizes

  rerun, log = _train_here(workdir)
  assert rerun['step'] == 6
  assert 'resuming from the checkpoint at step 4' in log, log
  assert int(checkpoint.restore_train_state(str(workdir)).step) == 6  # no fallback needed now
  restored = []
  checkpoint.restore(str(workdir), log=restored.append)
  assert 'of step 6 from' in restored[0]
  warnings = [line for line in log.splitlines() if line.startswith('warning: checkpoint at')]
  assert len(warnings) == 1 and f'moved aside to {workdir}/checkpoints/6.unreadable' in warnings[0]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4', '6', '6.unreadable']
  kept = workdir / 'checkpoints' / '6.unreadable'
  assert {p: (kept / p).stat().st_size for p in sizes} == sizes  # moved as it was, not deleted


def test_a_rerun_after_the_last_checkpoint_writes_the_final_metrics(tmp_path):
  """Killed once its last checkpoint was committed, before final_metrics.json was written: the
  rerun evaluates the restored state and writes the metrics the run would have (not `{}`)."""
  workdir = tmp_path / 'run'
  _train_here(workdir)
  final_metrics_json = workdir / 'final_metrics.json'
  finished = json.loads(final_metrics_json.read_text())
  assert finished['step'] == 6 and 'test_accuracy' in finished
  final_metrics_json.unlink()

  rerun, log = _train_here(workdir)
  assert json.loads(final_metrics_json.read_text()) == finished
  assert rerun == finished
  assert 'resuming from the checkpoint at step 6' in log, log
  assert 'wrote no final metrics; evaluating its final state' in log
  assert _train_steps(workdir) == list(range(1, 7))  # nothing trained again


def test_stop_at_step_at_or_before_the_resumed_step_stops_at_once(tmp_path):
  """The same command after it stopped at step 4 (or one stopping earlier) does nothing: it
  used to train on to total_steps, as `step == stop_at_step` never came."""
  workdir = tmp_path / 'run'
  assert _train_here(workdir, stop_at_step=4)[0] == {'step': 4, 'stopped': True}
  for stop_at_step in (4, 2):
    again, log = _train_here(workdir, stop_at_step=stop_at_step)
    assert again == {'step': 4, 'stopped': True}
    assert f'--stop_at_step={stop_at_step}: the run in {workdir} is at step 4 already' in log
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  assert not (workdir / 'final_metrics.json').exists()
  assert _train_steps(workdir) == [1, 2, 3, 4]
  finished, _ = _train_here(workdir, stop_at_step=6)  # a later step trains on (6: to the end)
  assert finished['step'] == 6 and 'test_accuracy' in finished
