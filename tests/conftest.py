"""Shared test set-up: CPU only, the repository root importable, a helper to run train.py."""

import os
import subprocess
import sys
import threading
import time

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# PyPI's torch for Python 3.12 is its CUDA build, with triton: transformers' ViT import loads
# triton through torch._dynamo, and triton beside TensorFlow in one process is a segmentation
# fault (measured: jax 0.12, torch 2.13.0+cu130, triton 3.7.1). The tests run torch eagerly on
# the CPU and never use triton; hidden, torch takes it for not installed. Python 3.11's CPU
# build of torch has no triton.
sys.modules.setdefault('triton', None)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

# The tests' own steps run with the allocator settings train.py uses, set before JAX starts.
from vit_jax import cpu_allocator  # pylint: disable=g-import-not-at-top,wrong-import-position
cpu_allocator.tune_at_start()

# One persistent XLA compilation cache for every test process and the train.py runs they start
# (they inherit the environment): the same quickstart steps are compiled by dozens of them. It
# changes no result, only how often XLA compiles the same program.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(REPO_ROOT, '.pytest_cache', 'jax_compilation_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.3')

# The suite compiles ~2,000 small programs and runs few steps of most: XLA's compile was over
# half of its CPU time. Its LLVM backend at -O0 compiles a tiny ViT's train step in half the
# CPU time (3.3 s against 7.3 s) and runs it ~1.5x slower (the quickstart's 4-layer step ~3x),
# with the same HLO optimisations, so the tests and their processes use it. The runs that train
# for hundreds of steps (the quickstart, its RoPE variant, distillation) run as users do, at
# XLA's default level: `XLA_DEFAULT_LEVEL` (BENCHMARKS.md, "The test suite").
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'
XLA_DEFAULT_LEVEL = {'XLA_FLAGS': ''}


def with_test_xla_flags(xla_flags):
  """`xla_flags` (an XLA_FLAGS value) with the tests' backend level, unless it sets its own."""
  if 'xla_backend_optimization_level' in xla_flags:
    return xla_flags
  return f'{TEST_XLA_FLAGS} {xla_flags}'.strip()


os.environ['XLA_FLAGS'] = with_test_xla_flags(os.environ.get('XLA_FLAGS', ''))


# Bytecode for the package, compiled once: the ~240 Pythons the suite starts each spent ~0.7 s
# of CPU compiling it from source where PYTHONDONTWRITEBYTECODE is set (as on CI's machines).
# The controller does it, before its workers start; the files are ignored by git.
if 'PYTEST_XDIST_WORKER' not in os.environ:
  import compileall  # pylint: disable=g-import-not-at-top
  for _folder in ('vit_jax', 'configs'):
    compileall.compile_dir(os.path.join(REPO_ROOT, _folder), quiet=1)


def shared_fixtures(name):
  """The folder of a reference checkpoint under shared/fixtures (see its README).

  $VIT_JAX_FIXTURES if set, else ../shared/fixtures beside the clone (as CI lays it out), else
  /work/shared/fixtures. A missing folder fails the test: these checks are never skipped.
  """
  if os.environ.get('VIT_JAX_FIXTURES'):
    candidates = [os.environ['VIT_JAX_FIXTURES']]  # Said explicitly: no fallback.
  else:
    candidates = [os.path.join(REPO_ROOT, '..', 'shared', 'fixtures'), '/work/shared/fixtures']
  for root in candidates:
    if os.path.isdir(os.path.join(root, name)):
      return os.path.join(root, name)
  raise FileNotFoundError(f'fixtures {name!r} not found in any of {candidates}; set '
                          'VIT_JAX_FIXTURES to the shared/fixtures folder')


def python_env(env=None):
  """The environment of the Pythons the tests start: this one's, the repository importable.

  An XLA_FLAGS in `env` is added to the tests' own (`XLA_DEFAULT_LEVEL`: XLA's defaults).
  """
  env = dict(env or {})
  if env.get('XLA_FLAGS'):
    env['XLA_FLAGS'] = with_test_xla_flags(env['XLA_FLAGS'])
  return dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu', **env)


def run_python(args, env=None, timeout=600, cwd=REPO_ROOT):
  """Runs `python <args>` from the repository root; returns the CompletedProcess."""
  return subprocess.run([sys.executable] + list(args), cwd=cwd, env=python_env(env),
                        timeout=timeout, capture_output=True, text=True)


def run_train(args, env=None, timeout=600):
  """Runs `python train.py <args>`."""
  return run_python(['train.py'] + list(args), env=env, timeout=timeout)


