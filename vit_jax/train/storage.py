"""Where a run's bytes go: a local disk or a bucket (`gs://`), and what a fault there means.

A `gs://` path is read and written through `etils.epath` on fsspec/gcsfs, as Orbax's metadata
is, and Orbax's arrays through TensorStore. `configure()` (run when `vit_jax.train.workdir` is
imported, before any path is opened) sets what each library needs:

  EPATH_USE_TF=false   epath uses gcsfs for gs:// rather than TensorFlow's gfile, whose GCS
                       client cannot be pointed at an emulator (one route, tested, everywhere)

and with one knob, `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` (gcsfs reads it itself):

  TENSORSTORE_GCS_HTTP_URL          the same endpoint for TensorStore
  GOOGLE_AUTH_TOKEN_FOR_TESTING     a placeholder token, so TensorStore neither looks for nor
                                    sends real credentials to the emulator
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false   no bucket-type probe of Google's control API,
                                    which stalls for about a minute where it cannot be reached
  gcsfs token 'anon'                no credential search either

A variable the user set is left as it is. Objects cannot be appended to; `GrowingFile` holds a
file that grows (metrics.jsonl, TensorBoard events) and replaces the object whole.
"""

import asyncio
import errno
import logging
import os
import re
import sys
import threading
import time
import warnings

EMULATOR_VARIABLE = 'STORAGE_EMULATOR_HOST'
PROBE_DEADLINE_S = 15  # A storage endpoint that has not answered by then is reported as down.


def is_local(path):
  """Whether `path` is on a local file system (no `scheme://`, as `gs://` has)."""
  return '://' not in os.fspath(path)


