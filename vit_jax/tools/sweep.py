"""Config sweeps: one base config trained many times, each time with a few values changed.

A sweep file is plain Python, like a config:

    # configs/sweeps/quickstart_lr_wd.py
    from vit_jax.tools.sweep import axis, product
    base_config = 'configs/quickstart.py'
    def get_sweep():
      return product(axis('schedule.base_lr', [1e-3, 3e-3]),
                     axis('optimizer.weight_decay', [0.0, 0.05]))

`get_sweep()` returns the points: a list of dicts of config overrides (`product` makes a grid,
`zipit` pairs values up, a hand-written list works as well). Every point is one ordinary
`train.py` command line, so a sweep is literally a list of commands:

    python -m vit_jax.tools.sweep configs/sweeps/quickstart_lr_wd.py [--config.total_steps=5 ...]
        runs the points one after another, each in its own workdir under
        workdirs/sweeps/<sweep name>/ (--workdir_root, local or gs://), skipping points already
        finished and points that diverged (exit status 3: rerun as they are, they diverge
        again; delete their diverged.json to retry them);
    python -m vit_jax.tools.sweep configs/sweeps/quickstart_lr_wd.py --print
        prints the commands instead, one a line, for a TPU VM or a job scheduler;
    python -m vit_jax.tools.sweep summarize workdirs/sweeps/quickstart_lr_wd
        prints a table of what differs between the runs and their final metrics, and writes
        summary.md, summary.csv and curves.png into that folder.
"""

import argparse
import csv
import difflib
import hashlib
import importlib.util
import io
import itertools
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys

from vit_jax import errors
from vit_jax.train import cli
from vit_jax.train import config as config_lib
from vit_jax.train import workdir as workdir_lib
from vit_jax.errors import UserError

DEFAULT_WORKDIR_ROOT = 'workdirs/sweeps'
_MAX_NAME_CHARS = 120


# ------------------------------------------------------------------ building sweeps (sweep files)

def axis(key, values):
  """One varied key: `axis('schedule.base_lr', [1e-3, 3e-3])` -> `[{key: 1e-3}, {key: 3e-3}]`."""
  values = list(values)
  if not values:
    raise UserError(f'axis({key!r}) has no values; give at least one')
  return [{key: value} for value in values]


def product(*axes):
  """The grid of several axes: every combination, the last axis varying fastest."""
  points = []
  for combination in itertools.product(*axes):
    merged = {}
    for overrides in combination:
      repeated = sorted(set(merged) & set(overrides))
      if repeated:
        raise UserError(f'product() sets {repeated[0]!r} in two axes; vary each key in one axis')
      merged.update(overrides)
    points.append(merged)
  return points


def zipit(*axes):
  """Pairs axes of equal length element by element (the 1st with the 1st, ...), no grid."""
  lengths = [len(a) for a in axes]
  if len(set(lengths)) > 1:
    raise UserError(f'zipit() needs axes of one length; got lengths {lengths}')
  return [dict(itertools.chain.from_iterable(o.items() for o in group)) for group in zip(*axes)]


# ------------------------------------------------------------------ loading a sweep file

class Sweep:
  """A loaded sweep file: `name`, `base_config` (path[:arg]) and `points` (override dicts)."""

  def __init__(self, name, base_config, points):
    self.name = name
    self.base_config = base_config
    self.points = points


def _load_module(path, what):
  if not os.path.isfile(path):
    raise UserError(f'{what} {path!r} does not exist; give the path of a .py file')
  cli.allow_sibling_imports(path)
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_base_config(base_config):
  """The ConfigDict a `train.py --config <base_config>` would start from ('path.py[:arg]')."""
  path, _, arg = base_config.partition(':')
  module = _load_module(path, 'base_config')
  if not hasattr(module, 'get_config'):
    raise UserError(f'base_config {path!r} has no get_config(); it must be a config file')
  return module.get_config(arg) if arg else module.get_config()


def _flat_keys(tree, prefix=''):
  """Dotted names of every leaf of a nested dict / ConfigDict."""
  keys = []
  for key, value in tree.items():
    if hasattr(value, 'items'):
      keys.extend(_flat_keys(value, f'{prefix}{key}.'))
    else:
      keys.append(prefix + key)
  return keys


def check_keys(keys, config, where):
  """Raises a UserError naming the first of `keys` (dotted) that `config` does not have."""
  valid = set(_flat_keys(config))
  for key in keys:
    if key not in valid:
      close = difflib.get_close_matches(key, sorted(valid), n=3)
      hint = f'did you mean {", ".join(close)}?' if close else 'see configs/common.py for the keys'
      raise UserError(f'{where}: unknown config key {key!r}; {hint}')


