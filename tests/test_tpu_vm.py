"""The TPU VM recipe builds the right gcloud commands (it cannot reach a TPU here).

The expected commands are written out by hand from `gcloud compute tpus tpu-vm --help`; the
execution path runs against a fake `gcloud` on PATH that records its calls.
"""

import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tarfile
import textwrap

import pytest

from vit_jax.tools import tpu_vm
from vit_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ['--name', 'my-tpu', '--zone', 'us-central2-b', '--accelerator_type', 'v4-32',
        '--config', 'configs/common.py', '--workdir', 'gs://bucket/run1']
ZONE = '--zone=us-central2-b'

FAKE_GCLOUD = textwrap.dedent('''\
    #!{python}
    import json, os, shutil, sys
    args = sys.argv[1:]
    log = os.environ['FAKE_GCLOUD_LOG']
    with open(log, 'a') as f:
      f.write(json.dumps(args) + '\\n')
    if args[3] == 'describe':
      state = os.environ.get('FAKE_STATE')
      if not state:
        sys.stderr.write('NOT_FOUND\\n')
        sys.exit(1)
      print(state)
    if args[3] == 'scp':
      shutil.copy(args[4], os.path.join(os.path.dirname(log), 'shipped.tar.gz'))
''')


def _train_line(*args):
  return ('--command=cd ~/vit_jax && ~/vit_jax_env/bin/python train.py '
          + ' '.join(args))


def test_default_version_follows_the_accelerator_generation():
  assert tpu_vm.default_version('v4-32') == 'tpu-ubuntu2204-base'
  assert tpu_vm.default_version('v5litepod-16') == 'v2-alpha-tpuv5-lite'
  assert tpu_vm.default_version('v5p-8') == 'v2-alpha-tpuv5'
  assert tpu_vm.default_version('v6e-8') == 'v2-alpha-tpuv6e'
  with pytest.raises(UserError, match="'v9x-8'.*pass --version"):
    tpu_vm.default_version('v9x-8')


def test_dry_run_plan_is_exactly_the_recipe():
  args, overrides = tpu_vm._parse(BASE + ['--config.schedule.base_lr=0.001', '--project', 'p1'])
  steps = tpu_vm.plan(args, overrides, '/tmp/code.tar.gz')
  where = [ZONE, '--project=p1']
  ssh = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu', '--worker=all']
  assert steps == [
      ('copy the code', ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', '/tmp/code.tar.gz',
                         'my-tpu:vit_jax.tar.gz', '--worker=all', *where]),
      ('unpack the code',
       ssh + ['--command=mkdir -p ~/vit_jax && tar -xzf vit_jax.tar.gz -C ~/vit_jax', *where]),
      ('install', ssh + [
          '--command=python3 -m pip install --user --quiet --upgrade uv && '
          '([ -x ~/vit_jax_env/bin/python ] || '
          '~/.local/bin/uv venv --python 3.12 ~/vit_jax_env) && cd ~/vit_jax && '
          '~/.local/bin/uv pip install --python ~/vit_jax_env/bin/python '
          '-r requirements.txt "jax[tpu]"', *where]),
      ('train', ssh + [_train_line('--config configs/common.py',
                                   '--config.schedule.base_lr=0.001',
                                   '--workdir gs://bucket/run1'), *where]),
  ]
  vm = tpu_vm.TpuVm('my-tpu', 'us-central2-b', 'p1')
  assert tpu_vm.describe_command(vm) == [
      'gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', 'my-tpu', '--format=value(state)',
      *where]
  assert tpu_vm.create_command(vm, 'v4-32', 'tpu-ubuntu2204-base', spot=True) == [
      'gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'my-tpu', '--accelerator-type=v4-32',
      '--version=tpu-ubuntu2204-base', '--spot', *where]


