"""Where numbers go: `metrics.jsonl`, TensorBoard event files, and the console progress line.

Only process 0 writes (the others get a writer that drops everything), so a multi-host run
produces one set of files. Both files go through `storage.GrowingFile`: appended locally,
replaced whole in a bucket, at most every `UPLOAD_EVERY_S` and at each `flush()` (the loop
flushes at each eval and before each checkpoint, so a checkpoint never outlives its rows).

A resumed run starts both files from what the interrupted one logged up to its checkpoint's
step: the rows and events after it are dropped, so every step appears once, and TensorBoard gets
a restart event (`SessionLog.START`) at the first new step, which tells a TensorBoard that read
the dropped points to forget them.
"""

import json
import struct
import sys
import time

import jax
import numpy as np

from vit_jax.train import flops as flops_lib
from vit_jax.train import storage

UPLOAD_EVERY_S = 30  # How stale a bucket's metrics may be while the run is going.


def _tfrecord(data):
  """One TFRecord (the framing of TensorBoard event files): length, CRCs, data."""
  from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
  header = struct.pack('<Q', len(data))
  return (header + struct.pack('<I', masked_crc32c(header)) + data
          + struct.pack('<I', masked_crc32c(data)))


def _tfrecords(blob):
  """The records of an event file; a record cut off at the end (a killed writer) is dropped."""
  records, offset = [], 0
  while offset + 12 <= len(blob):
    (length,) = struct.unpack_from('<Q', blob, offset)
    end = offset + 12 + length + 4
    if end > len(blob):
      break
    records.append(blob[offset + 12:end - 4])
    offset = end
  return records


def _event(**fields):
  from tensorboard.compat.proto import event_pb2
  return event_pb2.Event(wall_time=time.time(), **fields)


def kept_events(blob, last_step):
  """The records of an event file up to `last_step` (the file header and steps <= it)."""
  from tensorboard.compat.proto import event_pb2
  kept = []
  for record in _tfrecords(blob):
    event = event_pb2.Event.FromString(record)
    if event.HasField('file_version') or event.step <= last_step:
      kept.append(_tfrecord(record))
  return b''.join(kept)


def kept_rows(blob, last_step):
  """The lines of a metrics.jsonl up to `last_step` (a line cut off mid-write is dropped)."""
  kept = []
  for line in blob.decode().splitlines(keepends=True):
    try:
      if line.endswith('\n') and json.loads(line)['step'] <= last_step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      continue
  return ''.join(kept).encode()


class MetricWriter:
  """Appends `{'step': s, **scalars}` to `metrics.jsonl` and to TensorBoard in a workdir."""

  def __init__(self, files, enabled=True, start_step=0):
    """`files`: the run's `vit_jax.train.workdir.RunFiles`; `start_step`: the step the run
    resumes from (what was logged after it is dropped)."""
    self.enabled = enabled
    self._files = files
    self._jsonl = self._events = None
    self._last_upload = time.monotonic()
    self._step = start_step
    if not enabled:
      return
    try:
      files.root.mkdir(parents=True, exist_ok=True)
      old = files.metrics_jsonl.read_bytes() if files.metrics_jsonl.exists() else b''
      self._jsonl = storage.GrowingFile(files.metrics_jsonl, kept_rows(old, start_step))
      event_files = files.events_files()
      for stale in event_files[:-1]:  # From an older version of the code: filter in place.
        blob = stale.read_bytes()
        kept = kept_events(blob, start_step)
        if kept != blob:
          files.write_bytes(stale, kept)
      if event_files:
        kept = kept_events(event_files[-1].read_bytes(), start_step)
        self._events = storage.GrowingFile(event_files[-1], kept)
      else:
        self._events = storage.GrowingFile(files.new_events_file())
        self._add_event(_event(file_version='brain.Event:2'))
      if start_step:
        from tensorboard.compat.proto import event_pb2
        self._add_event(_event(step=start_step + 1, session_log=event_pb2.SessionLog(
            status=event_pb2.SessionLog.START)))
    except Exception as e:  # pylint: disable=broad-except
      raise files.fault(e, files.root, start_step) from None

  def _add_event(self, event):
    self._events.append(_tfrecord(event.SerializeToString()))

  def write(self, step, scalars):
    """Writes plain Python/numpy scalars for `step`."""
    if not self.enabled:
      return
    from tensorboard.compat.proto import summary_pb2
    self._step = int(step)
    row = {'step': int(step)}
    row.update({name: float(np.asarray(value)) for name, value in scalars.items()})
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=name, simple_value=value)
        for name, value in row.items() if name != 'step'])
    try:
      self._jsonl.append((json.dumps(row) + '\n').encode())
      self._add_event(_event(step=row['step'], summary=summary))
    except Exception as e:  # pylint: disable=broad-except
      raise self._files.fault(e, self._jsonl.path, step) from None
    if time.monotonic() - self._last_upload > UPLOAD_EVERY_S:
      self.flush()

  def flush(self):
    """Makes everything written so far durable (uploads it, for a bucket)."""
    if not self.enabled:
      return
    for file in (self._jsonl, self._events):
      try:
        file.flush()
      except Exception as e:  # pylint: disable=broad-except
        raise self._files.fault(e, file.path, self._step) from None
    self._last_upload = time.monotonic()

  def close(self, discard=False):
    """Flushes and closes; with `discard` (after a storage fault) sends nothing more."""
    if not self.enabled:
      return
    for file in (self._jsonl, self._events):
      try:
        file.close(discard=discard)
      except Exception as e:  # pylint: disable=broad-except
        if not discard:
          raise self._files.fault(e, file.path, self._step) from None


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
    """Prints how long the first step took to compile and run."""
    if self.enabled:
      print(f'first step compiled and ran in {seconds:.1f}s', file=self.stream, flush=True)

  def update(self, step, loss, img_per_sec, steps_per_sec):
    """Prints the progress line of `step`; img/s and the ETA once a rate is known."""
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
    """Keeps `step`'s metrics, still on the device, for the next `flush`."""
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