def load_sweep(path):
  """Loads and checks a sweep file: every point's keys must exist in its base config."""
  module = _load_module(path, 'sweep file')
  for needed in ('base_config', 'get_sweep'):
    if not hasattr(module, needed):
      raise UserError(f'sweep file {path!r} defines no {needed}; it needs base_config = '
                      "'configs/<name>.py' and def get_sweep() returning a list of dicts")
  points = module.get_sweep()
  if (not isinstance(points, (list, tuple)) or not points
      or not all(isinstance(p, dict) and all(isinstance(k, str) for k in p) for p in points)):
    raise UserError(f'get_sweep() in {path!r} returned {type(points).__name__}; it must return '
                    'a non-empty list of dicts like {"schedule.base_lr": 0.001}')
  config = load_base_config(module.base_config)
  check_keys(sorted({k for p in points for k in p}), config, path)
  name = os.path.splitext(os.path.basename(path))[0]
  return Sweep(name, module.base_config, [dict(p) for p in points])


# ------------------------------------------------------------------ points -> workdirs, commands

def format_value(value):
  """A value as `--config.<key>=<value>` spells it (ml_collections parses it back)."""
  if isinstance(value, str):
    return value
  if value is None:  # config_flags parses 'None' as the field's type and fails.
    raise UserError('sweep value None cannot be given on the command line; leave the key out '
                    'of that point to keep the base config\'s value')
  if isinstance(value, (bool, int, float, tuple, list)):
    return repr(value)
  raise UserError(f'sweep value {value!r} is a {type(value).__name__}; use str, int, float, '
                  'bool, tuple or list')


def _short_keys(keys):
  """The shortest dotted suffix of each key that no other key ends with."""
  short = {}
  for key in keys:
    parts = key.split('.')
    for n in range(1, len(parts) + 1):
      suffix = '.'.join(parts[-n:])
      if not any(other != key and (other == suffix or other.endswith('.' + suffix))
                 for other in keys):
        break
    short[key] = suffix
  return short


def _sanitize(text):
  return re.sub(r'[^A-Za-z0-9._=+,-]', '_', text)


def _digest(overrides):
  text = json.dumps(overrides, sort_keys=True, default=repr)
  return hashlib.sha1(text.encode()).hexdigest()[:8]


def point_names(points):
  """A short, readable, unique folder name per point, built from its overrides.

  E.g. `base_lr=0.001,warmup_steps=10`. Names depend only on the point, not its position, so
  editing the sweep file keeps finished points recognisable.
  """
  short = _short_keys(sorted({k for p in points for k in p}))
  names = []
  for overrides in points:
    name = _sanitize(','.join(f'{short[k]}={format_value(v)}' for k, v in overrides.items()))
    name = name or 'base'
    if len(name) > _MAX_NAME_CHARS:
      name = f'{name[:_MAX_NAME_CHARS - 9]}-{_digest(overrides)}'
    names.append(name)
  for i, j in itertools.combinations(range(len(points)), 2):
    if points[i] == points[j]:
      raise UserError(f'sweep point {j} repeats point {i} ({points[i]}); drop one of them')
  counts = {n: names.count(n) for n in names}
  return [f'{n}-{_digest(p)}' if counts[n] > 1 else n for n, p in zip(names, points)]


def train_command(base_config, overrides, workdir, extra_args=(), python='python3',
                  train_script='train.py'):
  """The argv of one run: `python train.py --config B --config.k=v ... --workdir W`."""
  return ([python, train_script, '--config', base_config]
          + [f'--config.{k}={format_value(v)}' for k, v in overrides.items()]
          + list(extra_args) + ['--workdir', workdir])


def sweep_commands(sweep, workdir_root, extra_args=(), python='python3', train_script='train.py'):
  """[(name, workdir, argv)] for every point, in the sweep file's order."""
  varied = {k for p in sweep.points for k in p}
  for arg in extra_args:
    if not (arg.startswith('--config.') and '=' in arg):
      raise UserError(f'unexpected argument {arg!r}; extra arguments must be '
                      '--config.<key>=<value>, passed to every point')
    key = arg[len('--config.'):].partition('=')[0]
    if key in varied:
      raise UserError(f'{arg!r} sets {key!r}, which the sweep varies; drop it or the axis')
  commands = []
  for name, overrides in zip(point_names(sweep.points), sweep.points):
    workdir = posixpath.join(workdir_root, name)  # posixpath keeps gs:// intact.
    commands.append((name, workdir, train_command(sweep.base_config, overrides, workdir,
                                                  extra_args, python, train_script)))
  return commands


