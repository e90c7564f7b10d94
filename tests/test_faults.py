"""Faults a real machine has (issue 14): a full disk during a save, paths that cannot be written,
an image file that vanishes mid-run, a tfds shard that fails to read, a step that does not fit
the device, a corrupt or too new config.json. Each is one `error:` line (or a warning and a
count, for the image), no traceback, and nothing lost."""

import concurrent.futures
import errno
import json
import logging
import os
import subprocess
import textwrap

import numpy as np
import pytest

from conftest import REPO_ROOT, TINY_QUICKSTART, TINY_STEPS, run_python, run_train
from test_bad_input import image_folder, snapshot

# The same run, its second checkpoint (step 8) failing with ENOSPC inside the save: the fallback
# where a tmpfs cannot be mounted. Orbax's save has started (a half-written temporary folder is
# there) when the error comes, as it would from a full disk.
ENOSPC_AT_STEP_8 = textwrap.dedent('''
    import errno, sys
    import orbax.checkpoint as ocp
    save = ocp.CheckpointManager.save
    def failing_save(self, step, *args, **kwargs):
      if step == 8:
        partial = self.directory / '8.orbax-checkpoint-tmp-1'
        partial.mkdir(parents=True, exist_ok=True)
        (partial / '_CHECKPOINT_METADATA').write_text('{')
        raise OSError(errno.ENOSPC, 'No space left on device', str(partial))
      return save(self, step, *args, **kwargs)
    ocp.CheckpointManager.save = failing_save
    from vit_jax.train import main
    sys.exit(main.run(['train.py'] + sys.argv[1:]))
''')


def _lines(stderr):
  return [line for line in stderr.splitlines() if line.strip()]


def _assert_one_error_line(result, status, *words):
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert result.returncode == status, result.stderr[-3000:]
  errors = [line for line in _lines(result.stderr) if line.startswith('error: ')]
  assert len(errors) == 1 and _lines(result.stderr)[-1] == errors[0], result.stderr[-3000:]
  for word in words:
    assert word in errors[0], (word, errors[0])
  return errors[0]


def _steps(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line)['step'] for line in f if 'train_loss' in line]


def _mount_tmpfs(path, size):
  """Mounts a tmpfs of `size` at `path`; False where this machine does not allow it."""
  os.makedirs(path, exist_ok=True)
  try:
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', path],
                             capture_output=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return mounted.returncode == 0


