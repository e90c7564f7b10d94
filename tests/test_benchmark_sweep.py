"""The fast-path sweep: variants in subprocesses, rows appended as they end, the table."""

import json
import subprocess

import pytest
from conftest import run_python

from vit_jax.tools import benchmark_sweep

# Shrinks every variant's model so one subprocess takes seconds on CPU; these come after the
# base and variant args, so they win (a later --config.x= overrides an earlier one).
TINY = ['--config.image_size=32', '--config.data.host_image_size=32',
        '--config.model.hidden_size=32', '--config.model.num_layers=2',
        '--config.model.num_heads=2', '--config.model.mlp_dim=64', '--config.batch_size=8',
        '--config.eval_batch_size=8', '--steps', '1', '--repeats', '1', '--warmup', '0']


def _rows(path):
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_sweep_cli_runs_each_variant_and_records_a_failure(tmp_path):
  out = tmp_path / 'sweep.jsonl'
  # attention=cudnn fails on CPU (no cuDNN) between variants that succeed: it must be recorded
  # and the sweep must go on.
  result = run_python(['-m', 'vit_jax.tools.benchmark_sweep', '--out', str(out),
                       '--only', 'baseline,scan,remat=full,attention=cudnn', '--', *TINY])
  assert result.returncode == 0, result.stderr[-2000:]
  rows = _rows(out)
  # In VARIANTS order, whatever the order in --only.
  assert [row['variant'] for row in rows] == ['baseline', 'attention=cudnn', 'remat=full', 'scan']
  by_name = {row['variant']: row for row in rows}
  assert 'cudnn' in by_name['attention=cudnn']['error'].lower()
  assert '--config.model.attention_impl=cudnn' in by_name['attention=cudnn']['args']
  for name in ('baseline', 'remat=full', 'scan'):
    row = by_name[name]
    assert 'error' not in row, row.get('error')
    assert row['train_step_ms'] > 0
    # The tiny overrides won over the ViT-B/16, 224 px, batch 256 base args.
    assert row['batch_size'] == 8 and row['image_size'] == 32
    assert row['model_overrides']['num_layers'] == 2
    assert row['model_overrides']['dtype'] == 'bfloat16'  # A base arg the extras leave alone.
  assert by_name['scan']['model_overrides']['scan'] is True
  assert not by_name['baseline']['model_overrides'].get('scan')  # Unset: the model's default, False.
  assert by_name['remat=full']['model_overrides']['remat_policy'] == 'full'
  for name in ('baseline', 'scan', 'remat=full', 'attention=cudnn'):
    assert f'| {name} |' in result.stdout
    assert f'{name}: ' in result.stderr  # One progress line each.
  assert result.stdout.splitlines()[0].startswith('device: 1 x cpu, jax ')


def test_skip_done_runs_nothing_already_done(tmp_path, monkeypatch):
  out = tmp_path / 'sweep.jsonl'
  done = {'variant': 'baseline', 'train_step_ms': 10.0, 'train_img_per_sec': 100.0}
  failed = {'variant': 'scan', 'error': 'out of memory'}
  out.write_text(json.dumps(done) + '\n' + json.dumps(failed) + '\n')
  result = run_python(['-m', 'vit_jax.tools.benchmark_sweep', '--out', str(out), '--only', 'baseline',
                       '--skip_done'])
  assert result.returncode == 0, result.stderr
  assert 'baseline: done already, skipped' in result.stderr
  assert len(_rows(out)) == 2  # Nothing appended.
  assert '| baseline | n/a | 10.0 | 100 |' in result.stdout
  # A variant whose only row is an error is not done: it is run again.
  ran = []
  monkeypatch.setattr(benchmark_sweep, 'run_variant',
                      lambda name, *a: ran.append(name) or {'variant': name, 'wall_s': 0.0})
  benchmark_sweep.run_sweep(benchmark_sweep.select_variants('baseline,scan'), str(out),
                            skip_done=True)
  assert ran == ['scan']


