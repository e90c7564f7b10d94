"""What the command-line tools share: reading --config and its overrides, with one-line errors,
and handing `config.xla_flags` to XLA before the backend starts.

`train.py` and `python -m vit_jax.tools.benchmark` take the same `--config path[:arg]` and
`--config.<key>=<value>` overrides (ml_collections' config_flags on absl); a mistake in either
is a `UserError` of one line naming the bad flag, key or file.
"""

import ast
import os
import re
import sys

from absl import flags

from vit_jax.errors import UserError
from vit_jax.train import config as config_lib


def config_argument(argv):
  """The value given to --config (`path[:arg]`)."""
  for index, arg in enumerate(argv):
    if arg == '--config' and index + 1 < len(argv):
      return argv[index + 1]
    if arg.startswith('--config='):
      return arg.partition('=')[2]
  return ''


def allow_sibling_imports(config_path):
  """Lets a config import its siblings (`from configs import vit`) wherever it is run from.

  A config file in a package folder (one with `__init__.py`, as `configs/` is) imports the
  package's other modules by the package's name; the folder above the package goes on sys.path
  so that works from any working directory, as Python does for a script's own folder.
  """
  folder = os.path.dirname(os.path.abspath(config_path))
  if os.path.isfile(os.path.join(folder, '__init__.py')):
    root = os.path.dirname(folder)
    if root not in sys.path:
      sys.path.insert(0, root)


def apply_xla_flags(config, environ=None):
  """Appends `config.xla_flags` to XLA_FLAGS in `environ` (default os.environ); returns them.

  XLA reads XLA_FLAGS once, when the first backend starts, so the command-line tools call this
  right after parsing their flags, before anything touches a device (in a notebook whose jax has
  already started, it changes nothing). The environment's flags stay first and the config's come
  last, and a flag given twice takes its last value. A token that is not `--name[=value]` is a
  UserError; a well-formed name XLA does not know stops XLA itself when the backend starts.
  """
  environ = os.environ if environ is None else environ
  added = config_lib.xla_flag_tokens(config.get('xla_flags', ''))
  if added:
    environ['XLA_FLAGS'] = ' '.join([environ.get('XLA_FLAGS', ''), *added]).strip()
  return environ.get('XLA_FLAGS', '')


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
  return f'unknown config key {named} ({hint}every key is declared in vit_jax/train/config.py)'


def _flag_error_message(error):
  """One line for an absl flag error; a config file's own exception is kept (its last line)."""
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  if len(lines) > 1 and any(line.startswith('Traceback') for line in lines):
    return f'{lines[0]} {lines[-1]}'
  return lines[0]


def load_config(argv, config_flag, command):
  """Parses `argv` with absl and returns the config of `config_flag`, its overrides applied.

  `command` is how the tool is run, for the message when --config is missing (e.g.
  'python train.py'). Every failure is a one-line UserError.
  """
  argument = config_argument(argv)
  if not argument:
    raise UserError(f'--config is required, e.g. {command} --config configs/quickstart.py')
  config_path = argument.partition(':')[0]
  if not os.path.isfile(config_path):
    raise UserError(f'config file {config_path} does not exist (configs are in configs/, e.g. '
                    'configs/quickstart.py)')
  allow_sibling_imports(config_path)
  try:
    flags.FLAGS(argv)
    config = config_flag.value
    config.keys()  # Loads the file and applies the overrides (or raises their error).
  except (AttributeError, KeyError) as e:
    raise UserError(_unknown_key_message(e, argv)) from None
  except (flags.Error, TypeError, ValueError) as e:
    raise UserError(_flag_error_message(e)) from None
  except (OSError, ImportError, SyntaxError) as e:
    raise UserError(f'cannot load config {argument}: {_flag_error_message(e)}') from None
  return config
