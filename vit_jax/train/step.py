"""The train step and the eval step: pure functions of (state, batch) that `jax.jit` compiles.

Everything a step needs that is not an array (the model, the optimizer, sizes, rates) is bound
with `functools.partial` by the loop, so one compile serves every step. Randomness (dropout,
drop-path, mixup) comes from `fold_in(seed, step)`: no key lives in the state, and a resumed run
draws exactly the numbers an uninterrupted one would.
"""

import dataclasses
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from vit_jax.data import device as device_data
from vit_jax.train import distill
from vit_jax.train import optim


@flax.struct.dataclass
class TrainState:
  """Everything that changes from step to step; what a checkpoint holds."""
  step: jax.Array                 # int32 scalar: the number of steps taken so far
  params: Any
  opt_state: Any                  # its schedule's count: the updates applied, step - skipped
  # The params' tree in float32 whatever their dtype (bfloat16 would round each small step
  # towards them to nothing), or None when EMA is off. `weights_to_evaluate` casts it back.
  ema_params: Any
  skipped_updates: jax.Array      # int32: steps skipped for a non-finite loss or gradient
  first_nonfinite_step: jax.Array  # int32: -1 until a loss or gradient is non-finite


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """The static (non-array) settings of a step, hashable so jit can close over them."""
  image_size: int
  num_classes: int
  seed: int
  accum_steps: int = 1
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  label_smoothing: float = 0.0
  ema_decay: float = 0.0
  prng_impl: str = 'threefry2x32'  # jax.random.key's impl: threefry2x32 | rbg | unsafe_rbg
  patch_size: Optional[int] = None  # FlexiViT: the patch side of this step; None: the model's
  distill_kind: Optional[str] = None  # hard | soft with a teacher (vit_jax/train/distill.py)
  distill_alpha: float = 0.0
  distill_temperature: float = 1.0
  # How a step with a non-finite loss or gradient keeps the old state: 'cond' | 'select'
  # (`guard_for` gives the one measured faster on the mesh's devices).
  guard: str = 'cond'


def guard_for(platform):
  """The non-finite guard for devices of `platform` ('cpu', 'gpu', 'tpu'): 'cond' on the CPU,
  'select' elsewhere.

  Measured on the CPU (quickstart step, jax 0.10.2): the select per leaf compiles to 18,722
  optimized HLO lines and 3.4 s against the cond's 15,756 and 3.1 s, and the compile budget is
  tight there. On an H200 (ViT-Ti/16 bf16, batch 16, jax 0.11.2) the cond cost 0.5 ms a step
  (XLA reads its predicate back to the host before it launches a branch): 1.07–1.09x the
  textbook step, where the select, fused into the update's own kernels, is 1.01x, and compiles
  no slower. The TPU takes the GPU's choice unmeasured: its selects fuse the same way.
  """
  return 'cond' if platform == 'cpu' else 'select'


def _patch_size_kwargs(patch_size):
  """The model's `patch_size` argument, passed only when FlexiViT sets one (a Mixer has none)."""
  return {} if patch_size is None else {'patch_size': (patch_size, patch_size)}


def create_train_state(params, tx, ema_decay):
  """The state at step 0 for freshly initialised (or pretrained) `params`."""
  # A copy even where the params are float32 already: the state is donated to the step, and
  # one buffer may not be donated twice.
  ema_of = lambda p: jnp.copy(jnp.asarray(p, jnp.float32))
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=jax.tree_util.tree_map(ema_of, params) if ema_decay else None,
      skipped_updates=jnp.zeros((), jnp.int32),
      first_nonfinite_step=jnp.full((), -1, jnp.int32))


def weights_to_evaluate(state):
  """The weights a run evaluates: its EMA (in the params' dtypes, as `checkpoint.restore` gives
  it back) when it keeps one, else its params."""
  if state.ema_params is None:
    return state.params
  return jax.tree_util.tree_map(lambda ema, p: ema.astype(p.dtype), state.ema_params,
                                state.params)


