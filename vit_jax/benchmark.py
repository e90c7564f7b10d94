r"""Times a config's real train and eval steps on the device, and its input pipeline on the host.

  python -m vit_jax.benchmark --config configs/vit_b16_cifar10.py --config.image_size=224 \
      --config.model.dtype=bfloat16 --config.batch_size=256 --skip_data

The steps are the trainer's own (`vit_jax.step`, jitted with the same shardings and donation),
fed one synthetic batch of uint8 images at the host size that is placed on the device once and
reused, so the figures hold the device's work alone. The input pipeline (decode, augment, batch)
is timed separately through `vit_jax.data.measure_host_throughput`. MFU is the step's model
FLOPs (XLA's cost analysis with scan and remat off, `vit_jax.flops.model_flops_per_step`) per
device, divided by step time and the device's peak bf16 FLOP/s; it is null where the peak is
unknown (CPU). The last line printed is one JSON object.
"""

import functools
import json
import os
import statistics
import sys
import time

from absl import flags
from ml_collections import config_flags

from vit_jax.errors import UserError

_FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file[:arg].',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 10, 'Steps per timed repeat.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repeats; the median is reported.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compiling.')
_NUM_CLASSES = flags.DEFINE_integer(
    'num_classes', None, 'Head width; default: the data set\'s, or 1000 when it is not built.')
_SKIP_DATA = flags.DEFINE_bool('skip_data', False, 'Do not time the input pipeline.')
_DATA_BATCHES = flags.DEFINE_integer('data_batches', 20, 'Host batches timed.')

DEFAULT_NUM_CLASSES = 1000  # An ImageNet head, when no data set says otherwise.


def parse_flags(argv):
  """Parses flags and the config; a bad flag or override raises UserError with one line."""
  if not any(arg == '--config' or arg.startswith('--config=') for arg in argv):
    raise UserError('--config is required, e.g. python -m vit_jax.benchmark '
                    '--config configs/quickstart.py')
  try:
    _FLAGS(argv)
    config = _CONFIG.value  # Loads the file and applies the overrides.
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, (AttributeError, KeyError)):
      message = f'unknown config key {message} (check the spelling against configs/common.py)'
    raise UserError(message) from None
  except (FileNotFoundError, ImportError, SyntaxError) as e:
    raise UserError(f'cannot load config: {e}') from None
  for name, value, least in (('steps', _STEPS.value, 1), ('repeats', _REPEATS.value, 1),
                             ('warmup', _WARMUP.value, 0),
                             ('data_batches', _DATA_BATCHES.value, 1)):
    if value < least:
      raise UserError(f'--{name}={value} must be >= {least}')
  return config


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
  import jax
  per_call = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = None
    for _ in range(steps):
      out = call()
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - start) / steps)
  return statistics.median(per_call)


