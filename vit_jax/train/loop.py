"""The training loop: `train_and_evaluate(config, workdir)`.

Read top to bottom: resolve the config (checked once) and check the workdir, build data → model
→ optimizer → state (resumed from the workdir's checkpoints, or loaded from a pretrained file,
or initialised), compile the train step once, then loop: get batch, step, maybe log, maybe
eval, maybe save. Nothing in the loop waits on the device except logging, eval and saving, and
those fetch values that are already done while the next step runs.
"""

import itertools
import json
import time

import jax
import numpy as np

from vit_jax import data as data_lib
from vit_jax.errors import Diverged, EnvironmentFault
from vit_jax.train import build
from vit_jax.train import checkpoint as checkpoint_lib
from vit_jax.train import config as config_lib
from vit_jax.train import curves
from vit_jax.train import distill
from vit_jax.train import evaluate as evaluate_lib
from vit_jax.train import feature_evals as feature_evals_lib
from vit_jax.train import flexi
from vit_jax.train import flops as flops_lib
from vit_jax.train import out_of_memory
from vit_jax.train import metrics as metrics_lib
from vit_jax.train import prefetch
from vit_jax.train import sharding
from vit_jax.train import step as step_lib
from vit_jax.train import stopping
from vit_jax.train import workdir as workdir_lib