def test_git_url_sweep_and_detach_variants():
  args, overrides = tpu_vm._parse(
      BASE[:6] + ['--sweep', 'configs/sweeps/quickstart_lr_wd.py', '--workdir', 'gs://b/sw',
                  '--git_url', 'https://example.com/me/vit.git', '--git_ref', 'v1', '--detach',
                  '--config.total_steps=5'])
  steps = dict(tpu_vm.plan(args, overrides, 'unused.tar.gz'))
  assert list(steps) == ['get the code', 'install', 'train']
  assert steps['get the code'][-2] == (
      '--command=([ -d ~/vit_jax/.git ] || git clone -q https://example.com/me/vit.git '
      '~/vit_jax) && git -C ~/vit_jax fetch -q https://example.com/me/vit.git v1 && '
      'git -C ~/vit_jax checkout -q --detach FETCH_HEAD')
  assert steps['train'][-2] == (
      '--command=cd ~/vit_jax && if [ -f ~/vit_jax_train.pid ] && '
      'kill -0 "$(cat ~/vit_jax_train.pid)" 2>/dev/null; then '
      'echo "training is running already (pid $(cat ~/vit_jax_train.pid))"; else '
      'nohup ~/vit_jax_env/bin/python -m vit_jax.tools.sweep '
      'configs/sweeps/quickstart_lr_wd.py --workdir_root gs://b/sw --config.total_steps=5 '
      '> ~/vit_jax_train.log 2>&1 < /dev/null & echo $! > ~/vit_jax_train.pid; fi')
  args, overrides = tpu_vm._parse(BASE + ['--skip_setup'])
  assert [p for p, _ in tpu_vm.plan(args, overrides, 'x')] == ['train']


def test_values_with_spaces_survive_both_shells():
  line = tpu_vm.train_remote_command('gs://b/r', ["--config.data.name=my data (v2)"],
                                     config='configs/common.py')
  assert line.startswith('cd ~/vit_jax && ~/vit_jax_env/bin/python ')
  remote_argv = shlex.split(line.split(' && ', 1)[1])
  assert remote_argv[1:] == ['train.py', '--config', 'configs/common.py',
                             '--config.data.name=my data (v2)', '--workdir', 'gs://b/r']


@pytest.mark.parametrize('extra, message', [
    (['--workdir', 'workdirs/run'], 'is not a gs:// path'),
    (['--sweep', 'configs/sweeps/quickstart_lr_wd.py'], 'exactly one of --config'),
    (['--config.schedule.base_rl=1'], "unknown config key 'schedule.base_rl'"),
    (['--accelerator_type', 'v9x-8'], "no default --version for accelerator type 'v9x-8'"),
    (['--steps=3'], "unexpected argument '--steps=3'"),
])
def test_mistakes_fail_before_any_gcloud_call(tmp_path, extra, message):
  result, calls = _run_cli(tmp_path, *BASE, *extra)
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith('error: ') and result.stderr.count('\n') == 1
  assert message in result.stderr
  assert calls == []


def _run_cli(tmp_path, *args, state=None):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(exist_ok=True)
  gcloud = bin_dir / 'gcloud'
  gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
  log = tmp_path / 'gcloud.jsonl'
  log.write_text('')
  env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
             FAKE_GCLOUD_LOG=str(log), TMPDIR=str(tmp_path))
  env.pop('FAKE_STATE', None)
  if state:
    env['FAKE_STATE'] = state
  result = subprocess.run([sys.executable, '-m', 'vit_jax.tools.tpu_vm', *args], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=120)
  return result, [json.loads(l) for l in log.read_text().splitlines()]


def test_dry_run_prints_the_commands_and_runs_none(tmp_path):
  result, calls = _run_cli(tmp_path, *BASE, '--dry_run')
  assert result.returncode == 0, result.stderr
  assert calls == []
  commands = [shlex.split(l) for l in result.stdout.splitlines() if not l.startswith('#')]
  assert [c[4] for c in commands] == ['describe', 'create', 'scp', 'ssh', 'ssh', 'ssh', 'delete']
  assert all(c[:4] == ['gcloud', 'compute', 'tpus', 'tpu-vm'] for c in commands)
  assert commands[-2][-2] == _train_line('--config configs/common.py',
                                         '--workdir gs://bucket/run1')


