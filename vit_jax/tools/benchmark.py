r"""Times a config's real train and eval steps on the device, and its input pipeline on the host.

  python -m vit_jax.tools.benchmark --config configs/vit_b16_cifar10.py --config.image_size=224 \
      --config.model.dtype=bfloat16 --config.batch_size=256 --skip_data

The steps are the trainer's own (`vit_jax.train.step`, jitted with the same shardings and donation),
fed one synthetic batch of uint8 images at the host size that is placed on the device once and
reused, so the figures hold the device's work alone. The input pipeline (decode, augment, batch)
is timed separately through `vit_jax.data.measure_host_throughput`. MFU is the step's model
FLOPs (its matrix products, scan and remat off, `vit_jax.train.flops.model_flops_per_step`) per
device, divided by step time and the device's peak bf16 FLOP/s; it is null where the peak is
unknown (CPU). The last line printed is one JSON object.

`--baseline` also builds a textbook train step on the same model, optimizer (the same optax
transformation) and batch: `jax.value_and_grad` of the softmax cross-entropy, `tx.update` and
`optax.apply_updates`, nothing else (the images already resized and normalised, one-hot
labels), jitted with the same shardings and state donation. Both steps are timed in turns in
this process (ours then textbook, then textbook then ours, ...), and the JSON line adds
`textbook_step_ms`, `step_overhead` (the median over repeats of ours / textbook, each repeat's
pair run back to back), `textbook_compile_s`, `train_recompile_s` (ours compiled again beside
it; each the median of `--compile_repeats` compiles, default `COMPILE_REPEATS`) and
`compile_overhead` (the median over those repeats of ours / textbook,
`compile_overhead_repeats`: all compiled after the process's first compiles, each with jax's
caches cleared, in turns whose order alternates as the steps' do). What our step does
beyond the textbook (uint8 resize and normalisation, the non-finite guard, mixup, EMA, the
metrics) is what the overhead measures.

Compile times are fresh compiles: the command switches jax's persistent compilation cache off
for its own process, whatever JAX_COMPILATION_CACHE_DIR says.
"""

from vit_jax import cpu_allocator
# As train.py starts, before anything else is imported: the steps run as they run there.
cpu_allocator.start(__name__, 'vit-benchmark')

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import os
import statistics
import sys
import time

from absl import flags
from ml_collections import config_flags

from vit_jax.train import cli
from vit_jax import errors
from vit_jax.errors import UserError

COMPILE_REPEATS = 3  # --baseline: pairs of fresh compiles (textbook, ours) for compile_overhead

# jax, TensorFlow and the model are imported inside the functions that use them, after the
# flags are parsed, so a misspelt flag fails in a second (as in train.py).

DEFAULT_NUM_CLASSES = 1000  # An ImageNet head, when no data set says otherwise.


