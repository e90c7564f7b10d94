"""What the command-line tools share: reading --config and its overrides, with one-line errors.

`train.py` and `python -m vit_jax.benchmark` take the same `--config path[:arg]` and
`--config.<key>=<value>` overrides (ml_collections' config_flags on absl); a mistake in either
is a `UserError` of one line naming the bad flag, key or file.
"""

import ast
import os
import re

from absl import flags

from vit_jax.errors import UserError


def config_argument(argv):
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
