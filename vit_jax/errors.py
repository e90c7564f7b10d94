"""The one exception type for a user's mistake.

Raised where the mistake is first visible, naming the bad value and what would be valid. The
command-line entry points print its message as one line and exit non-zero, with no traceback.
"""


class UserError(ValueError):
  """A mistake in a config, a command line, a file or a data folder: not a bug in vit_jax."""


def one_line(error):
  """The first line of an error's message (its type's name when it has none)."""
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


def report(error):
  """Prints a user's mistake as one `error: ...` line on stderr; returns exit status 2."""
  import sys
  print(f'error: {one_line(error)}', file=sys.stderr)
  return 2