def run_sweep(commands, keep_going=False, out=sys.stdout):
  """Runs the commands one after another, skipping those whose workdir holds final metrics or
  says the point diverged (a point that exits with the Diverged status is marked so).

  Returns the names of the points that failed (empty when all finished or diverged before).
  """
  failed = []
  diverged = []
  for i, (name, workdir, argv) in enumerate(commands):
    prefix = f'[{i + 1}/{len(commands)}] {name}'
    files = workdir_lib.RunFiles(workdir)
    if files.is_finished():
      print(f'{prefix}: finished already, skipping', file=out, flush=True)
      continue
    if files.diverged_json.exists():
      print(f'{prefix}: diverged before, not retried (delete {files.diverged_json} to retry)',
            file=out, flush=True)
      diverged.append(name)
      continue
    print(f'{prefix}: {shlex.join(argv)}', file=out, flush=True)
    returncode = subprocess.run(argv, check=False).returncode
    if returncode == errors.DIVERGED_STATUS:
      files.write_json(files.diverged_json, {'exit_status': returncode})
    if returncode != 0:
      print(f'{prefix}: failed with exit code {returncode}', file=out, flush=True)
      failed.append(name)
      if not keep_going:
        break
  if diverged:
    print(f'{len(diverged)} point(s) diverged before and were not run: {", ".join(diverged)}',
          file=out, flush=True)
  return failed


# ------------------------------------------------------------------ summarizing a sweep's runs

def _flatten(tree, prefix=''):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = value
  return flat


def _read_json(path):
  return json.loads(path.read_text())


def _last_metrics(path):
  """The latest value of every metric in a metrics.jsonl (for runs that have not finished)."""
  latest = {}
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        latest.update(json.loads(line))
      except ValueError:
        continue  # A blank line, or the last line of a running job cut off mid-write.
  return latest


def find_runs(sweep_dir):
  """The run folders directly under `sweep_dir` (local or gs://; those holding config.json),
  sorted by name."""
  root = workdir_lib.as_path(sweep_dir)
  if not root.is_dir():
    raise UserError(f'{sweep_dir!r} is not a folder; give the root of a sweep\'s workdirs')
  runs = sorted(os.fspath(d) for d in root.iterdir()
                if workdir_lib.RunFiles(d).config_json.exists())
  if not runs:
    raise UserError(f'no runs in {sweep_dir!r}: no sub-folder holds a config.json')
  return runs


def summary_table(run_dirs):
  """(header, rows): run name, the config keys that differ between runs, status, final metrics."""
  run_files = [workdir_lib.RunFiles(d) for d in run_dirs]
  configs = [_flatten(config_lib.config_of_record(_read_json(files.config_json)))
             for files in run_files]
  all_keys = sorted({k for c in configs for k in c})
  _missing = object()
  varied = [k for k in all_keys
            if len({json.dumps(c.get(k, _missing), default=repr, sort_keys=True)
                    for c in configs}) > 1]
  results = []  # (status, {metric: latest value}); final metrics override the last logged ones.
  final_keys = set()
  for files in run_files:
    metrics = _last_metrics(files.metrics_jsonl)
    finished = files.is_finished()
    if finished:
      final = _read_json(files.final_metrics_json)
      final_keys |= set(final)
      metrics.update(final)
    status = ('finished' if finished else 'diverged' if files.diverged_json.exists()
              else 'unfinished')
    results.append((status, metrics))
  # The final (eval) metrics and the last train loss; the logged rest (img/s, learning rate,
  # ...) only while no run has finished.
  logged = {k for _, m in results for k in m}
  shown = (final_keys | ({'train_loss'} & logged)) if final_keys else logged
  metric_keys = sorted(shown - {'step'}, key=lambda k: (not k.startswith('test_'), k))
  header = ['run'] + varied + ['status', 'step'] + metric_keys
  rows = []
  for d, config, (status, metrics) in zip(run_dirs, configs, results):
    rows.append([posixpath.basename(d)] + [config.get(k) for k in varied]
                + [status, metrics.get('step')] + [metrics.get(k) for k in metric_keys])
  return header, rows


def _cell(value):
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value)


