"""Train on a Cloud TPU VM: create (or reuse) it, ship the code, install, start on every worker.

    python -m vit_jax.tools.tpu_vm --name my-tpu --zone us-central2-b --accelerator_type v4-32 \\
        --config configs/vit.py:b16,cifar10 --workdir gs://my-bucket/vit_b16 \\
        [--config.<key>=<value> ...] [--spot] [--reuse] [--detach [--resume]] [--dry_run]

The steps, each one `gcloud` command (`--dry_run` prints them and runs nothing):
  1. `tpu-vm describe` the VM; if it is missing, `tpu-vm create` it (with --reuse an existing
     READY VM is used, a STOPPED one started);
  2. ship the code to every worker: this checkout's files (those git tracks or would track) as a
     tarball through `tpu-vm scp --worker=all`, or `git clone` on the workers with --git_url;
  3. `tpu-vm ssh --worker=all`: make a Python venv (uv; TPU images ship an older Python than
     jax needs) and install requirements.txt plus `jax[tpu]` into it;
  4. `tpu-vm ssh --worker=all`: run `train.py` (or a sweep) on all workers at once. Every worker
     runs the same command; `jax.distributed.initialize()` in train.py finds the others itself.

A VM that is lost on the way (a Spot VM gcloud reports PREEMPTED or TERMINATED, or one that is
gone) is recreated and steps 2-4 run again; the run resumes from the checkpoints in its gs://
workdir, and a sweep skips its finished points and those that diverged. Attached, the launcher
does this itself (up to --max_recreations times); with --detach it cannot watch, and the same
command with --resume does it on demand (on a READY VM it only restarts training that is not
running). See docs/TPU_VM.md.
"""

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile

from vit_jax.tools import sweep as sweep_lib
from vit_jax import errors
from vit_jax.errors import UserError

REMOTE_DIR = '~/vit_jax'               # the code on every worker
REMOTE_TARBALL = 'vit_jax.tar.gz'      # relative to the workers' home folder
REMOTE_VENV = '~/vit_jax_env'
REMOTE_PYTHON = f'{REMOTE_VENV}/bin/python'
REMOTE_LOG = '~/vit_jax_train.log'     # with --detach
REMOTE_PID = '~/vit_jax_train.pid'     # with --detach: the training's process, while it runs
LOST_STATES = ('PREEMPTED', 'TERMINATED')  # a Spot VM taken back; delete and create it again
UV = '~/.local/bin/uv'

# The TPU software version ("runtime") to create each generation with, from Google's table of
# versions for JAX and PyTorch (cloud.google.com/tpu/docs/runtimes).
DEFAULT_VERSIONS = (
    ('v6e', 'v2-alpha-tpuv6e'),
    ('v5p', 'v2-alpha-tpuv5'),
    ('v5litepod', 'v2-alpha-tpuv5-lite'),
    ('v4', 'tpu-ubuntu2204-base'),
    ('v3', 'tpu-ubuntu2204-base'),
    ('v2', 'tpu-ubuntu2204-base'),
)


def default_version(accelerator_type):
  """The software version for an accelerator type such as 'v4-32' or 'v5litepod-16'."""
  generation = accelerator_type.rsplit('-', 1)[0]
  for prefix, version in DEFAULT_VERSIONS:
    if generation == prefix:
      return version
  known = ', '.join(f'{p}-N' for p, _ in DEFAULT_VERSIONS)
  raise UserError(f'no default --version for accelerator type {accelerator_type!r}; pass '
                  f'--version, or use one of {known}')


@dataclasses.dataclass(frozen=True)
class TpuVm:
  """Which TPU VM the gcloud commands address."""
  name: str
  zone: str
  project: str | None = None

  def gcloud(self, verb, *args, name_first=True):
    """`gcloud compute tpus tpu-vm <verb> <name> <args> --zone=Z [--project=P]`."""
    where = [f'--zone={self.zone}'] + ([f'--project={self.project}'] if self.project else [])
    name = [self.name] if name_first else []  # scp names the VM in its destination instead.
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, *name, *args, *where]

  def ssh_all(self, remote_command):
    """Runs a shell command line on every worker of the VM at once."""
    return self.gcloud('ssh', '--worker=all', f'--command={remote_command}')


