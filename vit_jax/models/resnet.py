"""The ResNet root of the hybrid R50+ViT (BiT style: weight-standardised convs, GroupNorm).

The stem downsamples 4x (a 7x7 stride-2 conv and a 3x3 stride-2 max pool), then each stage after
the first halves the map again: R50+ViT-B/16 has stages (3, 4, 9), 16x in all, and its ViT takes
1x1 patches of that map.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


def weight_standardize(kernel, axis, eps):
  """Zero mean, unit variance per output filter (Qiao et al. 2019)."""
  kernel = kernel - jnp.mean(kernel, axis=axis)
  return kernel / (jnp.std(kernel, axis=axis) + eps)


class StdConv(nn.Conv):
  """A conv whose kernel is standardised before use; the stored kernel stays raw."""

  def param(self, name, *args, **kwargs):
    """nn.Conv's `param`, the kernel returned standardised (in float32); others as stored."""
    param = super().param(name, *args, **kwargs)
    if name == 'kernel':
      # In float32 even when the conv runs in bfloat16: the statistics need the precision.
      param = weight_standardize(param.astype(jnp.float32), axis=[0, 1, 2], eps=1e-5)
    return param


class ResidualUnit(nn.Module):
  """Bottleneck unit: 1x1 (features) -> 3x3 (features, strided) -> 1x1 (4 * features)."""
  features: int
  strides: Sequence[int] = (1, 1)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda features, kernel, name, strides=(1, 1): StdConv(
        features, kernel, strides=strides, use_bias=False, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    norm = lambda name, **kw: nn.GroupNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                                           name=name, **kw)
    residual = x
    if x.shape[-1] != self.features * 4 or tuple(self.strides) != (1, 1):
      residual = conv(self.features * 4, (1, 1), 'conv_proj', self.strides)(residual)
      residual = norm('gn_proj')(residual)

    y = nn.relu(norm('gn1')(conv(self.features, (1, 1), 'conv1')(x)))
    y = nn.relu(norm('gn2')(conv(self.features, (3, 3), 'conv2', self.strides)(y)))
    y = conv(self.features * 4, (1, 1), 'conv3')(y)
    # Zero-initialised scale: each unit starts as the identity on its residual path.
    y = norm('gn3', scale_init=nn.initializers.zeros)(y)
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`block_size` units; the first one may stride."""
  block_size: int
  features: int
  first_stride: Sequence[int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.block_size):
      x = ResidualUnit(self.features, strides=self.first_stride if i == 0 else (1, 1),
                       dtype=self.dtype, param_dtype=self.param_dtype, name=f'unit{i + 1}')(x)
    return x


def resnet_stem(x, stage_sizes, width=64, dtype=jnp.float32, param_dtype=jnp.float32):
  """Runs the ResNet root and stages inside the calling module.

  A function rather than a Module so that its parameters (`conv_root`, `gn_root`,
  `block1/unit1/...`) sit at the top of the model's tree, where the published R50+ViT
  checkpoints have them. Call it from a compact method.

  Args:
    x: (batch, H, W, C) images.
    stage_sizes: units per stage, e.g. (3, 4, 9).
    width: channels of the root conv; stage i has bottleneck width `width * 2**i`.
    dtype: compute dtype.
    param_dtype: parameter dtype.

  Returns:
    (batch, H / 2**(1 + len(stage_sizes)), ..., 4 * width * 2**(len - 1)) features.
  """
  x = StdConv(width, (7, 7), strides=(2, 2), use_bias=False, dtype=dtype,
              param_dtype=param_dtype, name='conv_root')(x)
  x = nn.relu(nn.GroupNorm(dtype=dtype, param_dtype=param_dtype, name='gn_root')(x))
  x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='SAME')
  for i, block_size in enumerate(stage_sizes):
    x = ResNetStage(block_size, width * 2**i, first_stride=(1, 1) if i == 0 else (2, 2),
                    dtype=dtype, param_dtype=param_dtype, name=f'block{i + 1}')(x)
  return x
