"""Training curves from workdirs' `metrics.jsonl`: loss, test accuracy, learning rate, img/s.

Runs are overlaid, one colour each, labelled by workdir name. A metric a run never logged is
skipped for that run (a panel no run logged says so). The trainer calls `plot_workdirs` at each
eval to refresh `curves.png` in its workdir.
"""

import io
import json
import os
import posixpath

import numpy as np

from vit_jax.errors import EnvironmentFault, UserError
from vit_jax.train import workdir as workdir_lib

# (panel title, y label, [(metric key, line style, legend suffix)], log-scale y)
PANELS = (
    ('loss', 'loss', [('train_loss', '-', 'train'), ('test_loss', '--', 'test')], True),
    ('test accuracy', 'accuracy',
     [('test_accuracy', '-', 'top-1'), ('test_top5_accuracy', ':', 'top-5')], False),
    ('learning rate', 'learning rate', [('learning_rate', '-', '')], False),
    ('throughput', 'images / second', [('img_per_sec', '-', '')], False),
)


def read_metrics(workdir):
  """`{metric: (steps, values)}` from `workdir/metrics.jsonl` (local or gs://), each sorted by
  step.

  A resumed run drops what its predecessor logged after the checkpoint; should a file still
  hold a step twice (written by an older version), the later row wins. A last line cut off
  mid-write (a run still going) is skipped; a broken line elsewhere is a UserError.
  """
  path = workdir_lib.RunFiles(workdir).metrics_jsonl
  if not path.exists():
    raise UserError(f'{path} does not exist; pass workdirs that train.py wrote')
  lines = path.read_text().split('\n')
  series = {}   # metric -> list of (step, value), steps increasing
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      step = int(row['step'])
    except (ValueError, KeyError, TypeError) as e:
      if number == len(lines):   # no trailing newline yet: being written right now
        continue
      raise UserError(f'{path} line {number} is not a JSON object with a step ({e})') from None
    for name, value in row.items():
      if name == 'step' or not isinstance(value, (int, float)):
        continue
      points = series.setdefault(name, [])
      while points and points[-1][0] >= step:   # a resume: drop what it logs again
        points.pop()
      points.append((step, float(value)))
  return {name: (np.array([s for s, _ in points]), np.array([v for _, v in points]))
          for name, points in series.items()}


def run_labels(workdirs):
  """One label per workdir: its name, or its path as given when names clash."""
  paths = [os.fspath(workdir_lib.as_path(d)) for d in workdirs]
  names = [posixpath.basename(path.rstrip('/')) for path in paths]
  return [name if names.count(name) == 1 else path for name, path in zip(names, paths)]


def plot_workdirs(workdirs, out_png):
  """Writes the curves of `workdirs` (one colour each) to `out_png` (1000 x 700 px), a local
  path or gs://.

  The file is replaced atomically, so a viewer never sees it half written.
  """
  fig = curves_figure(workdirs)
  png = io.BytesIO()
  fig.savefig(png, format='png')
  out = workdir_lib.as_path(out_png)
  workdir_lib.RunFiles(out.parent).write_bytes(out, png.getvalue())


def curves_figure(workdirs):
  """The matplotlib `Figure` that `plot_workdirs` writes: 2 x 2 panels, one per `PANELS`."""
  if not workdirs:
    raise UserError('no workdirs given; pass at least one')
  runs = [(label, read_metrics(d)) for label, d in zip(run_labels(workdirs), workdirs)]
  # Imported here: matplotlib costs a second of every start, and a run plots only at evals.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(10, 7), dpi=100)
  colours = [f'C{i % 10}' for i in range(len(runs))]
  for index, (title, ylabel, metrics, log_scale) in enumerate(PANELS):
    ax = fig.add_subplot(2, 2, index + 1)
    drawn = False
    for colour, (label, series) in zip(colours, runs):
      for key, style, suffix in metrics:
        if key not in series:
          continue
        steps, values = series[key]
        ax.plot(steps, values, style, color=colour, marker='.' if len(steps) < 20 else None,
                label=f'{label} {suffix}'.strip())
        drawn = True
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if not drawn:
      ax.text(0.5, 0.5, 'not logged', ha='center', va='center', transform=ax.transAxes)
      continue
    if log_scale and all(np.all(series[k][1] > 0) for _, series in runs
                         for k, _, _ in metrics if k in series):
      ax.set_yscale('log')
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def refresh(files):
  """Redraws a run's `curves.png` from its metrics.jsonl; a plotting failure never stops
  training (it is reported as a warning), a storage fault does."""
  try:
    plot_workdirs([os.fspath(files.root)], os.fspath(files.curves_png))
  except EnvironmentFault:
    raise  # A full disk or a failing bucket is the run's fault too, not the plot's.
  except Exception as e:  # pylint: disable=broad-except
    print(f'warning: could not refresh curves.png ({type(e).__name__}: {e})')
