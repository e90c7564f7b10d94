"""The one exception type for a user's mistake.

Raised where the mistake is first visible, naming the bad value and what would be valid. The
command-line entry points print its message as one line and exit non-zero, with no traceback.
"""


class UserError(ValueError):
  """A mistake in a config, a command line, a file or a data folder: not a bug in vit_jax."""
