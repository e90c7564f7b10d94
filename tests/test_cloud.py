"""gs:// workdirs end to end (issue 13), against gcp-storage-emulator on 127.0.0.1.

One knob points everything at the emulator: STORAGE_EMULATOR_HOST (vit_jax.train.storage).
The tiny quickstart trains into gs://bkt/sweep/run, is killed with SIGKILL after its first
checkpoint, loses the network in the middle of its second save, and is rerun to the end; its
final state equals an uninterrupted local run's, bit for bit, and the tools read the bucket.
Two processes train into the bucket, stop, and two resume. Storage that is missing, refuses
the credentials or does not answer is one line, exit 4, within seconds.
"""

import concurrent.futures
import contextlib
import csv
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, TINY_QUICKSTART, TINY_STEPS, python_env
from gcs_emulator import Emulator, free_port

RUN = 'sweep/run'
WORKDIR = f'gs://bkt/{RUN}'
# The tiny quickstart from any folder, with an eval and curves.png halfway and at the end.
ARGS = ([a.replace('configs/', f'{REPO_ROOT}/configs/') for a in TINY_QUICKSTART]
        + ['--config.eval_every=6', '--config.plot_every_eval=True'])
DIGEST = textwrap.dedent('''
    import json, sys
    import vit_jax
    from vit_jax.train import checkpoint
    model, params, config = vit_jax.restore(sys.argv[1])
    state = checkpoint.restore_train_state(sys.argv[1])
    print(json.dumps({'step': int(state.step), 'digest': checkpoint.tree_digest(state),
                      'params_equal': checkpoint.tree_digest(params)
                                      == checkpoint.tree_digest(state.params)}))
''')


def _env(extra):
  return python_env(dict(extra, PYTHONUNBUFFERED='1'))


def _run(argv, env, cwd, timeout=600):
  return subprocess.run([sys.executable, *argv], cwd=cwd, env=_env(env), capture_output=True,
                        text=True, timeout=timeout)


def _one_error_line(result):
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith('error: ')]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
  return errors[0]


