r"""The GPU fast-path sweep as one command: the baseline and every switch, each timed on its own.

Each variant is one `python -m vit_jax.tools.benchmark` run in its own subprocess, so a variant that
runs out of memory, or one whose XLA_FLAGS (read only when the backend starts) break XLA,
cannot poison the others. Each variant's JSON line is appended to --out (a local file, or a
gs:// object, which is replaced whole) as soon as it finishes,
so a command cut off at a time limit keeps what it did; a failed variant is recorded as a row
with an "error" and the sweep goes on. A markdown table comparing every variant with the
baseline is printed last.

  python -m vit_jax.tools.benchmark_sweep --out results.jsonl [--only baseline,attention=xla,...]
      [--skip_done] [--timeout 600] [--budget SECONDS] [-- <extra benchmark args>]
  python -m vit_jax.tools.benchmark_sweep --table results.jsonl   # re-print the table from a file
  python -m vit_jax.tools.benchmark_sweep --list                  # the variants and their args

Everything after `--` is passed to every variant after its own args, so it overrides them
(a later `--config.x=` wins), e.g. to shrink the model on CPU.

On an H100 session (10 minutes a command, 30 minutes of device time, no network there): a
variant costs an import of jax, compiling the train and eval steps, lowering them again for the
FLOP count, and the timing: an estimated 30-60 s for ViT-B/16 (not measured yet), so split the
sweep in two device calls. ml_collections is not in the GPU machine's image: carry it as a wheel and install
it before the sweep (BENCHMARKS.md has the recipe). $OUT starts empty in every call, so each call
writes its own file; join them back here and re-print the table:

  # device call 1
  python -m vit_jax.tools.benchmark_sweep --out $OUT/sweep1.jsonl --budget 420 --timeout 300 \
      --only baseline,attention=xla,attention=cudnn,dtype=float32,remat=dots,remat=dots_no_batch,remat=full,scan,dropout=0.1,dropout=0.1+prng=unsafe_rbg
  # device call 2 (the baseline again: each file then has one from the same machine)
  python -m vit_jax.tools.benchmark_sweep --out $OUT/sweep2.jsonl --budget 420 --timeout 300 \
      --only baseline,batch=128,batch=512,batch=1024,batch=1024+remat=dots,max_batch,max_batch+remat=dots,eval_batch=1024,host_size=32,xla:latency_hiding,xla:no_triton_gemm
  # back here
  cat sweep1.jsonl sweep2.jsonl > sweep.jsonl && python -m vit_jax.tools.benchmark_sweep --table sweep.jsonl

--budget starts no new variant after that many seconds, so the command ends inside the device's
10 minutes with its file whole. To finish a call that stopped short, put its file back in the
working tree, copy it to $OUT in the next call and run the same command with --skip_done:
variants with a successful row there are not run again. The table shows one row per variant,
its last success (else its last error), so in joined files every variant is compared with the
last successful baseline.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

from vit_jax import errors
from vit_jax.errors import UserError
from vit_jax.train import storage
from vit_jax.train import workdir as workdir_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The baseline: ViT-B/16 at 224 px in bf16, batch 256, an ImageNet-sized head, and the host
# delivering 224 px so the step does no resize.
BASE_ARGS = (
    '--config', 'configs/vit_b16_cifar10.py', '--config.image_size=224',
    '--config.data.host_image_size=224', '--config.model.dtype=bfloat16',
    '--config.batch_size=256', '--skip_data', '--num_classes', '1000')

# (name, benchmark args added to BASE_ARGS).
VARIANTS = (
    ('baseline', ()),
    ('attention=xla', ('--config.model.attention_impl=xla',)),
    ('attention=cudnn', ('--config.model.attention_impl=cudnn',)),
    # The CPU's choice from 64 keys on (vit.deferred_norm_attention); on an H200, 1.38x cuDNN's
    # step (BENCHMARKS.md, 2026-11-27).
    ('attention=deferred_norm', ('--config.model.attention_impl=deferred_norm',)),
    ('dtype=float32', ('--config.model.dtype=float32',)),
    ('remat=dots', ('--config.model.remat_policy=dots',)),
    ('remat=dots_no_batch', ('--config.model.remat_policy=dots_no_batch',)),
    ('remat=full', ('--config.model.remat_policy=full',)),
    ('scan', ('--config.model.scan=True',)),
    # Scan alone keeps every residual a layer's backward reads (36.8 GiB against 20.3 on an H200):
    # what recomputing all but the matmuls' outputs gives back.
    ('scan+remat=dots', ('--config.model.scan=True', '--config.model.remat_policy=dots')),
    # What dropout's random bits cost, and what the hardware generator saves of it.
    ('dropout=0.1', ('--config.model.dropout_rate=0.1',)),
    ('dropout=0.1+prng=unsafe_rbg', ('--config.model.dropout_rate=0.1',
                                     '--config.prng_impl=unsafe_rbg')),
    ('batch=128', ('--config.batch_size=128',)),
    ('batch=512', ('--config.batch_size=512',)),
    ('batch=1024', ('--config.batch_size=1024',)),
    # '+', not ',': --only is split on commas.
    ('batch=1024+remat=dots', ('--config.batch_size=1024', '--config.model.remat_policy=dots')),
    # The largest batch_size·2^k whose train step XLA plans within 95% of the device memory.
    ('max_batch', ('--max_batch',)),
    ('max_batch+remat=dots', ('--max_batch', '--config.model.remat_policy=dots')),
    ('eval_batch=1024', ('--config.eval_batch_size=1024',)),
    # The host ships 32 px and the step resizes to 224 px on the device.
    ('host_size=32', ('--config.data.host_image_size=32',)),
    # config.xla_flags joins XLA_FLAGS before the backend starts (GPU flags: candidates only).
    ('xla:latency_hiding', ('--config.xla_flags=--xla_gpu_enable_latency_hiding_scheduler=true',)),
    ('xla:no_triton_gemm', ('--config.xla_flags=--xla_gpu_enable_triton_gemm=false',)),
)

_MAX_ERROR_CHARS = 500
# Lines that state why a process failed: an `error:` line, an exception, an XLA fatal log.
_ERROR_LINE = re.compile(r'^(error:|[\w.]*(Error|Exception|Exit)\b|F\d{4} )')


# ------------------------------------------------------------------ choosing and running variants

def select_variants(only=None):
  """The VARIANTS named in `only` (comma-separated names), in VARIANTS order; all if None."""
  if only is None:
    return list(VARIANTS)
  wanted = [name.strip() for name in only.split(',') if name.strip()]
  valid = [name for name, _ in VARIANTS]
  unknown = [name for name in wanted if name not in valid]
  if unknown or not wanted:
    raise UserError(f'unknown variant {unknown[0] if unknown else only!r} in --only; valid: '
                    f'{", ".join(valid)}')
  return [variant for variant in VARIANTS if variant[0] in wanted]


def benchmark_args(variant_args, extra_args=()):
  """The arguments after `python -m vit_jax.tools.benchmark`: base, the variant's, then the extras."""
  return [*BASE_ARGS, *variant_args, *extra_args]


