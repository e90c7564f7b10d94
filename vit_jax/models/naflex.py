"""NaFlex: the ViT on a padded sequence of patches, each image at its own grid and aspect ratio.

As SigLIP 2's NaFlex (big_vision) and timm's NaFlexViT: instead of square images, the model takes
every image cut into patches at its own grid (gh, gw), padded to a fixed number of tokens, so one
compiled step serves images of every shape. The input is a dict (`KEYS`):

  patches     float (batch, tokens, ph * pw * channels): each patch flattened in (row, column,
              channel) order, normalised as images are ([-1, 1]); padding is anything (zeros)
  positions   int32 (batch, tokens, 2): the (row, column) of each patch in its image's grid
  patch_mask  bool (batch, tokens): True on real patches. Real patches come first and padding
              after (cuDNN's attention reads the mask as a length per example)
  grid_hw     int32 (batch, 2): each image's grid (gh, gw); gh * gw <= tokens

`patchify` makes it from square images. The parameters are the square model's, used the same way:
- the patch embedding is the same kernel applied as a matmul on the flattened patches
  (`vit_jax.models.flexi.PatchEmbedding`), so a model trained on squares runs on patches and
  the other way round, and a square image patchified gives the same logits;
- the learned position table, stored for a square grid, is resized to each image's grid
  (bilinear, antialiased when shrinking: exactly `resize_posemb`'s resize) and read at the
  patches' positions (`gather_posemb`); sincos2d is computed from the positions, RoPE turns by
  them;
- attention never reads a padding key (the class, distillation and register tokens are always
  valid), and 'gap' and 'map' pooling read the real patches only.
"""

import math
from typing import Mapping

import jax
import jax.numpy as jnp

from vit_jax.errors import UserError

KEYS = ('patches', 'positions', 'patch_mask', 'grid_hw')


def is_patch_input(inputs):
  """Whether a model input is a NaFlex patch sequence (a mapping with 'patches')."""
  return isinstance(inputs, Mapping) and 'patches' in inputs


def check_patch_input(inputs, patch_hw):
  """Raises UserError for a patch input whose keys or shapes do not fit each other."""
  missing = [key for key in KEYS if key not in inputs]
  if missing:
    raise UserError(f'a NaFlex input needs the keys {", ".join(KEYS)}; missing '
                    f'{", ".join(missing)}')
  patches = inputs['patches']
  if len(patches.shape) != 3:
    raise UserError(f"NaFlex 'patches' must be (batch, tokens, ph * pw * channels), got "
                    f'{tuple(patches.shape)}')
  batch, tokens, flat = patches.shape
  expected = {'positions': (batch, tokens, 2), 'patch_mask': (batch, tokens),
              'grid_hw': (batch, 2)}
  for key, shape in expected.items():
    if tuple(inputs[key].shape) != shape:
      raise UserError(f'NaFlex {key!r} must be {shape} for patches {tuple(patches.shape)}, '
                      f'got {tuple(inputs[key].shape)}')
  if flat % (patch_hw[0] * patch_hw[1]):
    raise UserError(f'NaFlex patches of {flat} values are not {patch_hw[0]}x{patch_hw[1]} '
                    'patches of whole channels; patchify at the model\'s patch size')


def patchify(images, patch_hw):
  """Square (or any same-shape) images -> a NaFlex input with every patch real.

  images (batch, H, W, C), H and W multiples of the patch; the tokens are in row-major order,
  the order the image path of the model lays them out.
  """
  batch, height, width, channels = images.shape
  patch_h, patch_w = patch_hw
  if height % patch_h or width % patch_w:
    raise UserError(f'patch size {patch_h}x{patch_w} does not divide the image size '
                    f'{height}x{width}')
  grid_h, grid_w = height // patch_h, width // patch_w
  patches = jnp.reshape(images, (batch, grid_h, patch_h, grid_w, patch_w, channels))
  patches = jnp.transpose(patches, (0, 1, 3, 2, 4, 5))
  patches = jnp.reshape(patches, (batch, grid_h * grid_w, patch_h * patch_w * channels))
  rows, cols = jnp.meshgrid(jnp.arange(grid_h), jnp.arange(grid_w), indexing='ij')
  positions = jnp.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1).astype(jnp.int32)
  return {
      'patches': patches,
      'positions': jnp.broadcast_to(positions, (batch, grid_h * grid_w, 2)),
      'patch_mask': jnp.ones((batch, grid_h * grid_w), bool),
      'grid_hw': jnp.broadcast_to(jnp.asarray([grid_h, grid_w], jnp.int32), (batch, 2)),
  }


