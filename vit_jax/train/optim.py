"""Optimizers and learning-rate schedules, built from `config.optimizer` and `config.schedule`.

Every optimizer is one Optax chain of the same shape, so the pieces a researcher tunes line up:

  clip by global norm → the optimizer's update direction → decoupled weight decay (per leaf)
  → [LAMB's trust ratio] → per-leaf learning-rate factors → multiply by −learning_rate(step)

Weight decay is decoupled (added after the update direction, scaled by the learning rate, as
AdamW does) and applies to the weight matrices and conv kernels only (every `kernel` leaf,
the patch embedding's included, as timm and big_vision decay it): not to biases, norm scales,
layer scales, position embeddings, the class/register tokens or the MAP probe.

Fine-tuning options act per parameter, named by regexes searched in the '/'-joined path of each
leaf ('head/kernel', 'Transformer/encoderblock_3/MlpBlock_3/Dense_0/kernel', 'cls'):
- `layer_decay` d (BEiT's layer-wise decay): the embeddings (patch embedding, class,
  distillation and register tokens, position embeddings, `pre_norm`, a hybrid's ResNet root)
  are layer 0, `encoderblock_i` layer i + 1, everything after the blocks (final norm, fc_norm,
  MAP head, pre_logits, heads) layer L + 1; layer j's rate is base × d^(L + 1 − j), so block i
  gets d^(L − i), the embeddings d^(L + 1) and the head 1. Scanned blocks are one stack whose
  factor varies along its leading layer axis.
- `lr_multipliers` 'PATTERN=X,...': matching leaves' rate times X (several matches multiply,
  and multiply the layer decay); `wd_multipliers` the same for the weight decay of the kernels.
- `frozen` / `trainable`: a leaf is frozen when it matches `frozen`, or `trainable` is set and
  it does not match it. The chain above then sees the trained leaves only (its clipping norm,
  its state): `optax.multi_transform` gives the frozen ones zero updates and no state at all.
A pattern that matches no parameter is a UserError naming it.

The config is the resolved one (`vit_jax.train.config.resolve`), which has checked every value
and filled the optimizer's own keys (an sgd run has `momentum`, an adamw run `b1`, `b2`, `eps`).
"""

import functools
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax.errors import UserError
from vit_jax.train import config as config_lib

# BEiT's layer 0: everything before the blocks (ViT, hybrid ResNet root, Mixer stem).
_EMBEDDINGS = re.compile(r'^(embedding|conv_root|gn_root|block\d+|stem)/|^(cls|dist|registers)$'
                         r'|^Transformer/(posembed_input|pre_norm)/')
_BLOCK = re.compile(r'^(?:Transformer/encoderblock|MixerBlock)_(\d+)/')
_SCANNED_BLOCKS = 'Transformer/encoderblock/'
TRAINED, FROZEN = 'trained', 'frozen'


def create_schedule(schedule_config, total_steps):
  """Linear warmup to `base_lr`, then the named decay down to `end_lr` at `total_steps`.

  The warmup's first step (step 0) already takes base_lr / warmup_steps, step s takes
  base_lr * (s + 1) / warmup_steps, and step warmup_steps - 1 the full base_lr: no step is
  spent at a rate of 0. `rsqrt` decays as base_lr * sqrt(warmup / step) after warmup
  (timescale = warmup, at least 1).
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


def leaf_name(path):
  """A leaf's key path as the '/'-joined name the patterns are searched in."""
  return '/'.join(str(getattr(key, 'key', getattr(key, 'idx', key))) for key in path)


def decay_mask(params):
  """True for the leaves that get weight decay: every `kernel` (matrices and conv kernels)."""
  def wants_decay(path, leaf):
    del leaf
    return str(getattr(path[-1], 'key', path[-1])) == 'kernel'
  return jax.tree_util.tree_map_with_path(wants_decay, params)