def test_run_creates_a_missing_vm_then_ships_installs_and_trains(tmp_path):
  result, calls = _run_cli(tmp_path, *BASE)
  assert result.returncode == 0, result.stderr
  assert [c[3] for c in calls] == ['describe', 'create', 'scp', 'ssh', 'ssh', 'ssh']
  assert '--accelerator-type=v4-32' in calls[1] and '--version=tpu-ubuntu2204-base' in calls[1]
  assert all('--worker=all' in c for c in calls[2:])
  with tarfile.open(tmp_path / 'shipped.tar.gz') as tar:
    names = set(tar.getnames())
  assert {'vit_jax/tools/tpu_vm.py', 'configs/common.py', 'tests/test_tpu_vm.py'} <= names
  assert not any(n.startswith('.git/') or '__pycache__' in n for n in names)


@pytest.mark.parametrize('state, reuse, verbs, returncode', [
    ('READY', True, ['describe', 'scp', 'ssh', 'ssh', 'ssh'], 0),
    ('STOPPED', True, ['describe', 'start', 'scp', 'ssh', 'ssh', 'ssh'], 0),
    ('READY', False, ['describe'], 2),
    # A preempted Spot VM is created again; the run resumes from its gs:// workdir.
    ('PREEMPTED', True, ['describe', 'delete', 'create', 'scp', 'ssh', 'ssh', 'ssh'], 0),
    ('CREATING', True, ['describe'], 2),
])
def test_an_existing_vm_is_reused_only_when_asked(tmp_path, state, reuse, verbs, returncode):
  result, calls = _run_cli(tmp_path, *BASE, *(['--reuse'] if reuse else []), state=state)
  assert result.returncode == returncode, result.stderr
  assert [c[3] for c in calls] == verbs
  if returncode:
    assert result.stderr.startswith('error: ') and state in result.stderr


# A stateful fake: the VM's state lives in a file (create -> READY, delete -> gone), scp copies
# into a fake home, and with FAKE_RUN_SSH its ssh really runs the command there, locally (the
# install step only makes ~/vit_jax_env/bin/python run this Python). With FAKE_PREEMPT_AT the
# first remote output line containing that text preempts the VM: the command is killed, the
# state becomes PREEMPTED and ssh exits 255, as a dropped session does.
FAKE_CLOUD = textwrap.dedent('''\
    #!{python}
    import json, os, shutil, signal, subprocess, sys
    args = sys.argv[1:]
    here = os.environ['FAKE_CLOUD_DIR']
    home = os.path.join(here, 'home')
    with open(os.path.join(here, 'gcloud.jsonl'), 'a') as f:
      f.write(json.dumps(args) + '\\n')
    state_file = os.path.join(here, 'state')
    state = open(state_file).read() if os.path.exists(state_file) else None
    def set_state(value):
      with open(state_file, 'w') as f:
        f.write(value)
    verb = args[3]
    if verb == 'describe':
      if state is None:
        sys.exit('ERROR: NOT_FOUND')
      print(state)
    elif verb == 'create':
      if state is not None:
        sys.exit('ERROR: ALREADY_EXISTS')
      set_state('READY')
    elif verb == 'delete':
      os.remove(state_file)
    elif verb == 'start':
      set_state('READY')
    elif verb in ('scp', 'ssh') and state != 'READY':
      sys.exit(255)
    elif verb == 'scp':
      os.makedirs(home, exist_ok=True)
      shutil.copy(args[4], os.path.join(home, args[5].split(':', 1)[1]))
    elif verb == 'ssh' and 'train.py' in args[-2] + args[-3] and os.environ.get('FAKE_TRAIN'):
      if os.environ['FAKE_TRAIN'] == 'preempted':
        set_state('PREEMPTED')
        sys.exit(255)
      sys.exit(int(os.environ['FAKE_TRAIN']))
    elif verb == 'ssh' and os.environ.get('FAKE_RUN_SSH'):
      command = [a for a in args if a.startswith('--command=')][0][len('--command='):]
      if 'uv pip install' in command:
        os.makedirs(os.path.join(home, 'vit_jax_env', 'bin'), exist_ok=True)
        python = os.path.join(home, 'vit_jax_env', 'bin', 'python')
        with open(python, 'w') as f:
          f.write('#!/bin/sh\\nexec {python} "$@"\\n')
        os.chmod(python, 0o755)
        sys.exit(0)
      process = subprocess.Popen(['bash', '-c', command], cwd=home, env=dict(os.environ, HOME=home),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
      trigger, marker = os.environ.get('FAKE_PREEMPT_AT'), os.path.join(here, 'preempted')
      for line in process.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if trigger and trigger in line and not os.path.exists(marker):
          os.killpg(process.pid, signal.SIGKILL)
          open(marker, 'w').close()
          set_state('PREEMPTED')
          sys.exit(255)
      sys.exit(process.wait())
''')


