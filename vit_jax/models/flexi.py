"""FlexiViT (Beyer et al. 2023): one set of ViT weights for many patch sizes.

What is stored (as in big_vision's `proj/flexi/vit.py`): the patch-embedding kernel at the
model's `patch_size`, the base patch (`embedding/kernel`, (ph, pw, channels, width)), and the
learned position-embedding table for the grid that base patch gives on the training images
(H // ph x W // pw). Calling `VisionTransformer` with `patch_size=(p, q)` turns the base kernel
into a p x q kernel with `resize_patch_embedding` (the pseudo-inverse resize, "PI-resize") and the
table bilinearly into the H // p x W // q grid, on the fly and differentiably, so gradients reach
the stored base weights whatever patch size a step uses.

PI-resize. Let B be the linear map that resizes a patch bilinearly from the base size to the new
one (the resize the input pipeline uses: `jax.image.resize`, bilinear, antialiased when
shrinking). For a kernel w the new kernel w' should give the same token on the resized patch:
<B x, w'> = <x, w> for every patch x, that is B^T w' = w. PI-resize takes w' = pinv(B^T) w.
- Upsampling (new patch at least as large on both axes): B^T has full row rank, the equation has
  solutions and w' is the smallest; tokens are preserved exactly (up to float rounding).
- Downsampling: B^T w' = w has no solution in general; w' is the least-squares fit, minimising
  ||w - B^T w'|| (per input channel and output feature). With the residual r = w - B^T w', the
  token error on a patch x is <x, r>: at most ||x|| ||r|| for any x, and of mean square ||r||^2
  for patches with independent unit-variance pixels (the paper's criterion).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes


def as_hw(patch_hw):
  """(h, w) ints from an int or a pair."""
  if isinstance(patch_hw, int):
    return (patch_hw, patch_hw)
  return tuple(int(side) for side in patch_hw)


@functools.lru_cache(maxsize=64)
def bilinear_resize_matrix(old_hw, new_hw):
  """B, (new_h * new_w, old_h * old_w) float64: B @ x.ravel() is `x` resized to `new_hw`.

  The resize is `jax.image.resize(..., 'bilinear', antialias=True)` on a (old_h, old_w) patch,
  as `vit_jax.data.device.preprocess` resizes images. Read-only (it is cached).
  """
  old_hw, new_hw = as_hw(old_hw), as_hw(new_hw)
  num_old = old_hw[0] * old_hw[1]
  # The matrix depends on shapes only: build it now even when called inside a jit trace.
  with jax.ensure_compile_time_eval():
    basis = jnp.eye(num_old, dtype=jnp.float32).reshape((num_old,) + old_hw)
    resized = jax.image.resize(basis, (num_old,) + new_hw, method='bilinear', antialias=True)
    columns = np.asarray(resized, np.float64).reshape(num_old, -1)
  matrix = columns.T  # Column i: basis patch i resized.
  matrix.flags.writeable = False
  return matrix


@functools.lru_cache(maxsize=64)
def pi_resize_matrix(old_hw, new_hw):
  """pinv(B^T), (new_h * new_w, old_h * old_w) float64: maps a flattened kernel to its PI-resize."""
  matrix = np.linalg.pinv(bilinear_resize_matrix(old_hw, new_hw).T)
  matrix.flags.writeable = False
  return matrix


def resize_patch_embedding(kernel, new_patch_hw):
  """PI-resizes a patch-embedding kernel (FlexiViT) to a new patch size.

  Use it on its own when loading weights into a model of another patch size (e.g. a /16 kernel
  into a /8 model); `VisionTransformer(...).apply(..., patch_size=...)` calls it on the fly.

  Args:
    kernel: (ph, pw, channels, width), as stored under `embedding/kernel`; numpy or jax.
    new_patch_hw: (ph', pw') or an int for a square patch.

  Returns:
    (ph', pw', channels, width) in the kernel's dtype (numpy in, numpy out); the kernel itself
    when the size does not change. Upsampling preserves every token exactly; downsampling is the
    least-squares fit (see the module docstring for its error).
  """
  old_hw, new_hw = tuple(kernel.shape[:2]), as_hw(new_patch_hw)
  if len(kernel.shape) != 4 or len(new_hw) != 2 or min(new_hw) < 1:
    raise ValueError(f'need a (h, w, channels, width) kernel and a positive (h, w) patch, got '
                     f'{tuple(kernel.shape)} and {new_patch_hw!r}')
  if old_hw == new_hw:
    return kernel
  matrix = pi_resize_matrix(old_hw, new_hw)
  flat_shape = (old_hw[0] * old_hw[1],) + tuple(kernel.shape[2:])
  new_shape = new_hw + tuple(kernel.shape[2:])
  if isinstance(kernel, np.ndarray):
    resized = np.tensordot(matrix, kernel.reshape(flat_shape).astype(np.float64), axes=1)
    return resized.reshape(new_shape).astype(kernel.dtype)
  resized = jnp.tensordot(jnp.asarray(matrix, jnp.float32),
                          jnp.reshape(kernel, flat_shape).astype(jnp.float32), axes=1,
                          precision=jax.lax.Precision.HIGHEST)
  return jnp.reshape(resized, new_shape).astype(kernel.dtype)


class PatchEmbedding(nn.Module):
  """The P x P, stride-P patch embedding, with FlexiViT's patch-size hook.

  Its parameters are those of `nn.Conv` (`kernel` (ph, pw, channels, width) at the base
  `patch_size`, `bias` (width,) unless `use_bias=False`), initialised alike, so published
  checkpoints load as they are; at the base patch it computes exactly what `nn.Conv` does.
  """
  features: int
  patch_size: tuple  # The base patch (ph, pw): the stored kernel's size.
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, patch_size=None):
    """images (batch, H, W, C) -> (batch, H / p, W / q, width); patch_size (p, q), None: base.

    Flattened patches (batch, tokens, p * q * C) (NaFlex, `vit_jax.models.naflex`) ->
    (batch, tokens, width): the same kernel as a matmul, the same token as the conv's.
    """
    base = as_hw(self.patch_size)
    patch = base if patch_size is None else as_hw(patch_size)
    flattened = images.ndim == 3
    channels = images.shape[-1] // (patch[0] * patch[1]) if flattened else images.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        base + (channels, self.features), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros_init(), (self.features,),
                        self.param_dtype)
    if patch != base:
      kernel = resize_patch_embedding(kernel, patch)
    images, kernel, bias = dtypes.promote_dtype(images, kernel, bias, dtype=self.dtype)
    if flattened:  # (row, column, channel) order, as the kernel's leading axes.
      tokens = jnp.dot(images, jnp.reshape(kernel, (-1, self.features)))
      return tokens if bias is None else tokens + bias
    tokens = jax.lax.conv_general_dilated(
        images, kernel, window_strides=patch, padding='VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return tokens if bias is None else tokens + bias.reshape((1, 1, 1, -1))
