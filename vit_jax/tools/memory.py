"""Device memory of a train step: XLA's plan for it, and the largest batch whose plan fits.

XLA plans every buffer of a compiled program ahead of running it: arguments, outputs, and the
temporaries (activations kept for the backward pass, gradients, workspace). For the train step
that plan, per device, is what decides whether a batch fits: parameters and optimizer state
(donated, so their outputs reuse the arguments' memory) plus the activations, which grow with
the batch. Compiling against abstract shapes allocates nothing, so the search below asks XLA
about batch after batch without touching the device's memory.
"""

import jax

from vit_jax.errors import UserError


def plan_bytes(compiled):
  """Bytes per device XLA plans for a compiled program, or None where the backend has no plan.

  Arguments + outputs − the outputs that reuse donated arguments + temporaries.
  """
  try:
    plan = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # Not every backend implements it.
    return None
  if plan is None:
    return None
  return int(plan.argument_size_in_bytes + plan.output_size_in_bytes
             - plan.alias_size_in_bytes + plan.temp_size_in_bytes)


def device_memory_limit(device=None):
  """Bytes the device's allocator may use (GPU, TPU), or None where it reports none (CPU)."""
  device = device or jax.devices()[0]
  stats = device.memory_stats() or {}
  return stats.get('bytes_limit')


def train_step_planner(config, num_classes):
  """`plan_for(batch_size)`: XLA's memory plan per device of the config's train step.

  The step is the trainer's own (`vit_jax.train.build`), built once and compiled for abstract inputs
  at each batch size asked: no state or batch is allocated.
  """
  from vit_jax.train import build  # pylint: disable=g-import-not-at-top
  run_parts = build.parts(config, num_classes)

  def plan_for(batch_size):
    lowered = run_parts.train_fn.lower(run_parts.abstract_state,
                                       build.abstract_batch(config, batch_size))
    return plan_bytes(lowered.compile())
  return plan_for


def largest_fitting_batch(plan_for, limit_bytes, start, multiple, ceiling):
  """The largest batch `start`·2^k (k may be negative) whose plan fits in `limit_bytes`.

  `plan_for(batch)` gives the planned bytes of a batch. From `start`, the batch doubles while
  the next one fits (up to `ceiling`), or halves until one fits (down to `multiple`, the
  smallest batch the devices and accumulation steps can split). Returns `(batch or None, tried)`
  where `tried` lists `(batch, planned bytes, fits)` in the order asked; None when not even
  `multiple` fits.
  """
  if start % multiple or start < multiple:
    raise UserError(f'the search starts at batch_size={start}, which must be a positive '
                    f'multiple of {multiple} (devices x accum_steps)')
  tried = []

  def fits(batch):
    planned = plan_for(batch)
    if planned is None:
      raise UserError('this backend gives no memory plan for the train step; '
                      '--max_batch cannot search on it')
    tried.append((batch, planned, planned <= limit_bytes))
    return planned <= limit_bytes

  batch = start
  if fits(batch):
    while batch * 2 <= ceiling and fits(batch * 2):
      batch *= 2
    return batch, tried
  while batch // 2 >= multiple and (batch // 2) % multiple == 0:
    batch //= 2
    if fits(batch):
      return batch, tried
  return None, tried
