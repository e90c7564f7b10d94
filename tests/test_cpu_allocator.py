"""vit_jax.cpu_allocator: with its malloc settings a freed buffer's memory stays in the process,
also after TensorFlow has set its own mmap threshold (as it does in every train.py run), so
reusing it faults in no fresh pages; the backend guess follows JAX_PLATFORMS."""

import json
import os
import subprocess
import sys

import pytest

from conftest import python_env
from conftest import run_python
from vit_jax import cpu_allocator

# (major, minor) of the C library, or None where it is not glibc.
_GLIBC = cpu_allocator._glibc_version()  # pylint: disable=protected-access

# In a fresh process, `tuned` or not, after TensorFlow's mallopt as in train.py: malloc, write
# and free a 4 MiB buffer 50 times (what XLA's CPU kernels do with their scratch buffers on
# every call); prints the minor page faults per round.
_FAULTS_PER_ROUND = '''
import ctypes, ctypes.util, json, resource, sys
from vit_jax import cpu_allocator
tuned = sys.argv[1] == 'tuned'
if tuned:
  assert cpu_allocator.tune_at_start()  # First thing, as train.py does.
from vit_jax.data.tensorflow_import import tf
# A generator dataset, as the in-memory pipeline of every train.py run builds: TensorFlow's own
# mallopt happens at the first one (at the import above where the settings are on).
one = tf.data.Dataset.from_generator(lambda: iter([1]),
                                     output_signature=tf.TensorSpec((), tf.int32))
for _ in one:
  pass
libc = ctypes.CDLL(ctypes.util.find_library('c'))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 4 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
  buffer = libc.malloc(size)
  ctypes.memset(buffer, 1, size)
  libc.free(buffer)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({'faults_per_round': faults / 50}))
'''


def _faults_per_round(mode):
  result = run_python(['-c', _FAULTS_PER_ROUND, mode])
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])['faults_per_round']


@pytest.mark.slow  # Two Pythons importing TensorFlow.
@pytest.mark.skipif(_GLIBC is None, reason='the settings are glibc\'s')
def test_a_freed_buffer_is_reused_without_faults_after_tensorflows_threshold():
  default, tuned = _faults_per_round('default'), _faults_per_round('tuned')
  pages = (4 << 20) // 4096
  # glibc after TensorFlow's mallopt: each round is an mmap of its own, every page faulted in.
  assert default > pages / 2, default
  assert tuned < pages / 20, tuned  # The same memory every round (measured: ~20 faults).


@pytest.mark.parametrize('platforms, expected', [
    ('cpu', True), ('cpu,gpu', True), ('cuda', False), ('tpu,cpu', False), (' gpu ', False)])
def test_the_backend_guess_reads_jax_platforms_first(platforms, expected):
  assert cpu_allocator.jax_will_use_cpu({'JAX_PLATFORMS': platforms}) is expected


def test_without_jax_platforms_the_guess_is_the_cpu_unless_a_plugin_is_installed(monkeypatch):
  installed = set()
  monkeypatch.setattr(cpu_allocator.importlib.util, 'find_spec',
                      lambda name: object() if name in installed else None)
  assert cpu_allocator.jax_will_use_cpu({})
  installed.add('jax_cuda12_plugin')
  assert not cpu_allocator.jax_will_use_cpu({})


needs_hugetlb_tunable = pytest.mark.skipif(_GLIBC is None or _GLIBC < (2, 35),
                                           reason='glibc.malloc.hugetlb needs glibc >= 2.35')


@needs_hugetlb_tunable
def test_the_restart_adds_the_huge_page_tunable_once_and_only_for_the_cpu():
  calls = []
  fake_execve = lambda *args: calls.append(args)
  environ = {'JAX_PLATFORMS': 'cpu', 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4', 'A': '1'}
  assert cpu_allocator.restart_with_huge_pages(environ, execve=fake_execve)
  (executable, argv, env), = calls
  assert argv == sys.orig_argv and executable == sys.executable  # The same command again.
  assert env == dict(environ, GLIBC_TUNABLES='glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1')
  assert environ['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=4'  # The caller's left alone.
  # Set already (by the restart or by the user, whatever the value), or not the CPU: no restart.
  for untouched in ({'JAX_PLATFORMS': 'cpu', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'},
                    {'JAX_PLATFORMS': 'cuda'}):
    assert not cpu_allocator.restart_with_huge_pages(untouched, execve=fake_execve)
  assert len(calls) == 1


@needs_hugetlb_tunable
def test_the_restart_is_the_same_process_with_the_tunable_set():
  script = ('import json, os\n'
            'from vit_jax import cpu_allocator\n'
            'print(json.dumps([os.getpid(), os.environ.get("GLIBC_TUNABLES")]), flush=True)\n'
            'cpu_allocator.restart_with_huge_pages()\n')
  result = run_python(['-c', script], env={'GLIBC_TUNABLES': ''})  # JAX_PLATFORMS=cpu there.
  assert result.returncode == 0, result.stderr[-2000:]
  first, second = (json.loads(line) for line in result.stdout.splitlines())
  assert first[0] == second[0]  # One process, started again: a kill still reaches the run.
  assert not first[1] and second[1] == 'glibc.malloc.hugetlb=1'


# A config whose loading reports the process that loads it, then fails: a run that stops at once.
_PROBE_CONFIG = ('import json, os, sys\n'
                 'def get_config():\n'
                 '  print("probe", json.dumps([os.getpid(), os.environ.get("GLIBC_TUNABLES")]),\n'
                 '        file=sys.stderr, flush=True)\n'
                 '  raise ValueError("probe")\n')


@needs_hugetlb_tunable
@pytest.mark.parametrize('script', ['vit-train', 'vit-benchmark'])
def test_the_console_scripts_restart_with_the_tunable_set(script, tmp_path):
  # pip's generated script imports the entry point's module first, then calls it: the module
  # restarts itself, and `sys.orig_argv` runs the same script again.
  path = os.path.join(os.path.dirname(sys.executable), script)  # Where pip installs it.
  if not os.path.isfile(path):
    pytest.skip(f'{script} is not installed beside {sys.executable}')
  config = tmp_path / 'probe.py'
  config.write_text(_PROBE_CONFIG)
  process = subprocess.Popen([path, '--config', str(config)], stderr=subprocess.PIPE, text=True,
                             env=python_env({'GLIBC_TUNABLES': ''}))
  _, stderr = process.communicate(timeout=600)
  assert process.returncode == 2, stderr[-2000:]  # The config's error, as one line.
  probe, = (line for line in stderr.splitlines() if line.startswith('probe '))
  pid, tunables = json.loads(probe.partition(' ')[2])
  assert pid == process.pid  # The script's own process, started again with the tunable.
  assert tunables == 'glibc.malloc.hugetlb=1'
