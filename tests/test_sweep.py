"""Sweeps: building points, naming workdirs, the commands, running/skipping, the summary."""

import csv
import io
import json
import os
import shlex
import subprocess
import sys
import textwrap

import pytest

from vit_jax.tools import sweep as sweep_lib
from vit_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Stands in for train.py in the fast tests: logs each call, writes the files train.py writes.
FAKE_TRAIN = textwrap.dedent('''
    import json, os, sys
    args = sys.argv[1:]
    workdir = args[args.index('--workdir') + 1]
    overrides = dict(a[len('--config.'):].split('=', 1) for a in args if a.startswith('--config.'))
    with open(os.environ['FAKE_LOG'], 'a') as f:
      f.write(json.dumps({'workdir': workdir, 'argv': args}) + '\\n')
    if os.environ.get('FAKE_FAIL') and os.environ['FAKE_FAIL'] in workdir:
      sys.exit(1)  # A crash (3 would be a diverged run, which a sweep does not retry).
    if os.environ.get('FAKE_DIVERGE') and os.environ['FAKE_DIVERGE'] in workdir:
      sys.exit(3)  # vit_jax.errors.DIVERGED_STATUS
    os.makedirs(workdir, exist_ok=True)
    config = {'seed': 0, 'schedule': {'name': 'cosine'}}
    for key, value in overrides.items():
      *parents, leaf = key.split('.')
      node = config
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = float(value) if value.replace('.', '', 1).isdigit() else value
    json.dump(config, open(os.path.join(workdir, 'config.json'), 'w'))
    lr = float(overrides.get('schedule.base_lr', 0))
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      f.write(json.dumps({'step': 1, 'train_loss': 2.0}) + '\\n')
      f.write(json.dumps({'step': 2, 'train_loss': 1.0, 'test_accuracy': lr}) + '\\n')
    json.dump({'step': 2, 'test_accuracy': lr, 'test_loss': 1.5},
              open(os.path.join(workdir, 'final_metrics.json'), 'w'))
''')


def _write(path, text):
  path.write_text(textwrap.dedent(text))
  return str(path)


def _run_cli(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'vit_jax.tools.sweep', *args], cwd=REPO,
                        capture_output=True, text=True, env=env, timeout=120)


def test_product_is_a_grid_and_zipit_pairs():
  lrs = sweep_lib.axis('schedule.base_lr', [0.1, 0.2])
  warmups = sweep_lib.axis('schedule.warmup_steps', [0, 5, 9])
  grid = sweep_lib.product(lrs, warmups)
  assert len(grid) == 6
  assert grid[1] == {'schedule.base_lr': 0.1, 'schedule.warmup_steps': 5}
  assert {(p['schedule.base_lr'], p['schedule.warmup_steps']) for p in grid} == {
      (lr, w) for lr in (0.1, 0.2) for w in (0, 5, 9)}
  pairs = sweep_lib.zipit(lrs, sweep_lib.axis('seed', [1, 2]))
  assert pairs == [{'schedule.base_lr': 0.1, 'seed': 1}, {'schedule.base_lr': 0.2, 'seed': 2}]
  with pytest.raises(UserError, match='one length'):
    sweep_lib.zipit(lrs, warmups)
  with pytest.raises(UserError, match='two axes'):
    sweep_lib.product(lrs, lrs)


def test_point_names_are_short_readable_and_unique():
  names = sweep_lib.point_names(sweep_lib.product(
      sweep_lib.axis('schedule.base_lr', [1e-3, 3e-3]),
      sweep_lib.axis('optimizer.name', ['sgd', 'adamw']),
      sweep_lib.axis('schedule.name', ['cosine'])))
  assert names[0] == 'base_lr=0.001,optimizer.name=sgd,schedule.name=cosine'
  assert len(set(names)) == 4
  # Characters unsafe in a path are replaced; points that then collide get a distinct suffix.
  names = sweep_lib.point_names([{'data.name': 'a/b'}, {'data.name': 'a b'}, {}])
  assert all('/' not in n and ' ' not in n for n in names)
  assert len(set(names)) == 3 and names[0].startswith('name=a_b-') and names[2] == 'base'
  with pytest.raises(UserError, match='None cannot be given'):
    sweep_lib.point_names([{'model.representation_size': None}])
  with pytest.raises(UserError, match='repeats point 0'):
    sweep_lib.point_names([{'seed': 1}, {'seed': 1}])


def test_commands_quote_values_and_print_round_trips(tmp_path):
  sweep_file = _write(tmp_path / 'odd.py', '''
      base_config = 'configs/common.py'
      def get_sweep():
        return [{'model_name': 'R50+ViT-B/16', 'data.name': 'my data (v2), big'},
                {'model_name': 'ViT-Ti/16', 'data.name': 'cifar10'}]
  ''')
  result = _run_cli(sweep_file, '--print', '--workdir_root', 'gs://bucket/sw',
                    '--config.total_steps=7')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().split('\n')
  assert len(lines) == 2
  argv = shlex.split(lines[0])
  assert argv[:4] == ['python3', 'train.py', '--config', 'configs/common.py']
  assert '--config.data.name=my data (v2), big' in argv
  assert '--config.model_name=R50+ViT-B/16' in argv
  assert argv[-3:-2] == ['--config.total_steps=7']
  assert argv[-2] == '--workdir' and argv[-1].startswith('gs://bucket/sw/')
  assert '/' not in argv[-1][len('gs://bucket/sw/'):]


