"""MLP-Mixer (Tolstikhin et al. 2021): ViT's patches, with MLPs across tokens instead of attention.

Parameter names are those of the published vit_jax Mixer checkpoints (`stem`,
`MixerBlock_{i}/{LayerNorm_0, token_mixing, LayerNorm_1, channel_mixing}`,
`pre_head_layer_norm`, `head`).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vit_jax.errors import UserError

Dtype = Any


class MixerMlp(nn.Module):
  """Dense -> GELU -> Dense, back to the input width (published name: MlpBlock)."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda features, name: nn.Dense(features, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=name)
    y = nn.gelu(dense(self.mlp_dim, 'Dense_0')(x))
    return dense(x.shape[-1], 'Dense_1')(y)


class MixerBlock(nn.Module):
  """Token mixing (an MLP along the token axis), then channel mixing; both pre-LN residual."""
  tokens_mlp_dim: int
  channels_mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # (batch, tokens, width)
    norm = lambda name: nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    mlp = lambda dim, name: MixerMlp(dim, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    y = jnp.swapaxes(norm('LayerNorm_0')(x), 1, 2)  # (batch, width, tokens)
    x = x + jnp.swapaxes(mlp(self.tokens_mlp_dim, 'token_mixing')(y), 1, 2)
    return x + mlp(self.channels_mlp_dim, 'channel_mixing')(norm('LayerNorm_1')(x))


class MlpMixer(nn.Module):
  """An MLP-Mixer classifier; `vit_jax.models.create_model('Mixer-B/16', ...)` fills the fields."""
  num_classes: Optional[int]  # None or 0: return the pooled features.
  patch_size: Sequence[int] = (16, 16)
  hidden_size: int = 768
  num_layers: int = 12
  tokens_mlp_dim: int = 384
  channels_mlp_dim: int = 3072
  head_bias_init: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train=False):
    """images: float (batch, height, width, channels) in [-1, 1]. Mixer has no dropout."""
    del train
    patch_h, patch_w = self.patch_size
    if images.shape[1] % patch_h or images.shape[2] % patch_w:
      raise UserError(f'patch size {patch_h}x{patch_w} does not divide the image size '
                      f'{images.shape[1]}x{images.shape[2]}')
    x = nn.Conv(self.hidden_size, (patch_h, patch_w), strides=(patch_h, patch_w),
                dtype=self.dtype, param_dtype=self.param_dtype, name='stem')(
                    jnp.asarray(images, self.dtype))
    batch, grid_h, grid_w, width = x.shape
    x = jnp.reshape(x, (batch, grid_h * grid_w, width))
    for i in range(self.num_layers):
      x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim, dtype=self.dtype,
                     param_dtype=self.param_dtype, name=f'MixerBlock_{i}')(x)
    x = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                     name='pre_head_layer_norm')(x)
    x = jnp.mean(x, axis=1)
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.constant(self.head_bias_init), name='head')(x)
    return x.astype(jnp.float32)