def _wait_for(condition, what, process=None, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert process is None or process.poll() is None, f'the run ended before {what}'
    assert time.time() < deadline, f'no {what} within {timeout} s'
    time.sleep(0.2)


@pytest.fixture(scope='module')
def gcs():
  with Emulator(['bkt']) as emulator:
    yield emulator


@pytest.fixture(scope='module')
def gs_run(gcs, compile_cache, tmp_path_factory):
  """The tiny quickstart in gs://bkt/sweep/run, run from a scratch folder three times: killed
  with SIGKILL once its first checkpoint is complete; resumed and cut off from the storage in
  the middle of its second save (every request dropped from the first one for step 8); rerun
  with the network back, to the end."""
  cwd = str(tmp_path_factory.mktemp('gs_run_cwd'))
  env = dict(gcs.env, **compile_cache)
  argv = [f'{REPO_ROOT}/train.py', *ARGS, '--workdir', WORKDIR]
  killed = subprocess.Popen([sys.executable, *argv], cwd=cwd, env=_env(env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for(lambda: f'{RUN}/checkpoints/4/commit_success.txt' in gcs.names(f'{RUN}/checkpoints/'),
            'first checkpoint', killed)
  killed.send_signal(signal.SIGKILL)
  killed.wait(timeout=60)

  gcs.cut(lambda method, name: name.startswith(f'{RUN}/checkpoints/8/'))
  start = time.time()
  cut_off = _run(argv, env, cwd)
  cut_off_seconds = time.time() - start
  cut_at = gcs.cut_at
  gcs.heal()
  after_cut = gcs.names(f'{RUN}/checkpoints/')

  finished = _run(argv, env, cwd)
  return dict(cwd=cwd, cut_off=cut_off, cut_off_seconds=cut_off_seconds, cut_at=cut_at,
              after_cut=after_cut, finished=finished, env=env)


@pytest.mark.slow
def test_killed_and_cut_off_gs_run_ends_bit_identical(gs_run, tiny_reference):
  cut_off, finished = gs_run['cut_off'], gs_run['finished']
  assert gs_run['cut_at'] and gs_run['cut_at'][1].startswith(f'{RUN}/checkpoints/8/')
  line = _one_error_line(cut_off)
  assert cut_off.returncode == 4, cut_off.stderr[-3000:]
  # Orbax writes step 8 in the background: the fault shows at the next write that waits on
  # the storage (the save itself, or the metrics before it), naming the save that did not end.
  assert ('cannot save the checkpoint at step 8' in line
          or 'the save at step 8 did not complete' in line), line
  assert (f'the newest complete checkpoint in {WORKDIR}/checkpoints, step 4, is untouched' in line
          or f'{WORKDIR}/checkpoints (' in line and 'checkpoint, step 4, is untouched' in line)
  assert f'resuming from the checkpoint at step 4 in {WORKDIR}/checkpoints' in cut_off.stdout
  print(f'cut off in its save: exit {cut_off.returncode} after {gs_run["cut_off_seconds"]:.0f} s')
  assert f'{RUN}/checkpoints/4/commit_success.txt' in gs_run['after_cut']
  assert f'{RUN}/checkpoints/8/commit_success.txt' not in gs_run['after_cut']

  assert finished.returncode == 0, finished.stderr[-3000:]
  assert f'resuming from the checkpoint at step 4 in {WORKDIR}/checkpoints' in finished.stdout
  restored = _run(['-c', DIGEST, WORKDIR], gs_run['env'], gs_run['cwd'])
  assert restored.returncode == 0, restored.stderr[-3000:]
  result = json.loads(restored.stdout.strip().splitlines()[-1])
  assert result == {'step': TINY_STEPS, 'digest': tiny_reference[1], 'params_equal': True}


@pytest.mark.slow
def test_the_bucket_holds_every_file_and_each_step_once(gs_run, gcs):
  from tensorboard.compat.proto import event_pb2
  from vit_jax.train import metrics
  assert gs_run['finished'].returncode == 0, gs_run['finished'].stderr[-3000:]
  names = gcs.names(f'{RUN}/')
  top = {name[len(RUN) + 1:] for name in names if '/' not in name[len(RUN) + 1:]}
  events = [name for name in top if name.startswith('events.out.tfevents.')]
  assert {'config.json', 'class_names.json', 'metrics.jsonl', 'curves.png',
          'final_metrics.json'} <= top and len(events) == 1, top
  for step in (4, 8, 12):
    assert f'{RUN}/checkpoints/{step}/commit_success.txt' in names
  assert gcs.read(f'{RUN}/curves.png')[:8] == b'\x89PNG\r\n\x1a\n'
  assert json.loads(gcs.read(f'{RUN}/final_metrics.json'))['step'] == TINY_STEPS

  rows = [json.loads(line) for line in gcs.read(f'{RUN}/metrics.jsonl').decode().splitlines()]
  train_steps = [row['step'] for row in rows if 'train_loss' in row]
  assert train_steps == list(range(1, TINY_STEPS + 1))
  assert [row['step'] for row in rows if 'test_accuracy' in row] == [6, 12]

  logged = {}
  restarts = []
  for record in metrics._tfrecords(gcs.read(f'{RUN}/{events[0]}')):  # pylint: disable=protected-access
    event = event_pb2.Event.FromString(record)
    if event.HasField('session_log'):
      restarts.append(event.step)
    for value in event.summary.value:
      logged.setdefault(value.tag, []).append(event.step)
  assert logged['train_loss'] == list(range(1, TINY_STEPS + 1))
  assert logged['test_accuracy'] == [6, 12]
  assert restarts == [5]  # the last resume (from step 4) told TensorBoard to forget steps > 4

  for folder in (gs_run['cwd'], REPO_ROOT):
    assert not os.path.exists(os.path.join(folder, 'gs:')), folder


@pytest.mark.slow
def test_the_tools_read_and_write_the_bucket(gs_run, gcs, tmp_path):
  """predict, plot, sweep summarize and convert on gs:// paths, run side by side."""
  assert gs_run['finished'].returncode == 0, gs_run['finished'].stderr[-3000:]
  image = tmp_path / 'digit.png'
  Image.fromarray((np.eye(8) * 255).astype(np.uint8)).convert('RGB').save(image)
  commands = {
      'predict': ['-m', 'vit_jax.tools.predict', '--workdir', WORKDIR, str(image)],
      'plot': ['-m', 'vit_jax.tools.plot', WORKDIR, '--out', 'gs://bkt/plots/curves.png'],
      'summarize': ['-m', 'vit_jax.tools.sweep', 'summarize', 'gs://bkt/sweep', '--format',
                    'csv'],
      'convert': ['-m', 'vit_jax.tools.convert', f'{WORKDIR}/checkpoints/8',
                  str(tmp_path / 'step8.npz')],
  }
  with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
    futures = {name: pool.submit(_run, argv, gs_run['env'], str(tmp_path))
               for name, argv in commands.items()}
  results = {name: future.result() for name, future in futures.items()}
  for name, result in results.items():
    assert result.returncode == 0, (name, result.stderr[-3000:])
  assert str(image) in results['predict'].stdout and '  1. ' in results['predict'].stdout
  assert gcs.read('plots/curves.png')[:8] == b'\x89PNG\r\n\x1a\n'
  table = list(csv.DictReader(io.StringIO(results['summarize'].stdout)))
  assert [(r['run'], r['status'], r['step']) for r in table] == [('run', 'finished', '12')]
  assert {'sweep/summary.md', 'sweep/summary.csv', 'sweep/curves.png'} <= set(
      gcs.names('sweep/summary') + gcs.names('sweep/curves'))
  with np.load(tmp_path / 'step8.npz') as weights:
    assert len(weights.files) > 5
  assert not os.path.exists(tmp_path / 'gs:')


@pytest.mark.slow
def test_two_processes_stop_in_the_bucket_and_two_resume(gcs, compile_cache, tmp_path):
  workdir = 'gs://bkt/multi'
  env = dict(gcs.env, XLA_FLAGS='--xla_force_host_platform_device_count=2', **compile_cache)
  tiny = [a.replace('configs/', f'{REPO_ROOT}/configs/') for a in TINY_QUICKSTART]

  def both(extra):
    port = free_port()
    processes = [subprocess.Popen(
        [sys.executable, f'{REPO_ROOT}/train.py', *tiny, '--workdir', workdir, *extra,
         f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
         f'--process_id={index}'], cwd=str(tmp_path), env=_env(env), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for index in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_, err) in zip(processes, outputs):
      assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]

  first = both(['--stop_at_step=6'])
  assert '--stop_at_step=6: saved a checkpoint at step 6' in first[0]
  second = both([])
  assert f'resuming from the checkpoint at step 6 in {workdir}/checkpoints' in second[0]
  assert 'on 4 cpu device(s)' in second[0]
  assert not second[1].strip() or 'step 12/12' not in second[1]  # only process 0 reports
  names = gcs.names('multi/')
  for step in (6, 12):
    assert f'multi/checkpoints/{step}/commit_success.txt' in names
  rows = [json.loads(line) for line in gcs.read('multi/metrics.jsonl').decode().splitlines()]
  assert [row['step'] for row in rows if 'train_loss' in row] == list(range(1, TINY_STEPS + 1))


@contextlib.contextmanager
def _refusing_endpoint(max_requests=200):
  """A loopback HTTP endpoint answering every request with 401 Invalid Credentials, as GCS
  does for a token it refuses; it serves at most `max_requests` and stops with the test."""
  served = []

  class Refuse(http.server.BaseHTTPRequestHandler):
    def _refuse(self):
      served.append(self.path)
      body = json.dumps({'error': {'code': 401, 'message': 'Invalid Credentials',
                                   'errors': [{'reason': 'authError'}]}}).encode()
      self.send_response(401)
      self.send_header('Content-Type', 'application/json')
      self.send_header('Content-Length', str(len(body)))
      self.end_headers()
      self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Refuse)
  server.timeout = 5

  def serve():
    while len(served) < max_requests and not stopping.is_set():
      server.handle_request()
  stopping = threading.Event()
  thread = threading.Thread(target=serve, daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}', served
  finally:
    stopping.set()
    server.server_close()


@contextlib.contextmanager
def _silent_endpoint():
  """A loopback port that accepts connections (the kernel's backlog) and never answers."""
  listener = socket.socket()
  listener.bind(('127.0.0.1', 0))
  listener.listen(64)
  try:
    yield f'http://127.0.0.1:{listener.getsockname()[1]}'
  finally:
    listener.close()


@pytest.mark.slow
def test_missing_bucket_refused_credentials_and_silent_endpoint_are_one_line(gcs, tmp_path):
  """Each fails at the workdir check, before any data or model is built: exit 4, one line,
  nothing written; the silent endpoint within the probe's deadline (about 15 s), not minutes
  of retries."""
  argv = [f'{REPO_ROOT}/train.py', *ARGS]
  with _refusing_endpoint() as (refusing, served), _silent_endpoint() as silent:
    cases = {
        'missing_bucket': (gcs.url, 'gs://no-such-bucket/run',
                           'the bucket no-such-bucket does not exist'),
        'refused': (refusing, 'gs://bkt/refused',
                    'refused the credentials (401 Invalid Credentials)'),
        'silent': (silent, 'gs://bkt/silent', f'no answer from {silent} within'),
    }

    def attempt(case):
      endpoint, workdir, _ = cases[case]
      start = time.time()
      result = _run(argv + ['--workdir', workdir], {'STORAGE_EMULATOR_HOST': endpoint},
                    str(tmp_path))
      return result, time.time() - start
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
      outcomes = dict(zip(cases, pool.map(attempt, cases)))
  for case, (result, seconds) in outcomes.items():
    line = _one_error_line(result)
    assert result.returncode == 4, (case, result.stderr[-3000:])
    assert cases[case][2] in line, (case, line)
    print(f'{case}: {seconds:.1f} s: {line}')
  assert served  # the refusing endpoint was asked
  # Started together, the silent case waits on the network for its deadline at most.
  assert outcomes['silent'][1] - outcomes['missing_bucket'][1] < 30
  assert outcomes['refused'][1] - outcomes['missing_bucket'][1] < 10
  assert not gcs.names('refused') and not gcs.names('silent')
  assert not os.path.exists(tmp_path / 'gs:')