def train_losses_on_one_batch(config, steps=5, num_classes=10):
  """(losses, skipped updates) of the trainer's own jitted train step, `steps` times on one
  fixed synthetic batch from one init: how a config's step behaves, without any data set."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_jax.tools import benchmark
  from vit_jax.train import build  # pylint: disable=g-import-not-at-top
  from vit_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.resolve(config, jax.device_count())
  run_parts = build.parts(config, num_classes)
  state = run_parts.new_state()
  batch = benchmark.synthetic_batch(config, config.batch_size, num_classes, run_parts.mesh,
                                    np.random.default_rng(0))
  losses = []
  for _ in range(steps):
    state, metrics = run_parts.train_fn(state, batch)
    losses.append(float(metrics['train_loss']))
  return np.array(losses), int(state.skipped_updates)


# A quickstart small enough for the fault and cloud tests (one 16-wide layer, 12 steps, a
# checkpoint every 4): each run is mostly the start of Python, JAX and TensorFlow.
TINY_STEPS = 12
TINY_MODEL = ['--config.model.num_layers=1', '--config.model.hidden_size=16',
              '--config.model.mlp_dim=32']  # The quickstart's ViT at one 16-wide layer.
TINY_QUICKSTART = ['--config', 'configs/quickstart.py', f'--config.total_steps={TINY_STEPS}',
                   '--config.schedule.warmup_steps=2', '--config.checkpoint_every=4',
                   '--config.log_every=1', '--config.eval_every=0', '--config.batch_size=16',
                   *TINY_MODEL, '--config.plot_every_eval=False']


@pytest.fixture(scope='session')
def compile_cache(tmp_path_factory):
  """Environment for subprocesses sharing one persistent XLA cache: the tiny runs compile the
  same steps, so each later run starts seconds sooner (the executable is the same)."""
  return {'JAX_COMPILATION_CACHE_DIR': str(tmp_path_factory.mktemp('xla_cache'))}


@pytest.fixture(scope='session')
def tiny_reference(tmp_path_factory, compile_cache):
  """An uninterrupted local TINY_QUICKSTART run: `(workdir, digest of its final TrainState)`."""
  from vit_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('tiny_reference') / 'run')
  result = run_train(TINY_QUICKSTART + ['--workdir', workdir], env=compile_cache)
  assert result.returncode == 0, result.stderr[-3000:]
  state = checkpoint.restore_train_state(workdir)
  assert int(state.step) == TINY_STEPS
  return workdir, checkpoint.tree_digest(state)


def _uses_trained_quickstart(item):
  return 'trained_quickstart' in getattr(item, 'fixturenames', ())


def pytest_collection_modifyitems(items):
  """The modules whose tests use `trained_quickstart` go last (the order is kept otherwise):
  the run trains in the background from the session's first test on, so by the time they
  start it is usually there, and no worker sits idle waiting for it."""
  late = {item.nodeid.split('::')[0] for item in items if _uses_trained_quickstart(item)}
  items.sort(key=lambda item: item.nodeid.split('::')[0] in late)  # A stable sort.


def _session_folder(tmp_path_factory, worker_id):
  """The folder every pytest-xdist worker of this session shares (never an older session's)."""
  base = tmp_path_factory.getbasetemp()
  return base if worker_id == 'master' else base.parent


_QUICKSTART = 'trained_quickstart'  # Its workdir in the session folder; its files beside it.


@pytest.fixture(scope='session', autouse=True)
def _quickstart_in_background(request, tmp_path_factory, worker_id):
  """Starts the README's first command in the background when any selected test needs its
  model: once per session, by whichever worker gets here first (a lock in the shared folder).

  It trains beside the tests (the workers never wait idle for it, as they did when the first
  test to need it trained it). A thread writes its exit status when it ends. At the end of
  this worker's session it is waited for (another worker's test may need it), or killed when
  the session is stopping on a failure.
  """
  import filelock  # pylint: disable=g-import-not-at-top
  if not any(_uses_trained_quickstart(item) for item in request.session.items):
    yield
    return
  folder = _session_folder(tmp_path_factory, worker_id)
  with filelock.FileLock(str(folder / f'{_QUICKSTART}.lock')):
    started = folder / f'{_QUICKSTART}.started'
    process = None
    if not started.exists():
      started.touch()
      with open(folder / f'{_QUICKSTART}.stdout', 'w') as stdout, \
          open(folder / f'{_QUICKSTART}.stderr', 'w') as stderr:
        process = subprocess.Popen(
            [sys.executable, 'train.py', '--config', 'configs/quickstart.py',
             '--workdir', str(folder / _QUICKSTART)],
            cwd=REPO_ROOT, env=python_env(XLA_DEFAULT_LEVEL), stdout=stdout, stderr=stderr)

      def record_exit_status():
        status = process.wait()
        written = folder / f'{_QUICKSTART}.returncode.partial'
        written.write_text(str(status))
        written.rename(folder / f'{_QUICKSTART}.returncode')  # Whole, or not there at all.

      threading.Thread(target=record_exit_status, daemon=True).start()
  yield
  if process is not None and process.poll() is None:
    if request.session.shouldstop or request.session.shouldfail:
      process.kill()
    else:
      process.wait(timeout=QUICKSTART_TIMEOUT_S)


QUICKSTART_TIMEOUT_S = 1200


@pytest.fixture(scope='session')
def trained_quickstart(tmp_path_factory, worker_id, _quickstart_in_background):
  """The README's first command, trained once per test session: `(workdir, train.py's stdout)`.

  The full quickstart run is the slowest thing the suite does, and several tests need a trained
  model (its accuracy, a distillation teacher, frozen features): it trains in the background
  from the session's start (`_quickstart_in_background`), and this waits for it to end.
  Read-only: copy it to change it.
  """
  folder = _session_folder(tmp_path_factory, worker_id)
  status_file = folder / f'{_QUICKSTART}.returncode'
  deadline = time.monotonic() + QUICKSTART_TIMEOUT_S
  while not status_file.exists():
    if time.monotonic() > deadline:
      pytest.fail(f'the background quickstart run did not end within {QUICKSTART_TIMEOUT_S} s')
    time.sleep(0.5)
  stderr = (folder / f'{_QUICKSTART}.stderr').read_text()
  assert status_file.read_text() == '0', stderr[-3000:]
  return str(folder / _QUICKSTART), (folder / f'{_QUICKSTART}.stdout').read_text()
