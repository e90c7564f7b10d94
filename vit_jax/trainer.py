"""The training loop: `train_and_evaluate(config, workdir)`.

Read top to bottom: check the config and the workdir, build data → model → optimizer → state
(restored from the workdir's checkpoints, or initialised, or loaded from a pretrained file),
compile the two steps once, then loop: get batch, step, maybe log, maybe eval, maybe save.
Nothing in the loop waits on the device except logging, eval and saving, and those fetch
values that are already done while the next step runs.
"""

import itertools
import json
import os
import queue
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import build
from vit_jax import checkpoint as checkpoint_lib
from vit_jax import data as data_lib
from vit_jax import flops as flops_lib
from vit_jax import metrics as metrics_lib
from vit_jax import models
from vit_jax import optim
from vit_jax import sharding
from vit_jax import step as step_lib
from vit_jax.errors import UserError

PRNG_IMPLS = ('threefry2x32', 'rbg', 'unsafe_rbg')

# Keys that may change between a run and its resumption: they change when and how much is
# logged or kept, never what is computed.
RESUMABLE_CHANGES = (
    'log_every', 'eval_every', 'checkpoint_every', 'keep_checkpoints', 'plot_every_eval',
    'data.prefetch_batches', 'data.data_dir', 'data.download', 'pretrained.url', 'xla_flags',
)


class NonFiniteLoss(UserError):
  """The loss or a gradient became NaN or Inf and the config says to stop."""


def validate_config(config, device_count):
  """Checks what can be checked before anything is built; raises UserError on the first fault."""
  if config.total_steps <= 0:
    raise UserError(f'total_steps={config.total_steps} must be a positive number of steps')
  if config.batch_size <= 0:
    raise UserError(f'batch_size={config.batch_size} must be positive')
  if config.batch_size % device_count:
    raise UserError(f'batch_size={config.batch_size} is not divisible by the '
                    f'{device_count} devices')
  if config.accum_steps <= 0 or config.batch_size % (config.accum_steps * device_count):
    raise UserError(f'batch_size={config.batch_size} must divide into accum_steps='
                    f'{config.accum_steps} micro-batches, each divisible by the '
                    f'{device_count} devices')
  eval_batch_size = config.eval_batch_size or config.batch_size
  if eval_batch_size <= 0 or eval_batch_size % device_count:
    raise UserError(f'eval_batch_size={eval_batch_size} is not divisible by the '
                    f'{device_count} devices')
  for key in ('log_every', 'eval_every', 'checkpoint_every'):
    if config[key] < 0:
      raise UserError(f'{key}={config[key]} must be >= 0 (0: only at the end)')
  if config.log_every == 0:
    raise UserError('log_every=0: must be a positive number of steps')
  if config.keep_checkpoints <= 0:
    raise UserError(f'keep_checkpoints={config.keep_checkpoints} must be >= 1')
  if config.optimizer.nan_policy not in ('stop', 'skip'):
    raise UserError(f'optimizer.nan_policy={config.optimizer.nan_policy!r}; valid: stop, skip')
  if config.image_size <= 0:
    raise UserError(f'image_size={config.image_size} must be positive')
  if config.prng_impl not in PRNG_IMPLS:
    raise UserError(f'prng_impl={config.prng_impl!r}; valid: {", ".join(PRNG_IMPLS)}')
  # The model, optimizer and pretrained settings fail here, before the (slow) data is loaded.
  _validate_model(config)
  optim.create_optimizer(config)
  _validate_pretrained(config.pretrained)


def _validate_model(config):
  """The model name and overrides, and that its patch divides config.image_size."""
  fields = models.model_kwargs(config.model_name, None, **config.model.to_dict())
  if fields.get('resnet_layers'):
    return  # A hybrid's patches tile the ResNet map; the model checks that when it is built.
  patch_h, patch_w = fields['patch_size']
  if config.image_size % patch_h or config.image_size % patch_w:
    raise UserError(f'patch size {patch_h}x{patch_w} of {config.model_name} does not divide '
                    f'the image size {config.image_size}x{config.image_size}; set image_size '
                    f'to a multiple of {patch_h}')


def _validate_pretrained(pretrained):
  """An unknown pretrained format. (The file is checked only when it is needed: a resumed run
  never reads it.)"""
  if not pretrained.path:
    return
  from vit_jax import convert  # Only fine-tuning needs the converters.
  if pretrained.format not in ('auto',) + convert.READ_FORMATS:
    raise UserError(f'pretrained.format={pretrained.format!r} is unknown; valid: auto, '
                    f'{", ".join(convert.READ_FORMATS)}')