def benchmark_steps(config, num_classes, steps, repeats, warmup):
  """Compiles and times the trainer's train and eval steps on one synthetic device batch."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from vit_jax import flops as flops_lib
  from vit_jax import models, optim, sharding
  from vit_jax import step as step_lib
  from vit_jax import trainer

  trainer.validate_config(config, jax.device_count())
  mesh = sharding.create_mesh(config.mesh)
  model = models.create_model(config.model_name, num_classes, **config.model.to_dict())
  tx, schedule = optim.create_optimizer(config)

  def init_state(key):
    images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    params = model.init(key, images, train=False)['params']
    return step_lib.create_train_state(params, tx, config.optimizer.ema_decay)

  init_key = jax.random.key(config.seed)
  state_shardings = sharding.state_shardings(mesh, jax.eval_shape(init_state, init_key))
  state = jax.jit(init_state, out_shardings=state_shardings)(init_key)

  # Synthetic uint8 batches at the size the host would deliver, put on the device once.
  host_size = config.data.host_image_size or config.image_size
  rng = np.random.default_rng(config.seed)
  eval_batch_size = config.eval_batch_size or config.batch_size

  def synthetic_batch(size, with_mask):
    batch = {'images': rng.integers(0, 256, (size, host_size, host_size, 3), np.uint8),
             'labels': rng.integers(0, num_classes, (size,), np.int32)}
    if with_mask:
      batch['mask'] = np.ones((size,), np.float32)
    return sharding.global_batch(batch, mesh)

  train_batch = synthetic_batch(config.batch_size, with_mask=False)
  eval_batch = synthetic_batch(eval_batch_size, with_mask=True)

  settings = step_lib.StepSettings(
      image_size=config.image_size, num_classes=num_classes, seed=config.seed,
      accum_steps=config.accum_steps, mixup_alpha=config.aug.mixup_alpha,
      cutmix_alpha=config.aug.cutmix_alpha, label_smoothing=config.aug.label_smoothing,
      ema_decay=config.optimizer.ema_decay)
  batch_sharding = sharding.batch_sharding(mesh)
  start = time.perf_counter()
  compiled_train = jax.jit(
      functools.partial(step_lib.train_step, model=model, tx=tx, schedule=schedule,
                        settings=settings),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,)).lower(state, train_batch).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled_eval = jax.jit(
      functools.partial(step_lib.eval_step, model=model, image_size=config.image_size),
      in_shardings=(state_shardings.params, batch_sharding),
      out_shardings=sharding.replicated(mesh)).lower(state.params, eval_batch).compile()
  eval_compile_s = time.perf_counter() - start

  holder = {'state': state}  # The train step donates its state: each call feeds the next.

  def train_call():
    holder['state'], metrics = compiled_train(holder['state'], train_batch)
    return metrics

  eval_call = lambda: compiled_eval(holder['state'].params, eval_batch)
  for _ in range(warmup):
    jax.block_until_ready((train_call(), eval_call()))
  train_s = time_calls(train_call, steps, repeats)
  eval_s = time_calls(eval_call, steps, repeats)

  # MFU counts the model's FLOPs (scan and accumulation loops unrolled, no remat recompute);
  # XLA's count of the compiled program is reported beside it (one device's share).
  train_flops, eval_flops = flops_lib.model_flops_per_step(config, num_classes, eval_batch_size)
  per_device = lambda value: None if value is None else value / jax.device_count()
  peak_memory, memory_source = _peak_memory(compiled_train)
  model_kwargs = models.model_kwargs(config.model_name, num_classes, **config.model.to_dict())
  return {
      'compile_s': compile_s,
      'eval_compile_s': eval_compile_s,
      'train_step_ms': 1e3 * train_s,
      'eval_step_ms': 1e3 * eval_s,
      'train_img_per_sec': config.batch_size / train_s,
      'eval_img_per_sec': eval_batch_size / eval_s,
      'train_flops_per_step': train_flops,
      'eval_flops_per_step': eval_flops,
      'compiled_train_flops_per_device': flops_lib.compiled_flops(compiled_train),
      'compiled_eval_flops_per_device': flops_lib.compiled_flops(compiled_eval),
      'analytic_forward_flops_per_image': flops_lib.analytic_vit_flops(
          model_kwargs, config.image_size),
      'train_mfu': flops_lib.mfu(per_device(train_flops), train_s),
      'eval_mfu': flops_lib.mfu(per_device(eval_flops), eval_s),
      'peak_flops_per_device': flops_lib.peak_flops_per_device(),
      'peak_memory_bytes': peak_memory,
      'peak_memory_source': memory_source,
  }


def _peak_memory(compiled_train):
  """(bytes, where from): the allocator's peak where the backend keeps one, else XLA's plan."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device allocator peak'
  try:
    plan = compiled_train.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # Not every backend implements it.
    plan = None
  if plan is None:
    return None, None
  total = (plan.argument_size_in_bytes + plan.output_size_in_bytes
           - plan.alias_size_in_bytes + plan.temp_size_in_bytes)
  return int(total), 'XLA memory plan of the train step'


