"""A user's mistake gets one line `error: ...`, exit status 2, no traceback, and the workdir as
it was (issue 5). Each case runs `train.py` as the user would; the cases run in parallel once per
module (two at a time), and each has its own test asserting its message and the workdir."""

import concurrent.futures
import dataclasses
import hashlib
import os
import time
from typing import Callable, Optional

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_MODEL, run_python, run_train

QUICKSTART = ['--config', 'configs/quickstart.py']
# A quickstart run short enough to finish in seconds (no eval until the end, one checkpoint),
# of the one-layer 16-wide model.
SHORT_RUN = ['--config.total_steps=2', '--config.schedule.warmup_steps=1',
             '--config.log_every=1', '--config.eval_every=0', '--config.checkpoint_every=0',
             '--config.batch_size=16', '--config.plot_every_eval=False', *TINY_MODEL]
# Runs train.py with the tfds storage host pointed at a closed local port: "offline", for sure.
OFFLINE_TRAIN = (
    'import runpy, sys\n'
    'from vit_jax.data import tfds_source\n'
    "tfds_source.TFDS_STORAGE_ADDRESS = ('127.0.0.1', 9)\n"
    "sys.argv[0] = 'train.py'\n"
    "runpy.run_path('train.py', run_name='__main__')\n")


def snapshot(path):
  """Everything under `path` (a folder, a file, or nothing): names, kinds, bytes and mtimes."""
  if not os.path.lexists(path):
    return None
  if not os.path.isdir(path):
    with open(path, 'rb') as f:
      return ('file', os.stat(path).st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
  listing = {}
  for root, dirs, files in os.walk(path):
    for name in dirs:
      full = os.path.join(root, name)
      listing[os.path.relpath(full, path)] = ('dir', os.stat(full).st_mtime_ns)
    for name in files:
      full = os.path.join(root, name)
      listing[os.path.relpath(full, path)] = snapshot(full)
  return ('dir', os.stat(path).st_mtime_ns, listing)


def write_images(folder, count, size=8, seed=0):
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(count):
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, f'{i}.png'))


def image_folder(root, classes=('a', 'b'), per_class=3):
  """<root>/{train,test}/<class>/*.png with small random images."""
  for split in ('train', 'test'):
    for index, name in enumerate(classes):
      write_images(os.path.join(root, split, name), per_class, seed=index)
  return root


def write_vit_npz(path, hidden_size):
  """A quickstart-shaped ViT (4x4 patches, gap, 10 classes) of another width, as an .npz."""
  import jax
  import jax.numpy as jnp
  from vit_jax import models
  from vit_jax.weights import convert
  model = models.create_model('ViT-Ti/4', 10, hidden_size=hidden_size, num_layers=4,
                              num_heads=4, mlp_dim=128, classifier='gap')
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)['params']
  convert.save_weights(params, path, format='npz')
  return path


@dataclasses.dataclass
class Case:
  """One bad input: the train.py arguments and the words its error must contain."""
  args: list                   # after `train.py` (no --workdir: the case gets its own)
  expected: tuple              # lower-case words the error line must contain
  env: Optional[dict] = None
  populate_workdir: bool = True  # a workdir holding marker.txt; else a path that does not exist
  prepare: Optional[Callable] = None  # (tmp dir) -> extra args; runs before the snapshot
  script: Optional[str] = None  # run `python -c script` (train.py's CLI) instead of train.py
  workdir_flag: bool = True    # False: --workdir <tmp>/afile/workdir, under a regular file
  workdir_is_the_file: bool = False  # --workdir <tmp>/afile itself


def _prepare_folder(make):
  def prepare(tmp):
    root = os.path.join(tmp, 'images')
    make(root)
    return ['--config.data.source=folder', f'--config.data.name={root}']
  return prepare


def _no_classes(root):
  os.makedirs(os.path.join(root, 'train'))
  os.makedirs(os.path.join(root, 'test'))


def _empty_class(root):
  image_folder(root)
  os.makedirs(os.path.join(root, 'train', 'c'))


def _pretrained_garbage(tmp):
  path = os.path.join(tmp, 'garbage.npz')
  with open(path, 'wb') as f:
    f.write(b'this is not a zip archive\n' * 10)
  return [f'--config.pretrained.path={path}']