def _flatten(config_dict, prefix=''):
  flat = {}
  for key, value in config_dict.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_differences(old, new):
  """`{key: (old, new)}` for the computation-changing keys that differ between two configs."""
  old_flat, new_flat = _flatten(old), _flatten(new)
  return {key: (old_flat.get(key), new_flat.get(key))
          for key in sorted(set(old_flat) | set(new_flat))
          if key not in RESUMABLE_CHANGES and old_flat.get(key) != new_flat.get(key)}


def check_workdir(workdir, config_json, allow_config_change):
  """Refuses a workdir that cannot be written, or that holds a run of a different config."""
  parent = workdir
  while not os.path.exists(parent):
    parent = os.path.dirname(parent) or '.'
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise UserError(f'workdir {workdir} cannot be written ({parent} is not a writable folder)')
  saved_path = os.path.join(workdir, 'config.json')
  if os.path.exists(saved_path) and not allow_config_change:
    with open(saved_path) as f:
      saved = json.load(f)
    differences = config_differences(saved, json.loads(config_json))
    if differences:
      listed = ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in list(differences.items())[:5])
      raise UserError(f'workdir {workdir} holds a run of a different config ({listed}); use a '
                      f'new --workdir, or pass --allow_config_change to resume it anyway')


def _load_pretrained(config, init_params, model_kwargs, log):
  """The pretrained params for fine-tuning, head re-initialised and posemb resized."""
  from vit_jax import convert  # Only fine-tuning needs the converters.
  path = config.pretrained.path
  if not os.path.exists(path):
    if config.pretrained.url:
      _download(config.pretrained.url, path, log)
    else:
      raise UserError(f'pretrained checkpoint {path} does not exist')
  log(f'loading pretrained weights from {path}')
  return convert.load_for_finetune(path, init_params, model_kwargs,
                                   format=config.pretrained.format)


def _download(url, path, log, timeout_s=10):
  """Fetches `url` to `path`; offline, fails at once saying where to put the file."""
  import urllib.request
  log(f'{path} is absent: downloading {url}')
  partial = path + '.partial'
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(partial, 'wb') as f:
      while chunk := response.read(1 << 20):
        f.write(chunk)
  except (OSError, ValueError) as e:
    if os.path.exists(partial):
      os.remove(partial)
    raise UserError(f'pretrained checkpoint {path} is absent and {url} could not be fetched '
                    f'({type(e).__name__}); download it elsewhere and put it at {path}, or set '
                    f'--config.pretrained.path') from None
  os.replace(partial, path)


def _device_prefetch(host_batches, mesh, depth):
  """Moves host batches onto the mesh in a background thread, `depth` batches ahead."""
  if depth <= 0:
    yield from (sharding.global_batch(b, mesh) for b in host_batches)
    return
  ready = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def producer():
    try:
      for host_batch in host_batches:
        if stop.is_set():
          return
        ready.put(sharding.global_batch(host_batch, mesh))
    except Exception as e:  # pylint: disable=broad-except  # Re-raised in the loop's thread.
      ready.put(e)

  thread = threading.Thread(target=producer, daemon=True)
  thread.start()
  try:
    while True:
      item = ready.get()
      if isinstance(item, Exception):
        raise item
      yield item
  finally:
    stop.set()


