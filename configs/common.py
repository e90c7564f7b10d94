"""Every key a run can use, at its default; not meant to be trained as it is.

The keys and their defaults are declared once, in `vit_jax.train.config.defaults` (the model's
keys generated from its dataclass); configs start from there and state only what differs. This
file makes them a config of their own, e.g. for a sweep's base: `--config configs/common.py`.
"""

from vit_jax.train import config as config_lib


def get_config():
  return config_lib.defaults()
