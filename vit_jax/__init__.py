"""vit_jax: Vision Transformers in JAX/Flax, and the framework that trains them."""

from vit_jax.errors import UserError


def restore(workdir, step=None, weights=None, log=None):
  """Restores `(model, params, config)` from a training workdir (latest step, or `step`).

  `weights='ema'` gives the EMA of the params (the default for a run with
  `optimizer.ema_decay > 0`: the weights it evaluated), `'params'` the raw ones; the choice is
  printed on stderr (or passed to `log`). Runs no training code; works on CPU for any
  checkpoint `train.py` wrote.
  """
  from vit_jax.train import checkpoint  # Imported here so `import vit_jax` stays light.
  return checkpoint.restore(workdir, step=step, weights=weights, log=log)


__all__ = ['UserError', 'restore']