class _StopRequest:
  """SIGTERM or Ctrl-C: ask the loop to save and exit; a second Ctrl-C exits at once."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def install(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signal_name is not None and signum == signal.SIGINT:
      os._exit(130)  # A second Ctrl-C: the user wants out now.
    self.signal_name = signal.Signals(signum).name

  def uninstall(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _evaluate(eval_fn, params, datasets, mesh, num_classes):
  """Test-split metrics: loss, top-1 and (with more than 5 classes) top-5 accuracy."""
  sums = None
  for host_batch in datasets.eval_batches():
    batch_sums = eval_fn(params, sharding.global_batch(host_batch, mesh))
    sums = batch_sums if sums is None else jax.tree_util.tree_map(jnp.add, sums, batch_sums)
  sums = jax.device_get(sums)
  count = max(float(sums['count']), 1.0)
  results = {'test_loss': sums['loss_sum'] / count, 'test_accuracy': sums['top1_sum'] / count}
  if num_classes > 5:
    results['test_top5_accuracy'] = sums['top5_sum'] / count
  return {name: float(value) for name, value in results.items()}


def restore_train_state(workdir, step=None):
  """The full `TrainState` (params, optimizer state, EMA, counters) of a workdir's checkpoint.

  For inspecting or comparing runs; `vit_jax.restore` is the lighter params-only path.
  """
  config = checkpoint_lib.read_config(workdir)
  num_classes = len(checkpoint_lib.read_class_names(workdir))
  abstract_state = build.parts(config, num_classes).abstract_state
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  try:
    if step is None:
      state, _ = checkpointer.restore_latest(abstract_state)
    else:
      state = checkpointer.restore(step, abstract_state)
  finally:
    checkpointer.close()
  if state is None:
    raise UserError(f'no readable checkpoint in {checkpointer.directory}')
  return state


def train_and_evaluate(config, workdir, *, stop_at_step=None, allow_config_change=False,
                       log=print):
  """Trains `config` in `workdir`, resuming from its checkpoints; returns the final metrics.

  `stop_at_step`: save and return after that step (as a SIGTERM would), for staged runs.
  """
  is_main = jax.process_index() == 0
  log = log if is_main else (lambda *a, **k: None)
  validate_config(config, jax.device_count())
  config_json = config.to_json_best_effort(indent=2, sort_keys=True)
  check_workdir(workdir, config_json, allow_config_change)

  # Data → model → optimizer, each of which checks its part of the config.
  mesh = sharding.create_mesh(config.mesh)
  datasets = data_lib.create_datasets(config, process_index=jax.process_index(),
                                      process_count=jax.process_count())
  num_classes = datasets.num_classes
  model_kwargs = models.model_kwargs(config.model_name, num_classes, **config.model.to_dict())
  run = build.parts(config, num_classes, mesh)

  # The state: resumed from the workdir, else fresh (from a pretrained file when configured).
  # A pretrained file is read before anything is written, so a bad one leaves the workdir as
  # it was.
  pretrained_params = None
  if config.pretrained.path and not checkpoint_lib.has_checkpoints(workdir):
    init_params = run.new_state().params
    pretrained_params = _load_pretrained(config, jax.device_get(init_params), model_kwargs, log)
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  state, restored_step = checkpointer.restore_latest(run.abstract_state, log=log)
  if state is not None:
    log(f'resuming from the checkpoint at step {restored_step} in {checkpointer.directory}')
  elif pretrained_params is not None:
    state = jax.jit(lambda p: step_lib.create_train_state(p, run.tx, config.optimizer.ema_decay),
                    out_shardings=run.state_shardings)(pretrained_params)
  else:
    state = run.new_state()
  log(sharding.describe(state.params))
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config_json)
    with open(os.path.join(workdir, 'class_names.json'), 'w') as f:
      json.dump(list(datasets.class_names), f)

  # Compile both steps once, ahead of time: the loop can never trigger a recompile.
  train_fn, eval_fn = run.train_fn, run.eval_fn

  start_step = int(jax.device_get(state.step))
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  progress = metrics_lib.Progress(config.total_steps, enabled=is_main)
  stop_request = _StopRequest().install()
  batches = _device_prefetch(datasets.train_batches(start_step), mesh,
                             config.data.prefetch_batches)
  eval_params = lambda s: s.ema_params if s.ema_params is not None else s.params
  final_metrics = {}
  try:
    first_batch = next(batches)
    compile_start = time.perf_counter()
    compiled_train = train_fn.lower(state, first_batch).compile()
    compiled_eval = None  # Compiled at the first eval, when its batch shape is known.
    # Model FLOPs (not XLA's count of this compiled step, which counts a scanned layer or an
    # accumulation loop once and a remat recomputation as work): one device's share.
    flops_per_step = None
    if flops_lib.peak_flops_per_device() is not None:
      flops_per_step = flops_lib.model_flops_per_step(config, num_classes)[0] / jax.device_count()
    log(f'workdir {workdir}: training {config.model_name} for steps {start_step}..'
        f'{config.total_steps} on {jax.device_count()} {jax.devices()[0].platform} device(s) '
        f'(mesh {dict(mesh.shape)})')

    train_log = _TrainLog(config, flops_per_step, writer, progress, checkpointer)
    batches = itertools.chain([first_batch], batches)
    for step in range(start_step + 1, config.total_steps + 1):
      state, step_metrics = compiled_train(state, next(batches))
      if step == start_step + 1:
        jax.block_until_ready(step_metrics)
        progress.compiled(time.perf_counter() - compile_start)
        train_log.start_clock(step)
      train_log.flush()  # The device is busy with `step`: fetching the last log's values is free.

      is_last = step == config.total_steps
      stopping = stop_request.signal_name is not None or step == stop_at_step
      if step % config.log_every == 0 or is_last:
        train_log.hold(step, step_metrics)

      if (config.eval_every and step % config.eval_every == 0) or is_last:
        _check_finite({'first_nonfinite_step': state.first_nonfinite_step}, config,
                      checkpointer)
        if compiled_eval is None:
          eval_batch = next(iter(datasets.eval_batches()))
          compiled_eval = eval_fn.lower(
              eval_params(state), sharding.global_batch(eval_batch, mesh)).compile()
        eval_metrics = _evaluate(compiled_eval, eval_params(state), datasets, mesh, num_classes)
        writer.write(step, eval_metrics)
        final_metrics = dict(eval_metrics, step=step)
        log(f'step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in eval_metrics.items()))
        if is_main and config.plot_every_eval:
          _refresh_plot(workdir)

      if (config.checkpoint_every and step % config.checkpoint_every == 0) or is_last \
          or stopping:
        _check_finite({'first_nonfinite_step': state.first_nonfinite_step}, config,
                      checkpointer)
        checkpointer.save(state, force=True)

      if stopping and not is_last:
        reason = stop_request.signal_name or f'--stop_at_step={stop_at_step}'
        train_log.flush()
        checkpointer.wait()
        log(f'{reason}: saved a checkpoint at step {step} in {checkpointer.directory}; rerun '
            f'the same command to resume')
        return {'step': step, 'stopped': True}

    train_log.flush()
    checkpointer.wait()
    if is_main:
      with open(os.path.join(workdir, 'final_metrics.json'), 'w') as f:
        json.dump(final_metrics, f, indent=2)
    return final_metrics
  finally:
    stop_request.uninstall()
    writer.close()
    checkpointer.close()


class _TrainLog:
  """Train metrics of a log step, held on the device and fetched after the next step is
  dispatched, so the host never makes the device wait; img/s and MFU over the interval."""

  def __init__(self, config, flops_per_step, writer, progress, checkpointer):
    self._config, self._flops_per_step = config, flops_per_step
    self._writer, self._progress, self._checkpointer = writer, progress, checkpointer
    self._held = None  # (step, metrics on device)
    self._clock = None  # (time, step) of the last fetch

  def start_clock(self, step):
    """Rates are measured from here: after `step`, the first (compiling) one, has finished."""
    self._clock = (time.perf_counter(), step)

  def hold(self, step, metrics):
    self._held = (step, metrics)

  def flush(self):
    """Fetches and writes the held metrics (if any); stops the run on a non-finite loss."""
    if self._held is None:
      return
    step, metrics = self._held
    self._held = None
    fetched = jax.device_get(metrics)
    _check_finite(fetched, self._config, self._checkpointer)
    scalars = {name: float(value) for name, value in fetched.items()
               if name != 'first_nonfinite_step'}
    now = time.perf_counter()
    clock_time, clock_step = self._clock
    steps_per_sec = None
    if step > clock_step:  # No interval to measure before the first step has finished.
      seconds_per_step = (now - clock_time) / (step - clock_step)
      steps_per_sec = 1.0 / seconds_per_step
      scalars['img_per_sec'] = self._config.batch_size * steps_per_sec
      train_mfu = flops_lib.mfu(self._flops_per_step, seconds_per_step)
      if train_mfu is not None:
        scalars['train_mfu'] = train_mfu
      self._clock = (now, step)
    self._writer.write(step, scalars)
    self._progress.update(step, scalars['train_loss'], scalars.get('img_per_sec'),
                          steps_per_sec)


def _check_finite(fetched, config, checkpointer):
  """Stops the run at the first non-finite loss when `optimizer.nan_policy` is `stop`."""
  bad_step = int(np.asarray(fetched['first_nonfinite_step']))
  if bad_step >= 0 and config.optimizer.nan_policy == 'stop':
    checkpointer.wait()
    steps = checkpointer.steps()
    last_good = f'the last good checkpoint is step {steps[-1]}' if steps else 'no checkpoint'
    raise NonFiniteLoss(
        f'the loss or a gradient became NaN/Inf at step {bad_step + 1}; {last_good}; lower '
        f'schedule.base_lr, or set optimizer.nan_policy=skip to skip such updates')


def _refresh_plot(workdir):
  """Redraws `workdir/curves.png` from metrics.jsonl; a plotting failure never stops training."""
  try:
    from vit_jax import plot
    plot.plot_workdirs([workdir], os.path.join(workdir, 'curves.png'))
  except Exception as e:  # pylint: disable=broad-except
    print(f'warning: could not refresh curves.png ({type(e).__name__}: {e})')
