"""The files of a run: one owner of every path in a workdir, local or `gs://`.

  files = RunFiles('workdirs/quickstart')
  files.config_json, files.metrics_jsonl, files.checkpoints, ...   # etils.epath.Path each

Every reader and writer of a workdir (the loop, the checkpointer, the metric writer, `restore`,
the tools) gets its paths here, as `etils.epath` paths, so a local folder and a bucket are the
same to the rest of the code. What a workdir holds:

  config.json         the resolved config, its schema version and provenance (written first)
  class_names.json    the class names of the data, in label order
  metrics.jsonl       one JSON object per logged step
  events.out.tfevents.*  TensorBoard
  curves.png          redrawn at each eval
  checkpoints/<step>/ Orbax
  final_metrics.json  when the run has finished
"""

import json
import os
import uuid

from etils import epath

from vit_jax.errors import EnvironmentFault, UserError
from vit_jax.train import config as config_lib

CHECKPOINT_SUBDIR = 'checkpoints'


def _is_local(path):
  return '://' not in os.fspath(path)


def as_path(path):
  """An `epath.Path` for a local path (made absolute) or a URL such as `gs://bucket/run`."""
  text = os.fspath(path)
  return epath.Path(os.path.abspath(text) if _is_local(text) else text)


def describe_os_error(error):
  """'no space left on device' for an OSError; its message otherwise (for one-line reports)."""
  if isinstance(error, OSError) and error.errno is not None:
    return os.strerror(error.errno).lower()
  return str(error).splitlines()[0] if str(error) else type(error).__name__


class RunFiles:
  """The paths of one workdir, and the reading and writing of its small files."""

  def __init__(self, workdir):
    self.root = as_path(workdir)
    self.config_json = self.root / 'config.json'
    self.class_names_json = self.root / 'class_names.json'
    self.metrics_jsonl = self.root / 'metrics.jsonl'
    self.curves_png = self.root / 'curves.png'
    self.final_metrics_json = self.root / 'final_metrics.json'
    self.checkpoints = self.root / CHECKPOINT_SUBDIR

  def __str__(self):
    return os.fspath(self.root)

  # -- Before anything is written.

  def check_writable(self):
    """Tries to write here (a probe file, created and removed), rather than trusting
    permission bits (which say yes to root on a read-only mount).

    Locally the probe goes to the nearest folder that exists, so nothing is left behind.

    Raises:
      UserError: naming the path and why it cannot be written (a path the user chose, checked
        before anything runs).
    """
    probe_dir = self.root
    if _is_local(self.root):
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
      raise UserError(f'workdir {self} cannot be written ({probe_dir} is not a writable '
                      f'folder: {describe_os_error(e)})') from None

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

  # -- Small files, written whole (a bucket object cannot be appended to or truncated).

  def write_json(self, path, value):
    """Writes `value` to `path` whole, through a temporary file where the storage allows."""
    text = json.dumps(value, indent=2, sort_keys=True)
    try:
      self.root.mkdir(parents=True, exist_ok=True)
      if _is_local(path):
        partial = path.parent / f'{path.name}.partial'
        partial.write_text(text)
        os.replace(partial, path)
      else:
        path.write_text(text)
    except OSError as e:
      raise EnvironmentFault(f'cannot write {path} ({describe_os_error(e)})') from None

  def write_config(self, resolved):
    self.write_json(self.config_json, config_lib.workdir_record(resolved))

  def write_class_names(self, class_names):
    self.write_json(self.class_names_json, list(class_names))

  def write_final_metrics(self, metrics):
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

