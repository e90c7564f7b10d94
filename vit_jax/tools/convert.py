"""Weights between formats: `python -m vit_jax.tools.convert SRC DST [...]`.

The readers, writers and the fitting to a model are `vit_jax.weights`; this is their command line.
"""

import sys

from vit_jax.weights.convert import main

if __name__ == '__main__':
  sys.exit(main())