def test_a_timed_out_variant_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
  calls = []

  def fake_run(command, **kwargs):
    calls.append((command, kwargs))
    if len(calls) == 1:
      raise subprocess.TimeoutExpired(command, kwargs['timeout'])
    return subprocess.CompletedProcess(command, 0, 'table\n{"train_img_per_sec": 5.0}\n', '')

  monkeypatch.setattr(benchmark_sweep.subprocess, 'run', fake_run)
  out = tmp_path / 'sweep.jsonl'
  benchmark_sweep.run_sweep(benchmark_sweep.select_variants('baseline,xla:no_triton_gemm'),
                            str(out), extra_args=['--steps', '1'], timeout=7)
  first, second = _rows(out)
  assert first['variant'] == 'baseline' and first['error'] == 'timed out after 7 s'
  assert second['variant'] == 'xla:no_triton_gemm' and second['train_img_per_sec'] == 5.0
  assert second['args'][-3] == '--config.xla_flags=--xla_gpu_enable_triton_gemm=false'
  # Base args, then the variant's, then the extras (last, so they win).
  command, kwargs = calls[0]
  assert command[1:3] == ['-m', 'vit_jax.tools.benchmark'] and command[-2:] == ['--steps', '1']
  assert command[3:] == first['args'] == list(benchmark_sweep.BASE_ARGS) + ['--steps', '1']
  assert kwargs['cwd'] == benchmark_sweep.REPO_ROOT


def test_failed_runs_give_one_line_reasons():
  make = lambda *a, **k: benchmark_sweep.make_row('v', ['--x'], 1.0, *a, **k)
  assert make(2, '', 'W some warning\nerror: --steps=0 must be >= 1\n')['error'] == \
      'error: --steps=0 must be >= 1'
  traceback = ('Traceback (most recent call last):\n  File "x.py"\n'
               'jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory\n'
               'W1125 12:00:00 some shutdown log line\n')
  assert make(1, '', traceback)['error'] == \
      'jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory'
  xla_abort = 'F1125 04:42:43.005561 15570 parse_flags_from_env.cc:234] Unknown flag in XLA_FLAGS'
  assert make(-6, '', xla_abort)['error'] == xla_abort
  assert make(-9, '', '')['error'] == 'exited with status -9 and no stderr'
  assert 'no JSON' in make(0, 'a table but no json\n', '')['error']
  ok = make(0, 'table\n{"train_step_ms": 3.0}\n', '')
  assert ok['train_step_ms'] == 3.0 and 'error' not in ok and ok['args'] == ['--x']


def test_bad_only_name_is_a_one_line_error(tmp_path):
  result = run_python(['-m', 'vit_jax.tools.benchmark_sweep', '--out', str(tmp_path / 'x.jsonl'),
                       '--only', 'baseline,remat=dotz'])
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error:') and "'remat=dotz'" in lines[0]
  assert 'remat=dots' in lines[0]  # The valid names are listed.
  assert not (tmp_path / 'x.jsonl').exists()