def _run_cloud(tmp_path, *args, state=None, env=None, timeout=120):
  """Runs the launcher against FAKE_CLOUD; returns (result, [(verb, args)])."""
  here = tmp_path / 'cloud'
  (here / 'bin').mkdir(parents=True, exist_ok=True)
  gcloud = here / 'bin' / 'gcloud'
  gcloud.write_text(FAKE_CLOUD.format(python=sys.executable))
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
  log = here / 'gcloud.jsonl'
  log.write_text('')
  if state:
    (here / 'state').write_text(state)
  full_env = dict(os.environ, PATH=f'{here / "bin"}{os.pathsep}{os.environ["PATH"]}',
                  FAKE_CLOUD_DIR=str(here), TMPDIR=str(tmp_path), PYTHONUNBUFFERED='1',
                  **(env or {}))
  result = subprocess.run([sys.executable, '-m', 'vit_jax.tools.tpu_vm', *args], cwd=REPO,
                          capture_output=True, text=True, env=full_env, timeout=timeout)
  return result, [json.loads(l) for l in log.read_text().splitlines()]


def test_a_detached_run_is_resumed_on_demand(tmp_path):
  """--detach cannot watch the VM: `--resume` recreates a preempted (or deleted) one and starts
  training again; on a READY VM it only restarts training, which the pid guard keeps single."""
  sweep = ['--sweep', 'configs/sweeps/quickstart_lr_wd.py', '--detach']
  base = [a for a in BASE if a not in ('--config', 'configs/common.py')]
  result, calls = _run_cloud(tmp_path, *base, *sweep, '--resume', state='PREEMPTED')
  assert result.returncode == 0, result.stderr
  assert [c[3] for c in calls] == ['describe', 'delete', 'create', 'scp', 'ssh', 'ssh', 'ssh']
  assert 'nohup' in calls[-1][-2] and 'vit_jax_train.pid' in calls[-1][-2]
  assert 'rerun this command with --resume' in result.stdout

  result, calls = _run_cloud(tmp_path, *base, *sweep, '--resume')  # READY now
  assert result.returncode == 0, result.stderr
  assert [c[3] for c in calls] == ['describe', 'ssh']
  result, calls = _run_cloud(tmp_path, *base, *sweep, '--resume', '--reuse')
  assert result.returncode == 2 and 'drop --reuse' in result.stderr