def describe_command(vm):
  """The gcloud command that prints the VM's state (READY, PREEMPTED, ...); it fails where there
  is no VM."""
  return vm.gcloud('describe', '--format=value(state)')


def create_command(vm, accelerator_type, version, spot=False):
  """The gcloud command that creates the VM with that accelerator type and software version (a
  Spot VM with `spot`)."""
  return vm.gcloud('create', f'--accelerator-type={accelerator_type}', f'--version={version}',
                   *(['--spot'] if spot else []))


def start_command(vm):
  """The gcloud command that starts the VM (a stopped one)."""
  return vm.gcloud('start')


def delete_command(vm):
  """The gcloud command that deletes the VM, without asking."""
  return vm.gcloud('delete', '--quiet')


def copy_tarball_commands(vm, local_tarball):
  """scp the tarball to every worker, then unpack it into REMOTE_DIR there."""
  return [
      vm.gcloud('scp', local_tarball, f'{vm.name}:{REMOTE_TARBALL}', '--worker=all',
                name_first=False),
      vm.ssh_all(f'mkdir -p {REMOTE_DIR} && tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR}'),
  ]


def git_clone_command(vm, git_url, git_ref='HEAD'):
  """Clones (first time) or fetches `git_url` on every worker and checks out `git_ref`."""
  url, ref = shlex.quote(git_url), shlex.quote(git_ref)
  return vm.ssh_all(
      f'([ -d {REMOTE_DIR}/.git ] || git clone -q {url} {REMOTE_DIR}) && '
      f'git -C {REMOTE_DIR} fetch -q {url} {ref} && '
      f'git -C {REMOTE_DIR} checkout -q --detach FETCH_HEAD')


def install_command(vm, python_version='3.12'):
  """A venv with the requirements and the TPU build of jax, on every worker.

  The TPU images' system Python can be older than current jax needs, so uv supplies one.
  """
  version = shlex.quote(python_version)
  return vm.ssh_all(
      f'python3 -m pip install --user --quiet --upgrade uv && '
      f'([ -x {REMOTE_PYTHON} ] || {UV} venv --python {version} {REMOTE_VENV}) && '
      f'cd {REMOTE_DIR} && '
      f'{UV} pip install --python {REMOTE_PYTHON} -r requirements.txt "jax[tpu]"')


def train_remote_command(workdir, overrides, config=None, sweep_file=None, detach=False):
  """The shell line each worker runs: train.py with a config, or every point of a sweep."""
  if sweep_file:
    # The sweep runs its points with the interpreter that runs it: the venv's.
    argv = [REMOTE_PYTHON, '-m', 'vit_jax.tools.sweep', sweep_file, '--workdir_root', workdir,
            *overrides]
  else:
    argv = sweep_lib.train_command(config, {}, workdir, overrides, python=REMOTE_PYTHON)
  # REMOTE_PYTHON starts with ~, which must reach the remote shell unquoted to expand.
  line = f'{REMOTE_PYTHON} {shlex.join(argv[1:])}'
  if detach:
    # Keeps running after the ssh session ends (output in REMOTE_LOG); not started twice.
    line = (f'if [ -f {REMOTE_PID} ] && kill -0 "$(cat {REMOTE_PID})" 2>/dev/null; then '
            f'echo "training is running already (pid $(cat {REMOTE_PID}))"; else '
            f'nohup {line} > {REMOTE_LOG} 2>&1 < /dev/null & echo $! > {REMOTE_PID}; fi')
  return f'cd {REMOTE_DIR} && {line}'