def parse_flags(argv):
  """(config, options) from the command line; a bad flag or override raises UserError.

  The flags are defined here, not at import, so importing this module beside `train.py`
  (which defines its own --config) does not clash in absl's global flag registry.
  """
  config_flag = config_flags.DEFINE_config_file('config', None, 'Path to a config file[:arg].',
                                                lock_config=True)
  options = dict(
      steps=flags.DEFINE_integer('steps', 10, 'Steps per timed repeat.'),
      repeats=flags.DEFINE_integer('repeats', 3, 'Timed repeats; the median is reported.'),
      warmup=flags.DEFINE_integer('warmup', 2, 'Untimed steps after compiling.'),
      num_classes=flags.DEFINE_integer(
          'num_classes', None, "Head width; default: the data set's, else 1000 without data."),
      skip_data=flags.DEFINE_bool('skip_data', False, 'Do not time the input pipeline.'),
      data_only=flags.DEFINE_bool('data_only', False,
                                  'Time the input pipeline alone (a host with no accelerator).'),
      data_batches=flags.DEFINE_integer('data_batches', 20, 'Host batches timed.'),
      baseline=flags.DEFINE_bool(
          'baseline', False, 'Also time a textbook train step (value_and_grad, tx.update, '
          'apply_updates) on the same model, optimizer and batch, in turns with ours.'),
      compile_repeats=flags.DEFINE_integer(
          'compile_repeats', COMPILE_REPEATS, '--baseline: pairs of fresh compiles (textbook, '
          'ours) whose median ratio is compile_overhead.'),
      max_batch=flags.DEFINE_bool(
          'max_batch', False, 'Find the largest batch (batch_size times a power of two) whose '
          "train step fits the device's memory, per XLA's plan, and time that batch."),
      memory_limit_gib=flags.DEFINE_float(
          'memory_limit_gib', None, 'Memory per device for --max_batch; default: 95%% of what '
          'the device reports (CPU reports none).'))
  config = cli.load_config(argv, config_flag, 'python -m vit_jax.tools.benchmark')
  options = {name: holder.value for name, holder in options.items()}
  for name, least in (('steps', 1), ('repeats', 1), ('warmup', 0), ('data_batches', 1),
                      ('compile_repeats', 1)):
    if options[name] < least:
      raise UserError(f'--{name}={options[name]} must be >= {least}')
  if options['memory_limit_gib'] is not None and (not options['max_batch']
                                                  or options['memory_limit_gib'] <= 0):
    raise UserError(f'--memory_limit_gib={options["memory_limit_gib"]} needs --max_batch and '
                    f'a positive size')
  return config, options


def measure_data(config, num_batches):
  """(img/s of the host pipeline, num_classes, error message or None)."""
  from vit_jax import data as data_lib
  try:
    datasets = data_lib.create_datasets(config)
    img_per_sec = data_lib.measure_host_throughput(config, num_batches=num_batches,
                                                   datasets=datasets)
  except UserError as e:
    return None, None, str(e)
  return img_per_sec, datasets.num_classes, None


def time_calls(call, steps, repeats):
  """Median seconds per call of `call()` over `repeats` runs of `steps` calls each."""
  return statistics.median(time_interleaved([call], steps, repeats)[0])


def host_cost_per_call(call, steps):
  """(minor page faults, kernel ms) per call of `call()` over `steps` calls, from the process's
  own counters (None, None where the OS keeps none): on a CPU, what a step pays the kernel for
  memory handed to it afresh. XLA maps a large step's temporaries anew at every call; the
  Ti/16 step at 224 px took 233,000 faults without train.py's huge pages, 835 with them
  (BENCHMARKS.md, "Page faults of a large step")."""
  try:
    import resource  # pylint: disable=g-import-not-at-top
  except ImportError:  # Not on Windows.
    return None, None
  import jax
  before = resource.getrusage(resource.RUSAGE_SELF)
  out = None
  for _ in range(steps):
    out = call()
  jax.block_until_ready(out)
  after = resource.getrusage(resource.RUSAGE_SELF)
  return ((after.ru_minflt - before.ru_minflt) / steps,
          1e3 * (after.ru_stime - before.ru_stime) / steps)


def turn_order(count, repeat):
  """The indices 0..count-1 in the order of turn `repeat`: rotated by one place each repeat
  (for two: 0 1, 1 0, 0 1, ...), so no call always runs first, right after another's block."""
  first = repeat % count
  return list(range(first, count)) + list(range(first))


def time_interleaved(calls, steps, repeats):
  """Seconds per call of each of `calls` in each repeat, timed in turns: each repeat runs `steps`
  calls of each, one after another (in `turn_order`), so a machine's changing load falls on all
  of them. Returns one list of `repeats` figures per call, in `calls`' order."""
  import jax
  per_call = [[] for _ in calls]
  for repeat in range(repeats):
    for index in turn_order(len(calls), repeat):
      call, times = calls[index], per_call[index]
      start = time.perf_counter()
      out = None
      for _ in range(steps):
        out = call()
      jax.block_until_ready(out)
      times.append((time.perf_counter() - start) / steps)
  return per_call