@pytest.mark.slow
def test_full_disk_during_a_save_then_resume_is_bit_identical(tmp_path, tiny_reference,
                                                                compile_cache):
  mount_point = str(tmp_path / 'small_disk')
  # 400 KiB hold the run's files and its first checkpoint (~250 KiB), not a second one.
  on_tmpfs = _mount_tmpfs(mount_point, '400k')
  try:
    workdir = os.path.join(mount_point, 'run')
    args = TINY_QUICKSTART + ['--workdir', workdir]
    if on_tmpfs:
      failed = run_train(args, env=compile_cache)
    else:
      failed = run_python(['-c', ENOSPC_AT_STEP_8] + args, env=compile_cache)
    line = _assert_one_error_line(failed, 4, 'cannot save the checkpoint at step 8',
                                  'no space left on device',
                                  'the newest complete checkpoint, step 4, is untouched')
    assert os.path.join(workdir, 'checkpoints') in line
    assert 'Event loop is closed' not in failed.stderr
    saved = os.listdir(os.path.join(workdir, 'checkpoints'))
    assert '4' in saved and '8' not in saved, saved
    assert any('tmp' in name for name in saved), saved  # the half-written one is still there

    if on_tmpfs:
      subprocess.run(['mount', '-o', 'remount,size=8m', mount_point], check=True, timeout=30)
    resumed = run_train(args, env=compile_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'resuming from the checkpoint at step 4 in {workdir}' in resumed.stdout
    assert not any('tmp' in name for name in os.listdir(os.path.join(workdir, 'checkpoints')))
    assert _steps(workdir) == list(range(1, TINY_STEPS + 1))  # each step once

    from vit_jax.train import checkpoint
    assert checkpoint.tree_digest(checkpoint.restore_train_state(workdir)) == tiny_reference[1]
  finally:
    if on_tmpfs:
      subprocess.run(['umount', mount_point], check=False, timeout=30)


def _read_only_folder(tmp_path):
  """A read-only file system (a tmpfs mounted `ro`), or None where mounting is not allowed."""
  path = str(tmp_path / 'read_only')
  if not _mount_tmpfs(path, '1m'):
    return None
  subprocess.run(['mount', '-o', 'remount,ro', path], check=True, timeout=30)
  return path


@pytest.mark.slow
def test_paths_that_cannot_be_written_and_bad_config_json_are_one_line(tmp_path):
  """train.py on an uncreatable path, a read-only file system, and workdirs whose config.json
  is corrupt or from a newer schema: one line each (exit 2, a path or file the user chose),
  nothing changed."""
  corrupt = tmp_path / 'corrupt'
  corrupt.mkdir()
  (corrupt / 'config.json').write_text('{"schema_version": 2, "config": {"seed": ')
  newer = tmp_path / 'newer'
  newer.mkdir()
  (newer / 'config.json').write_text(json.dumps({'schema_version': 99, 'config': {}}))
  read_only = _read_only_folder(tmp_path)
  cases = {
      'uncreatable': ('/proc/no/such/dir', ['cannot be written', '/proc']),
      'corrupt': (str(corrupt), ['config.json is corrupt']),
      'newer': (str(newer), ['config.json', '99']),
  }
  if read_only:
    cases['read_only'] = (os.path.join(read_only, 'run'),
                          ['cannot be written', 'read-only file system'])
  try:
    before = {name: snapshot(path) for name, (path, _) in cases.items()}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      results = {name: pool.submit(run_train, TINY_QUICKSTART + ['--workdir', path])
                 for name, (path, _) in cases.items()}
    for name, (path, words) in cases.items():
      _assert_one_error_line(results[name].result(), 2, *words)
      assert snapshot(path) == before[name], name
  finally:
    if read_only:
      subprocess.run(['umount', read_only], check=False, timeout=30)


def test_probe_failures_say_which_kind(tmp_path, monkeypatch):
  """The writability probe tries a file: a full disk is the machine's fault (exit 4), a
  read-only or forbidden place the user's choice (exit 2); neither trusts permission bits."""
  from vit_jax.errors import EnvironmentFault, UserError
  from vit_jax.train import workdir as workdir_lib
  files = workdir_lib.RunFiles(tmp_path / 'run')
  files.check_writable()  # a real probe: nothing is left behind
  assert os.listdir(tmp_path) == []

  def failing(errno_value):
    def write_text(self, *args, **kwargs):
      raise OSError(errno_value, os.strerror(errno_value), os.fspath(self))
    return write_text
  path_class = type(files.root)
  for errno_value, error_class, words in ((errno.ENOSPC, EnvironmentFault, 'no space left'),
                                          (errno.EROFS, UserError, 'read-only file system'),
                                          (errno.EACCES, UserError, 'permission denied')):
    monkeypatch.setattr(path_class, 'write_text', failing(errno_value))
    with pytest.raises(error_class, match=words):
      files.check_writable()


def test_a_failing_metrics_write_names_the_file_and_the_step(tmp_path, monkeypatch):
  from vit_jax.errors import EnvironmentFault
  from vit_jax.train import metrics, storage, workdir as workdir_lib
  files = workdir_lib.RunFiles(tmp_path / 'run')
  writer = metrics.MetricWriter(files)
  writer.write(1, {'train_loss': 2.0})

  def append(self, data):
    raise OSError(errno.EROFS, 'Read-only file system')
  monkeypatch.setattr(storage.GrowingFile, 'append', append)
  with pytest.raises(EnvironmentFault, match=r'metrics.jsonl at step 2 \(read-only file system'):
    writer.write(2, {'train_loss': 1.0})
  writer.close(discard=True)


def test_resume_drops_what_was_logged_after_the_checkpoint(tmp_path):
  """metrics.jsonl and the TensorBoard events of a run resumed from step 3 hold steps 1..3 of
  the interrupted run, then the new ones: each step once, and a restart event at step 4."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  from vit_jax.train import metrics, workdir as workdir_lib
  files = workdir_lib.RunFiles(tmp_path / 'run')
  first = metrics.MetricWriter(files)
  for step in range(1, 7):
    first.write(step, {'train_loss': 10.0 + step})
  first.close()
  with open(files.metrics_jsonl, 'ab') as f:
    f.write(b'{"step": 7, "train_lo')  # killed mid-write
  second = metrics.MetricWriter(files, start_step=3)
  for step in range(4, 9):
    second.write(step, {'train_loss': 20.0 + step})
  second.close()
  rows = [json.loads(line) for line in files.metrics_jsonl.read_text().splitlines()]
  assert [(r['step'], r['train_loss']) for r in rows] == (
      [(s, 10.0 + s) for s in (1, 2, 3)] + [(s, 20.0 + s) for s in range(4, 9)])
  assert len(files.events_files()) == 1
  events = EventAccumulator(os.fspath(files.root))
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars('train_loss')] == [
      (s, 10.0 + s) for s in (1, 2, 3)] + [(s, 20.0 + s) for s in range(4, 9)]


def test_an_image_that_vanishes_mid_run_is_skipped_warned_and_counted(tmp_path, caplog):
  from vit_jax import data as data_lib
  from vit_jax.train import config as config_lib
  import configs.quickstart as quickstart
  root = image_folder(str(tmp_path / 'images'), per_class=4)
  config = quickstart.get_config()
  config.data.source, config.data.name = 'folder', root
  config.batch_size = config.eval_batch_size = 4
  config.data.prefetch_batches = 0
  datasets = data_lib.create_datasets(config_lib.resolve(config, 1))
  batches = datasets.train_batches(0)
  next(batches)
  vanished = os.path.join(root, 'train', 'a', '0.png')
  os.remove(vanished)
  unreadable = os.path.join(root, 'train', 'b', '1.png')
  os.remove(unreadable)
  os.mkdir(unreadable)  # reading it now fails (IsADirectoryError), as root cannot lose read access
  with caplog.at_level(logging.WARNING):
    for _ in range(6):  # three epochs of the 8 images: both are asked for
      batch = next(batches)
      assert batch['images'].shape == (4, 8, 8, 3) and batch['labels'].shape == (4,)
    evaluated = sum(float(b['mask'].sum()) for b in datasets.eval_batches())
  assert datasets.train_source.unreadable == {vanished, unreadable}
  warnings = [r.getMessage() for r in caplog.records if 'can no longer be read' in r.getMessage()]
  assert len(warnings) == 2 and '2 such files so far' in warnings[1]
  assert {vanished, unreadable} == {w.split()[3].rstrip(',') for w in warnings}
  assert evaluated == 8  # the eval split is untouched


def _tiny_tfds(data_dir):
  """A prepared tfds image data set of 2 shards (built offline); returns the builder."""
  import tensorflow_datasets as tfds

  class TinyShards(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(8, 8, 3)),
          'label': tfds.features.ClassLabel(names=['a', 'b'])}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(40), 'test': self._generate_examples(8)}

    def _generate_examples(self, count):
      rng = np.random.default_rng(count)
      for i in range(count):
        yield i, {'image': rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), 'label': i % 2}

  builder = TinyShards(data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      max_examples_per_split=None, num_shards=2))
  return builder


def test_a_tfds_shard_that_fails_to_read_is_one_line_naming_it(tmp_path):
  from vit_jax import data as data_lib
  from vit_jax.errors import EnvironmentFault
  from vit_jax.train import config as config_lib
  import configs.quickstart as quickstart
  builder = _tiny_tfds(str(tmp_path / 'tfds'))
  shards = [os.fspath(f) for f in builder.info.splits['train'].filepaths]
  config = quickstart.get_config()
  config.data.update(source='tfds', name='tiny_shards', data_dir=str(tmp_path / 'tfds'),
                     train_split='train', eval_split='test', prefetch_batches=0)
  config.batch_size = config.eval_batch_size = 8
  datasets = data_lib.create_datasets(config_lib.resolve(config, 1))
  # Shards are read in file order: the second is damaged first, then the first goes missing.
  for shard, damage in ((shards[1], 'corrupt'), (shards[0], 'missing')):
    if damage == 'corrupt':
      with open(shard, 'r+b') as f:
        f.seek(100)
        f.write(b'\0' * 64)
    else:
      os.remove(shard)
    with pytest.raises(EnvironmentFault) as raised:
      for _ in range(20):
        next(datasets.train_batches(0))
    message = str(raised.value)
    assert '\n' not in message and shard in message and 'tiny_shards' in message, message
    assert 'tfds build tiny_shards' in message


def test_a_step_that_does_not_fit_is_one_line_with_figures_and_remedies(tmp_path, monkeypatch):
  """XLA's RESOURCE_EXHAUSTED at compile (raised here by the test, as a too-large batch would on
  an accelerator): one line naming the batch, the device and the remedies; nothing written."""
  import jax
  from vit_jax.errors import UserError
  from vit_jax.train import loop
  import configs.quickstart as quickstart

  def compile_out_of_memory(self, *args, **kwargs):
    raise jax.errors.JaxRuntimeError(
        'RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17.25GiB.\n'
        'BufferAssignment OOM Debugging.\nBufferAssignment stats: ...\n' + 'x' * 5000)
  monkeypatch.setattr(jax.stages.Lowered, 'compile', compile_out_of_memory)
  config = quickstart.get_config()
  config.total_steps, config.schedule.warmup_steps = 4, 1
  config.model.num_layers, config.model.hidden_size, config.model.mlp_dim = 1, 16, 32
  workdir = tmp_path / 'run'
  with pytest.raises(UserError) as raised:
    loop.train_and_evaluate(config, str(workdir), log=lambda *a: None)
  message = str(raised.value)
  assert '\n' not in message, message
  for words in ('does not fit in device memory', 'batch_size 128', 'XLA asked for 17.25GiB',
                'accum_steps=2', 'model.remat_policy=dots', '--max_batch'):
    assert words in message, (words, message)
  assert not workdir.exists()


def test_the_remedies_offer_scan_only_with_remat_as_the_memory_plan_says():
  """Scan alone plans more memory than the unrolled step (its loop hands out every residual
  the backward reads), scan with remat=dots less: the out-of-memory line says so."""
  import jax
  import configs.quickstart as quickstart
  from vit_jax.tools import memory
  from vit_jax.train import config as config_lib
  from vit_jax.train import out_of_memory

  def resolved(scan, remat_policy):
    config = quickstart.get_config()
    config.model.update(num_layers=4, scan=scan, remat_policy=remat_policy)
    return config_lib.resolve(config, jax.device_count())

  plans = {(scan, remat): memory.train_step_planner(resolved(scan, remat), 10)(128)
           for scan, remat in ((False, 'none'), (True, 'none'), (True, 'dots'))}
  assert plans[True, 'none'] > plans[False, 'none'] > plans[True, 'dots'], plans
  unrolled = out_of_memory.remedies(resolved(False, 'none'))
  assert 'model.scan=True with model.remat_policy=dots (scan alone keeps more, not less)' in unrolled
  assert 'model.scan=True' in out_of_memory.remedies(resolved(False, 'dots'))
  assert not any('scan' in remedy for remedy in out_of_memory.remedies(resolved(True, 'none')))


def test_a_bucket_gets_metrics_whole_at_flushes_and_every_upload_interval(tmp_path,
                                                                          monkeypatch):
  """In a bucket (here: local files written as a bucket's objects are, whole), rows wait in
  memory until a flush, or until UPLOAD_EVERY_S has passed since the last upload."""
  from vit_jax.train import metrics, storage, workdir as workdir_lib
  monkeypatch.setattr(storage, 'is_local', lambda path: False)
  files = workdir_lib.RunFiles(tmp_path / 'run')
  writer = metrics.MetricWriter(files)
  writer.write(1, {'train_loss': 2.0})
  assert not files.metrics_jsonl.exists()  # nothing sent yet
  writer.flush()
  assert files.metrics_jsonl.read_text().count('\n') == 1
  writer.write(2, {'train_loss': 1.5})
  assert files.metrics_jsonl.read_text().count('\n') == 1
  monkeypatch.setattr(metrics, 'UPLOAD_EVERY_S', 0)
  writer.write(3, {'train_loss': 1.0})
  assert [json.loads(l)['step'] for l in files.metrics_jsonl.read_text().splitlines()] == [1, 2, 3]
  writer.close()


def test_an_unreadable_checkpoint_in_a_bucket_is_set_aside_and_saved_again(compile_cache):
  """gs:// as a local disk (test_resilience): the rerun falls back past a damaged step 12,
  renames its objects to `12.unreadable/` (every one kept, as it was) and saves step 12 anew,
  which a later restore reads."""
  from gcs_emulator import Emulator
  workdir = 'gs://bkt/run'
  with Emulator(['bkt']) as gcs:
    env = dict(gcs.env, **compile_cache)
    args = TINY_QUICKSTART + ['--workdir', workdir]
    first = run_train(args, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    damaged = {}  # object name under checkpoints/12/ -> its damaged content
    for name in gcs.names('run/checkpoints/12/'):
      data = gcs.read(name)
      if data and not name.endswith('commit_success.txt'):  # still a committed checkpoint
        damaged[name] = data[:len(data) // 2]
        gcs.write(name, damaged[name])
    assert damaged

    rerun = run_train(args, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    restored = run_python(['-c', textwrap.dedent('''
        import sys
        from vit_jax.train import checkpoint
        print('step', int(checkpoint.restore_train_state(sys.argv[1]).step))
        ''' ), workdir], env=env)
    assert restored.returncode == 0, restored.stderr[-3000:]
    assert restored.stdout.split() == ['step', str(TINY_STEPS)]
    assert 'resuming from the checkpoint at step 8' in rerun.stdout
    assert f'moved aside to {workdir}/checkpoints/12.unreadable' in rerun.stdout
    for name, data in damaged.items():
      assert gcs.read(name.replace('/12/', '/12.unreadable/')) == data
    assert 'run/checkpoints/12/commit_success.txt' in gcs.names('run/checkpoints/12/')