def to_markdown(header, rows):
  """A Markdown table of `rows` under `header`: floats to 4 significant digits, None empty."""
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(_cell(v).replace('|', '\\|') for v in row) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def to_csv(header, rows):
  """CSV text of `header` then `rows`, values as they are and None empty."""
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(header)
  writer.writerows([['' if v is None else v for v in row] for row in rows])
  return buffer.getvalue()


def summarize(sweep_dir, plot=True):
  """Writes summary.md, summary.csv (and curves.png) into `sweep_dir`; returns (header, rows)."""
  run_dirs = find_runs(sweep_dir)
  header, rows = summary_table(run_dirs)
  files = workdir_lib.RunFiles(sweep_dir)
  files.write_bytes(files.root / 'summary.md', to_markdown(header, rows).encode())
  files.write_bytes(files.root / 'summary.csv', to_csv(header, rows).encode())
  if plot:
    from vit_jax.train import curves as plot_lib  # matplotlib is slow to import; only when plotting.
    plot_lib.plot_workdirs(run_dirs, os.fspath(files.root / 'curves.png'))
  return header, rows


# ------------------------------------------------------------------ command line

def _summarize_main(argv):
  parser = argparse.ArgumentParser(
      prog='python -m vit_jax.tools.sweep summarize', allow_abbrev=False,
      description='Tabulates the runs of a sweep: differing config values and final metrics.')
  parser.add_argument('sweep_dir', help='the folder holding one workdir per point')
  parser.add_argument('--format', choices=('markdown', 'csv'), default='markdown',
                      help='what to print (both files are written either way)')
  parser.add_argument('--no_plot', action='store_true', help='do not write curves.png')
  args = parser.parse_args(argv)
  header, rows = summarize(args.sweep_dir, plot=not args.no_plot)
  print(to_markdown(header, rows) if args.format == 'markdown' else to_csv(header, rows), end='')
  written = ['summary.md', 'summary.csv'] + ([] if args.no_plot else ['curves.png'])
  print(f'\nwrote {", ".join(posixpath.join(args.sweep_dir, w) for w in written)}',
        file=sys.stderr)
  return 0


def _run_main(argv):
  parser = argparse.ArgumentParser(
      prog='python -m vit_jax.tools.sweep', allow_abbrev=False,
      description='Runs (or prints) every point of a sweep file. Extra --config.<key>=<value> '
                  'arguments are passed to every point. "summarize DIR" tabulates the results.')
  parser.add_argument('sweep_file', help='e.g. configs/sweeps/quickstart_lr_wd.py')
  parser.add_argument('--workdir_root', default=None,
                      help=f'folder of the point workdirs (default {DEFAULT_WORKDIR_ROOT}/<sweep '
                           'name>); a gs:// path works with --print')
  parser.add_argument('--print', dest='print_only', action='store_true',
                      help='print one command per point instead of running them')
  parser.add_argument('--python', default=None,
                      help='interpreter in the commands (default: this one when running, '
                           'python3 when printing)')
  parser.add_argument('--train_script', default='train.py', help='the training entry point')
  parser.add_argument('--keep_going', action='store_true',
                      help='run the remaining points after one fails')
  args, extra_args = parser.parse_known_args(argv)
  sweep = load_sweep(args.sweep_file)
  workdir_root = args.workdir_root or posixpath.join(DEFAULT_WORKDIR_ROOT, sweep.name)
  python = args.python or ('python3' if args.print_only else sys.executable)
  commands = sweep_commands(sweep, workdir_root, extra_args, python, args.train_script)
  if args.print_only:
    for _, _, argv_ in commands:
      print(shlex.join(argv_))
    return 0
  if not os.path.isfile(args.train_script):
    raise UserError(f'no {args.train_script!r} in {os.getcwd()!r}; run the sweep from the '
                    'repository root or pass --train_script')
  failed = run_sweep(commands, keep_going=args.keep_going)
  if failed:
    print(f'error: {len(failed)} of {len(commands)} points failed: {", ".join(failed)}',
          file=sys.stderr)
    return 1
  print(f'all {len(commands)} points ran; summary: '
        f'python -m vit_jax.tools.sweep summarize {shlex.quote(workdir_root)}')
  return 0


def main(argv=None):
  """Runs (or prints) a sweep file's points, or with `summarize DIR` tabulates them; the exit
  status."""
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    if argv and argv[0] == 'summarize':
      return _summarize_main(argv[1:])
    return _run_main(argv)
  except errors.REPORTED as e:
    return errors.report(e)


if __name__ == '__main__':
  sys.exit(main())
