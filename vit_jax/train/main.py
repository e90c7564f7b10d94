r"""The `train.py` command line: trains a ViT from a config file.

  python train.py --config configs/quickstart.py      (or `vit-train`, installed with the package)
  python train.py --config configs/vit_b16_cifar10.py --config.batch_size=256 --workdir /tmp/b16
  python train.py --config configs/vit.py:B/16,cifar10

Without --workdir the run goes to workdirs/<config name>[_<arg>] (printed). A workdir that
already holds checkpoints is resumed. Multi-host: on TPU VMs and SLURM, jax.distributed is set up
automatically; elsewhere pass --coordinator_address, --num_processes and --process_id.

A user's mistake (a misspelt key, a wrong value, a missing data set) prints one line starting
with `error:` and exits with status 2, leaving the workdir as it was; a diverged run exits 3 and a
fault of the machine or network (disk, storage) 4 (`vit_jax.errors`).
"""

from vit_jax import cpu_allocator
cpu_allocator.start(__name__, 'vit-train')  # Before anything else is imported (see there).

# pylint: disable=g-import-not-at-top,wrong-import-position
import importlib.util
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

from vit_jax.train import cli
from vit_jax import errors
from vit_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file[:arg].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics go.')
_STOP_AT_STEP = flags.DEFINE_integer(
    'stop_at_step', None, 'Save a checkpoint and exit after this step (rerun to resume).')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False, 'Resume a workdir even though its config differs.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 for multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')


def default_workdir(config_arg):
  """workdirs/<config file stem>[_<config argument>], e.g. workdirs/vit_B-16_cifar10."""
  path, _, argument = config_arg.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  if argument:
    name += '_' + re.sub(r'[^A-Za-z0-9.+-]+', '_', argument.replace('/', '-'))
  return os.path.join('workdirs', name)


def parse_flags(argv):
  """Parses flags; a bad flag or config override raises UserError with one line."""
  cli.load_config(argv, _CONFIG, 'python train.py')
  if _STOP_AT_STEP.value is not None and _STOP_AT_STEP.value < 1:
    raise UserError(f'--stop_at_step={_STOP_AT_STEP.value}: must be a step >= 1')


def initialize_distributed():
  """Joins a multi-process run: explicit flags, or auto-detection on TPU VMs and SLURM."""
  import jax
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    if None in (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value):
      raise UserError('multi-process runs need all of --coordinator_address, --num_processes '
                      'and --process_id')
    # CPU devices need gloo for collectives across processes; GPU and TPU ignore the setting.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif 'SLURM_JOB_ID' in os.environ and int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize()  # JAX reads the SLURM variables itself.
  elif importlib.util.find_spec('libtpu') is not None:
    # A Cloud TPU VM (libtpu comes with jax[tpu]): JAX finds the slice's workers itself, and a
    # single-host VM is simply a run of one process.
    jax.distributed.initialize()


def main(argv):
  """Trains (or resumes) the run `argv` describes; a user's mistake raises UserError."""
  parse_flags(argv)
  config = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir(cli.config_argument(argv))
  print(f'workdir: {workdir}', flush=True)
  cli.apply_xla_flags(config)  # Before anything starts the backend, which reads them once.
  initialize_distributed()
  from vit_jax.train import loop  # Imported after flag parsing: a typo should fail in a second.
  from vit_jax.train import storage
  try:
    loop.train_and_evaluate(config, workdir, stop_at_step=_STOP_AT_STEP.value,
                            allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, errors.REPORTED) or not storage.is_fault(e):
      raise
    # A disk or storage fault the loop did not name more precisely: still one line.
    raise errors.EnvironmentFault(f'workdir {workdir}: {storage.describe(e)}') from None


def run(argv=None):
  """`main` as a command: its exit status (see vit_jax.errors).

  After a storage fault the process ends at once: the threads of a storage that stopped
  answering (Orbax's async writers, retrying) would otherwise hold the interpreter's exit for
  minutes. The fault is reported, and the newest complete checkpoint is safe.
  """
  status = errors.exit_status_of(main, sys.argv if argv is None else argv)
  if status == errors.ENVIRONMENT_FAULT_STATUS:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access
  return status


if __name__ == '__main__':
  sys.exit(run())