def layer_ids(params):
  """`(ids, num_layers)`: each leaf's BEiT layer (0 embeddings, i + 1 for encoderblock_i,
  L + 1 after the blocks; a scanned stack gets the array 1..L along its layer axis) and L."""
  names = [leaf_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  blocks = {int(m.group(1)) for m in map(_BLOCK.match, names) if m}
  stacked = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
             if leaf_name(path).startswith(_SCANNED_BLOCKS)]
  num_layers = stacked[0].shape[0] if stacked else len(blocks)

  def layer_id(path, leaf):
    name = leaf_name(path)
    if name.startswith(_SCANNED_BLOCKS):
      return np.arange(1, num_layers + 1).reshape((num_layers,) + (1,) * (leaf.ndim - 1))
    block = _BLOCK.match(name)
    if block:
      return int(block.group(1)) + 1
    return 0 if _EMBEDDINGS.match(name) else num_layers + 1

  return jax.tree_util.tree_map_with_path(layer_id, params), num_layers


def _names_seen(names):
  """The parameter names in short, for an error message: `{i}` for a block's number, `*` for
  what lies below ('Transformer/encoderblock_{i}/*, cls, head/*')."""
  groups = []
  for name in names:
    name = re.sub(r'^(Transformer/encoderblock|MixerBlock)_\d+/', r'\1_{i}/', name)
    parts = name.split('/')
    depth = 2 if parts[0] == 'Transformer' else 1
    group = '/'.join(parts[:depth]) + ('/*' if len(parts) > depth else '')
    if group not in groups:
      groups.append(group)
  return ', '.join(groups)


def _factor(name, rules):
  """The product of the factors of the (pattern, factor) rules whose pattern is in `name`."""
  return float(np.prod([factor for pattern, factor in rules if re.search(pattern, name)]))


class PerParameter(NamedTuple):
  """What the fine-tuning options make of each leaf of the params (trees like the params)."""
  lr_factors: Any    # a float, or an array along a scanned stack's layer axis; None: all 1
  decay_rates: Any   # the weight decay rate (0.0: none); None: no weight decay at all
  labels: Any        # TRAINED or FROZEN; None: all trained


