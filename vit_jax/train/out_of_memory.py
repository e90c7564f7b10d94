"""A step that does not fit the device's memory, said in one line with what to change.

XLA reports it as `RESOURCE_EXHAUSTED` (at compile, when its plan exceeds the device, or at run
time, when an allocation fails) followed by a dump of buffers; `explained` turns that into a
UserError naming the batch, the device and the remedies that apply to the config.
"""

import contextlib
import re

import jax

from vit_jax.errors import UserError

_ALLOCATION = re.compile(r'allocate\s+([\d.]+\s*[KMGT]?i?B|\d+\s*bytes)', re.IGNORECASE)


def is_out_of_memory(error):
  """Whether `error` is XLA's report of a step that does not fit the device's memory."""
  return 'RESOURCE_EXHAUSTED' in str(error) or 'Out of memory' in str(error)


def remedies(config):
  """What would make the step smaller, for this config."""
  model = config.model_fields
  options = [f'a smaller batch_size (now {config.batch_size})',
             f'accum_steps={config.accum_steps * 2} (the same batch in more, smaller '
             'micro-batches)']
  if getattr(model, 'remat_policy', 'none') == 'none':
    options.append('model.remat_policy=dots (recompute activations in the backward pass)')
  elif model.remat_policy != 'full':
    options.append('model.remat_policy=full')
  if not getattr(model, 'scan', True):
    # Scan alone keeps more, not less: every residual a layer's backward reads leaves the loop
    # as a stacked output, where the unrolled step's fusions recompute the cheap ones (ViT-S/16
    # bf16 at 224 px, batch 32, XLA's CPU plan: 5.4 GiB scanned, 4.0 unrolled, 2.1 scanned with
    # remat=dots; ViT-B/16 on an H200: 36.8 GiB scanned, 20.3 unrolled).
    with_remat = ('' if model.remat_policy != 'none'
                  else ' with model.remat_policy=dots (scan alone keeps more, not less)')
    options.append(f'model.scan=True{with_remat}')
  return options


def message(config, what, error):
  """The one line for `error`, an out-of-memory error of `what` (e.g. 'the train step')."""
  device = jax.devices()[0]
  per_device = config.batch_size // max(jax.device_count(), 1) // max(config.accum_steps, 1)
  limit = (device.memory_stats() or {}).get('bytes_limit') if hasattr(
      device, 'memory_stats') else None
  figures = [f'batch_size {config.batch_size}', f'{per_device} per device and micro-batch',
             f'{jax.device_count()} {device.device_kind}']
  if limit:
    figures.append(f'{limit / 2**30:.1f} GiB each')
  allocation = _ALLOCATION.search(str(error))
  if allocation:
    figures.append(f'XLA asked for {allocation.group(1)} more')
  return (f'{what} of {config.model_name} does not fit in device memory '
          f'({", ".join(figures)}; RESOURCE_EXHAUSTED); try {"; or ".join(remedies(config))}. '
          '`python -m vit_jax.tools.benchmark --max_batch` finds the largest batch that fits')


@contextlib.contextmanager
def explained(config, what):
  """Turns an out-of-memory error raised inside into a one-line UserError."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  # jax's runtime error has moved modules
    if not is_out_of_memory(e):
      raise
    raise UserError(message(config, what, e)) from None