def failure_reason(stderr, returncode):
  """One line saying why a benchmark run failed, from its stderr (its last error-like line)."""
  lines = [line.strip() for line in (stderr or '').splitlines() if line.strip()]
  reason = next((line for line in reversed(lines) if _ERROR_LINE.match(line)),
                lines[-1] if lines else f'exited with status {returncode} and no stderr')
  return reason[:_MAX_ERROR_CHARS]


def make_row(name, args, wall_s, returncode=None, stdout='', stderr='', error=None):
  """The JSONL row of one run: the benchmark's JSON, or an "error" when it failed.

  `error` is given for a run that did not finish (a timeout); otherwise the run failed when it
  exited non-zero or its last stdout line is not the benchmark's JSON object.
  """
  row = {'variant': name}
  figures = None
  if error is None and returncode == 0:
    lines = (stdout or '').strip().splitlines()
    try:
      figures = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
      pass
    if not isinstance(figures, dict):
      figures, error = None, 'exited 0 but the last stdout line is no JSON object'
  elif error is None:
    error = failure_reason(stderr, returncode)
  if figures is not None:
    row.update(figures)
  else:
    row['error'] = error
  row['args'] = list(args)
  row['wall_s'] = round(wall_s, 1)
  return row


def run_variant(name, variant_args, extra_args=(), timeout=600):
  """Runs one variant's benchmark in a subprocess from the repository root; returns its row."""
  args = benchmark_args(variant_args, extra_args)
  start = time.perf_counter()
  try:
    result = subprocess.run([sys.executable, '-m', 'vit_jax.tools.benchmark', *args], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:  # subprocess.run has killed it.
    return make_row(name, args, time.perf_counter() - start,
                    error=f'timed out after {timeout:g} s')
  return make_row(name, args, time.perf_counter() - start, result.returncode,
                  result.stdout, result.stderr)


def read_rows(path):
  """The rows of a JSONL file, local or gs:// (none if it does not exist); a torn line is
  skipped with a warning."""
  path = workdir_lib.as_path(path)
  if not path.exists():
    return []
  rows = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      row = None
    if isinstance(row, dict) and 'variant' in row:
      rows.append(row)
    else:
      print(f'warning: {path}:{number} is not a sweep row; skipped', file=sys.stderr)
  return rows


def run_sweep(variants, out_path, extra_args=(), timeout=600, skip_done=False, budget=None):
  """Runs each variant, appending its row to `out_path` as it ends; returns the new rows."""
  done = {row['variant'] for row in read_rows(out_path) if 'error' not in row}
  todo = [variant for variant in variants if not (skip_done and variant[0] in done)]
  for name, _ in variants:
    if skip_done and name in done:
      print(f'{name}: done already, skipped', file=sys.stderr)
  start, new_rows = time.perf_counter(), []
  out = workdir_lib.as_path(out_path)  # appended locally; a gs:// object is replaced whole
  results = storage.GrowingFile(out, out.read_bytes() if out.exists() else b'')
  for index, (name, variant_args) in enumerate(todo):
    if budget is not None and time.perf_counter() - start >= budget:
      left = ', '.join(name for name, _ in todo[index:])
      print(f'budget of {budget:g} s spent; not run: {left}', file=sys.stderr)
      break
    row = run_variant(name, variant_args, extra_args, timeout)
    results.append((json.dumps(row) + '\n').encode())
    results.flush()
    new_rows.append(row)
    outcome = f'error: {row["error"]}' if 'error' in row else 'ok'
    print(f'[{index + 1}/{len(todo)}] {name}: {row["wall_s"]:.1f} s, {outcome}', file=sys.stderr,
          flush=True)
  results.close()
  return new_rows


# ------------------------------------------------------------------ the table

TABLE_COLUMNS = ('variant', 'batch', 'train ms/step', 'train img/s', 'train MFU', 'eval img/s',
                 'eval MFU', 'peak memory GiB', 'compile s', 'train img/s vs baseline')


def _number(value, fmt):
  return 'n/a' if value is None else format(value, fmt)


def _cell(text):
  return str(text).replace('|', r'\|')


def latest_rows(rows):
  """One row per variant, in first-appearance order: its last success, else its last error."""
  chosen = {}
  for row in rows:
    previous = chosen.get(row['variant'])
    # A success replaces anything; an error replaces only an earlier error.
    if previous is None or 'error' not in row or 'error' in previous:
      chosen[row['variant']] = row
  return list(chosen.values())


def format_table(rows):
  """A markdown table of every variant against the baseline, under a device/jax/date line."""
  rows = latest_rows(rows)
  successes = [row for row in rows if 'error' not in row]
  baseline = next((row for row in successes if row['variant'] == 'baseline'), None)
  if successes:
    first = successes[0]
    header = (f'device: {first.get("device_count", "?")} x {first.get("device", "?")}, '
              f'jax {first.get("jax_version", "?")}, date {first.get("date", "?")}')
  else:
    header = 'no successful run'
  lines = [header, '', '| ' + ' | '.join(TABLE_COLUMNS) + ' |',
           '|' + '|'.join(' --- ' for _ in TABLE_COLUMNS) + '|']
  for row in rows:
    if 'error' in row:
      cells = [row['variant'], f'error: {row["error"]}'] + [''] * (len(TABLE_COLUMNS) - 2)
    else:
      memory = row.get('peak_memory_bytes')
      cells = [
          row['variant'],
          _number(row.get('batch_size'), ',d'),
          _number(row.get('train_step_ms'), '.1f'),
          _number(row.get('train_img_per_sec'), ',.0f'),
          _number(row.get('train_mfu'), '.1%'),
          _number(row.get('eval_img_per_sec'), ',.0f'),
          _number(row.get('eval_mfu'), '.1%'),
          _number(None if memory is None else memory / 2 ** 30, '.3g'),
          _number(_train_compile_s(row), '.1f'),
          _versus(row, baseline),
      ]
    lines.append('| ' + ' | '.join(_cell(cell) for cell in cells) + ' |')
  return '\n'.join(lines)


def _train_compile_s(row):
  """The train step's compile time; rows written before the benchmark named it
  `train_compile_s` (beside `eval_compile_s`) call it `compile_s`."""
  return row.get('train_compile_s', row.get('compile_s'))


def _versus(row, baseline):
  """Train img/s relative to the baseline's, e.g. '+12.3%'; blank for the baseline itself."""
  if baseline is None or row is baseline:
    return ''
  mine, theirs = row.get('train_img_per_sec'), baseline.get('train_img_per_sec')
  if not mine or not theirs:
    return ''
  return f'{100 * (mine / theirs - 1):+.1f}%'


def format_list(variants=VARIANTS, extra_args=()):
  """The variants, one a line: name and the args it adds."""
  lines = [f'every variant runs: python -m vit_jax.tools.benchmark {" ".join(BASE_ARGS)} <its args>'
           + (f' {" ".join(extra_args)}' if extra_args else '')]
  width = max(len(name) for name, _ in variants)
  for name, variant_args in variants:
    lines.append(f'{name:<{width}}  {" ".join(variant_args) or "(nothing added)"}')
  return '\n'.join(lines)


# ------------------------------------------------------------------ command line

def main(argv=None):
  """The command line; returns the exit status (2 for a user's mistake)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  extra_args = []
  if '--' in argv:
    split = argv.index('--')
    argv, extra_args = argv[:split], argv[split + 1:]
  parser = argparse.ArgumentParser(
      prog='python -m vit_jax.tools.benchmark_sweep', allow_abbrev=False,
      description='Runs the baseline and each fast-path switch of `python -m vit_jax.tools.benchmark` '
                  'in its own subprocess, appends each JSON line to --out, prints a table. '
                  'Arguments after -- go to every benchmark run, after its own.')
  mode = parser.add_mutually_exclusive_group(required=True)
  mode.add_argument('--out', help='JSONL file the rows are appended to')
  mode.add_argument('--table', metavar='JSONL', help='only print the table of this file')
  mode.add_argument('--list', action='store_true', help='print the variants; run nothing')
  parser.add_argument('--only', help='comma-separated variant names (default: all)')
  parser.add_argument('--skip_done', action='store_true',
                      help='skip variants that already have a successful row in --out')
  parser.add_argument('--timeout', type=float, default=600, help='seconds per variant')
  parser.add_argument('--budget', type=float, default=None,
                      help='start no new variant after this many seconds')
  try:
    try:
      args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed its usage and message.
      return 0 if e.code == 0 else 2
    if args.timeout <= 0 or (args.budget is not None and args.budget <= 0):
      raise UserError('--timeout and --budget must be positive seconds')
    if not args.out and (args.skip_done or args.budget is not None):
      raise UserError('--skip_done and --budget go with --out (a sweep to run)')
    if args.list:
      print(format_list(select_variants(args.only), extra_args))
      return 0
    if args.table:
      if args.only or extra_args:
        raise UserError('--table prints every row of its file; it takes no --only or -- args')
      if not workdir_lib.as_path(args.table).exists():
        raise UserError(f'no such file {args.table!r}')
      print(format_table(read_rows(args.table)))
      return 0
    variants = select_variants(args.only)
    if not workdir_lib.as_path(args.out).parent.is_dir() and '://' not in args.out:
      raise UserError(f'the folder of --out {args.out!r} does not exist')
    new_rows = run_sweep(variants, args.out, extra_args, args.timeout, args.skip_done,
                         args.budget)
  except errors.REPORTED as e:
    return errors.report(e)
  failed = [row['variant'] for row in new_rows if 'error' in row]
  if failed:  # Recorded in the file and the table; a failure is a result, not a crash.
    print(f'{len(failed)} of {len(new_rows)} variants failed: {", ".join(failed)}',
          file=sys.stderr)
  print(format_table(read_rows(args.out)))
  return 0


if __name__ == '__main__':
  sys.exit(main())
