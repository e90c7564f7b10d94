"""FLOPs of a compiled step and the peak FLOP/s of the device it runs on, for MFU.

MFU = (FLOPs of the step, from XLA's cost analysis) / (step time × devices × peak bf16 FLOP/s).
The peaks are dense bf16 matrix-unit figures from the vendors' datasheets, per device (a TPU
v4 chip, one GPU); a device not in the table has no MFU (None), never a guess.
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
  """Total FLOPs of one call of a `jax.jit(...).lower(...).compile()` result, or None.

  XLA reports the FLOPs of the whole (global) computation for a single-device program and of
  one device's share for an SPMD-partitioned one; callers multiply by the device count in the
  latter case (see `mfu`).
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