def pack_repo(repo_dir, out_path):
  """Tars the files git tracks or would track (not ignored ones: no workdirs, no .git).

  Returns the relative paths packed. Uncommitted edits are included, as they are on disk.
  """
  listing = subprocess.run(
      ['git', '-C', repo_dir, 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
      capture_output=True, check=False)
  if listing.returncode != 0:
    raise UserError(f'{repo_dir!r} is not a git checkout ({listing.stderr.decode().strip()}); '
                    'run from the repository or pass --git_url')
  paths = sorted(p for p in listing.stdout.decode().split('\0')
                 if p and os.path.isfile(os.path.join(repo_dir, p)))
  with tarfile.open(out_path, 'w:gz') as tar:
    for path in paths:
      tar.add(os.path.join(repo_dir, path), arcname=path)
  return paths


def check_run(config, sweep_file, overrides, workdir):
  """Catches the mistakes that would otherwise surface only after a VM has been paid for."""
  if (config is None) == (sweep_file is None):
    raise UserError('pass exactly one of --config (one run) and --sweep (every point of a sweep)')
  if not workdir.startswith('gs://'):
    raise UserError(f'--workdir {workdir!r} is not a gs:// path; every worker must write to the '
                    'same place, e.g. gs://my-bucket/vit_run')
  keys = []
  for arg in overrides:
    if not (arg.startswith('--config.') and '=' in arg):
      raise UserError(f'unexpected argument {arg!r}; extra arguments must be '
                      '--config.<key>=<value>')
    keys.append(arg[len('--config.'):].partition('=')[0])
  if sweep_file:
    sweep = sweep_lib.load_sweep(sweep_file)
    sweep_lib.sweep_commands(sweep, workdir, overrides)  # Checks overrides against the sweep.
    config = sweep.base_config
  sweep_lib.check_keys(keys, sweep_lib.load_base_config(config), 'command line')


def _parse(argv):
  parser = argparse.ArgumentParser(
      prog='python -m vit_jax.tools.tpu_vm', allow_abbrev=False,
      description='Creates or reuses a TPU VM, installs vit_jax on all workers and trains there. '
                  'Extra --config.<key>=<value> arguments go to train.py.')
  parser.add_argument('--name', required=True, help='the TPU VM name')
  parser.add_argument('--zone', required=True, help='e.g. us-central2-b')
  parser.add_argument('--project', default=None, help='default: gcloud\'s configured project')
  parser.add_argument('--accelerator_type', required=True, help='e.g. v4-32, v5litepod-16')
  parser.add_argument('--version', default=None,
                      help='TPU software version (default: the one for the accelerator)')
  parser.add_argument('--spot', action='store_true', help='create a Spot (preemptible) VM')
  parser.add_argument('--reuse', action='store_true', help='use the VM if it exists already')
  parser.add_argument('--config', default=None, help='configs/<name>.py[:arg] for train.py')
  parser.add_argument('--sweep', default=None, help='a sweep file: run all its points instead')
  parser.add_argument('--workdir', required=True, help='a gs:// folder all workers write to')
  parser.add_argument('--git_url', default=None,
                      help='clone this repository on the workers instead of copying this one')
  parser.add_argument('--git_ref', default='HEAD', help='branch, tag or commit for --git_url')
  parser.add_argument('--python_version', default='3.12', help='Python of the workers\' venv')
  parser.add_argument('--skip_setup', action='store_true',
                      help='do not copy code or install; only start training')
  parser.add_argument('--detach', action='store_true',
                      help=f'leave training running in the background (log: {REMOTE_LOG})')
  parser.add_argument('--resume', action='store_true',
                      help='resume a run: recreate the VM if it was preempted or deleted, '
                           'start it if stopped, and restart training unless it is running')
  parser.add_argument('--max_recreations', type=int, default=5,
                      help='attached: how many times a lost (preempted) VM is recreated')
  parser.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  args, overrides = parser.parse_known_args(argv)
  return args, overrides


def plan(args, overrides, local_tarball, setup=True):
  """The commands to run once the VM is up: [(purpose, argv)]."""
  vm = TpuVm(args.name, args.zone, args.project)
  steps = []
  if setup and not args.skip_setup:
    if args.git_url:
      steps.append(('get the code', git_clone_command(vm, args.git_url, args.git_ref)))
    else:
      scp, unpack = copy_tarball_commands(vm, local_tarball)
      steps += [('copy the code', scp), ('unpack the code', unpack)]
    steps.append(('install', install_command(vm, args.python_version)))
  steps.append(('train', vm.ssh_all(train_remote_command(
      args.workdir, overrides, config=args.config, sweep_file=args.sweep, detach=args.detach))))
  return steps


def _run(purpose, argv):
  print(f'# {purpose}\n{shlex.join(argv)}', flush=True)
  returncode = subprocess.run(argv, check=False).returncode
  if returncode != 0:
    raise RuntimeError(f'{purpose} failed with exit code {returncode}: {shlex.join(argv)}')


def vm_state(vm):
  """The VM's state as gcloud reports it ('READY', 'PREEMPTED', ...), or None if it is gone."""
  print(f'# look for the VM\n{shlex.join(describe_command(vm))}', flush=True)
  described = subprocess.run(describe_command(vm), capture_output=True, text=True, check=False)
  return described.stdout.strip() if described.returncode == 0 else None


def ensure_vm(vm, accelerator_type, version, reuse, spot):
  """Creates the VM, or with `reuse` uses the one that exists (started if STOPPED, created again
  if PREEMPTED or TERMINATED)."""
  state = vm_state(vm)
  if state is None:
    _run('create the VM', create_command(vm, accelerator_type, version, spot))
    return
  if not reuse:
    raise UserError(f'TPU VM {vm.name!r} exists already in {vm.zone} ({state}); pass --reuse to '
                    'use it, or choose another --name')
  if state == 'STOPPED':
    _run('start the VM', start_command(vm))
  elif state in LOST_STATES:  # Preempted: a new VM resumes the run from its gs:// workdir.
    print(f'# the VM is {state}: create it again', flush=True)
    recreate_vm(vm, state, accelerator_type, version, spot)
  elif state != 'READY':
    raise UserError(f'TPU VM {vm.name!r} is {state}, not READY or STOPPED; delete it with '
                    f'`gcloud compute tpus tpu-vm delete {vm.name} --zone={vm.zone}` and rerun')


def recreate_vm(vm, state, accelerator_type, version, spot):
  """Deletes a lost VM (unless it is gone already) and creates it again."""
  if state is not None:
    _run(f'delete the {state} VM', delete_command(vm))
  _run('create the VM again', create_command(vm, accelerator_type, version, spot))


def revive_vm(vm, accelerator_type, version, spot):
  """For --resume: the VM made READY; returns whether it is new (and needs the code again)."""
  state = vm_state(vm)
  if state == 'READY':
    return False
  if state == 'STOPPED':
    _run('start the VM', start_command(vm))
    return False
  if state is not None and state not in LOST_STATES:
    raise UserError(f'TPU VM {vm.name!r} is {state}; wait until it is READY, or delete it')
  print(f'# the VM is {state or "gone"}: create it again and resume', flush=True)
  recreate_vm(vm, state, accelerator_type, version, spot)
  return True


def supervise(vm, steps_for, recreate, max_recreations):
  """Runs the steps; when one fails because the VM was lost (preempted, or deleted), recreates
  the VM and runs the steps again, at most `max_recreations` times.

  `steps_for(recreated)` gives the steps (a recreated VM needs the setup steps again);
  `recreate(state)` makes a new VM. Returns `(purpose, exit status)` of the step that failed on a
  VM that is still there (the command's own failure), or `(None, 0)`.
  """
  recreations = 0
  while True:
    failed = None
    for purpose, argv in steps_for(recreations > 0):
      print(f'# {purpose}\n{shlex.join(argv)}', flush=True)
      returncode = subprocess.run(argv, check=False).returncode
      if returncode != 0:
        failed = (purpose, returncode)
        break
    if failed is None:
      return None, 0
    state = vm_state(vm)
    if state is not None and state not in LOST_STATES:
      return failed
    if recreations == max_recreations:
      raise RuntimeError(f'the VM was lost {recreations + 1} times (now {state or "gone"}); '
                         'giving up: rerun with --resume to go on')
    recreations += 1
    print(f'# the VM is {state or "gone"} (preempted?): recreate it and resume '
          f'({recreations} of at most {max_recreations})', flush=True)
    recreate(state)


def _remote_failure(purpose, returncode):
  """The launcher's exit status for a step that failed on a live VM: a training's own status
  (2 mistake, 3 diverged, 4 environment) is passed on."""
  meaning = {errors.USER_ERROR_STATUS: 'a mistake in the config or command',
             errors.DIVERGED_STATUS: 'the run diverged; rerunning as it is diverges again',
             errors.ENVIRONMENT_FAULT_STATUS: 'a fault of the machine or storage'}
  if purpose == 'train' and returncode in meaning:
    print(f'error: training on the VM exited with status {returncode} ({meaning[returncode]}); '
          'its output above says more', file=sys.stderr)
    return returncode
  print(f'error: {purpose} failed with exit code {returncode}', file=sys.stderr)
  return 1


def main(argv=None):
  """Creates or reuses the TPU VM, installs the code and starts the run (or sweep) on every
  worker, recreating a lost VM; with --dry_run prints the commands instead. The exit status."""
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    args, overrides = _parse(argv)
    check_run(args.config, args.sweep, overrides, args.workdir)
    if args.resume and args.reuse:
      raise UserError('--resume reuses the VM already; drop --reuse')
    version = args.version or default_version(args.accelerator_type)
    vm = TpuVm(args.name, args.zone, args.project)
    local_tarball = os.path.join(
        tempfile.gettempdir(), f'vit_jax-{re.sub(r"[^A-Za-z0-9_.-]", "_", args.name)}.tar.gz')
    steps = plan(args, overrides, local_tarball)
    if args.dry_run:
      print(f'# look for the VM (with --reuse, use it if it exists)\n'
            f'{shlex.join(describe_command(vm))}')
      print(f'# if it does not exist: create it\n'
            f'{shlex.join(create_command(vm, args.accelerator_type, version, args.spot))}')
      if not (args.skip_setup or args.git_url):
        print(f'# pack this checkout (files git tracks or would track) into {local_tarball}')
      for purpose, command in steps:
        print(f'# {purpose}\n{shlex.join(command)}')
      print(f'# if the VM is lost (PREEMPTED, TERMINATED or gone): delete it, create it again '
            f'and rerun the steps above\n{shlex.join(delete_command(vm))}')
      return 0
    if args.resume:
      setup_first = revive_vm(vm, args.accelerator_type, version, args.spot)
    else:
      ensure_vm(vm, args.accelerator_type, version, args.reuse, args.spot)
      setup_first = True
    if not (args.skip_setup or args.git_url):
      repo_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
      count = len(pack_repo(repo_dir, local_tarball))
      print(f'# packed {count} files of {repo_dir} into {local_tarball}', flush=True)
    purpose, returncode = supervise(
        vm, lambda recreated: plan(args, overrides, local_tarball,
                                   setup=setup_first or recreated),
        lambda state: recreate_vm(vm, state, args.accelerator_type, version, args.spot),
        args.max_recreations)
    if returncode:
      return _remote_failure(purpose, returncode)
    if args.detach:
      follow = vm.gcloud('ssh', '--worker=0', f'--command=tail -f {REMOTE_LOG}')
      print(f'training runs in the background; follow worker 0 with: {shlex.join(follow)}; '
            'if the VM is preempted, rerun this command with --resume')
    return 0
  except errors.REPORTED as e:
    return errors.report(e)
  except RuntimeError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main())
