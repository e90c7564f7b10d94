"""Where numbers go: `metrics.jsonl`, TensorBoard event files, and the console progress line.

Only process 0 writes (the others get a writer that drops everything), so a multi-host run
produces one set of files.
"""

import json
import os
import sys
import time

import jax
import numpy as np

from vit_jax.train import flops as flops_lib


def _tensorboard_writer(logdir):
  """An event-file writer from the `tensorboard` package alone (no TensorFlow import)."""
  try:
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
  except ImportError:  # TensorBoard is optional; metrics.jsonl is always written.
    return None
  return EventFileWriter(logdir)


class MetricWriter:
  """Appends `{'step': s, **scalars}` to `metrics.jsonl` and to TensorBoard in a workdir."""

  def __init__(self, files, enabled=True):
    """`files`: the run's `vit_jax.train.workdir.RunFiles`."""
    self.enabled = enabled
    self.jsonl_path = os.fspath(files.metrics_jsonl)
    self._tensorboard = _tensorboard_writer(os.fspath(files.root)) if enabled else None

  def write(self, step, scalars):
    """Writes plain Python/numpy scalars for `step`."""
    if not self.enabled:
      return
    row = {'step': int(step)}
    row.update({name: float(np.asarray(value)) for name, value in scalars.items()})
    with open(self.jsonl_path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    if self._tensorboard is not None:
      from tensorboard.compat.proto import event_pb2, summary_pb2
      summary = summary_pb2.Summary(value=[
          summary_pb2.Summary.Value(tag=name, simple_value=value)
          for name, value in row.items() if name != 'step'])
      self._tensorboard.add_event(
          event_pb2.Event(wall_time=time.time(), step=row['step'], summary=summary))
      self._tensorboard.flush()

  def close(self):
    if self._tensorboard is not None:
      self._tensorboard.close()


def _format_seconds(seconds):
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{seconds:02d}s'


class Progress:
  """The console line: step/total, loss, img/s, ETA; and the first step's compile time."""

  def __init__(self, total_steps, enabled=True, stream=None):
    self.total_steps = total_steps
    self.enabled = enabled
    self.stream = stream or sys.stdout

  def compiled(self, seconds):
    if self.enabled:
      print(f'first step compiled and ran in {seconds:.1f}s', file=self.stream, flush=True)

  def update(self, step, loss, img_per_sec, steps_per_sec):
    if not self.enabled:
      return
    width = 20
    done = int(width * step / max(self.total_steps, 1))
    bar = '#' * done + '.' * (width - done)
    line = f'[{bar}] step {step}/{self.total_steps} | loss {loss:.4f}'
    if img_per_sec and steps_per_sec:  # None until a timed interval has passed.
      eta = (self.total_steps - step) / steps_per_sec
      line += f' | {img_per_sec:,.0f} img/s | ETA {_format_seconds(eta)}'
    print(line, file=self.stream, flush=True)


class TrainLog:
  """Train metrics of a log step, held on the device and fetched after the next step is
  dispatched, so the host never makes the device wait; img/s and MFU over the interval.

  `check(fetched)` sees every fetched set first (the loop stops a diverged run there).
  """

  def __init__(self, global_batch_size, flops_per_step, writer, progress, check):
    self._global_batch_size, self._flops_per_step = global_batch_size, flops_per_step
    self._writer, self._progress, self._check = writer, progress, check
    self._held = None  # (step, metrics on device)
    self._clock = None  # (time, step) of the last fetch

  def start_clock(self, step):
    """Rates are measured from here: after `step`, the first (compiling) one, has finished."""
    self._clock = (time.perf_counter(), step)

  def hold(self, step, metrics):
    self._held = (step, metrics)

  def flush(self):
    """Fetches and writes the held metrics (if any)."""
    if self._held is None:
      return
    step, metrics = self._held
    self._held = None
    fetched = jax.device_get(metrics)
    self._check(fetched)
    scalars = {name: float(value) for name, value in fetched.items()
               if name != 'first_nonfinite_step'}
    now = time.perf_counter()
    clock_time, clock_step = self._clock
    steps_per_sec = None
    if step > clock_step:  # No interval to measure before the first step has finished.
      seconds_per_step = (now - clock_time) / (step - clock_step)
      steps_per_sec = 1.0 / seconds_per_step
      scalars['img_per_sec'] = self._global_batch_size * steps_per_sec
      train_mfu = flops_lib.mfu(self._flops_per_step, seconds_per_step)
      if train_mfu is not None:
        scalars['train_mfu'] = train_mfu
      self._clock = (now, step)
    self._writer.write(step, scalars)
    self._progress.update(step, scalars['train_loss'], scalars.get('img_per_sec'),
                          steps_per_sec)
