"""FLOPs of a train or eval step and the peak FLOP/s of the device it runs on, for MFU.

MFU = (model FLOPs of the step) / (step time × devices × peak bf16 FLOP/s). The model FLOPs are
the step's matrix products and convolutions, counted from its jaxpr (`model_flops_per_step`,
`matmul_flops`), as MFU conventionally counts them: the same figure on every backend, with a
scan's body counted once per iteration, for the model with remat off (a rematerialised forward
is recomputation, not model work) and with XLA's attention (cuDNN's kernel is one opaque call).
XLA's own cost analysis (`compiled_flops`, the benchmark's "compiled FLOPs") is not used for MFU:
it counts a while loop's body once, and on a GPU it leaves out the products XLA hands to cuBLAS
and cuDNN (an H200's ViT-B/16 train step: 0.09 of 27 TFLOPs). The peaks are dense bf16
matrix-unit figures from the vendors' datasheets, per device (a TPU v4 chip, one GPU); a device
not in the table has no MFU (None), never a guess.
"""


import math

import jax

# Dense bf16 peak FLOP/s per device, matched against `device.device_kind` (lower case).
PEAK_BF16_FLOPS = (
    ('h200', 989e12),
    ('h100', 989e12),   # SXM; the PCIe part is lower (756e12) and reports 'h100 pcie'.
    ('a100', 312e12),
    ('tpu v6', 918e12),  # v6e (Trillium)
    ('tpu v5p', 459e12),
    ('tpu v5 lite', 197e12),  # v5e reports 'TPU v5 lite'
    ('tpu v5e', 197e12),
    ('tpu v4', 275e12),
)


def peak_flops_per_device(device=None):
  """Peak dense bf16 FLOP/s of `device` (default: the first device), or None if unknown."""
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  if 'h100' in kind and 'pcie' in kind:
    return 756e12
  for name, peak in PEAK_BF16_FLOPS:
    if name in kind:
      return peak
  return None