def _pretrained_wrong_width(tmp):
  return [f'--config.pretrained.path={write_vit_npz(os.path.join(tmp, "vit32.npz"), 32)}']


def _unwritable_workdir(tmp):
  with open(os.path.join(tmp, 'afile'), 'w') as f:
    f.write('a file, not a folder\n')
  return []


def _finished_run(tmp):
  """A finished 2-step quickstart run in the case's workdir, to be resumed with another config."""
  result = run_train(QUICKSTART + ['--workdir', os.path.join(tmp, 'workdir')] + SHORT_RUN)
  assert result.returncode == 0, result.stderr[-3000:]
  return SHORT_RUN + ['--config.model.hidden_size=32']


CASES = {
    'missing_config': Case([], ('--config is required',)),
    'config_file_missing': Case(['--config', 'configs/no_such_config.py'],
                                ('config file configs/no_such_config.py does not exist',)),
    'config_argument_not_accepted': Case(['--config', 'configs/quickstart.py:B/16'],
                                         ('quickstart.py:b/16', 'get_config()')),
    'unknown_flag': Case(QUICKSTART + ['--wrkdir=x'], ('wrkdir',)),
    'unknown_config_key': Case(QUICKSTART + ['--config.modle_name=x'],
                               ('unknown config key --config.modle_name',
                                'did you mean model_name?')),
    'unknown_nested_config_key': Case(QUICKSTART + ['--config.optimizer.lr=0.1'],
                                      ('unknown config key --config.optimizer.lr',)),
    'wrong_value_type': Case(QUICKSTART + ['--config.batch_size=abc'], ('batch_size', 'abc')),
    'wrong_value_type_placeholder': Case(QUICKSTART + ['--config.model.hidden_size=wide'],
                                         ('hidden_size', 'wide')),
    'unknown_model_name': Case(QUICKSTART + ['--config.model_name=ViT-Q/16'],
                               ('unknown model name', 'vit-q/16'), populate_workdir=False),
    'patch_does_not_divide_image': Case(QUICKSTART + ['--config.image_size=15'],
                                        ('patch size 4x4', 'does not divide', '15')),
    'heads_do_not_divide_width': Case(QUICKSTART + ['--config.model.num_heads=3'],
                                      ('num_heads 3', 'width 64')),
    'unknown_classifier': Case(QUICKSTART + ['--config.model.classifier=cls'],
                               ('classifier', 'cls', 'gap')),
    'cudnn_attention_without_gpu': Case(
        QUICKSTART + ['--config.model.attention_impl=cudnn', '--config.model.dtype=bfloat16'],
        ('attention_impl=cudnn needs a cuda gpu', 'cpu')),
    'unknown_prng_impl': Case(QUICKSTART + ['--config.prng_impl=mt19937'],
                              ("prng_impl='mt19937'", 'unsafe_rbg')),
    'xla_flags_not_flags': Case(QUICKSTART + ['--config.xla_flags=fast_math'],
                                ("xla_flags: 'fast_math' is not an xla flag",)),
    'unknown_dtype': Case(QUICKSTART + ['--config.model.dtype=float8'],
                          ('dtype', 'float8', 'bfloat16')),
    'batch_not_divisible_by_devices': Case(
        QUICKSTART + ['--config.batch_size=129'], ('batch_size=129', '2 devices'),
        env={'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}),
    'batch_not_divisible_by_accum_steps': Case(
        QUICKSTART + ['--config.accum_steps=3'], ('batch_size=128', 'accum_steps=3')),
    'zero_total_steps': Case(QUICKSTART + ['--config.total_steps=0'], ('total_steps=0',),
                             populate_workdir=False),
    'negative_total_steps': Case(QUICKSTART + ['--config.total_steps=-5'], ('total_steps=-5',)),
    'negative_eval_every': Case(QUICKSTART + ['--config.eval_every=-1'], ('eval_every=-1',)),
    'unknown_nan_policy': Case(QUICKSTART + ['--config.optimizer.nan_policy=ignore'],
                               ('nan_policy', 'ignore', 'skip')),
    'unknown_optimizer': Case(QUICKSTART + ['--config.optimizer.name=adam'],
                              ("optimizer.name='adam' is unknown", 'adamw')),
    'unknown_schedule': Case(QUICKSTART + ['--config.schedule.name=cosin'],
                             ("schedule.name='cosin' is unknown", 'cosine')),
    'warmup_longer_than_run': Case(QUICKSTART + ['--config.total_steps=50'],
                                   ('warmup_steps=80', 'total_steps=50')),
    'invalid_mesh': Case(QUICKSTART + ['--config.mesh.fsdp=3'], ('mesh', '1 devices')),
    'unknown_data_source': Case(QUICKSTART + ['--config.data.source=csv'],
                                ("source='csv'", 'tfds, folder, digits')),
    'tfds_name_unknown': Case(
        QUICKSTART + ['--config.data.source=tfds', '--config.data.name=cifar11'],
        ("no data set 'cifar11'", 'cifar10')),
    'tfds_not_prepared_no_download': Case(
        QUICKSTART + ['--config.data.source=tfds', '--config.data.name=cifar10',
                      '--config.data.download=False'],
        ("'cifar10' is not prepared", 'download=false', 'data_dir'),
        prepare=lambda tmp: [f'--config.data.data_dir={os.path.join(tmp, "tfds")}'],
        populate_workdir=False),
    'tfds_not_prepared_offline': Case(
        QUICKSTART + ['--config.data.source=tfds', '--config.data.name=cifar10',
                      '--config.data.download=True'],
        ("'cifar10' is not prepared", 'unreachable', 'data_dir'),
        prepare=lambda tmp: [f'--config.data.data_dir={os.path.join(tmp, "tfds")}'],
        script=OFFLINE_TRAIN),
    'folder_missing': Case(QUICKSTART + ['--config.data.source=folder',
                                         '--config.data.name=/no/such/folder'],
                           ('/no/such/folder', 'is not a folder')),
    'folder_without_classes': Case(QUICKSTART, ('no class folders',),
                                   prepare=_prepare_folder(_no_classes)),
    'folder_with_empty_class': Case(QUICKSTART, ('class folder', 'train/c', 'holds no images'),
                                    prepare=_prepare_folder(_empty_class),
                                    populate_workdir=False),
    'folder_split_missing': Case(QUICKSTART + ['--config.data.eval_split=val'],
                                 ('split folder', 'val', 'test, train'),
                                 prepare=_prepare_folder(image_folder)),
    'pretrained_missing': Case(QUICKSTART + ['--config.pretrained.path=/no/such/vit.npz'],
                               ('/no/such/vit.npz', 'does not exist')),
    'pretrained_garbage': Case(QUICKSTART, ('garbage.npz', 'cannot read', 'not a zip archive'),
                               prepare=_pretrained_garbage),
    'pretrained_wrong_architecture': Case(
        QUICKSTART, ('vit32.npz', 'does not match', 'wrong shape', 'embedding'),
        prepare=_pretrained_wrong_width, populate_workdir=False),
    'pretrained_unknown_format': Case(
        QUICKSTART + ['--config.pretrained.path=vit.npz', '--config.pretrained.format=onnx'],
        ("pretrained.format='onnx' is unknown", 'npz')),
    'workdir_not_writable': Case(QUICKSTART, ('afile/workdir', 'cannot be written'),
                                 prepare=_unwritable_workdir, workdir_flag=False),
    'workdir_is_a_file': Case(QUICKSTART, ('cannot be written', 'not a writable folder'),
                              prepare=_unwritable_workdir, workdir_flag=False,
                              workdir_is_the_file=True),
    'stop_at_step_zero': Case(QUICKSTART + ['--stop_at_step=0'], ('--stop_at_step=0', '>= 1')),
    'incomplete_multiprocess_flags': Case(QUICKSTART + ['--coordinator_address=localhost:9'],
                                          ('--num_processes', '--process_id')),
    'pretrained_url_unreachable': Case(
        QUICKSTART + ['--config.pretrained.url=http://127.0.0.1:9/vit.npz'],
        ('absent.npz', 'could not be fetched', 'put it at'),
        prepare=lambda tmp: [f'--config.pretrained.path={os.path.join(tmp, "absent.npz")}']),
    'workdir_of_another_config': Case(
        QUICKSTART, ('different config', 'model.hidden_size', '16 -> 32',
                     '--allow_config_change'),
        prepare=_finished_run, populate_workdir=False),
}


@dataclasses.dataclass
class Outcome:
  result: object
  seconds: float
  before: object
  after: object
  workdir: str
  tmp: str                     # the case's own folder (its fixtures and workdir)


def _run_case(name, case, tmp_root):
  tmp = os.path.join(tmp_root, name)
  os.makedirs(tmp)
  workdir = os.path.join(tmp, 'workdir')
  if case.populate_workdir:
    os.makedirs(workdir)
    with open(os.path.join(workdir, 'marker.txt'), 'w') as f:
      f.write('the user\'s own file\n')
  extra = case.prepare(tmp) if case.prepare else []
  if not case.workdir_flag:  # The unwritable cases: a regular file, or a workdir under one.
    workdir = os.path.join(tmp, 'afile') if case.workdir_is_the_file else os.path.join(
        tmp, 'afile', 'workdir')
  watched = os.path.join(tmp, 'afile') if not case.workdir_flag else workdir
  args = case.args + extra + ['--workdir', workdir]
  before = snapshot(watched)
  start = time.perf_counter()
  if case.script:
    result = run_python(['-c', case.script] + args, env=case.env, timeout=300)
  else:
    result = run_train(args, env=case.env, timeout=300)
  return Outcome(result=result, seconds=time.perf_counter() - start, before=before, after=snapshot(watched), workdir=workdir,
                 tmp=tmp)


CORRUPT_IMAGES = 'corrupt_images'  # The one run that must succeed (see its test).


def _run_with_corrupt_images(tmp_root):
  """A short training run on a folder with a corrupt PNG (train) and an empty JPEG (test)."""
  root = image_folder(os.path.join(tmp_root, CORRUPT_IMAGES, 'images'), per_class=4)
  with open(os.path.join(root, 'train', 'a', 'broken.png'), 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + b'not really a png' * 4)
  with open(os.path.join(root, 'test', 'b', 'empty.jpg'), 'wb'):
    pass
  workdir = os.path.join(tmp_root, CORRUPT_IMAGES, 'workdir')
  result = run_train(QUICKSTART + SHORT_RUN + [
      '--workdir', workdir, '--config.data.source=folder', f'--config.data.name={root}',
      '--config.batch_size=4', '--config.eval_batch_size=4'], timeout=300)
  return result, root, workdir


@pytest.fixture(scope='module')
def outcomes(tmp_path_factory):
  """Every case's outcome (a future), run two at a time: each is its own Python process."""
  tmp_root = str(tmp_path_factory.mktemp('bad_input'))
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    # The two that train start first, so they do not finish last.
    futures = {CORRUPT_IMAGES: pool.submit(_run_with_corrupt_images, tmp_root)}
    order = sorted(CASES, key=lambda name: CASES[name].prepare is not _finished_run)
    futures.update({name: pool.submit(_run_case, name, CASES[name], tmp_root)
                    for name in order})
  return futures


def test_at_least_twenty_cases():
  assert len(CASES) >= 20


@pytest.mark.slow  # All cases together: ~3 min on 2 busy cores (~40 Pythons importing JAX/TF).
@pytest.mark.parametrize('name', sorted(CASES))
def test_bad_input_is_one_line_exit_2_workdir_untouched(outcomes, name):
  outcome = outcomes[name].result()  # Re-raises a failure of the case's preparation.
  result, case = outcome.result, CASES[name]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert result.returncode == 2, result.stderr[-3000:]
  assert lines and lines[-1].startswith('error: '), result.stderr[-3000:]
  message = lines[-1].lower()
  for word in case.expected:
    assert word.lower() in message, (word, lines[-1])
  assert outcome.after == outcome.before, (outcome.before, outcome.after)
  partial_downloads = [name for _, _, files in os.walk(outcome.tmp) for name in files
                       if name.endswith('.partial')]
  assert not partial_downloads


@pytest.mark.slow
def test_corrupt_image_is_skipped_warned_and_counted(outcomes):
  """Not an error: unreadable files are left out with a warning each and a count, and the run
  trains and finishes."""
  result, root, workdir = outcomes[CORRUPT_IMAGES].result()
  output = result.stdout + result.stderr
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  for path in (('train', 'a', 'broken.png'), ('test', 'b', 'empty.jpg')):
    assert f'skipping unreadable image file {os.path.join(root, *path)}' in output
  assert 'skipped 2 unreadable image files' in output
  assert os.path.exists(os.path.join(workdir, 'final_metrics.json'))