def test_recreations_are_bounded_and_a_failing_training_is_not_retried(tmp_path):
  """A VM lost again and again is recreated --max_recreations times, then the launcher gives
  up (exit 1, pointing at --resume); a training that fails on a live VM (here: diverged, exit
  3) is not retried, and its status is the launcher's."""
  result, calls = _run_cloud(tmp_path, *BASE, '--max_recreations', '1',
                             env={'FAKE_TRAIN': 'preempted'})
  assert result.returncode == 1
  assert result.stderr.startswith('error: the VM was lost 2 times') and '--resume' in result.stderr
  assert [c[3] for c in calls].count('create') == 2 and calls[-1][3] == 'describe'

  result, calls = _run_cloud(tmp_path / 'live', *BASE, '--reuse', state='READY',
                             env={'FAKE_TRAIN': '3'})
  assert result.returncode == 3
  assert result.stderr.strip() == ('error: training on the VM exited with status 3 (the run '
                                   'diverged; rerunning as it is diverges again); its output '
                                   'above says more')
  assert [c[3] for c in calls] == ['describe', 'scp', 'ssh', 'ssh', 'ssh', 'describe']


@pytest.mark.slow
def test_preempted_sweep_vm_is_recreated_and_its_points_resume(tmp_path, compile_cache):
  """create -> run -> preempted -> recreate -> resume -> done, with the fake's ssh running the
  sweep for real against a local GCS emulator. Point seed=1 had finished and seed=2 had
  diverged before (their marks are in the bucket; how a point's exit status 3 becomes its
  diverged.json is tests/test_sweep.py's): neither runs again. Point seed=3 is preempted after
  step 9 and resumes from its checkpoint in the bucket."""
  from conftest import TINY_QUICKSTART, TINY_STEPS
  from gcs_emulator import Emulator
  sweep_file = tmp_path / 'three_seeds.py'
  sweep_file.write_text("base_config = 'configs/quickstart.py'\n"
                        "def get_sweep():\n"
                        "  return [{'seed': 1}, {'seed': 2}, {'seed': 3}]\n")
  overrides = [a for a in TINY_QUICKSTART if a.startswith('--config.')]
  args = ['--name', 'my-tpu', '--zone', 'us-central2-b', '--accelerator_type', 'v4-8', '--spot',
          '--sweep', str(sweep_file), '--workdir', 'gs://bkt/tpu', *overrides]
  with Emulator(['bkt']) as gcs:
    gcs.write('tpu/seed=1/final_metrics.json', b'{"step": 12}')
    gcs.write('tpu/seed=2/diverged.json', b'{"exit_status": 3}')
    env = dict(gcs.env, FAKE_RUN_SSH='1', FAKE_PREEMPT_AT='step 9/', **compile_cache)
    result, calls = _run_cloud(tmp_path, *args, env=env, timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    names = gcs.names('tpu/')
    metrics = gcs.read('tpu/seed=3/metrics.jsonl').decode().splitlines()
  assert [c[3] for c in calls] == [
      'describe', 'create', 'scp', 'ssh', 'ssh', 'ssh',     # create, ship, install, train...
      'describe', 'delete', 'create', 'scp', 'ssh', 'ssh', 'ssh']  # ...preempted: again
  assert '--spot' in calls[1] and '--spot' in calls[8]
  output = result.stdout
  assert '# the VM is PREEMPTED (preempted?): recreate it and resume (1 of at most 5)' in output
  assert output.count('seed=1: finished already, skipping') == 2
  assert output.count('seed=2: diverged before, not retried') == 2
  # Killed after step 9: step 4's checkpoint is complete (step 8's may still be in flight).
  assert re.search(r'resuming from the checkpoint at step [48] in gs://bkt/tpu/seed=3/checkpoints',
                   output)
  assert 'tpu/seed=3/final_metrics.json' in names
  assert not any(name.startswith(('tpu/seed=1/c', 'tpu/seed=2/c')) for name in names)
  steps = [json.loads(line)['step'] for line in metrics if 'train_loss' in line]
  assert steps == list(range(1, TINY_STEPS + 1))
