r"""Trains a ViT from a config file.

  python train.py --config configs/quickstart.py
  python train.py --config configs/vit_b16_cifar10.py --config.batch_size=256 --workdir /tmp/b16
  python train.py --config configs/vit.py:B/16,cifar10

Without --workdir the run goes to workdirs/<config name>[_<arg>] (printed). A workdir that
already holds checkpoints is resumed. Multi-host: on TPU VMs and SLURM, jax.distributed is set up
automatically; elsewhere pass --coordinator_address, --num_processes and --process_id.

A user's mistake (a misspelt key, a wrong value, a missing data set) prints one line starting
with `error:` and exits with status 2, leaving the workdir as it was.
"""

import ast
import importlib.util
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

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


def _config_argument(argv):
  """The value given to --config (`path[:arg]`)."""
  for index, arg in enumerate(argv):
    if arg == '--config' and index + 1 < len(argv):
      return argv[index + 1]
    if arg.startswith('--config='):
      return arg.partition('=')[2]
  return ''


def _unknown_key_message(error, argv):
  """'unknown config key --config.optimizer.lr ...' from config_flags' AttributeError/KeyError.

  Their text is the missing key in quotes, maybe followed by a 'Did you mean "x"' line.
  """
  text = str(error.args[0] if error.args else error)
  for _ in range(2):  # The text may come quoted, even twice (a KeyError's repr in a message).
    try:
      text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      break
  lines = text.strip().splitlines() or ['?']
  key = lines[0].strip('\'"')
  overrides = [arg.partition('=')[0] for arg in argv if arg.startswith('--config.')]
  named = next((name for name in overrides if name.rsplit('.', 1)[-1] == key), key)
  guess = re.search(r'did you mean "([^"]+)"', ' '.join(lines[1:]), re.IGNORECASE)
  hint = f'did you mean {guess.group(1)}? ' if guess else ''
  return f'unknown config key {named} ({hint}every key is declared in configs/common.py)'


def _flag_error_message(error):
  """One line for an absl flag error; a config file's own exception is kept (its last line)."""
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  if len(lines) > 1 and any(line.startswith('Traceback') for line in lines):
    return f'{lines[0]} {lines[-1]}'
  return lines[0]


def parse_flags(argv):
  """Parses flags; a bad flag or config override raises UserError with one line."""
  config_argument = _config_argument(argv)
  if not config_argument:
    raise UserError('--config is required, e.g. python train.py --config configs/quickstart.py')
  config_path = config_argument.partition(':')[0]
  if not os.path.isfile(config_path):
    raise UserError(f'config file {config_path} does not exist (configs are in configs/, e.g. '
                    'configs/quickstart.py)')
  try:
    flags.FLAGS(argv)
    _CONFIG.value.keys()  # Loads the file and applies the overrides (or raises their error).
  except (AttributeError, KeyError) as e:
    raise UserError(_unknown_key_message(e, argv)) from None
  except (flags.Error, TypeError, ValueError) as e:
    raise UserError(_flag_error_message(e)) from None
  except (OSError, ImportError, SyntaxError) as e:
    raise UserError(f'cannot load config {config_argument}: {_flag_error_message(e)}') from None
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
  parse_flags(argv)
  config = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir(_config_argument(argv))
  print(f'workdir: {workdir}', flush=True)
  from vit_jax import build  # After flag parsing, as below.
  build.apply_xla_flags(config)  # Before anything starts the backend, which reads them once.
  initialize_distributed()
  from vit_jax import trainer  # Imported after flag parsing: a typo should fail in a second.
  trainer.train_and_evaluate(config, workdir, stop_at_step=_STOP_AT_STEP.value,
                             allow_config_change=_ALLOW_CONFIG_CHANGE.value)


if __name__ == '__main__':
  try:
    main(sys.argv)
  except UserError as e:
    sys.exit(errors.report(e))