def test_table_compares_with_the_baseline_and_shows_errors():
  gib = 2 ** 30
  common = dict(device='NVIDIA H100 80GB HBM3', device_count=1, jax_version='0.10.2',
                date='2026-01-02', batch_size=256, eval_img_per_sec=3000.0, train_compile_s=12.34,
                eval_mfu=0.5)
  rows = [
      dict(variant='batch=1024', error='RESOURCE_EXHAUSTED: Out of memory | 80 GiB'),
      dict(common, variant='baseline', train_step_ms=250.0, train_img_per_sec=1000.0,
           train_mfu=0.4123, peak_memory_bytes=20 * gib),
      dict(common, variant='scan', train_step_ms=222.6, train_img_per_sec=1123.0,
           train_mfu=None, eval_mfu=None, peak_memory_bytes=None),
      dict(common, variant='dtype=float32', train_step_ms=500.0, train_img_per_sec=500.0,
           train_mfu=0.2, peak_memory_bytes=30 * gib),
      # A row from before the key was train_compile_s.
      dict({k: v for k, v in common.items() if k != 'train_compile_s'}, compile_s=45.67,
           variant='remat=full', train_step_ms=300.0, train_img_per_sec=850.0, train_mfu=0.3,
           peak_memory_bytes=10 * gib),
      # A later success replaces the variant's earlier error; a later error no earlier success.
      dict(common, variant='batch=1024', batch_size=1024, train_step_ms=900.0, train_img_per_sec=1138.0,
           train_mfu=0.5, peak_memory_bytes=70 * gib),
      dict(variant='scan', error='timed out after 600 s'),
  ]
  lines = benchmark_sweep.format_table(rows).splitlines()
  assert lines[0] == 'device: 1 x NVIDIA H100 80GB HBM3, jax 0.10.2, date 2026-01-02'
  table = {line.split(' | ')[0].lstrip('| '): line for line in lines[4:]}
  assert list(table) == ['batch=1024', 'baseline', 'scan', 'dtype=float32', 'remat=full']
  assert table['remat=full'].endswith('| 10 | 45.7 | -15.0% |')
  assert table['baseline'] == ('| baseline | 256 | 250.0 | 1,000 | 41.2% | 3,000 | 50.0% | 20 | 12.3 |'
                               '  |')
  assert table['scan'].endswith('| n/a | 3,000 | n/a | n/a | 12.3 | +12.3% |')
  assert table['dtype=float32'].endswith('| -50.0% |')
  assert table['batch=1024'].startswith('| batch=1024 | 1,024 | 900.0 |')
  assert table['batch=1024'].endswith('| 70 | 12.3 | +13.8% |')
  # No baseline row: no comparison; an error row shows its error, a pipe in it escaped.
  lines = benchmark_sweep.format_table(rows[2:3] + rows[:1]).splitlines()
  assert lines[4].endswith('| 12.3 |  |')
  assert lines[5].startswith(r'| batch=1024 | error: RESOURCE_EXHAUSTED: Out of memory \| 80 GiB |')
  assert benchmark_sweep.format_table(rows[:1]).startswith('no successful run')


def test_table_and_list_commands(tmp_path):
  path = tmp_path / 'rows.jsonl'
  path.write_text(json.dumps({'variant': 'baseline', 'train_img_per_sec': 9.0}) + '\n'
                  + '{"variant": "torn\n')  # A line cut off mid-write is skipped.
  result = run_python(['-m', 'vit_jax.tools.benchmark_sweep', '--table', str(path)])
  assert result.returncode == 0, result.stderr
  assert '| baseline |' in result.stdout and 'rows.jsonl:2 is not a sweep row' in result.stderr
  listed = run_python(['-m', 'vit_jax.tools.benchmark_sweep', '--list'])
  assert listed.returncode == 0
  names = [name for name, _ in benchmark_sweep.VARIANTS]
  assert len(names) == len(set(names)) == 22 and not any(',' in name for name in names)
  for name in names:
    assert any(line.startswith(name + ' ') for line in listed.stdout.splitlines()), name
  assert '--config.model.remat_policy=dots_no_batch' in listed.stdout


def test_budget_starts_no_variant_after_it_is_spent(tmp_path, monkeypatch, capsys):
  clock = [0.0]
  monkeypatch.setattr(benchmark_sweep.time, 'perf_counter', lambda: clock[0])

  def fake_variant(name, *unused):
    clock[0] += 100.0  # Each variant takes 100 s.
    return {'variant': name, 'wall_s': 100.0}

  monkeypatch.setattr(benchmark_sweep, 'run_variant', fake_variant)
  out = tmp_path / 'sweep.jsonl'
  rows = benchmark_sweep.run_sweep(benchmark_sweep.select_variants('baseline,scan,remat=full'),
                                   str(out), budget=150)
  assert [row['variant'] for row in rows] == ['baseline', 'remat=full']  # Started at 0 and 100 s.
  assert [row['variant'] for row in _rows(out)] == ['baseline', 'remat=full']
  assert 'not run: scan' in capsys.readouterr().err


def test_options_that_would_do_nothing_are_refused(tmp_path, capsys):
  path = str(tmp_path / 'rows.jsonl')
  for argv in (['--table', path, '--only', 'scan'], ['--table', path, '--', '--steps', '1'],
               ['--list', '--skip_done'], ['--out', path, '--timeout', '0']):
    assert benchmark_sweep.main(argv) == 2, argv
    assert capsys.readouterr().err.startswith('error: ')
  assert benchmark_sweep.main(['--list', '--only', 'scan']) == 0
  assert capsys.readouterr().out.splitlines()[1:] == ['scan  --config.model.scan=True']
