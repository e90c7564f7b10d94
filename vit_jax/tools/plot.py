"""Training curves of one or more workdirs in one PNG.

  python -m vit_jax.tools.plot WORKDIR [WORKDIR ...] [--out curves.png]

The drawing itself is `vit_jax.train.curves`, which the loop also uses for `curves.png`.
"""

import argparse
import sys

from vit_jax import errors
from vit_jax.errors import UserError
from vit_jax.train.curves import plot_workdirs

def main(argv=None):
  """Draws the curves of the workdirs in `argv` into one PNG; the exit status."""
  parser = argparse.ArgumentParser(
      prog='python -m vit_jax.tools.plot', description='Training curves from workdirs.')
  parser.add_argument('workdirs', nargs='+', metavar='WORKDIR')
  parser.add_argument('--out', default='curves.png', help='PNG to write (default: curves.png)')
  args = parser.parse_args(argv)
  try:
    plot_workdirs(args.workdirs, args.out)
  except errors.REPORTED as e:
    return errors.report(e)
  print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
