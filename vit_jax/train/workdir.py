"""The files of a run: one owner of every path in a workdir, local or `gs://`.

  files = RunFiles('workdirs/quickstart')
  files.config_json, files.metrics_jsonl, files.checkpoints, ...   # etils.epath.Path each

Every reader and writer of a workdir (the loop, the checkpointer, the metric writer, `restore`,
the tools) gets its paths here, as `etils.epath` paths, so a local folder and a bucket are the
same to the rest of the code. What a workdir holds:

  config.json         the resolved config, its schema version and provenance (written first)
  class_names.json    the class names of the data, in label order
  metrics.jsonl       one JSON object per logged step (on resume from step K, the rows after K
                      are dropped: they belong to the interrupted run)
  events.out.tfevents.*  TensorBoard (likewise)
  curves.png          redrawn at each eval
  checkpoints/<step>/ Orbax
  final_metrics.json  when the run has finished
  diverged.json       written by a sweep whose point exited Diverged (not retried)

`gs://` paths go through gcsfs, or the emulator `STORAGE_EMULATOR_HOST` names (see
`vit_jax.train.storage`, configured when this module is imported).
"""

import json
import os
import socket
import time
import uuid

from etils import epath

from vit_jax.errors import EnvironmentFault, UserError
from vit_jax.train import config as config_lib
from vit_jax.train import storage

storage.configure()  # Before any gs:// path is opened: epath picks its backend once.

CHECKPOINT_SUBDIR = 'checkpoints'
EVENTS_PREFIX = 'events.out.tfevents.'
_is_local = storage.is_local


def as_path(path):
  """An `epath.Path` for a local path (made absolute) or a URL such as `gs://bucket/run`."""
  text = os.fspath(path)
  return epath.Path(os.path.abspath(text) if _is_local(text) else text)


