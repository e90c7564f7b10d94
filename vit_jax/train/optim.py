"""Optimizers and learning-rate schedules, built from `config.optimizer` and `config.schedule`.

Every optimizer is one Optax chain of the same shape, so the pieces a researcher tunes line up:

  clip by global norm → the optimizer's update direction → decoupled weight decay (masked)
  → multiply by −learning_rate(step)

Weight decay is decoupled (added after the update direction, scaled by the learning rate, as
AdamW does) and applies to the weight matrices and conv kernels only (every `kernel` leaf,
the patch embedding's included, as timm and big_vision decay it): not to biases, norm scales,
layer scales, position embeddings, the class/register tokens or the MAP probe.

The config is the resolved one (`vit_jax.train.config.resolve`), which has checked every value
and filled the optimizer's own keys (an sgd run has `momentum`, an adamw run `b1`, `b2`, `eps`).
"""

import jax
import jax.numpy as jnp
import optax



def create_schedule(schedule_config, total_steps):
  """Linear warmup from 0 to `base_lr`, then the named decay down to `end_lr` at `total_steps`.

  `rsqrt` decays as base_lr * sqrt(warmup / step) after warmup (timescale = warmup, at least 1).
  """
  name = schedule_config.name
  base_lr = float(schedule_config.base_lr)
  end_lr = float(schedule_config.end_lr or 0.0)  # None for the schedules without an end value.
  warmup_steps = int(schedule_config.warmup_steps)

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
  """True for the leaves that get weight decay: every `kernel` (matrices and conv kernels)."""
  def wants_decay(path, leaf):
    del leaf
    return str(getattr(path[-1], 'key', path[-1])) == 'kernel'
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
  # adafactor: optax.adafactor's own direction (factored second moments, each update clipped
  # to block RMS 1, scaled by the parameter's RMS), without its learning rate and decay, which
  # the chain adds as for every optimizer.
  return optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0),
                     optax.scale_by_param_block_rms())


def create_optimizer(config):
  """Returns `(tx, schedule)`: the Optax transformation and the learning-rate schedule."""
  optimizer_config = config.optimizer
  schedule = create_schedule(config.schedule, config.total_steps)
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