def train_and_evaluate(config, workdir, *, stop_at_step=None, allow_config_change=False,
                       log=print):
  """Trains `config` in `workdir`, resuming from its checkpoints; returns the final metrics.

  `stop_at_step`: save and return after that step (as a SIGTERM would), for staged runs.
  Raises UserError (a mistake: nothing is written), Diverged (NaN/Inf with
  nan_policy=stop) or EnvironmentFault (the disk or storage failed).
  """
  is_main = jax.process_index() == 0
  log = log if is_main else (lambda *a, **k: None)
  config = config_lib.resolve(config, jax.device_count(), jax.process_count())
  files = workdir_lib.RunFiles(workdir)
  files.check_before_writing(config, allow_config_change)

  # Data → model, optimizer and steps → state. Nothing is written until all of them worked.
  datasets = data_lib.create_datasets(config, jax.process_index(), jax.process_count())
  num_classes = datasets.num_classes
  teacher = distill.load_teacher(config, num_classes, log) if distill.enabled(config) else None
  run = build.parts(config, num_classes, teacher=teacher)
  feature_evals = feature_evals_lib.create(config, datasets, run, log)  # None: config.evals off
  evaluate = _Evaluation(config, run, datasets, num_classes, feature_evals)
  state = _initial_state(config, run, files, num_classes, log)
  # A train step's arguments after (state, batch): the teacher's params, laid out as the
  # student's are, when distilling.
  step_args = () if teacher is None else (jax.jit(
      lambda params: params,
      out_shardings=sharding.state_shardings(run.mesh, teacher.params))(teacher.params),)
  log(sharding.describe(state.params))
  start_step = int(jax.device_get(state.step))
  if start_step >= config.total_steps:
    if files.is_finished():
      log(f'workdir {files}: the run finished at step {start_step} already; nothing to do')
      return json.loads(files.final_metrics_json.read_text())
    # Stopped after its last checkpoint was committed, before final_metrics.json was written:
    # the final eval is all that is left (its row is in metrics.jsonl, written before that
    # checkpoint could be).
    log(f'workdir {files}: the run trained to step {start_step} but wrote no final metrics; '
        'evaluating its final state')
    eval_metrics = evaluate(state)
    log(_eval_line(start_step, eval_metrics))
    final_metrics = dict(eval_metrics, step=start_step)
    if is_main:
      files.write_final_metrics(final_metrics)
    return final_metrics
  if stop_at_step is not None and start_step >= stop_at_step:
    # The same command run again after it stopped there: nothing to do (not a reason to train
    # on to total_steps).
    log(f'--stop_at_step={stop_at_step}: the run in {files} is at step {start_step} already; '
        'nothing to do (rerun without it, or with a later step, to train on)')
    return {'step': start_step, 'stopped': True}

  # Compiled once, ahead of time, on the first batch (the loop can never trigger a recompile),
  # and before anything is written: a step that does not fit the device changes nothing.
  # FlexiViT compiles one step per patch size.
  batches = prefetch.device_prefetch(datasets.train_batches(start_step), run.mesh,
                                     config.data.prefetch_batches)
  first_batch = next(batches)
  compile_start = time.perf_counter()
  with out_of_memory.explained(config, 'the train step'):
    train_steps = {patch_size: train_fn.lower(state, first_batch, *step_args).compile()
                   for patch_size, train_fn in run.train_fns.items()}
  if flexi.enabled(config):
    log(f'compiled {len(train_steps)} train steps, one per patch size '
        f'{", ".join(map(str, train_steps))}, in {time.perf_counter() - compile_start:.1f} s')
  batches = itertools.chain([first_batch], batches)

  if is_main:
    files.write_config(config)
    files.write_class_names(datasets.class_names)
  writer = metrics_lib.MetricWriter(files, enabled=is_main, start_step=start_step)
  progress = metrics_lib.Progress(config.total_steps, enabled=is_main)
  stop_request = stopping.StopRequest().install()
  checkpointer = checkpoint_lib.Checkpointer(files.checkpoints, keep=config.keep_checkpoints)
  check_finite = lambda fetched: _stop_if_diverged(fetched, config, checkpointer)
  final_metrics = {}
  try:
    log(f'workdir {files}: training {config.model_name} for steps {start_step}..'
        f'{config.total_steps} on {jax.device_count()} {jax.devices()[0].platform} device(s) '
        f'(mesh {dict(run.mesh.shape)})')
    train_log = metrics_lib.TrainLog(config.batch_size,
                                     _flops_per_device(config, num_classes, teacher),
                                     writer, progress, check_finite)

    for step in range(start_step + 1, config.total_steps + 1):
      patch_size = flexi.patch_size_at(config, step)
      state, step_metrics = train_steps[patch_size](state, next(batches), *step_args)
      if step == start_step + 1:
        with out_of_memory.explained(config, 'the train step'):
          jax.block_until_ready(step_metrics)
        progress.compiled(time.perf_counter() - compile_start)
        train_log.start_clock(step)
      train_log.flush()  # The device is busy with `step`: fetching the last log's values is free.

      is_last = step == config.total_steps
      stopping_now = stop_request.signal_name is not None or step == stop_at_step
      if step % config.log_every == 0 or is_last:
        train_log.hold(step, step_metrics if patch_size is None else
                       dict(step_metrics, patch_size=patch_size))

      if (config.eval_every and step % config.eval_every == 0) or is_last:
        check_finite({'first_nonfinite_step': state.first_nonfinite_step})
        eval_metrics = evaluate(state)
        writer.write(step, eval_metrics)
        writer.flush()
        final_metrics = dict(eval_metrics, step=step)
        log(_eval_line(step, eval_metrics))
        if is_main and config.plot_every_eval:
          curves.refresh(files)

      if ((config.checkpoint_every and step % config.checkpoint_every == 0) or is_last
          or stopping_now):
        check_finite({'first_nonfinite_step': state.first_nonfinite_step})
        # The rows up to this step are stored before its checkpoint can exist: a resume from it
        # never lacks one (and drops those logged after it).
        train_log.flush()
        writer.flush()
        checkpointer.save(state, force=True)

      if stopping_now and not is_last:
        reason = stop_request.signal_name or f'--stop_at_step={stop_at_step}'
        train_log.flush()
        checkpointer.wait()
        writer.close()
        log(f'{reason}: saved a checkpoint at step {step} in {checkpointer.directory}; rerun '
            f'the same command to resume')
        return {'step': step, 'stopped': True}

    train_log.flush()
    checkpointer.wait()
    writer.close()
    if is_main:
      files.write_final_metrics(final_metrics)
    return final_metrics
  except EnvironmentFault as fault:
    # Nothing more is sent to a storage that failed; the message says what survived.
    fault = checkpointer.with_survivor(fault)
    writer.close(discard=True)
    checkpointer.abandon()
    raise fault from None
  except BaseException:
    # A save in flight may end; the first error is the one reported.
    _close_quietly(writer.close, lambda: checkpointer.close(quiet=True))
    raise
  finally:
    stop_request.uninstall()
    checkpointer.close()