def compiled_flops(compiled):
  """Total FLOPs of one call of a `jax.jit(...).lower(...)` result, compiled or not, or None.

  A lowered step is counted over its whole (global) batch; a compiled SPMD program, for the
  share one device runs (the benchmark reports it per device). XLA counts a loop body (scan,
  gradient accumulation) once and a remat recomputation as work, so MFU uses
  `model_flops_per_step` instead.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax returns one dict per program.
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops'])


def mfu(flops_per_step_per_device, seconds_per_step, device=None):
  """Model FLOPs utilisation in [0, 1] of one device, or None where the peak is unknown."""
  peak = peak_flops_per_device(device)
  if peak is None or flops_per_step_per_device is None or seconds_per_step <= 0:
    return None
  return flops_per_step_per_device / seconds_per_step / peak


def analytic_vit_flops(model_kwargs, image_size):
  """Forward FLOPs of one image through a plain ViT, counted by hand (2 FLOPs per MAC).

  Counts the matrix products only, as MFU conventionally does: the patch embedding, per layer
  the QKV and output projections, the attention scores (QKᵀ) and weighted sum (AV), the MLP,
  then the pooling head (for `map`), pre-logits and classifier. Norms, softmax, GELU and adds
  are left out (under 1% for ViT-B/16). ViT-B/16 at 224 px: ≈ 35.1 GFLOPs. A training step
  costs about 3× the forward (the backward computes two products per forward product).

  Args:
    model_kwargs: `vit_jax.models.model_kwargs(...)` of a ViT (hybrids and Mixers: None).
    image_size: the square input resolution in pixels.

  Returns:
    float FLOPs per image, or None for a model this count does not cover.
  """
  if 'num_heads' not in model_kwargs or model_kwargs.get('resnet_layers') is not None:
    return None
  patch_h, patch_w = model_kwargs['patch_size']
  width, mlp_dim = model_kwargs['hidden_size'], model_kwargs['mlp_dim']
  patches = (image_size // patch_h) * (image_size // patch_w)
  classifier = model_kwargs.get('classifier', 'token')
  tokens = patches + (classifier == 'token') + model_kwargs.get('num_registers', 0)

  macs = patches * (patch_h * patch_w * 3) * width  # Patch embedding (a strided conv).
  per_layer = (4 * tokens * width * width           # Q, K, V and output projections
               + 2 * tokens * tokens * width        # QKᵀ scores and the weighted sum of V
               + 2 * tokens * width * mlp_dim)      # MLP in and out
  macs += model_kwargs['num_layers'] * per_layer
  if classifier == 'map':  # One probe query attending over the patch tokens, then an MLP.
    macs += (2 * patches * width * width + 2 * width * width + 2 * patches * width
             + 2 * width * mlp_dim)
  features = width
  outputs = patches if classifier == 'unpooled' else 1
  if model_kwargs.get('representation_size'):
    macs += outputs * features * model_kwargs['representation_size']
    features = model_kwargs['representation_size']
  if model_kwargs.get('num_classes'):
    macs += outputs * features * model_kwargs['num_classes']
  return 2.0 * macs


# Model overrides that change how a step computes, never what: the reference for counting.
REFERENCE_MODEL_OVERRIDES = dict(scan=False, remat_policy='none')


def model_flops_per_step(config, num_classes, eval_batch_size=None, teacher=None):
  """(train, eval) model FLOPs of one global step of a resolved `config`: the matrix products
  and convolutions of the trainer's own steps (`matmul_flops`).

  The steps are traced on abstract arrays (nothing compiled: this takes seconds) for the model
  without scan or remat, with XLA's attention, and without gradient accumulation, so every layer
  and micro-batch is counted once and no recomputation is counted. The figures are global (the
  whole batch); divide by the device count for one device's share. A distilling run's train
  step counts its `teacher`'s forward too (`vit_jax.train.distill.Teacher`, params abstract or
  not); without one, the student's work alone.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vit_jax.train import build  # pylint: disable=g-import-not-at-top
  from vit_jax.train import flexi  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())  # An unlocked copy to change.
  config.accum_steps = 1
  overrides = dict(REFERENCE_MODEL_OVERRIDES)
  if 'attention_impl' in config.model_fields:
    overrides['attention_impl'] = 'xla'
  run_parts = build.parts(config, num_classes, teacher=teacher, **overrides)
  state = run_parts.abstract_state
  teacher_args = () if teacher is None else (jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), teacher.params),)
  eval_batch_size = eval_batch_size or config.eval_batch_size
  train_batch = build.abstract_batch(config, config.batch_size)
  # FlexiViT: the mean over the patch sizes a step draws (the eval: at the eval patch size).
  train = sum(chance * matmul_flops(run_parts.train_fns[size].trace(
                  state, train_batch, *teacher_args).jaxpr)
              for size, chance in flexi.probabilities(config).items())
  evaluate = run_parts.eval_fn.trace(
      state.params, build.abstract_batch(config, eval_batch_size, with_mask=True))
  return train, matmul_flops(evaluate.jaxpr)


def matmul_flops(jaxpr):
  """FLOPs (2 per multiply-add) of the matrix products (`dot_general`) and convolutions in a
  jaxpr (closed or not), its inner jaxprs included: a scan's body times its length, the
  costliest branch of a `cond`, a while loop's body once (its trip count is not known here).
  Elementwise work (norms, softmax, GELU) is left out, as MFU conventionally does.
  """
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)  # A ClosedJaxpr holds its Jaxpr.
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (lhs_contracting, _), _ = eqn.params['dimension_numbers']
      lhs_shape = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs_shape[d] for d in lhs_contracting)
    elif name == 'conv_general_dilated':
      # Each output element sums over the kernel's input features (per group) and window.
      rhs_spec = eqn.params['dimension_numbers'].rhs_spec  # (out feature, in feature, *window)
      rhs_shape = eqn.invars[1].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          rhs_shape[d] for d in rhs_spec[1:])
    else:
      inner = [matmul_flops(sub) for sub in _inner_jaxprs(eqn.params)]
      if name == 'cond':
        total += max(inner, default=0.0)
      elif name == 'scan':
        total += eqn.params['length'] * sum(inner)
      else:
        total += sum(inner)
  return total


def _inner_jaxprs(params):
  """The jaxprs among an equation's parameters (a `pjit`'s body, a `cond`'s branches, ...)."""
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(item, 'eqns') or hasattr(getattr(item, 'jaxpr', None), 'eqns'):
        yield item