@pytest.mark.parametrize('body, message', [
    ("def get_sweep():\n  return [{'seed': 1}]\n", 'defines no base_config'),
    ("base_config = 'configs/common.py'\n", 'defines no get_sweep'),
    ("base_config = 'configs/common.py'\ndef get_sweep():\n  return [{'schedule.base_rl': 1}]\n",
     "unknown config key 'schedule.base_rl'; did you mean schedule.base_lr"),
    ("base_config = 'configs/common.py'\ndef get_sweep():\n  return {'seed': 1}\n",
     'must return a non-empty list of dicts'),
    ("base_config = 'configs/nope.py'\ndef get_sweep():\n  return [{'seed': 1}]\n",
     "base_config 'configs/nope.py' does not exist"),
])
def test_bad_sweep_file_is_a_one_line_error(tmp_path, body, message):
  sweep_file = _write(tmp_path / 'bad.py', body)
  with pytest.raises(UserError, match=message.replace('(', r'\(')):
    sweep_lib.load_sweep(sweep_file)
  result = _run_cli(sweep_file, '--print')
  assert result.returncode == 2
  assert result.stderr.startswith('error: ') and result.stderr.count('\n') == 1
  assert 'Traceback' not in result.stderr


def test_extra_args_must_be_config_overrides_not_varied_keys(tmp_path):
  sweep_file = _write(tmp_path / 's.py', '''
      base_config = 'configs/common.py'
      def get_sweep():
        return [{'seed': 1}, {'seed': 2}]
  ''')
  sweep = sweep_lib.load_sweep(sweep_file)
  with pytest.raises(UserError, match="which the sweep varies"):
    sweep_lib.sweep_commands(sweep, 'root', ['--config.seed=3'])
  with pytest.raises(UserError, match="unexpected argument '--steps=3'"):
    sweep_lib.sweep_commands(sweep, 'root', ['--steps=3'])


def test_run_skips_finished_points_and_summarizes(tmp_path):
  train = _write(tmp_path / 'fake_train.py', FAKE_TRAIN)
  log = tmp_path / 'calls.jsonl'
  sweep_file = _write(tmp_path / 'grid.py', '''
      from vit_jax.tools.sweep import axis, product
      base_config = 'configs/common.py'
      def get_sweep():
        return product(axis('schedule.base_lr', [0.25, 0.5]), axis('schedule.name', ['a', 'b']))
  ''')
  root = tmp_path / 'runs'
  env = dict(os.environ, FAKE_LOG=str(log), FAKE_FAIL='base_lr=0.5,name=a')
  args = [sweep_file, '--workdir_root', str(root), '--train_script', train,
          '--config.total_steps=2']

  # A failing point stops the sweep (exit 1) unless --keep_going.
  result = _run_cli(*args, env=env)
  assert result.returncode == 1 and 'base_lr=0.5,name=a' in result.stderr
  assert len(log.read_text().splitlines()) == 3
  result = _run_cli(*args, '--keep_going', env=env)
  assert result.returncode == 1
  calls = [json.loads(l)['workdir'] for l in log.read_text().splitlines()]
  assert len(calls) == 5 and calls[3:] == [str(root / 'base_lr=0.5,name=a'),
                                           str(root / 'base_lr=0.5,name=b')]

  # Fixed: only the failed point runs again; every call got the shared extra argument.
  env.pop('FAKE_FAIL')
  result = _run_cli(*args, env=env)
  assert result.returncode == 0, result.stderr
  calls = [json.loads(l) for l in log.read_text().splitlines()]
  assert [c['workdir'] for c in calls[5:]] == [str(root / 'base_lr=0.5,name=a')]
  assert all('--config.total_steps=2' in c['argv'] for c in calls)
  assert result.stdout.count('finished already, skipping') == 3

  header, rows = sweep_lib.summarize(str(root), plot=False)
  assert header[:3] == ['run', 'schedule.base_lr', 'schedule.name']  # seed is not varied.
  assert 'seed' not in header and 'test_accuracy' in header
  assert len(rows) == 4
  by_run = {r[0]: dict(zip(header, r)) for r in rows}
  assert by_run['base_lr=0.5,name=b']['test_accuracy'] == 0.5
  assert by_run['base_lr=0.25,name=a']['schedule.name'] == 'a'
  assert {r['status'] for r in by_run.values()} == {'finished'}

  result = _run_cli('summarize', str(root), '--format', 'csv', '--no_plot')
  assert result.returncode == 0, result.stderr
  table = list(csv.DictReader(io.StringIO(result.stdout)))
  assert len(table) == 4
  assert sorted(float(r['schedule.base_lr']) for r in table) == [0.25, 0.25, 0.5, 0.5]
  markdown = (root / 'summary.md').read_text().splitlines()
  assert len(markdown) == 2 + 4 and markdown[0].startswith('| run | schedule.base_lr |')