class RunFiles:
  """The paths of one workdir, and the reading and writing of its small files."""

  def __init__(self, workdir):
    self.root = as_path(workdir)
    self.config_json = self.root / 'config.json'
    self.class_names_json = self.root / 'class_names.json'
    self.metrics_jsonl = self.root / 'metrics.jsonl'
    self.curves_png = self.root / 'curves.png'
    self.final_metrics_json = self.root / 'final_metrics.json'
    self.diverged_json = self.root / 'diverged.json'  # a sweep's mark: do not retry this point
    self.checkpoints = self.root / CHECKPOINT_SUBDIR

  def __str__(self):
    return os.fspath(self.root)

  # -- Before anything is written.

  def check_writable(self):
    """Tries to write here (a probe file, created and removed), rather than trusting
    permission bits (which say yes to root on a read-only mount).

    Locally the probe goes to the nearest folder that exists, so nothing is left behind. In a
    bucket the probe is an object under the workdir, bounded in time (a dead endpoint fails
    within `storage.PROBE_DEADLINE_S`, refused credentials at the first answer).

    Raises:
      UserError: a local path that cannot hold the run (a path the user chose, checked before
        anything runs: a file in the way, read-only, not creatable).
      EnvironmentFault: a full disk, or a bucket that is missing, refuses the credentials or
        does not answer.
    """
    if not _is_local(self.root):
      probe = self.root / f'.vit_jax_probe_{uuid.uuid4().hex}'
      try:
        storage.within_deadline(lambda: (probe.write_text(''), probe.unlink()),
                                f'workdir {self}')
      except TimeoutError as e:
        raise EnvironmentFault(f'{e}; check the network (or STORAGE_EMULATOR_HOST)') from None
      except Exception as e:  # pylint: disable=broad-except
        if not storage.is_fault(e):
          raise
        raise EnvironmentFault(f'workdir {self} cannot be written: {storage.describe(e)} (at '
                               f'{storage.endpoint()})') from None
      return
    probe_dir = self.root
    while not probe_dir.exists() and probe_dir.parent != probe_dir:
      probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
      raise UserError(f'workdir {self} cannot be written ({probe_dir} is not a writable '
                      'folder: it is a file)')
    probe = probe_dir / f'.vit_jax_probe_{uuid.uuid4().hex}'
    times = os.stat(probe_dir) if _is_local(probe_dir) else None
    try:
      probe.write_text('')
      probe.unlink()
      if times is not None:  # Leave the folder as it was, its modification time included.
        os.utime(probe_dir, ns=(times.st_atime_ns, times.st_mtime_ns))
    except OSError as e:
      error_class = EnvironmentFault if storage.is_disk_full(e) else UserError
      raise error_class(f'workdir {self} cannot be written ({probe_dir} is not a writable '
                        f'folder: {storage.describe(e)})') from None

  def check_before_writing(self, resolved, allow_config_change=False):
    """`check_resumable` and `check_writable`, in the order that fails soonest: a bucket is
    probed first (a missing or unreachable one fails there, bounded in time, rather than in the
    unbounded retries of reading its config.json); a local workdir holding another run is
    refused before the probe touches its folder."""
    if _is_local(self.root):
      self.check_resumable(resolved, allow_config_change)
      self.check_writable()
    else:
      self.check_writable()
      self.check_resumable(resolved, allow_config_change)

  def check_resumable(self, resolved, allow_config_change=False):
    """Refuses a workdir that holds a run of a different config (read only)."""
    if allow_config_change or not self.config_json.exists():
      return
    saved = self.read_config()
    differences = config_lib.config_differences(config_lib.to_dict(saved),
                                                config_lib.to_dict(resolved))
    if differences:
      listed = ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in list(differences.items())[:5])
      raise UserError(f'workdir {self} holds a run of a different config ({listed}); use a '
                      f'new --workdir, or pass --allow_config_change to resume it anyway')

  def has_checkpoints(self):
    """Whether a finished checkpoint is here (read without writing)."""
    return self.checkpoints.is_dir() and any(
        path.name.isdigit() for path in self.checkpoints.iterdir())

  def is_finished(self):
    """Whether the run here has ended (its final metrics are written)."""
    return self.final_metrics_json.exists()

  def events_files(self):
    """The TensorBoard event files here, oldest first."""
    if not self.root.is_dir():
      return []
    return sorted((path for path in self.root.iterdir()
                   if path.name.startswith(EVENTS_PREFIX)), key=lambda path: path.name)

  def new_events_file(self):
    """A name for a new TensorBoard event file (TensorBoard reads every `*tfevents*` file)."""
    return self.root / f'{EVENTS_PREFIX}{int(time.time())}.{socket.gethostname()}.vit_jax'

  # -- Small files, written whole (a bucket object cannot be appended to or truncated).

  def write_bytes(self, path, data, step=None):
    """Writes `path` whole, atomically where the storage allows (`storage.write_bytes`).

    Raises:
      EnvironmentFault: naming the path (and the step, when given) and why.
    """
    try:
      self.root.mkdir(parents=True, exist_ok=True)
      storage.write_bytes(path, data)
    except Exception as e:  # pylint: disable=broad-except
      raise self.fault(e, path, step) from None

  def write_json(self, path, value):
    """Writes `value` to `path` whole (see `write_bytes`)."""
    self.write_bytes(path, json.dumps(value, indent=2, sort_keys=True).encode())

  def fault(self, error, path, step=None):
    """The EnvironmentFault for a failed write of `path`; other errors are returned as they are
    (a bug is not a storage fault)."""
    if not storage.is_fault(error):
      return error
    at_step = f' at step {step}' if step is not None else ''
    return EnvironmentFault(f'cannot write {path}{at_step} ({storage.describe(error)})')

  def write_config(self, resolved):
    """Writes config.json: the resolved config with its schema version and provenance."""
    self.write_json(self.config_json, config_lib.workdir_record(resolved))

  def write_class_names(self, class_names):
    """Writes class_names.json: the names in label order."""
    self.write_json(self.class_names_json, list(class_names))

  def write_final_metrics(self, metrics):
    """Writes final_metrics.json, when the run is done."""
    self.write_json(self.final_metrics_json, metrics)

  def read_config(self):
    """The resolved config of the run here (config.json of any schema this code knows).

    Raises:
      UserError: no config.json (not a workdir), or one that is corrupt or too new.
    """
    if not self.config_json.exists():
      raise UserError(f'{self} holds no config.json: not a vit_jax training workdir')
    try:
      record = json.loads(self.config_json.read_text())
    except ValueError as e:
      raise UserError(f'{self.config_json} is corrupt ({e}); restore it or use a new '
                      '--workdir') from None
    return config_lib.from_workdir_record(record, self.config_json)

  def read_class_names(self):
    """The class names a run was trained on."""
    try:
      return json.loads(self.class_names_json.read_text())
    except FileNotFoundError:
      raise UserError(f'{self} holds no class_names.json: not a vit_jax training workdir'
                      ) from None
    except ValueError as e:
      raise UserError(f'{self.class_names_json} is corrupt ({e})') from None

