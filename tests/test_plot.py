"""Training curves from metrics.jsonl: overlaid runs, labels, missing metrics, the CLI."""

import json

import numpy as np
import pytest
from PIL import Image

from vit_jax.train import curves
from vit_jax.tools import plot
from vit_jax.errors import UserError


def _write_metrics(workdir, rows, tail=''):
  workdir.mkdir(parents=True)
  with open(workdir / 'metrics.jsonl', 'w') as f:
    f.write(''.join(json.dumps(row) + '\n' for row in rows) + tail)
  return workdir


def _full_run(workdir):
  rows = []
  for step in range(0, 101, 10):
    rows.append({'step': step, 'train_loss': 2.0 / (1 + step), 'learning_rate': 0.01 * step,
                 'img_per_sec': 1000.0 + step, 'train_mfu': 0.3})
    if step % 50 == 0:
      rows.append({'step': step, 'test_loss': 1.5 / (1 + step), 'test_accuracy': step / 100,
                   'test_top5_accuracy': min(1.0, step / 50)})
  return _write_metrics(workdir, rows)


def test_read_metrics_resume_wins_and_partial_last_line_is_skipped(tmp_path):
  rows = [{'step': s, 'train_loss': float(s)} for s in (10, 20, 30)]
  rows += [{'step': s, 'train_loss': -float(s)} for s in (20, 30, 40)]   # resumed from step 10
  workdir = _write_metrics(tmp_path / 'run', rows, tail='{"step": 50, "train_lo')
  steps, values = curves.read_metrics(workdir)['train_loss']
  assert list(steps) == [10, 20, 30, 40]
  assert list(values) == [10.0, -20.0, -30.0, -40.0]


def test_broken_line_in_the_middle_is_a_user_error(tmp_path):
  workdir = _write_metrics(tmp_path / 'run', [{'step': 1, 'train_loss': 1.0}], tail='oops\n{}\n')
  with pytest.raises(UserError, match='line 2'):
    curves.read_metrics(workdir)
  with pytest.raises(UserError, match='does not exist'):
    curves.read_metrics(tmp_path / 'nowhere')


def test_runs_are_overlaid_labelled_and_missing_metrics_skipped(tmp_path):
  full = _full_run(tmp_path / 'b16_adamw')
  # A second run that has only train metrics (no eval yet).
  partial = _write_metrics(tmp_path / 'b16_sgd', [
      {'step': s, 'train_loss': 3.0 / (1 + s), 'learning_rate': 0.02, 'img_per_sec': 900.0}
      for s in range(0, 60, 10)])
  fig = curves.curves_figure([full, partial])
  loss, accuracy, lr, throughput = fig.axes
  assert sorted(line.get_label() for line in loss.get_lines()) == [
      'b16_adamw test', 'b16_adamw train', 'b16_sgd train']
  assert sorted(line.get_label() for line in accuracy.get_lines()) == [
      'b16_adamw top-1', 'b16_adamw top-5']
  assert [line.get_label() for line in lr.get_lines()] == ['b16_adamw', 'b16_sgd']
  np.testing.assert_allclose(throughput.get_lines()[1].get_ydata(), 900.0)
  np.testing.assert_array_equal(accuracy.get_lines()[0].get_xdata(), [0, 50, 100])


def test_png_and_cli(tmp_path, capsys):
  full = _full_run(tmp_path / 'a' / 'run')
  other = _full_run(tmp_path / 'b' / 'run')     # same name: labels fall back to the paths
  assert curves.run_labels([str(full), str(other)]) == [str(full), str(other)]
  out = tmp_path / 'curves.png'
  assert plot.main([str(full), str(other), '--out', str(out)]) == 0
  with Image.open(out) as image:
    assert image.size == (1000, 700)
    assert np.asarray(image.convert('L'), np.float64).var() > 0
  assert not (tmp_path / 'curves.png.tmp').exists()

  assert plot.main([str(tmp_path / 'missing')]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'missing' in err and len(err.strip().splitlines()) == 1