def test_a_point_that_diverged_is_marked_and_not_retried(tmp_path):
  """Exit status 3 (Diverged) marks the point's workdir with diverged.json: a rerun of the
  sweep (or a TPU VM recreated after preemption) skips it, as rerun as it is it would diverge
  again; the summary shows it."""
  train = _write(tmp_path / 'fake_train.py', FAKE_TRAIN)
  log = tmp_path / 'calls.jsonl'
  sweep_file = _write(tmp_path / 'lrs.py', '''
      base_config = 'configs/common.py'
      def get_sweep():
        return [{'schedule.base_lr': 0.25}, {'schedule.base_lr': 1e30}]
  ''')
  root = tmp_path / 'runs'
  args = [sweep_file, '--workdir_root', str(root), '--train_script', train, '--keep_going']
  result = _run_cli(*args, env=dict(os.environ, FAKE_LOG=str(log), FAKE_DIVERGE='1e+30'))
  assert result.returncode == 1 and 'failed with exit code 3' in result.stdout
  assert json.loads((root / 'base_lr=1e+30' / 'diverged.json').read_text()) == {
      'exit_status': 3}
  result = _run_cli(*args, env=dict(os.environ, FAKE_LOG=str(log)))
  assert result.returncode == 0, result.stderr
  assert 'base_lr=1e+30: diverged before, not retried' in result.stdout
  assert len(log.read_text().splitlines()) == 2  # one call per point, none after


def test_summary_of_an_unfinished_run_uses_its_last_metrics(tmp_path):
  for name, lr, finished in (('a', 0.1, True), ('b', 0.2, False)):
    run = tmp_path / name
    run.mkdir()
    (run / 'config.json').write_text(json.dumps({'schedule': {'base_lr': lr}, 'seed': 0}))
    (run / 'metrics.jsonl').write_text(
        json.dumps({'step': 5, 'train_loss': 3.0}) + '\n'
        + json.dumps({'step': 10, 'train_loss': 2.0 + lr}) + '\n')
    if finished:
      (run / 'final_metrics.json').write_text(json.dumps({'step': 10, 'test_accuracy': 0.9}))
  (tmp_path / 'not_a_run').mkdir()
  header, rows = sweep_lib.summary_table(sweep_lib.find_runs(str(tmp_path)))
  assert [r[0] for r in rows] == ['a', 'b']
  b = dict(zip(header, rows[1]))
  assert b['status'] == 'unfinished' and b['step'] == 10 and b['train_loss'] == 2.2
  assert b['test_accuracy'] is None and b['schedule.base_lr'] == 0.2
  a = dict(zip(header, rows[0]))  # A finished run: final metrics plus its last train loss.
  assert a['status'] == 'finished' and a['test_accuracy'] == 0.9 and a['train_loss'] == 2.1
  with pytest.raises(UserError, match='no runs in'):
    sweep_lib.find_runs(str(tmp_path / 'not_a_run'))


@pytest.mark.slow
def test_quickstart_sweep_runs_reruns_without_work_and_summarizes(tmp_path):
  """The shipped 4-point sweep of the quickstart, at a few steps, through the real train.py."""
  root = tmp_path / 'runs'
  # A few steps of a 1-layer, 16-wide version: the point is the sweep machinery, not accuracy.
  args = ['configs/sweeps/quickstart_lr_wd.py', '--workdir_root', str(root),
          '--config.total_steps=3', '--config.schedule.warmup_steps=1',
          '--config.batch_size=16', '--config.eval_every=0', '--config.log_every=1',
          '--config.checkpoint_every=0', '--config.plot_every_eval=False',
          '--config.model.num_layers=1', '--config.model.hidden_size=16',
          '--config.model.mlp_dim=32']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-m', 'vit_jax.tools.sweep', *args], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  finals = sorted(root.glob('*/final_metrics.json'))
  assert len(finals) == 4
  written = {p: p.stat().st_mtime_ns for p in finals}

  result = subprocess.run([sys.executable, '-m', 'vit_jax.tools.sweep', *args], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=60)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count('finished already, skipping') == 4
  assert {p: p.stat().st_mtime_ns for p in finals} == written

  result = _run_cli('summarize', str(root), '--format', 'csv')
  assert result.returncode == 0, result.stderr[-3000:]
  table = list(csv.DictReader(io.StringIO(result.stdout)))
  assert len(table) == 4
  assert {(float(r['schedule.base_lr']), float(r['optimizer.weight_decay'])) for r in table} == {
      (lr, wd) for lr in (1e-3, 3e-3) for wd in (0.0, 0.05)}
  assert all(r['status'] == 'finished' and int(r['step']) == 3 for r in table)
  assert all(0.0 <= float(r['test_accuracy']) <= 1.0 for r in table)
  assert 'model.hidden_size' not in table[0]  # the same in every run: not a difference
  with open(root / 'curves.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