def table_grid(num_grid_tokens):
  """The square (side, side) grid a learned table of `num_grid_tokens` entries is stored for."""
  side = math.isqrt(num_grid_tokens)
  if side * side != num_grid_tokens:
    raise UserError(f'a NaFlex model needs a learned position table for a square grid; this '
                    f'one has {num_grid_tokens} grid entries')
  return side, side


def resize_weights(old_size, new_sizes, indices):
  """Weights over the `old_size` input cells of output cell `indices` of a resize to `new_sizes`.

  The 1-D weights of `jax.image.resize(..., 'bilinear', antialias=True)` (a triangle kernel,
  widened by old/new when shrinking, normalised to sum 1), for a size that differs per example.

  Args:
    old_size: int, the stored table's side.
    new_sizes: int (batch,), each image's side (values below 1 are read as 1).
    indices: int (batch, tokens), the output cells.

  Returns:
    float32 (batch, tokens, old_size).
  """
  new_sizes = jnp.maximum(new_sizes, 1).astype(jnp.float32)[:, None, None]
  inv_scale = old_size / new_sizes
  kernel_scale = jnp.maximum(inv_scale, 1.0)
  # The input coordinate of the centre of each output cell.
  sample = (indices.astype(jnp.float32)[..., None] + 0.5) * inv_scale - 0.5
  distance = jnp.abs(sample - jnp.arange(old_size, dtype=jnp.float32)) / kernel_scale
  weights = jnp.maximum(0.0, 1.0 - distance)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  return weights / jnp.where(total > 0, total, 1.0)


def gather_posemb(table, grid_hw, positions):
  """A learned grid table resized to each image's grid, read at the patches' positions.

  Args:
    table: (gh0, gw0, width), the stored table's grid part.
    grid_hw: int (batch, 2), each image's grid.
    positions: int (batch, tokens, 2), (row, column) of each patch.

  Returns:
    float32 (batch, tokens, width): for every patch, the entry at its position of
    `resize_posemb(table, its image's grid)`. The resize is separable, so each patch reads a
    (gh0 x gw0) outer product of two 1-D weight vectors: batch * tokens * gh0 * gw0 weights,
    less memory than resizing the table for every image.
  """
  old_h, old_w, width = table.shape
  row_weights = resize_weights(old_h, grid_hw[:, 0], positions[..., 0])  # (batch, tokens, gh0)
  col_weights = resize_weights(old_w, grid_hw[:, 1], positions[..., 1])  # (batch, tokens, gw0)
  weights = row_weights[..., :, None] * col_weights[..., None, :]
  weights = jnp.reshape(weights, weights.shape[:2] + (old_h * old_w,))
  # HIGHEST: at the stored grid the weights are one-hot and the table comes out exactly.
  return jnp.einsum('bnk,kd->bnd', weights,
                    jnp.reshape(table, (old_h * old_w, width)).astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def sincos_posemb(positions, width, temperature=10_000.):
  """float32 (batch, tokens, width): `vit.posemb_sincos_2d` at the patches' (row, col)."""
  if width % 4:
    raise UserError(f'posemb=sincos2d needs a width divisible by 4, got {width}')
  omega = jnp.arange(width // 4) / (width // 4 - 1)
  omega = 1. / (temperature**omega)
  y = positions[..., 0].astype(jnp.float32)[..., None] * omega
  x = positions[..., 1].astype(jnp.float32)[..., None] * omega
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=-1)


def masked_mean(tokens, mask):
  """(batch, tokens, width), bool (batch, tokens) -> (batch, width): the mean of the real tokens
  (0 for an example with none, such as a padding example of an eval batch)."""
  weights = mask.astype(tokens.dtype)[..., None]
  count = jnp.maximum(jnp.sum(weights, axis=1), 1)
  return jnp.sum(tokens * weights, axis=1) / count
