"""Learning rate × weight decay for the quickstart (a 2 × 2 grid).

    python -m vit_jax.tools.sweep configs/sweeps/quickstart_lr_wd.py
    python -m vit_jax.tools.sweep summarize workdirs/sweeps/quickstart_lr_wd
"""

from vit_jax.tools.sweep import axis, product

base_config = 'configs/quickstart.py'


def get_sweep():
  return product(
      axis('schedule.base_lr', [1e-3, 3e-3]),
      axis('optimizer.weight_decay', [0.0, 0.05]),
  )
