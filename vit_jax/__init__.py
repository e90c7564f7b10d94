"""vit_jax: Vision Transformers in JAX/Flax, and the framework that trains them."""

from vit_jax.errors import UserError


def restore(workdir, step=None):
  """Restores `(model, params, config)` from a training workdir (latest step, or `step`).

  Runs no training code; works on CPU for any checkpoint `train.py` wrote.
  """
  from vit_jax.train import checkpoint  # Imported here so `import vit_jax` stays light.
  return checkpoint.restore(workdir, step=step)


__all__ = ['UserError', 'restore']