def synthetic_batch(config, size, num_classes, mesh, rng, with_mask=False):
  """A random global batch of `size` uint8 images at the host size (or NaFlex patches), laid out
  on `mesh`."""
  import numpy as np
  from vit_jax.train import build
  from vit_jax.train import sharding
  shapes = build.abstract_batch(config, size, with_mask)
  if 'patches' in shapes:  # NaFlex: every token a real patch (one row of them), the full cost.
    tokens = shapes['patches'].shape[1]
    row = np.stack([np.zeros(tokens, np.int32), np.arange(tokens, dtype=np.int32)], axis=-1)
    batch = {'patches': rng.integers(0, 256, shapes['patches'].shape, np.uint8),
             'positions': np.tile(row, (size, 1, 1)), 'patch_mask': np.ones((size, tokens), bool),
             'grid_hw': np.tile(np.int32([1, tokens]), (size, 1))}
  else:
    batch = {'images': rng.integers(0, 256, shapes['images'].shape, np.uint8)}
  batch['labels'] = rng.integers(0, num_classes, (size,), np.int32)
  if with_mask:
    batch['mask'] = np.ones((size,), np.float32)
  return sharding.global_batch(batch, mesh)


def textbook_step_function(run_parts):
  """The textbook train step on `run_parts`' model and optimizer, jitted like ours.

  `(params, opt_state, images, one_hot_labels, dropout_key) -> (params, opt_state, loss)`:
  `value_and_grad` of the mean softmax cross-entropy, `tx.update`, `optax.apply_updates`;
  images float (batch, size, size, 3) already normalised. The params and optimizer state are
  donated and laid out as the train state's are.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from vit_jax.train import sharding
  model, tx = run_parts.model, run_parts.tx

  def textbook_step(params, opt_state, images, one_hot_labels, dropout_key):
    def loss_fn(params):
      logits = model.apply({'params': params}, images, train=True, rngs={'dropout': dropout_key})
      return optax.softmax_cross_entropy(logits.astype(jnp.float32), one_hot_labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state_shardings = run_parts.state_shardings
  batch_sharding = sharding.batch_sharding(run_parts.mesh)
  replicated = sharding.replicated(run_parts.mesh)
  return jax.jit(
      textbook_step,
      in_shardings=(state_shardings.params, state_shardings.opt_state, batch_sharding,
                    batch_sharding, replicated),
      out_shardings=(state_shardings.params, state_shardings.opt_state, replicated),
      donate_argnums=(0, 1))


def textbook_inputs(config, run_parts, train_batch, num_classes):
  """`(images, one_hot_labels, dropout_key)` for the textbook step, from our uint8 batch: the
  same images resized and normalised once, on the device, with the same layout."""
  import jax
  from vit_jax.data import device as device_data
  from vit_jax.train import sharding
  batch_sharding = sharding.batch_sharding(run_parts.mesh)
  prepare = jax.jit(
      lambda batch: (device_data.preprocess(batch['images'], config.image_size),
                     jax.nn.one_hot(batch['labels'], num_classes)),
      out_shardings=(batch_sharding, batch_sharding))
  images, one_hot_labels = prepare(train_batch)
  dropout_key = jax.device_put(run_parts.init_key, sharding.replicated(run_parts.mesh))
  return images, one_hot_labels, dropout_key


def benchmark_steps(config, num_classes, steps, repeats, warmup, baseline=False,
                    compile_repeats=COMPILE_REPEATS):
  """Compiles and times the trainer's train and eval steps on one synthetic device batch; with
  `baseline`, the textbook step too (`textbook_step_function`), timed in turns with ours."""
  import jax
  import numpy as np
  from vit_jax.train import build
  from vit_jax.train import flops as flops_lib

  run_parts = build.parts(config, num_classes)
  state = run_parts.new_state()

  # Synthetic uint8 batches at the size the host would deliver, put on the device once.
  rng = np.random.default_rng(config.seed)
  eval_batch_size = config.eval_batch_size
  train_batch = synthetic_batch(config, config.batch_size, num_classes, run_parts.mesh, rng)
  eval_batch = synthetic_batch(config, eval_batch_size, num_classes, run_parts.mesh, rng,
                               with_mask=True)

  start = time.perf_counter()
  compiled_train = run_parts.train_fn.lower(state, train_batch).compile()
  train_compile_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled_eval = run_parts.eval_fn.lower(state.params, eval_batch).compile()
  eval_compile_s = time.perf_counter() - start

  holder = {'state': state}  # The train step donates its state: each call feeds the next.

  def train_call():
    holder['state'], metrics = compiled_train(holder['state'], train_batch)
    return metrics

  eval_call = lambda: compiled_eval(holder['state'].params, eval_batch)
  for _ in range(warmup):
    jax.block_until_ready((train_call(), eval_call()))

  textbook = {}
  if baseline:
    textbook_state = run_parts.new_state()  # The same init as ours: the same seed.
    inputs = textbook_inputs(config, run_parts, train_batch, num_classes)
    # The compiles compared are made in the same state of the process: after the first compiles
    # (a process's first pays for what later ones reuse), each with every jax cache cleared, in
    # turns whose order alternates (textbook then ours, ours then textbook, ...): one pair
    # varied by ±15% on a shared 2-core machine.
    def compile_seconds(lower):  # tracing and lowering included, as in train_compile_s
      jax.clear_caches()
      start = time.perf_counter()
      compiled = lower().compile()
      return time.perf_counter() - start, compiled

    lowers = (lambda: textbook_step_function(run_parts).lower(  # 0: the textbook's, first
                  textbook_state.params, textbook_state.opt_state, *inputs),
              lambda: run_parts.train_fn.lower(holder['state'], train_batch))  # 1: ours
    compile_pairs = []
    for repeat in range(compile_repeats):
      pair = {index: compile_seconds(lowers[index]) for index in turn_order(2, repeat)}
      (textbook_compile_s, compiled_textbook), (ours_compile_s, _) = pair[0], pair[1]
      compile_pairs.append((ours_compile_s, textbook_compile_s))
    textbook_holder = [textbook_state.params, textbook_state.opt_state]
    del textbook_state

    def textbook_call():
      textbook_holder[0], textbook_holder[1], loss = compiled_textbook(*textbook_holder, *inputs)
      return loss

    for _ in range(warmup):
      jax.block_until_ready(textbook_call())
    train_times, textbook_times = time_interleaved([train_call, textbook_call], steps, repeats)
    train_s, textbook_s = statistics.median(train_times), statistics.median(textbook_times)
    # Each repeat's ratio compares two blocks run one after the other, under the same load.
    ratios = [ours / theirs for ours, theirs in zip(train_times, textbook_times)]
    compile_ratios = [ours / theirs for ours, theirs in compile_pairs]
    textbook = {
        'textbook_step_ms': 1e3 * textbook_s,
        'step_overhead': statistics.median(ratios),
        'step_overhead_repeats': ratios,
        'textbook_compile_s': statistics.median(theirs for _, theirs in compile_pairs),
        'train_recompile_s': statistics.median(ours for ours, _ in compile_pairs),
        'compile_overhead': statistics.median(compile_ratios),
        'compile_overhead_repeats': compile_ratios,
    }
  else:
    train_s = time_calls(train_call, steps, repeats)
  eval_s = time_calls(eval_call, steps, repeats)
  train_page_faults, train_kernel_ms = host_cost_per_call(train_call, steps)

  # MFU counts the model's FLOPs (scan and accumulation loops unrolled, no remat recompute);
  # XLA's count of the compiled program is reported beside it (one device's share).
  train_flops, eval_flops = flops_lib.model_flops_per_step(config, num_classes, eval_batch_size)
  per_device = lambda value: None if value is None else value / jax.device_count()
  peak_memory, memory_source = _peak_memory(compiled_train)
  return {
      'train_compile_s': train_compile_s,
      'eval_compile_s': eval_compile_s,
      'train_step_ms': 1e3 * train_s,
      'eval_step_ms': 1e3 * eval_s,
      'train_img_per_sec': config.batch_size / train_s,
      'train_page_faults_per_step': train_page_faults,
      'train_kernel_ms_per_step': train_kernel_ms,
      'eval_img_per_sec': eval_batch_size / eval_s,
      'train_flops_per_step': train_flops,
      'eval_flops_per_step': eval_flops,
      'compiled_train_flops_per_device': flops_lib.compiled_flops(compiled_train),
      'compiled_eval_flops_per_device': flops_lib.compiled_flops(compiled_eval),
      'train_mfu': flops_lib.mfu(per_device(train_flops), train_s),
      'eval_mfu': flops_lib.mfu(per_device(eval_flops), eval_s),
      'peak_flops_per_device': flops_lib.peak_flops_per_device(),
      'peak_memory_bytes': peak_memory,
      'peak_memory_source': memory_source,
      **dict.fromkeys(TEXTBOOK_KEYS),
      **textbook,
  }


def _peak_memory(compiled_train):
  """(bytes, where from): the allocator's peak where the backend keeps one, else XLA's plan."""
  import jax
  from vit_jax.tools import memory
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device allocator peak'
  planned = memory.plan_bytes(compiled_train)
  return (None, None) if planned is None else (planned, 'XLA memory plan of the train step')


# XLA's plan leaves out what the runtime adds (cuDNN workspaces, fragmentation): keep 5% free.
MEMORY_HEADROOM = 0.95
MAX_BATCH_CEILING = 65536  # Where the doubling stops, whatever the memory.


def find_max_batch(config, num_classes, memory_limit_gib=None):
  """The largest power-of-two multiple of config.batch_size whose train step fits the device.

  Returns the figures for the JSON line. The limit is `memory_limit_gib` when given, else 95%
  of what the device's allocator may use; a device that reports no limit (CPU) needs the flag.
  """
  import jax
  from vit_jax.tools import memory
  if memory_limit_gib is not None:
    limit = int(memory_limit_gib * 2**30)
  else:
    reported = memory.device_memory_limit()
    if reported is None:
      raise UserError(f'{jax.devices()[0].platform} reports no memory limit; '
                      f'give --max_batch one with --memory_limit_gib')
    limit = int(MEMORY_HEADROOM * reported)
  found, tried = memory.largest_fitting_batch(
      memory.train_step_planner(config, num_classes), limit,
      start=config.batch_size, multiple=jax.device_count() * config.accum_steps,
      ceiling=MAX_BATCH_CEILING)
  if found is None:
    raise UserError(f'no batch fits in {limit / 2**30:.2f} GiB: batch '
                    f'{tried[-1][0]} plans {tried[-1][1] / 2**30:.2f} GiB per device')
  return {'max_batch_size': found, 'memory_limit_bytes': limit,
          'max_batch_search': [list(entry) for entry in tried]}



TEXTBOOK_KEYS = ('textbook_step_ms', 'step_overhead', 'step_overhead_repeats',
                 'textbook_compile_s', 'train_recompile_s', 'compile_overhead',
                 'compile_overhead_repeats')
STEP_KEYS = (
    'train_compile_s', 'eval_compile_s', 'train_step_ms', 'eval_step_ms', 'train_img_per_sec',
    'train_page_faults_per_step', 'train_kernel_ms_per_step',
    'eval_img_per_sec', 'train_flops_per_step', 'eval_flops_per_step',
    'compiled_train_flops_per_device', 'compiled_eval_flops_per_device', 'train_mfu', 'eval_mfu',
    'peak_flops_per_device', 'peak_memory_bytes', 'peak_memory_source') + TEXTBOOK_KEYS


def run(config, *, num_classes=None, steps=10, repeats=3, warmup=2, skip_data=False,
        data_only=False, data_batches=20, max_batch=False, memory_limit_gib=None,
        baseline=False, compile_repeats=COMPILE_REPEATS):
  """All the figures as one dict (the JSON line); `None` where a figure is not available."""
  if data_only and skip_data:
    raise UserError('--data_only and --skip_data leave nothing to time; pass one of them')
  if data_only and max_batch:
    raise UserError('--max_batch searches the train step, which --data_only does not run')
  if data_only and baseline:
    raise UserError('--baseline compares train steps, which --data_only does not run')
  import flax
  import jax
  import jaxlib
  from vit_jax.train import config as config_lib
  from vit_jax.train import flops as flops_lib
  from vit_jax import models
  requested, config = config, config_lib.resolve(config, jax.device_count())
  data_img_per_sec, data_classes, data_error = None, None, 'skipped (--skip_data)'
  if not skip_data:
    data_img_per_sec, data_classes, data_error = measure_data(config, data_batches)
  num_classes = num_classes or data_classes or DEFAULT_NUM_CLASSES
  search = {}
  if max_batch:
    search = find_max_batch(config, num_classes, memory_limit_gib)
    requested = requested.copy_and_resolve_references()
    with requested.unlocked():
      requested.batch_size = search['max_batch_size']
    config = config_lib.resolve(requested, jax.device_count())
  device = jax.devices()[0]
  results = {
      'date': time.strftime('%Y-%m-%d'),
      'device': device.device_kind,
      'platform': device.platform,
      'device_count': jax.device_count(),
      'jax_version': jax.__version__,
      'jaxlib_version': jaxlib.__version__,
      'flax_version': flax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      # Whether a compile could have come from jax's persistent cache (the command line turns
      # it off; a caller of `run` may not have).
      'persistent_compilation_cache': bool(jax.config.jax_enable_compilation_cache
                                           and jax.config.jax_compilation_cache_dir),
      'model_name': config.model_name,
      # A distilling config's steps are timed for the student alone: the benchmark reads no
      # teacher file, so the teacher's forward (in the real step) is not in these figures.
      'distill_teacher_included': False if config.distill.teacher else None,
      'image_size': config.image_size,
      'host_image_size': config.data.host_image_size,
      'batch_size': config.batch_size,
      'eval_batch_size': config.eval_batch_size,
      'num_classes': num_classes,
      'model_overrides': {k: v for k, v in config.model.to_dict().items() if v is not None},
  }
  results['analytic_forward_flops_per_image'] = flops_lib.analytic_vit_flops(
      models.model_kwargs(config.model_name, num_classes, **config.model.to_dict()),
      config.image_size)
  if data_only:
    results.update(dict.fromkeys(STEP_KEYS))
  else:
    results.update(benchmark_steps(config, num_classes, steps, repeats, warmup, baseline,
                                   compile_repeats))
  results.update(search)
  results['data_img_per_sec'] = data_img_per_sec
  results['data_error'] = data_error
  return results


def _fmt(value, unit='', scale=1.0):
  if value is None:
    return 'n/a'
  value /= scale
  return f'{value:,.0f}{unit}' if abs(value) >= 1000 else f'{value:.4g}{unit}'


def _listed(ratios):
  return ', '.join(f'{ratio:.3f}' for ratio in ratios)


def format_table(results):
  """The human-readable summary printed above the JSON line."""
  r = results
  data = (f'{_fmt(r["data_img_per_sec"])} img/s' if r['data_img_per_sec'] is not None
          else f'n/a ({r["data_error"]})')
  rows = [
      ('device', f'{r["device_count"]} x {r["device"]} ({r["platform"]})'),
      ('model', f'{r["model_name"]} at {r["image_size"]} px (host {r["host_image_size"]} px), '
                f'{r["num_classes"]} classes'),
      ('batch (train / eval)', f'{r["batch_size"]} / {r["eval_batch_size"]}'),
  ]
  if r['train_step_ms'] is not None:
    rows += [
        ('compile train / eval', f'{r["train_compile_s"]:.1f} s / {r["eval_compile_s"]:.1f} s'),
        ('train step', f'{r["train_step_ms"]:.1f} ms, {_fmt(r["train_img_per_sec"])} img/s'),
        ('eval step', f'{r["eval_step_ms"]:.1f} ms, {_fmt(r["eval_img_per_sec"])} img/s'),
        ('model FLOPs train / eval', f'{_fmt(r["train_flops_per_step"], " G", 1e9)} / '
                                     f'{_fmt(r["eval_flops_per_step"], " G", 1e9)} per step '
                                     '(matrix products, scan/remat/accumulation off)'),
        ('compiled FLOPs train / eval',
         f'{_fmt(r["compiled_train_flops_per_device"], " G", 1e9)} / '
         f'{_fmt(r["compiled_eval_flops_per_device"], " G", 1e9)} per device'),
        ('analytic forward', _fmt(r['analytic_forward_flops_per_image'], ' GFLOPs/img', 1e9)),
        ('peak bf16', _fmt(r['peak_flops_per_device'], ' TFLOP/s', 1e12)),
        ('MFU train / eval', f'{_fmt(r["train_mfu"], "%", 0.01)} / '
                             f'{_fmt(r["eval_mfu"], "%", 0.01)}'),
        ('peak memory', _fmt(r['peak_memory_bytes'], ' GiB', 2 ** 30)
         + (f' ({r["peak_memory_source"]})' if r['peak_memory_source'] else '')),
    ]
  if r.get('step_overhead') is not None:
    rows += [
        ('textbook train step', f'{r["textbook_step_ms"]:.1f} ms (value_and_grad + tx.update '
                                '+ apply_updates, same model, optimizer and batch)'),
        ('step overhead', f'{r["step_overhead"]:.3f}x (ours / textbook: the median of '
                          f'{_listed(r["step_overhead_repeats"])}, repeats in turns)'),
        ('textbook compile', f'{r["textbook_compile_s"]:.1f} s (ours again: '
                             f'{r["train_recompile_s"]:.1f} s, both after clearing the caches)'),
        ('compile overhead', f'{r["compile_overhead"]:.3f}x (our train step / textbook: the '
                             f'median of {_listed(r["compile_overhead_repeats"])})'),
    ]
  if r.get('max_batch_size'):
    rows.append(('largest batch that fits', f'{r["max_batch_size"]} (XLA plan within '
                 f'{r["memory_limit_bytes"] / 2**30:.2f} GiB per device; tried '
                 + ', '.join(f'{batch}: {planned / 2**30:.3g} GiB' + ('' if fits else ' (too big)')
                             for batch, planned, fits in r['max_batch_search']) + ')'))
  rows.append(('input pipeline', f'{data} on {os.cpu_count()} host cores'))
  width = max(len(name) for name, _ in rows)
  return '\n'.join(f'{name:<{width}}  {value}' for name, value in rows)


def main(argv):
  """Benchmarks the config `argv` names; prints the table, then the results as one JSON line."""
  config, options = parse_flags(argv)
  cli.apply_xla_flags(config)  # Before the backend starts: XLA reads XLA_FLAGS once.
  import jax
  # Compile time is a figure here, not a cost to save: no executable from an earlier run's
  # cache. Set before anything compiles (jax decides once per process whether to use it).
  jax.config.update('jax_enable_compilation_cache', False)
  results = run(config, **options)
  print(format_table(results))
  print(json.dumps(results), flush=True)


def run_command(argv=None):
  """`main` as a command: its exit status (see vit_jax.errors)."""
  return errors.exit_status_of(main, sys.argv if argv is None else argv)


if __name__ == '__main__':
  sys.exit(run_command())
