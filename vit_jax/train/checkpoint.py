"""Orbax checkpoints in `workdir/checkpoints`, and `restore` for notebooks.

A checkpoint holds two items so a notebook can read the weights without building an optimizer:
`params`, and `train_state` (optimizer state, EMA params and the step counters); `restore` reads
`params`, or `train_state`'s `ema_params` alone (a partial restore). Restores always
pass an abstract target (shapes, dtypes and shardings): without one Orbax returns plain dicts and
the optimizer state loses its types.
"""

import logging
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from vit_jax.errors import EnvironmentFault, UserError
from vit_jax.train import storage
from vit_jax.train import workdir as workdir_lib


def _train_state_item(state):
  """The non-param part of a `TrainState` as a dict (None-valued fields left out)."""
  item = {
      'step': state.step,
      'opt_state': state.opt_state,
      'skipped_updates': state.skipped_updates,
      'first_nonfinite_step': state.first_nonfinite_step,
  }
  if state.ema_params is not None:
    item['ema_params'] = state.ema_params
  return item


class SaveFailed(EnvironmentFault):
  """A checkpoint could not be written; the message names the step and what survived."""


class Checkpointer:
  """Async saves every so often, keep-N, and restore of the newest checkpoint that reads
  (setting aside, for a run, the newer ones that do not: `restore_latest`).

  A save that fails (a full disk, a read-only file system, a network error) raises SaveFailed
  naming the step, the cause and the newest complete checkpoint, which is untouched: Orbax
  writes a step into a temporary folder (renamed when complete) or, in a bucket, marks it
  complete with a commit file last, and the half-written one is removed when the workdir is
  opened again (`cleanup_tmp_directories`).
  """

  def __init__(self, directory, keep=3, async_save=True):
    """`directory`: the workdir's checkpoints folder (`RunFiles.checkpoints`), an epath."""
    self.directory = directory
    # Directories are made in `save` itself, so a storage that fails there fails the call
    # (made in the background, a failure leaves Orbax's writer threads waiting 20 minutes).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    _quiet_orbax_errors()
    storage.quiet_failed_writes()
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options, item_names=('params', 'train_state'))
      self._complete = set(self._manager.all_steps())
    except Exception as e:  # pylint: disable=broad-except
      if not storage.is_fault(e):
        raise
      raise EnvironmentFault(f'cannot open the checkpoints in {self.directory} '
                             f'({storage.describe(e)})') from None
    self._pending = None  # the step of a save started and not yet known to be complete
    self._closed = False

  def steps(self):
    """The steps of the checkpoints on disk, oldest first."""
    return sorted(self._manager.all_steps())

  def newest_complete(self):
    """The newest step known complete, without asking the storage (it may be failing)."""
    return max(self._complete, default=None)

  def _failed(self, step, error):
    fault = storage.find_fault(error)
    if fault is None:
      return error
    storage.quiet_abandoned_writers()
    survived = self._survivor()
    return SaveFailed(f'cannot save the checkpoint at step {step} in {self.directory} '
                      f'({storage.describe(fault)}); {survived}')

  def _survivor(self, where=''):
    """What survived, for a one-line report of a fault."""
    newest = self.newest_complete()
    if newest is None:
      return f'no checkpoint{where} had been completed yet'
    return (f'the newest complete checkpoint{where}, step {newest}, is untouched: rerun the '
            'same command to resume from it')

  def with_survivor(self, fault):
    """`fault` (a storage fault elsewhere in the run) with what survived of the run added."""
    if isinstance(fault, SaveFailed):
      return fault
    pending = (f'the save at step {self._pending} did not complete; '
               if self._pending is not None else '')
    return EnvironmentFault(f'{fault}; {pending}{self._survivor(f" in {self.directory}")}')

  def _finish_pending(self):
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(step, e) from None
    self._complete.add(step)

  def save(self, state, force=False):
    """Starts an (async) save of `state` at its step; returns whether one was started."""
    step = int(jax.device_get(state.step))
    self._finish_pending()  # Orbax waits for the previous save too: its error is its own.
    if step in self._complete:
      return False
    try:
      started = self._manager.save(step, force=force, args=ocp.args.Composite(
          params=ocp.args.StandardSave(state.params),
          train_state=ocp.args.StandardSave(_train_state_item(state))))
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(step, e) from None
    if started:
      self._pending = step
    return started

  def wait(self):
    """Blocks until every async save has been committed to disk."""
    self._finish_pending()

  def restore(self, step, abstract_state):
    """Restores the checkpoint at `step` into the structure (and shardings) of `abstract_state`."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state.params),
        train_state=ocp.args.StandardRestore(_train_state_item(abstract_state))))
    rest = restored['train_state']
    return abstract_state.replace(
        step=rest['step'], params=restored['params'], opt_state=rest['opt_state'],
        ema_params=rest.get('ema_params'), skipped_updates=rest['skipped_updates'],
        first_nonfinite_step=rest['first_nonfinite_step'])

  def restore_latest(self, abstract_state, log=print, set_aside_unreadable=False):
    """Restores the newest checkpoint that reads into the structure of `abstract_state`.

    A checkpoint that fails to read (a truncated or corrupt file) is reported and skipped, and
    the one before it is tried; a storage that cannot be reached is an EnvironmentFault (not a
    reason to start over). Returns `(state, step)`, or `(None, None)` with no checkpoints.

    `set_aside_unreadable` (for a run that goes on writing here): each checkpoint skipped is
    renamed `<step>.unreadable` beside the others (`_set_aside`). Left in place, no later
    restore would skip it (`restore` takes the newest step), and the run would never save its
    step again: Orbax saves no step it already has.
    """
    for step in reversed(self.steps()):
      try:
        return self.restore(step, abstract_state), step
      except Exception as e:  # pylint: disable=broad-except
        if storage.is_unreachable(e):
          raise EnvironmentFault(f'cannot read the checkpoint at step {step} in '
                                 f'{self.directory} ({storage.describe(e)})') from None
        message = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        moved = (f'; moved aside to {self._set_aside(step)} (delete it once it is not needed)'
                 if set_aside_unreadable else '')
        log(f'warning: checkpoint at step {step} in {self.directory} could not be read '
            f'({type(e).__name__}: {message}){moved}; trying the previous one')
    return None, None

  def _set_aside(self, step):
    """Renames the checkpoint at `step` to `<step>.unreadable` (`.2`, `.3`, ... if taken), a name
    Orbax reads as no step; returns the new path (on the process that renamed it, else None).

    Renamed, not deleted as a half-written save is: this one was committed, and what failed to
    read it (a passing storage error, a changed config) may not be what is wrong with it.
    epath renames a local folder and every object under a `gs://` prefix alike.
    """
    source = self.directory / str(step)  # Orbax's default step names: the step, unpadded.
    target = None
    if jax.process_index() == 0:
      target = self.directory / f'{step}.unreadable'
      copy = 1
      while target.exists():
        copy += 1
        target = self.directory / f'{step}.unreadable.{copy}'
      try:
        source.rename(target)
      except Exception as e:  # pylint: disable=broad-except
        if not storage.is_fault(e):
          raise
        raise EnvironmentFault(f'cannot move the unreadable checkpoint at step {step} aside '
                               f'to {target} ({storage.describe(e)})') from None
    # Every process lists the steps again only once the rename is done (none with one process).
    ocp.multihost.sync_global_processes(f'vit_jax_set_aside_checkpoint_{step}')
    self._manager.reload()
    self._complete.discard(step)
    return target

  def abandon(self):
    """After a storage fault: nothing more is waited for (a save in flight on a storage that
    stopped answering can hang for minutes in Orbax's threads) or reported."""
    self._pending = None
    self._closed = True
    storage.quiet_abandoned_writers()

  def close(self, quiet=False):
    if self._closed:
      return
    self._closed = True
    try:
      self._finish_pending()
      self._manager.close()
    except Exception:  # pylint: disable=broad-except
      if not quiet:
        raise


class _OrbaxErrorFilter(logging.Filter):
  """Drops the errors Orbax logs (a traceback per failed writer thread) as a save fails: the
  failure is reported once, in one line, by `Checkpointer`."""

  def filter(self, record):
    return not (record.levelno >= logging.ERROR and '/orbax/' in record.pathname)


def _quiet_orbax_errors():
  logger = logging.getLogger('absl')
  if not any(isinstance(f, _OrbaxErrorFilter) for f in logger.filters):
    logger.addFilter(_OrbaxErrorFilter())


WEIGHTS = ('ema', 'params')


def restore(workdir, step=None, weights=None, log=None):
  """`(model, params, config)` from a training workdir: the latest step, or `step`.

  `weights`: 'ema' (the EMA of the params, which the run evaluated and logged) or 'params' (the
  raw ones); None: 'ema' when the run had EMA (`optimizer.ema_decay > 0`), else 'params'. The
  choice is reported through `log` (default: one line on stderr).

  Builds the model from the saved (resolved) config and reads only those weights (the EMA ones
  as a partial restore of the `train_state` item: no optimizer state, no data), onto the
  default device; works on a CPU-only machine for a checkpoint written anywhere, local or
  `gs://`.
  """
  from vit_jax.train import build  # Imported here: the model is needed only once there is a workdir.

  files = workdir_lib.RunFiles(workdir)
  config = files.read_config()
  ema_decay = config.optimizer.ema_decay
  if weights is None:
    weights = 'ema' if ema_decay else 'params'
  if weights not in WEIGHTS:
    raise UserError(f'weights={weights!r} is unknown; valid: {", ".join(WEIGHTS)}')
  if weights == 'ema' and not ema_decay:
    raise UserError(f"weights='ema': the run in {workdir} kept no EMA "
                    "(optimizer.ema_decay=0); use weights='params'")
  num_classes = len(files.read_class_names())
  model = build.model_from_config(config, num_classes)
  device_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract_params = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device_sharding),
      build.abstract_params(config, model))

  manager = ocp.CheckpointManager(files.checkpoints, item_names=('params', 'train_state'))
  steps = sorted(manager.all_steps())
  if not steps:
    raise UserError(f'no checkpoints in {files.checkpoints}')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise UserError(f'no checkpoint at step {step} in {files.checkpoints}; steps there: {steps}')
  if weights == 'ema':
    restored = manager.restore(step, args=ocp.args.Composite(train_state=ocp.args.PyTreeRestore(
        {'ema_params': abstract_params}, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args(
            {'ema_params': abstract_params}))))
    params = restored['train_state']['ema_params']
    chosen = (f"the EMA weights (optimizer.ema_decay={ema_decay}, what the run evaluated; "
              "weights='params' for the raw ones)")
  else:
    params = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))['params']
    chosen = ("the raw params (weights='ema' for their EMA, which the run evaluated)"
              if ema_decay else 'the params (the run kept no EMA)')
  manager.close()
  (log or _to_stderr)(f'restored {chosen} of step {step} from {workdir}')
  return model, params, config


def _to_stderr(line):
  print(line, file=sys.stderr)


def restore_train_state(workdir, step=None):
  """The full `TrainState` (params, optimizer state, EMA, counters) of a workdir's checkpoint.

  For inspecting or comparing runs; `restore` is the lighter params-only path.
  """
  from vit_jax.train import build  # pylint: disable=g-import-not-at-top
  files = workdir_lib.RunFiles(workdir)
  config = files.read_config()
  num_classes = len(files.read_class_names())
  abstract_state = build.parts(config, num_classes).abstract_state
  checkpointer = Checkpointer(files.checkpoints, keep=config.keep_checkpoints)
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


def tree_digest(tree):
  """A hex digest of every array in a pytree (for bit-exact comparisons across runs)."""
  import hashlib
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()
