"""gcp-storage-emulator on 127.0.0.1, in the test's process, for the gs:// tests.

Three additions, all test-side:
- connections are accepted by a threaded server (many clients at once: tensorstore and gcsfs
  open several each), and requests handled one at a time, as the emulator expects;
- media downloads carry `x-goog-generation` (GCS sends it; the emulator does not, and
  TensorStore's OCDBT manifest updates need it: "Malformed StorageGeneration" without it);
- `cut(when)`: from the first request for which `when(method, object name)` holds, every
  request is dropped without an answer (a network that went away) until `heal()`.

  with Emulator(['bkt']) as gcs:          # a free port (or port=...)
    env = gcs.env                         # {'STORAGE_EMULATOR_HOST': 'http://127.0.0.1:PORT'}
    gcs.names('run/')                     # object names under a prefix

From a shell: `python tests/gcs_emulator.py --port 9023 --bucket my-bucket` (until Ctrl-C).
"""

import functools
import http.server
import json
import logging
import socket
import threading
import urllib.parse
import urllib.request

from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.handlers import buckets as emulator_buckets
from gcp_storage_emulator.handlers import objects as emulator_objects


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _with_generation(download):
  def patched(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = str(obj['generation'])
      response['x-goog-metageneration'] = str(obj['metageneration'])
    except Exception:  # pylint: disable=broad-except  # a missing object: the handler says 404
      pass
    return download(request, response, storage, *args, **kwargs)
  return patched


def _install_generation_header():
  original = emulator_objects.download
  if getattr(original, 'with_generation', False):
    return
  patched = _with_generation(original)
  patched.with_generation = True
  _replace_in(emulator_server.HANDLERS, original, patched)  # The router's table holds it too.
  emulator_objects.download = patched


_ONE_AT_A_TIME = threading.Lock()


def _threaded_run(api_thread):
  """APIThread.run with a threaded server: every connection is accepted at once."""
  httpd = http.server.ThreadingHTTPServer(
      (api_thread._host, api_thread._port),  # pylint: disable=protected-access
      functools.partial(emulator_server.RequestHandler,
                        api_thread._storage))  # pylint: disable=protected-access
  httpd.daemon_threads = True
  api_thread._httpd = httpd  # pylint: disable=protected-access
  api_thread.is_running.set()
  httpd.serve_forever()


def _replace_in(table, old, new):
  for item in table:
    if isinstance(item, dict):
      for key, value in item.items():
        if value is old:
          item[key] = new
    elif isinstance(item, (tuple, list)):
      _replace_in(item, old, new)


def _object_name(path):
  """The object name a JSON-API request addresses (from its path or its `name=` query)."""
  parsed = urllib.parse.urlparse(path)
  query = urllib.parse.parse_qs(parsed.query)
  if 'name' in query:
    return query['name'][0]
  parts = parsed.path.split('/o/', 1)
  return urllib.parse.unquote(parts[1]) if len(parts) == 2 else ''


class Emulator:
  """An in-memory emulator with `buckets`, served from a thread of this process."""

  def __init__(self, bucket_names=('bkt',), port=None):
    _install_generation_header()
    emulator_server.APIThread.run = _threaded_run
    logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)  # a 404 is no news
    self.port = port or free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.env = {'STORAGE_EMULATOR_HOST': self.url}
    self._server = emulator_server.create_server('127.0.0.1', self.port, in_memory=True)
    for name in bucket_names:
      emulator_buckets.create_bucket(name, self._server._storage)  # pylint: disable=protected-access
    self._cut_when = None
    self.cut_at = None  # (method, object name) of the first dropped request
    self.dropped = 0
    self._install_cut()

  def _install_cut(self):
    handler = emulator_server.RequestHandler
    if getattr(handler, 'cut_hook', False):
      handler.emulators.append(self)
      return
    handler.cut_hook = True
    handler.emulators = [self]
    for method in ('GET', 'POST', 'PUT', 'DELETE', 'PATCH'):
      original = getattr(handler, f'do_{method}')

      def do(request_handler, original=original, method=method):
        port = request_handler.server.server_address[1]
        for live in handler.emulators:
          if live.port == port and live.drops(method, request_handler.path):
            request_handler.close_connection = True
            return  # No answer at all: the client sees the connection close.
        with _ONE_AT_A_TIME:
          return original(request_handler)
      setattr(handler, f'do_{method}', do)

  def drops(self, method, path):
    if self.cut_at is not None:
      self.dropped += 1
      return True
    if self._cut_when is not None and self._cut_when(method, _object_name(path)):
      self.cut_at = (method, _object_name(path))
      self.dropped += 1
      return True
    return False

  def cut(self, when):
    """Drops every request from the first for which `when(method, name)` is true."""
    self._cut_when = when

  def heal(self):
    self._cut_when = None
    self.cut_at = None

  def start(self):
    self._server.start()
    return self

  def stop(self):
    self._server.stop()
    handler = emulator_server.RequestHandler
    if self in getattr(handler, 'emulators', []):
      handler.emulators.remove(self)

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()

  def names(self, prefix, bucket='bkt'):
    """Names of the objects under `prefix` in `bucket`."""
    query = urllib.parse.urlencode({'prefix': prefix})
    with urllib.request.urlopen(f'{self.url}/storage/v1/b/{bucket}/o?{query}', timeout=30) as r:
      return sorted(item['name'] for item in json.load(r).get('items', []))

  def write(self, name, data, bucket='bkt'):
    query = urllib.parse.urlencode({'uploadType': 'media', 'name': name})
    request = urllib.request.Request(f'{self.url}/upload/storage/v1/b/{bucket}/o?{query}',
                                     data=data, method='POST')
    with urllib.request.urlopen(request, timeout=30):
      pass

  def read(self, name, bucket='bkt'):
    quoted = urllib.parse.quote(name, safe='')
    with urllib.request.urlopen(
        f'{self.url}/download/storage/v1/b/{bucket}/o/{quoted}?alt=media', timeout=30) as r:
      return r.read()


def main():
  """`python tests/gcs_emulator.py [--port 9023] [--bucket my-bucket ...]`: serves until Ctrl-C."""
  import argparse  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--port', type=int, default=None, help='default: a free port')
  parser.add_argument('--bucket', action='append', default=None, help='default: bkt')
  args = parser.parse_args()
  with Emulator(args.bucket or ['bkt'], port=args.port) as emulator:
    print(f'STORAGE_EMULATOR_HOST={emulator.url}', flush=True)
    try:
      while True:
        time.sleep(3600)
    except KeyboardInterrupt:
      pass


if __name__ == '__main__':
  main()
