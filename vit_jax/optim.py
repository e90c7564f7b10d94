"""Optimizers and learning-rate schedules, built from `config.optimizer` and `config.schedule`.

Every optimizer is one Optax chain of the same shape, so the pieces a researcher tunes line up:

  clip by global norm → the optimizer's update direction → decoupled weight decay (masked)
  → multiply by −learning_rate(step)

Weight decay is decoupled (added after the update direction, scaled by the learning rate, as
AdamW does) and skips biases, norm scales, position embeddings and the class/register tokens:
decaying those hurts ViTs and is what the reference implementations avoid.
"""

import jax
import jax.numpy as jnp
import optax

from vit_jax.errors import UserError

OPTIMIZERS = ('sgd', 'adamw', 'adafactor', 'lamb')
SCHEDULES = ('cosine', 'linear', 'rsqrt', 'constant')

# Parameter names that are embeddings rather than weights of a linear map.
_NO_DECAY_NAMES = ('pos_embedding', 'cls', 'registers', 'probe')


def create_schedule(schedule_config, total_steps):
  """Linear warmup from 0 to `base_lr`, then the named decay down to `end_lr` at `total_steps`.

  `rsqrt` decays as base_lr * sqrt(warmup / step) after warmup (timescale = warmup, at least 1).
  """
  name = schedule_config.name
  base_lr = float(schedule_config.base_lr)
  end_lr = float(schedule_config.end_lr)
  warmup_steps = int(schedule_config.warmup_steps)
  if name not in SCHEDULES:
    raise UserError(f'unknown schedule {name!r}; valid: {", ".join(SCHEDULES)}')
  if warmup_steps < 0 or warmup_steps > total_steps:
    raise UserError(f'schedule.warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}]')
  if base_lr < 0:
    raise UserError(f'schedule.base_lr={base_lr} must be >= 0')

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warmup = jnp.minimum(1.0, (step + 1.0) / max(warmup_steps, 1)) if warmup_steps else 1.0
    progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    if name == 'cosine':
      decayed = end_lr + (base_lr - end_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif name == 'linear':
      decayed = base_lr + (end_lr - base_lr) * progress
    elif name == 'rsqrt':
      timescale = max(warmup_steps, 1)
      decayed = base_lr * jnp.sqrt(timescale / jnp.maximum(step + 1.0, timescale))
    else:  # constant
      decayed = jnp.asarray(base_lr, jnp.float32)
    return decayed * warmup

  return schedule


def decay_mask(params):
  """True for the leaves that get weight decay: matrices and conv kernels, not embeddings."""
  def wants_decay(path, leaf):
    names = [str(getattr(key, 'key', key)) for key in path]
    if names[-1] in _NO_DECAY_NAMES:
      return False
    return names[-1] == 'kernel' and leaf.ndim >= 2
  return jax.tree_util.tree_map_with_path(wants_decay, params)


def _update_direction(optimizer_config):
  """The optimizer's own transformation, before weight decay and the learning rate."""
  name = optimizer_config.name
  if name == 'sgd':
    momentum = float(optimizer_config.momentum)
    return optax.trace(decay=momentum) if momentum else optax.identity()
  if name in ('adamw', 'lamb'):
    return optax.scale_by_adam(b1=optimizer_config.b1, b2=optimizer_config.b2,
                               eps=optimizer_config.eps)
  if name == 'adafactor':
    return optax.scale_by_factored_rms()
  raise UserError(f'unknown optimizer {name!r}; valid: {", ".join(OPTIMIZERS)}')


def create_optimizer(config):
  """Returns `(tx, schedule)`: the Optax transformation and the learning-rate schedule."""
  optimizer_config = config.optimizer
  schedule = create_schedule(config.schedule, config.total_steps)
  if optimizer_config.grad_clip_norm < 0:
    raise UserError(f'optimizer.grad_clip_norm={optimizer_config.grad_clip_norm} must be >= 0')
  if optimizer_config.weight_decay < 0:
    raise UserError(f'optimizer.weight_decay={optimizer_config.weight_decay} must be >= 0')
  if not 0.0 <= optimizer_config.ema_decay < 1.0:
    raise UserError(f'optimizer.ema_decay={optimizer_config.ema_decay} must be in [0, 1)')
  chain = []
  if optimizer_config.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(optimizer_config.grad_clip_norm))
  chain.append(_update_direction(optimizer_config))
  if optimizer_config.weight_decay:
    chain.append(optax.add_decayed_weights(optimizer_config.weight_decay, mask=decay_mask))
  if optimizer_config.name == 'lamb':
    chain.append(optax.scale_by_trust_ratio())
  chain.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*chain), schedule
