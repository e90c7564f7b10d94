"""FLOPs of a train or eval step and the peak FLOP/s of the device it runs on, for MFU.

MFU = (model FLOPs of the step) / (step time × devices × peak bf16 FLOP/s). The model FLOPs
come from XLA's cost analysis of the step lowered with the model's math spelt out
(`model_flops_per_step`): XLA counts a while loop's body once, so a scanned model (`scan=True`)
or gradient accumulation would be under-counted by the trip count, and it counts rematerialised
forward passes as work, which MFU by definition does not. The peaks are dense bf16
matrix-unit figures from the vendors' datasheets, per device (a TPU v4 chip, one GPU); a device
not in the table has no MFU (None), never a guess.
"""


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
  """(train, eval) model FLOPs of one global step of a resolved `config`, from XLA's cost
  analysis.

  The trainer's steps are lowered (not compiled: this takes seconds) on abstract arrays, for
  the model without scan or remat and without gradient accumulation, so every layer and
  micro-batch is counted once and no recomputation is counted. The figures are global (the
  whole batch); divide by the device count for one device's share. A distilling run's train
  step counts its `teacher`'s forward too (`vit_jax.train.distill.Teacher`, params abstract or
  not); without one, the student's work alone.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vit_jax.train import build  # pylint: disable=g-import-not-at-top
  from vit_jax.train import flexi  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())  # An unlocked copy to change.
  config.accum_steps = 1
  run_parts = build.parts(config, num_classes, teacher=teacher, **REFERENCE_MODEL_OVERRIDES)
  state = run_parts.abstract_state
  teacher_args = () if teacher is None else (jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), teacher.params),)
  eval_batch_size = eval_batch_size or config.eval_batch_size
  train_batch = build.abstract_batch(config, config.batch_size)
  # FlexiViT: the mean over the patch sizes a step draws (the eval: at the eval patch size).
  per_size = [(chance, compiled_flops(run_parts.train_fns[size].lower(state, train_batch,
                                                                      *teacher_args)))
              for size, chance in flexi.probabilities(config).items()]
  train = (None if any(flops is None for _, flops in per_size)
           else sum(chance * flops for chance, flops in per_size))
  evaluate = run_parts.eval_fn.lower(
      state.params, build.abstract_batch(config, eval_batch_size, with_mask=True))
  return train, compiled_flops(evaluate)