def cross_entropy(logits, targets):
  """Mean softmax cross-entropy against soft `targets` (batch, classes), computed in float32."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(targets * log_probs, axis=-1))


def train_step(state, batch, teacher_params=None, *, model, tx, schedule, settings,
               teacher_model=None, param_labels=None):
  """One update on a global batch of uint8 images; returns `(new_state, metrics)`.

  The batch is resized and normalised on the device, mixed (mixup/cutmix, label smoothing),
  split into `accum_steps` micro-batches whose gradients are averaged, and the update applied
  unless the loss or a gradient is non-finite (then the state keeps its params, counts the skip
  and remembers the first such step for the loop to report). With a teacher (`teacher_model`
  and its `teacher_params`), the loss adds its predictions on the same images
  (`vit_jax.train.distill`). `param_labels`: `optim.trained_labels` of the params (None: all
  trained), the leaves `tx` updates; the others' gradients are never read.
  """
  step_key = jax.random.fold_in(jax.random.key(settings.seed, impl=settings.prng_impl),
                                state.step)
  mix_key, dropout_key = jax.random.split(step_key)
  images = device_data.model_inputs(batch, settings.image_size)  # or NaFlex patches
  images, targets = device_data.mix(
      mix_key, images, batch['labels'], settings.num_classes,
      settings.mixup_alpha, settings.cutmix_alpha, settings.label_smoothing)

  def loss_fn(params, micro_images, micro_targets, key):
    outputs = model.apply({'params': params}, micro_images, train=True, rngs={'dropout': key},
                          **_patch_size_kwargs(settings.patch_size))
    # A DeiT student (model.distilled) gives (class-token logits, distillation-token logits).
    is_pair = isinstance(outputs, tuple)
    logits, dist_logits = outputs if is_pair else (outputs, outputs)
    if settings.distill_kind is None:
      # No teacher: a distilled model's two heads learn the labels through their mean, the
      # logits it predicts with (timm's fine-tuning of DeiT checkpoints).
      return cross_entropy((logits + dist_logits) / 2 if is_pair else logits, micro_targets)
    teacher_logits = teacher_model.apply({'params': teacher_params}, micro_images, train=False)
    return ((1.0 - settings.distill_alpha) * cross_entropy(logits, micro_targets)
            + settings.distill_alpha * distill.teacher_term(
                dist_logits, teacher_logits, kind=settings.distill_kind,
                temperature=settings.distill_temperature))

  grad_fn = jax.value_and_grad(loss_fn)
  if settings.accum_steps == 1:
    loss, grads = grad_fn(state.params, images, targets, dropout_key)
  else:
    # Micro-batch j takes examples j, j+accum, ...: each device keeps its own slice of every
    # micro-batch, so accumulation needs no data movement between devices.
    def split(x):
      x = x.reshape((x.shape[0] // settings.accum_steps, settings.accum_steps) + x.shape[1:])
      return jnp.swapaxes(x, 0, 1)

    def accumulate(carry, micro):
      loss_sum, grad_sum = carry
      micro_images, micro_targets, index = micro
      loss, grads = grad_fn(state.params, micro_images, micro_targets,
                            jax.random.fold_in(dropout_key, index))
      return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    (loss_sum, grad_sum), _ = jax.lax.scan(
        accumulate, (jnp.zeros((), jnp.float32), zeros),
        (jax.tree_util.tree_map(split, images), split(targets),
         jnp.arange(settings.accum_steps)))
    loss = loss_sum / settings.accum_steps
    grads = jax.tree_util.tree_map(lambda g: g / settings.accum_steps, grad_sum)

  # The non-finite guard: one decision per step. The new state is kept only when the loss and
  # every gradient are finite; otherwise params, optimizer state and EMA pass through untouched.
  # (With an all-finite test per gradient, a select per leaf tripled the compiled program; the
  # select that `guard_for` picks off the CPU reads this one decision.)
  # The decision reads the gradients' global norm, which the grad_norm metric reports anyway:
  # NaN or Inf in any gradient makes it NaN or Inf (so does a norm above ~1.8e19, whose square
  # overflows float32: that update is skipped too). One reduction serves both, where a test per
  # leaf was a second pass over every gradient (2,500 more HLO lines for the quickstart).
  # The norm is over the trained leaves, the ones clipping sees: a frozen leaf's gradient is
  # then read by nothing, and XLA drops the backward pass that only it needed.
  grad_norm = optax.tree.norm(optim.only_trained(grads, param_labels))
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def apply_update(_):
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_ema = state.ema_params
    if settings.ema_decay:
      # Written as a step towards the params, so a param that does not move (a frozen one)
      # keeps an EMA bit-identical to it; in float32 (the EMA's dtype), as a bfloat16 EMA
      # would not move at all.
      new_ema = jax.tree_util.tree_map(
          lambda ema, p: ema + (1.0 - settings.ema_decay) * (p.astype(jnp.float32) - ema),
          state.ema_params, new_params)
    return new_params, new_opt_state, new_ema

  def skip_update(_):
    return state.params, state.opt_state, state.ema_params

  # The update is computed outside the cond, which only picks the new or the old state: inside,
  # it fused with nothing and its gradient clipping took its own pass over the gradients (the
  # quickstart step: 17,599 optimized HLO lines that way, 15,744 this way, the textbook 14,797).
  updated = apply_update(None)
  if settings.guard == 'cond':
    new_params, new_opt_state, new_ema = jax.lax.cond(finite, lambda _: updated, skip_update,
                                                      None)
  elif settings.guard == 'select':
    new_params, new_opt_state, new_ema = jax.tree_util.tree_map(
        lambda new, old: jnp.where(finite, new, old), updated, skip_update(None))
  else:
    raise ValueError(f"StepSettings.guard is 'cond' or 'select', not {settings.guard!r}")
  new_state = TrainState(
      step=state.step + 1,
      params=new_params,
      opt_state=new_opt_state,
      ema_params=new_ema,
      skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32),
      first_nonfinite_step=jnp.where(
          (state.first_nonfinite_step < 0) & ~finite, state.step, state.first_nonfinite_step))
  metrics = {
      'train_loss': loss,
      # The rate this step's update was scaled by: the optimizer reads its schedule at the
      # updates it has applied, which trail the steps by the skipped ones.
      'learning_rate': schedule(state.step - state.skipped_updates),
      'grad_norm': grad_norm,
      'skipped_updates': new_state.skipped_updates,
      'first_nonfinite_step': new_state.first_nonfinite_step,
  }
  return new_state, metrics


def eval_step(params, batch, *, model, image_size, patch_size=None):
  """Sums over one padded eval batch: loss, top-1 and top-5 hits, and the real-example count.

  `patch_size`: FlexiViT's patch side to evaluate at; None: the model's own.
  """
  images = device_data.model_inputs(batch, image_size)  # or NaFlex patches
  logits = model.apply({'params': params}, images, train=False,
                       **_patch_size_kwargs(patch_size)).astype(jnp.float32)
  labels, mask = batch['labels'], batch['mask']
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  top1 = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  k = min(5, logits.shape[-1])
  top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1).astype(jnp.float32)
  return {
      'loss_sum': jnp.sum(loss * mask),
      'top1_sum': jnp.sum(top1 * mask),
      'top5_sum': jnp.sum(top5 * mask),
      'count': jnp.sum(mask),
  }
