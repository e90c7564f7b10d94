"""FlexiViT training (Beyer et al. 2023): which patch size each train step and each eval uses.

The model side (the base kernel PI-resized, the position table resized) is
`vit_jax.models.flexi`; here is only the choice of sizes, from the resolved `config.flexi`. A
step's size is a function of (seed, step) alone, so a resumed run draws the sizes an
uninterrupted one would. Each size is its own compiled train step (shapes differ per size).
"""

import numpy as np

_STREAM = 0xF1E  # Keeps the patch-size draws apart from any other use of the seed on the host.


def enabled(config):
  """Whether `config` trains with several patch sizes."""
  return bool(config.flexi.patch_sizes)


def train_patch_sizes(config):
  """The patch sizes the train steps use; (None,): the model's own, with FlexiViT off."""
  return tuple(config.flexi.patch_sizes) if enabled(config) else (None,)


def eval_patch_sizes(config):
  """The patch sizes the eval reports (each listed size and the eval size), or (None,)."""
  if not enabled(config):
    return (None,)
  return tuple(sorted(set(config.flexi.patch_sizes) | {config.flexi.eval_patch_size}))


def probabilities(config):
  """{patch size: the chance a train step draws it} ({None: 1.0} with FlexiViT off)."""
  if not enabled(config):
    return {None: 1.0}
  sizes = config.flexi.patch_sizes
  weights = np.asarray(config.flexi.weights or [1.0] * len(sizes), np.float64)
  return dict(zip(sizes, (weights / weights.sum()).tolist()))


def patch_size_at(config, step):
  """The patch size of train step `step` (1-based): drawn by `flexi.weights`; None when off."""
  if not enabled(config):
    return None
  sizes, chances = zip(*probabilities(config).items())
  rng = np.random.default_rng([config.seed, _STREAM, step])
  return int(sizes[rng.choice(len(sizes), p=chances)])


def metric_names(eval_metrics, patch_size, eval_patch_size):
  """`eval_metrics` of one patch size renamed `<name>_p<size>`; the eval size's also bare."""
  if patch_size is None:
    return dict(eval_metrics)
  named = {f'{name}_p{patch_size}': value for name, value in eval_metrics.items()}
  if patch_size == eval_patch_size:
    named.update(eval_metrics)
  return named