class _Evaluation:
  """The run's eval of a state: the weights it evaluates (`step.weights_to_evaluate`) at each
  eval patch size, and the feature evals (k-NN, few-shot) where configured.

  The eval steps are compiled at the first call, when an eval batch's shape is known.
  """

  def __init__(self, config, run, datasets, num_classes, feature_evals):
    self._config = config
    self._run = run
    self._datasets = datasets
    self._num_classes = num_classes
    self._feature_evals = feature_evals  # None: config.evals off
    self._eval_steps = None  # {patch size (None: not FlexiViT): compiled eval step}

  def __call__(self, state):
    """The eval metrics of `state`, by name."""
    eval_params = step_lib.weights_to_evaluate(state)
    run, datasets = self._run, self._datasets
    if self._eval_steps is None:
      eval_batch = sharding.global_batch(next(iter(datasets.eval_batches())), run.mesh)
      with out_of_memory.explained(self._config, 'the eval step'):
        self._eval_steps = {patch_size: eval_fn.lower(eval_params, eval_batch).compile()
                            for patch_size, eval_fn in run.eval_fns.items()}
    eval_metrics = {}
    for patch_size, eval_step in self._eval_steps.items():
      eval_metrics.update(flexi.metric_names(
          evaluate_lib.evaluate(eval_step, eval_params, datasets, run.mesh, self._num_classes),
          patch_size, run.eval_patch_size))
    if self._feature_evals is not None:
      eval_metrics.update(self._feature_evals(eval_params))
    return eval_metrics


def _eval_line(step, eval_metrics):
  return f'step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in eval_metrics.items())


def _close_quietly(*closers):
  for close in closers:
    try:
      close()
    except Exception:  # pylint: disable=broad-except
      pass


def _initial_state(config, run, files, num_classes, log):
  """The newest readable checkpoint of the workdir; else the pretrained weights (when
  configured); else a fresh initialisation.

  A pretrained file is read before anything is written, so a bad one leaves the workdir as it
  was; a resumed run never reads it.
  """
  if files.has_checkpoints():
    checkpointer = checkpoint_lib.Checkpointer(files.checkpoints, keep=config.keep_checkpoints)
    try:
      state, restored_step = checkpointer.restore_latest(run.abstract_state, log=log,
                                                         set_aside_unreadable=True)
    finally:
      checkpointer.close()
    if state is not None:
      log(f'resuming from the checkpoint at step {restored_step} in {files.checkpoints}')
      return state
  if config.pretrained.path:
    from vit_jax.weights import pretrained  # Only fine-tuning needs the converters.
    pretrained.ensure_present(config.pretrained, log)  # Before seconds of initialisation.
    init_params = jax.device_get(run.new_state().params)
    params = pretrained.load_pretrained(config.pretrained, init_params,
                                        dict(config.model_fields, num_classes=num_classes), log)
    return build.jit_one_off(
        lambda p: step_lib.create_train_state(p, run.tx, config.optimizer.ema_decay), run.mesh,
        out_shardings=run.state_shardings)(params)
  return run.new_state()


def _flops_per_device(config, num_classes, teacher):
  """Model FLOPs of one train step on one device, where the device's peak is known (for MFU).

  Model FLOPs, not XLA's count of the compiled step, which counts a scanned layer or an
  accumulation loop once and a remat recomputation as work.
  """
  if flops_lib.peak_flops_per_device() is None:
    return None
  return (flops_lib.model_flops_per_step(config, num_classes, teacher=teacher)[0]
          / jax.device_count())


def _stop_if_diverged(fetched, config, checkpointer):
  """Stops the run at the first non-finite loss when `optimizer.nan_policy` is `stop`."""
  bad_step = int(np.asarray(fetched['first_nonfinite_step']))
  if bad_step >= 0 and config.optimizer.nan_policy == 'stop':
    checkpointer.wait()
    steps = checkpointer.steps()
    last_good = f'the last good checkpoint is step {steps[-1]}' if steps else 'no checkpoint'
    raise Diverged(
        f'the loss or a gradient became NaN/Inf at step {bad_step + 1}; {last_good}; lower '
        f'schedule.base_lr, or set optimizer.nan_policy=skip to skip such updates')
