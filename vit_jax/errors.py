"""The exceptions a command line turns into one line, and the exit status of each.

  2  UserError         a mistake in a config, a command line, a file or a data folder: fix it
  3  Diverged          the loss or a gradient became NaN/Inf: the run stopped at its last good
                       checkpoint; rerunning as it is diverges again
  4  EnvironmentFault  the machine or the network failed (disk full, read-only or missing
                       path, storage unreachable, refused credentials): worth a retry elsewhere

Each is raised where the fault is first visible, naming the bad value or path and what would be
valid. A sweep or a TPU-VM supervisor tells them apart by the status alone.
"""

import sys

USER_ERROR_STATUS = 2
DIVERGED_STATUS = 3
ENVIRONMENT_FAULT_STATUS = 4


class UserError(ValueError):
  """A mistake in a config, a command line, a file or a data folder: not a bug in vit_jax."""
  exit_status = USER_ERROR_STATUS


class Diverged(RuntimeError):
  """The loss or a gradient became NaN or Inf and the config says to stop."""
  exit_status = DIVERGED_STATUS


class EnvironmentFault(RuntimeError):
  """Disk, file system, network or storage failed under a run that was set up correctly."""
  exit_status = ENVIRONMENT_FAULT_STATUS


REPORTED = (UserError, Diverged, EnvironmentFault)


def one_line(error):
  """The first line of an error's message (its type's name when it has none)."""
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


def report(error):
  """Prints `error` as one `error: ...` line on stderr; returns its exit status."""
  print(f'error: {one_line(error)}', file=sys.stderr, flush=True)
  return getattr(error, 'exit_status', USER_ERROR_STATUS)


def exit_status_of(main, argv):
  """Runs `main(argv)` for a command line: 0 when it returns, else the reported error's one
  line on stderr and its exit status."""
  try:
    main(argv)
  except REPORTED as e:
    return report(e)
  return 0
