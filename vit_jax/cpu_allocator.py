"""glibc's malloc set up for XLA's CPU runtime: `start()`, called first thing by train.py, the
benchmark and the tools: `restart_with_huge_pages()` when run as a command, then `tune_at_start()`.

Why: XLA's CPU kernels (its YNNPACK fusions) malloc and free scratch buffers of 128 KiB to a few
MiB on every call, from XLA's worker threads. With glibc's defaults a worker thread's heap is
handed back to the kernel each time it empties and mapped afresh at the next call, and every
page of it is faulted in again. TensorFlow adds to it: its first `Dataset.from_generator` sets
M_MMAP_THRESHOLD to 128 KiB for the rest of the process (a workaround for Python 3.11), so each
such buffer becomes an mmap and a munmap of its own. Measured on this repository's 2-core CPU
(jax 0.10): ~12,000 page faults per quickstart train step, ~20,000 in train.py, where a third
of the run's time was kernel time.

What: freed memory stays in the process (M_TOP_PAD of 64 MiB, the size of one of glibc's
thread heaps, so an emptied heap is kept; M_TRIM_THRESHOLD of 128 MiB) and allocations below
32 MiB come from the heaps (M_MMAP_THRESHOLD, the largest glibc itself would pick). Measured:
the quickstart's train step in 29 ms against 46-63 ms the same hour (page faults down 20x), peak
memory 65 MiB higher (BENCHMARKS.md, "Page faults"). It changes no computed value.

The settings must come before JAX starts: set once JAX's threads have allocated, they remove
only part of the faults (measured: 26 faults per step set first, 1,800 set after `import jax`,
6,000 after its backend started). So the backend is guessed the way JAX will choose it:
JAX_PLATFORMS if set, else the CPU when no accelerator plugin is installed. Only for the CPU
(on GPU and TPU hosts the devices do that work, and a host with many threads would keep far
more memory), only where the C library is glibc; elsewhere nothing is changed.
"""

import ctypes
import ctypes.util
import importlib.util
import os
import platform
import sys

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
SETTINGS = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 128 << 20, _M_TOP_PAD: 64 << 20}

_tuned = False  # Whether this process asked for the settings (TensorFlow may undo them).


def _glibc_version():
  """(major, minor) of the C library where it is glibc on Linux, else None."""
  name, version = platform.libc_ver()
  if platform.system() != 'Linux' or name != 'glibc':
    return None
  try:
    return tuple(int(part) for part in version.split('.')[:2])
  except ValueError:
    return None


def _apply():
  """Sets SETTINGS with mallopt; False where the C library is not glibc or refuses one."""
  if _glibc_version() is None:
    return False
  libc = ctypes.CDLL(ctypes.util.find_library('c'))
  return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS.items())


# What JAX loads for a GPU or TPU backend: with none of them installed it can only use the CPU.
_ACCELERATOR_MODULES = ('jax_plugins', 'libtpu', 'jax_cuda12_plugin', 'jax_cuda13_plugin')


def jax_will_use_cpu(environ=None):
  """Whether JAX's default backend will be the CPU, decided without importing JAX."""
  environ = os.environ if environ is None else environ
  platforms = environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'  # The first one listed is the default.
  return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_MODULES)


def tune_at_start():
  """Applies the settings above when JAX will run on the CPU; True if it did.

  Call it before importing JAX or TensorFlow (see above). Changes no computed value.
  """
  global _tuned
  if jax_will_use_cpu():
    _tuned = _apply()
  return _tuned


def is_tuned():
  """Whether `tune_at_start` set the settings in this process."""
  return _tuned


def reapply_after_tensorflow():
  """Sets the settings again where `tune_at_start` set them: for `vit_jax.data.tensorflow_import`,
  right after it has made TensorFlow apply its own M_MMAP_THRESHOLD."""
  if _tuned:
    _apply()


def start(module_name, console_script=None):
  """First thing in a module that can run as a command (train.py, `vit_jax.train.main`, the
  benchmark, the tools): `restart_with_huge_pages()` where it runs as one (`module_name` is
  '__main__', or the command is its `console_script`, pip's generated script, whose first line
  imports the module), then `tune_at_start()`. A plain import (the tests, a notebook) only
  tunes: it must not restart someone else's process."""
  if module_name == '__main__' or (
      console_script and os.path.basename(sys.argv[0]) == console_script):
    restart_with_huge_pages()
  return tune_at_start()


# glibc >= 2.35: malloc asks for transparent huge pages (madvise) on the memory it maps.
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'


def restart_with_huge_pages(environ=None, execve=os.execve):
  """Runs this command again, the same process, with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
  added, where JAX will run on the CPU under glibc >= 2.35 and no `glibc.malloc.hugetlb` is set
  yet; otherwise returns False and changes nothing. For train.py and the benchmark, first thing.

  Why: even with the settings above, some processes keep handing a thread heap of about 22 MiB
  back to the kernel at every step and fault it in again (4,800-12,000 faults per quickstart
  step in 5 of 9 processes one evening). Backed by huge pages, the same churn costs 512 times
  fewer faults: 0-441 per step in 9 of 9, and the quickstart 72.9 s against 77.1 s, the same
  result (BENCHMARKS.md). glibc reads its tunables only when a process starts, hence the
  `execve` (the process keeps its id; nothing has been imported yet, so it costs milliseconds).
  """
  environ = os.environ if environ is None else environ
  version = _glibc_version()
  tunables = environ.get('GLIBC_TUNABLES', '')
  if (version is None or version < (2, 35) or 'glibc.malloc.hugetlb' in tunables
      or not jax_will_use_cpu(environ)):
    return False
  env = dict(environ, GLIBC_TUNABLES=':'.join(filter(None, (tunables, HUGE_PAGES_TUNABLE))))
  sys.stdout.flush()
  sys.stderr.flush()
  execve(sys.executable, sys.orig_argv, env)
  return True  # Only where `execve` is a stand-in that returns.