def configure(environ=None):
  """Points epath, gcsfs and TensorStore at the same storage; returns the emulator or None."""
  environ = os.environ if environ is None else environ
  environ.setdefault('EPATH_USE_TF', 'false')
  emulator = environ.get(EMULATOR_VARIABLE)
  if emulator:
    environ.setdefault('TENSORSTORE_GCS_HTTP_URL', emulator)
    environ.setdefault('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'emulator')
    environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
    try:
      import fsspec  # pylint: disable=g-import-not-at-top
      fsspec.config.conf.setdefault('gs', {}).setdefault('token', 'anon')
    except ImportError:
      pass
  # gcsfs logs each failed request with its traceback; the caller reports the fault in one line.
  logging.getLogger('gcsfs').setLevel(logging.CRITICAL)
  return emulator


def endpoint():
  """The storage endpoint a gs:// path reaches (for messages)."""
  return os.environ.get(EMULATOR_VARIABLE) or 'https://storage.googleapis.com'


def describe(error):
  """A short phrase for a storage error: 'no space left on device', 'the bucket B does not
  exist ...', 'the storage refused the credentials (401 ...)', 'cannot connect to host:port'."""
  code = getattr(error, 'code', None)
  message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  bucket = re.search(r'/b/([^/?]+)/o(\?|$)', message)  # an upload: the bucket is missing
  if isinstance(error, FileNotFoundError) and bucket:  # gcsfs names the request's URL
    return (f'the bucket {bucket.group(1)} does not exist (create it: gcloud storage buckets '
            f'create gs://{bucket.group(1)})')
  if code in (401, 403) and not isinstance(error, OSError):
    reason = re.sub(r',\s*40[13]$', '', message)
    return f'the storage refused the credentials ({code} {reason})'
  if isinstance(error, OSError) and message.startswith('Forbidden'):
    return f'the storage refused the credentials (403 {message})'
  if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
    return 'the storage did not answer in time'
  host = getattr(error, 'host', None)
  if host is not None:  # aiohttp's connection errors
    return f'cannot connect to {host}:{getattr(error, "port", "?")} ({type(error).__name__})'
  if isinstance(error, OSError) and error.errno is not None:
    return os.strerror(error.errno).lower()
  if _os_error_code(error) is not None:
    return os.strerror(_os_error_code(error)).lower()
  return message[:300]


_FAULT_MODULES = ('gcsfs', 'aiohttp', 'google.auth', 'google.api_core', 'requests', 'fsspec')
# TensorStore (Orbax's array writer) raises ValueErrors carrying an absl status, and the OS
# error code where there is one: "RESOURCE_EXHAUSTED: ... [os_error_code='28']".
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_TENSORSTORE_FAULTS = ('UNAVAILABLE', 'PERMISSION_DENIED', 'UNAUTHENTICATED',
                       'DEADLINE_EXCEEDED')


def _os_error_code(error):
  found = _OS_ERROR_CODE.search(str(error)) if isinstance(error, ValueError) else None
  return int(found.group(1)) if found else None


def is_fault(error):
  """Whether `error` is the storage's (a disk, a file system, the network, a bucket), as
  opposed to a bug: OSErrors, timeouts, TensorStore's I/O errors, and the errors of gcsfs and
  its HTTP stack."""
  if isinstance(error, (OSError, TimeoutError, asyncio.TimeoutError, _Refused)):
    return True
  if isinstance(error, ValueError):
    return _os_error_code(error) is not None or str(error).startswith(_TENSORSTORE_FAULTS)
  return any(type(error).__module__.startswith(module) for module in _FAULT_MODULES)


def find_fault(error):
  """The storage fault behind `error` (itself, or one it was raised from), or None: Orbax
  wraps the file system's errors in its own."""
  seen = set()
  while error is not None and id(error) not in seen:
    if is_fault(error):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def is_unreachable(error):
  """Whether the storage cannot be reached or refuses us (not a damaged file): no reason to
  fall back to an older checkpoint, or to start over."""
  if isinstance(error, (TimeoutError, asyncio.TimeoutError, ConnectionError, _Refused)):
    return True
  if getattr(error, 'code', None) in (401, 403) and not isinstance(error, OSError):
    return True
  return type(error).__module__.startswith(('aiohttp', 'google.auth'))


def is_disk_full(error):
  """Whether `error` says the disk is full or the quota is spent (ENOSPC, EDQUOT)."""
  return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


class _AbandonedWriterNoise(logging.Filter):
  """asyncio's 'Task exception was never retrieved' for a write that failed on the storage:
  the writer's failure is reported once, in one line, by the code that waits for it."""

  def filter(self, record):
    error = record.exc_info[1] if record.exc_info else None
    return not (error is not None and find_fault(error) is not None)


def _is_closed_loop_noise(error):
  """TensorStore finishing a write for an asyncio loop that its failed save already closed."""
  return isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'


def quiet_failed_writes():
  """Leaves out what a failed async write prints on its own: asyncio's report of a task that
  failed on the storage, and TensorStore's callbacks into the loop the failed save closed (the
  code that waits for the save reports the failure, in one line)."""
  logger = logging.getLogger('asyncio')
  if any(isinstance(f, _AbandonedWriterNoise) for f in logger.filters):
    return
  logger.addFilter(_AbandonedWriterNoise())
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def quiet_excepthook(kind, error, trace):
    if not _is_closed_loop_noise(error):
      excepthook(kind, error, trace)

  def quiet_unraisablehook(unraisable):
    if not _is_closed_loop_noise(unraisable.exc_value):
      unraisablehook(unraisable)
  sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook


def quiet_abandoned_writers():
  """After a storage fault is reported: what Orbax's abandoned async writers print as they are
  torn down (failed tasks nobody awaits, 'Event loop is closed' at exit) is left out."""
  quiet_failed_writes()
  warnings.filterwarnings('ignore', message='coroutine .* was never awaited',
                          category=RuntimeWarning)
  default_hook = sys.unraisablehook
  if getattr(default_hook, 'quiet_abandoned_writers', False):
    return

  def hook(unraisable):
    if find_fault(unraisable.exc_value) is None and not isinstance(
        unraisable.exc_value, (RuntimeError, ImportError)):
      default_hook(unraisable)
  hook.quiet_abandoned_writers = True
  sys.unraisablehook = hook


class _LastRetry(logging.Handler):
  """Keeps the last request failure gcsfs logs before retrying it."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.message = None

  def emit(self, record):
    text = record.getMessage()
    if 'retrying after exception' in text:
      self.message = text.split('retrying after exception:', 1)[1].strip()


def within_deadline(call, what, seconds=PROBE_DEADLINE_S):
  """`call()` for a remote path, bounded: gcsfs retries a dead endpoint for minutes, and a
  refused credential for half a minute; this gives up after `seconds`, or at the first refusal.

  Raises:
    TimeoutError: naming `what`, the endpoint and the last failure seen; or the call's error.
  """
  result = {}

  def target():
    try:
      result['value'] = call()
    except BaseException as e:  # pylint: disable=broad-except  # handed to the caller
      result['error'] = e

  watch = _LastRetry()
  logger = logging.getLogger('gcsfs')
  level = logger.level
  logger.addHandler(watch)
  logger.setLevel(logging.DEBUG)
  logger.propagate = False
  try:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + seconds
    while thread.is_alive() and time.monotonic() < deadline:
      thread.join(0.1)
      if watch.message and re.search(r', 40[13]$', watch.message):
        raise _Refused(watch.message)
  finally:
    logger.removeHandler(watch)
    logger.setLevel(level)
    logger.propagate = True
  if 'error' in result:
    raise result['error']
  if thread.is_alive():
    last = f'; last error: {watch.message}' if watch.message else ''
    raise TimeoutError(f'{what}: no answer from {endpoint()} within {seconds} s{last}')
  return result.get('value')


class _Refused(Exception):
  """A request gcsfs would retry although the storage refused the credentials."""

  def __init__(self, message):
    super().__init__(message)
    self.code = 403 if ', 403' in message else 401


class GrowingFile:
  """A file written in pieces (metrics.jsonl, TensorBoard events), starting from `kept`.

  Locally each piece is appended as it comes; the file is first rewritten to `kept` (atomically)
  when it holds more, e.g. the rows an interrupted run logged after its last checkpoint. A
  bucket's objects cannot be appended to or truncated: there the whole content is held here
  and the object replaced at each `flush()`.
  """

  def __init__(self, path, kept=b''):
    self.path = path
    self._file = None
    self._content = None
    if is_local(path):
      if not path.exists() or path.stat().length != len(kept):
        write_bytes(path, kept)
      self._file = open(path, 'ab')  # pylint: disable=consider-using-with
    else:
      self._content = bytearray(kept)
      self._dirty = not path.exists() or len(kept) != path.stat().length

  def append(self, data):
    """Adds `data` (bytes): written at once locally, held until `flush()` in a bucket."""
    if self._file is not None:
      self._file.write(data)
      self._file.flush()
    else:
      self._content += data
      self._dirty = True

  def flush(self):
    """Makes what was appended durable where it is (the object replaced, in a bucket)."""
    if self._file is not None:
      self._file.flush()
    elif self._dirty:
      self.path.write_bytes(bytes(self._content))
      self._dirty = False

  def close(self, discard=False):
    """Flushes (unless `discard`: after a storage fault, nothing more is sent) and closes."""
    try:
      if not discard:
        self.flush()
    finally:
      if self._file is not None:
        file, self._file = self._file, None
        try:
          file.close()
        except OSError:
          if not discard:
            raise


def write_bytes(path, data):
  """Writes `path` whole: locally through a temporary file and a rename, so no reader sees
  it half written; a bucket object is replaced whole by itself."""
  if is_local(path):
    partial = path.parent / f'{path.name}.partial'
    try:
      partial.write_bytes(data)
      os.replace(partial, path)
    except BaseException:
      try:
        partial.unlink(missing_ok=True)
      except OSError:
        pass  # The write's own error is the one to report.
      raise
  else:
    path.write_bytes(data)
