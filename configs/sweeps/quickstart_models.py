"""Pooling and position embeddings for the quickstart, paired up rather than crossed.

`zipit` takes the values element by element, so this is 3 runs, not 9; a plain list of dicts
would say the same.
"""

from vit_jax.tools.sweep import axis, zipit

base_config = 'configs/quickstart.py'


def get_sweep():
  return zipit(
      axis('model.classifier', ['token', 'gap', 'map']),
      axis('model.posemb', ['learn', 'sincos2d', 'learn']),
  )