def per_parameter(optimizer_config, params):
  """The per-leaf settings of `optimizer_config` for `params` (arrays or shapes).

  Raises:
    UserError: a pattern that matches no parameter (for `wd_multipliers`: no decayed kernel),
      or `frozen` / `trainable` that leave nothing to train.
  """
  names = [leaf_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  decayed = [name for name, wants in zip(names, jax.tree_util.tree_leaves(decay_mask(params)))
             if wants]
  lr_rules = config_lib.parse_multipliers(optimizer_config.lr_multipliers)
  wd_rules = config_lib.parse_multipliers(optimizer_config.wd_multipliers)

  def check(key, pattern, candidates, what='parameter'):
    if not any(re.search(pattern, name) for name in candidates):
      raise UserError(f'optimizer.{key}: pattern {pattern!r} matches no {what} of the model '
                      f'(the regex is searched in names such as {_names_seen(names)})')

  for pattern, _ in lr_rules:
    check('lr_multipliers', pattern, names)
  for pattern, _ in wd_rules:
    check('wd_multipliers', pattern, decayed, 'weight-decayed kernel')
  for key in ('frozen', 'trainable'):
    if optimizer_config[key]:
      check(key, optimizer_config[key], names)

  lr_factors = None
  if optimizer_config.layer_decay != 1.0 or lr_rules:
    ids, num_layers = layer_ids(params)
    decay = float(optimizer_config.layer_decay)

    def lr_factor(path, layer):
      factor = decay ** (num_layers + 1 - layer) * _factor(leaf_name(path), lr_rules)
      return factor.astype(np.float32) if isinstance(factor, np.ndarray) else float(factor)
    lr_factors = jax.tree_util.tree_map_with_path(lr_factor, ids)

  decay_rates = None
  if optimizer_config.weight_decay:
    def decay_rate(path, wants_decay):
      if not wants_decay:
        return 0.0
      return float(optimizer_config.weight_decay) * _factor(leaf_name(path), wd_rules)
    decay_rates = jax.tree_util.tree_map_with_path(decay_rate, decay_mask(params))

  labels = trained_labels(optimizer_config, params)
  if labels is not None and TRAINED not in jax.tree_util.tree_leaves(labels):
    raise UserError(f'optimizer.frozen={optimizer_config.frozen!r} with '
                    f'optimizer.trainable={optimizer_config.trainable!r} leaves no parameter '
                    'to train')
  return PerParameter(lr_factors, decay_rates, labels)


def trained_labels(optimizer_config, params):
  """TRAINED or FROZEN for each leaf of `params` (any tree of their structure: arrays, shapes,
  shardings), by `frozen` / `trainable`; None when both are unset (every leaf trained).

  The one rule: the optimizer partitions by it, and the train step reads it to keep the frozen
  leaves' gradients out of its norm (`only_trained`). Unchecked: `per_parameter` checks it.
  """
  frozen, trainable = optimizer_config.frozen, optimizer_config.trainable
  if not (frozen or trainable):
    return None
  is_frozen = lambda name: bool((frozen and re.search(frozen, name))
                                or (trainable and not re.search(trainable, name)))
  return jax.tree_util.tree_map_with_path(
      lambda path, _: FROZEN if is_frozen(leaf_name(path)) else TRAINED, params)


def only_trained(tree, labels):
  """`tree` with its frozen leaves replaced by the `optax.MaskedNode`s the trained chain sees
  (empty subtrees: a reduction over the result reads the trained leaves alone)."""
  if tree is None or labels is None:
    return tree
  return jax.tree_util.tree_map(
      lambda value, label: value if label == TRAINED else optax.MaskedNode(), tree, labels)


def _weight_decay(rates):
  """Decoupled weight decay at a rate per leaf: updates + rate × params on the kernels.

  Masked by `decay_mask` as `optax.add_decayed_weights(mask=decay_mask)` is, so the optimizer
  state has the same structure as in checkpoints written before the rates were per leaf.
  """
  on_kernels = jax.tree_util.tree_map(
      lambda rate, wants: rate if wants else optax.MaskedNode(), rates, decay_mask(rates))

  def update(updates, state, params):
    return jax.tree_util.tree_map(
        lambda u, rate, p: u + rate * p if rate else u, updates, on_kernels, params), state
  return optax.masked(optax.GradientTransformation(lambda params: optax.EmptyState(), update),
                      decay_mask)


def _scale_per_leaf(factors):
  """updates × factor, leaf by leaf; a factor of exactly 1 leaves its leaf untouched."""
  def scale(u, factor):
    if isinstance(factor, float) and factor == 1.0:
      return u
    return u * jnp.asarray(factor, u.dtype)

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(scale, updates, factors), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


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


def create_optimizer(config, params):
  """Returns `(tx, schedule)`: the Optax transformation and the learning-rate schedule.

  `params` (arrays, or shapes from `jax.eval_shape`) are the model's: the per-parameter
  options are resolved against their names here, once.
  """
  optimizer_config = config.optimizer
  schedule = create_schedule(config.schedule, config.total_steps)
  settings = per_parameter(optimizer_config, params)
  trained_only = functools.partial(only_trained, labels=settings.labels)
  chain = []
  if optimizer_config.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(optimizer_config.grad_clip_norm))
  chain.append(_update_direction(optimizer_config))
  if settings.decay_rates is not None:
    chain.append(_weight_decay(trained_only(settings.decay_rates)))
  if optimizer_config.name == 'lamb':
    chain.append(optax.scale_by_trust_ratio())
  if settings.lr_factors is not None:
    chain.append(_scale_per_leaf(trained_only(settings.lr_factors)))
  # The schedule is read at the count of updates this chain has applied (its state's `count`):
  # a step the train step skips (non-finite) leaves the state, so the count, as it was.
  chain.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*chain)
  if settings.labels is not None:
    tx = optax.multi_transform({TRAINED: tx, FROZEN: optax.set_to_zero()}, settings.labels)
  return tx, schedule