def run(config, *, num_classes=None, steps=10, repeats=3, warmup=2, skip_data=False,
        data_batches=20):
  """All the figures as one dict (the JSON line); `None` where a figure is not available."""
  import flax
  import jax
  data_img_per_sec, data_classes, data_error = None, None, 'skipped (--skip_data)'
  if not skip_data:
    data_img_per_sec, data_classes, data_error = measure_data(config, data_batches)
  num_classes = num_classes or data_classes or DEFAULT_NUM_CLASSES
  device = jax.devices()[0]
  results = {
      'device': device.device_kind,
      'platform': device.platform,
      'device_count': jax.device_count(),
      'jax_version': jax.__version__,
      'flax_version': flax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'model_name': config.model_name,
      'image_size': config.image_size,
      'host_image_size': config.data.host_image_size or config.image_size,
      'batch_size': config.batch_size,
      'eval_batch_size': config.eval_batch_size or config.batch_size,
      'num_classes': num_classes,
      'model_overrides': {k: v for k, v in config.model.to_dict().items() if v is not None},
  }
  results.update(benchmark_steps(config, num_classes, steps, repeats, warmup))
  results['data_img_per_sec'] = data_img_per_sec
  results['data_error'] = data_error
  return results


def _fmt(value, unit='', scale=1.0):
  return 'n/a' if value is None else f'{value / scale:,.4g}{unit}'


def format_table(results):
  """The human-readable summary printed above the JSON line."""
  data = (_fmt(results['data_img_per_sec']) if results['data_img_per_sec'] is not None
          else f'n/a ({results["data_error"]})')
  analytic = results['analytic_forward_flops_per_image']
  rows = [
      ('device', f'{results["device_count"]} x {results["device"]} ({results["platform"]})'),
      ('model', f'{results["model_name"]} at {results["image_size"]} px (host '
                f'{results["host_image_size"]} px), {results["num_classes"]} classes'),
      ('batch (train / eval)', f'{results["batch_size"]} / {results["eval_batch_size"]}'),
      ('compile train / eval', f'{results["compile_s"]:.1f} s / {results["eval_compile_s"]:.1f} s'),
      ('train step', f'{results["train_step_ms"]:.1f} ms, '
                     f'{results["train_img_per_sec"]:,.1f} img/s'),
      ('eval step', f'{results["eval_step_ms"]:.1f} ms, {results["eval_img_per_sec"]:,.1f} img/s'),
      ('model FLOPs train / eval', f'{_fmt(results["train_flops_per_step"], " G", 1e9)} / '
                                   f'{_fmt(results["eval_flops_per_step"], " G", 1e9)} per step'
                                   ' (XLA, scan/remat off)'),
      ('compiled FLOPs train / eval',
       f'{_fmt(results["compiled_train_flops_per_device"], " G", 1e9)} / '
       f'{_fmt(results["compiled_eval_flops_per_device"], " G", 1e9)} per device'),
      ('analytic forward', _fmt(analytic, ' GFLOPs/img', 1e9)),
      ('peak bf16', _fmt(results['peak_flops_per_device'], ' TFLOP/s', 1e12)),
      ('MFU train / eval', f'{_fmt(results["train_mfu"], "%", 0.01)} / '
                           f'{_fmt(results["eval_mfu"], "%", 0.01)}'),
      ('peak memory', _fmt(results['peak_memory_bytes'], ' GiB', 2 ** 30)
       + (f' ({results["peak_memory_source"]})' if results['peak_memory_source'] else '')),
      ('input pipeline', f'{data} img/s on {os.cpu_count()} host cores'),
  ]
  width = max(len(name) for name, _ in rows)
  return '\n'.join(f'{name:<{width}}  {value}' for name, value in rows)


def main(argv):
  config = parse_flags(argv)
  results = run(config, num_classes=_NUM_CLASSES.value, steps=_STEPS.value,
                repeats=_REPEATS.value, warmup=_WARMUP.value, skip_data=_SKIP_DATA.value,
                data_batches=_DATA_BATCHES.value)
  print(format_table(results))
  print(json.dumps(results), flush=True)


if __name__ == '__main__':
  try:
    main(sys.argv)
  except UserError as e:
    print(f'error: {(str(e).strip().splitlines() or ["UserError"])[0]}', file=sys.stderr)
    sys.exit(2)
