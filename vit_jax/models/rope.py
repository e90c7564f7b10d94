"""2-D rotary position embeddings (RoPE) for the ViT's attention.

RoPE (Su et al. 2021) rotates every query and key by angles proportional to its position, so
that a query-key product depends on the two positions only through their difference. RoPE-ViT
(Heo et al. 2024, github.com/naver-ai/rope-vit; timm's `rope_type='mixed'`) carries it to the
patch grid in two ways, both here:

- axial, `posemb='rope'`: half of each head's width rotates with the patch's row and half with
  its column, at D/4 fixed frequencies each, theta^(-4i/D) for i < D/4 (D the head width,
  theta = `AXIAL_THETA`).
- mixed, `posemb='rope_mixed'`: every head of every layer learns its own frequencies, one 2-D
  vector (f_x, f_y) per rotated pair, and a pair at column c and row r turns by f_x c + f_y r, so
  a head can prefer diagonal offsets. The parameter is `rope/freqs` inside each attention layer,
  shape (2, heads, D/2): [0] multiplies the column (x), [1] the row (y), as in RoPE-ViT's and
  timm's `freqs[:, layer]`. Initialised as RoPE-ViT does: magnitudes theta^(-4i/D) with
  theta = `MIXED_THETA`, turned to a random direction per head.

`posemb='learn+rope'` and `'learn+rope_mixed'` add the learned absolute table as well (resized
with `resize_posemb` as ever). Only the patch tokens turn: the class and register tokens in front
of them keep their queries and keys. A RoPE-only model has no parameter tied to the grid, so it
runs at any resolution as it is.

Layout: rotate-half (as GPT-NeoX and timm's `half=True`): dimension j of a head pairs with
j + D/2. For axial RoPE the first D/4 pairs turn with the row and the last D/4 with the column.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

AXIAL_THETA = 100.0  # RoPE-ViT's base for RoPE-Axial.
MIXED_THETA = 10.0  # RoPE-ViT's base for RoPE-Mixed (the initial frequencies).

# posemb value -> (absolute table or None, RoPE mode).
ROPE_POSEMBS = {
    'rope': (None, 'axial'),
    'rope_mixed': (None, 'mixed'),
    'learn+rope': ('learn', 'axial'),
    'learn+rope_mixed': ('learn', 'mixed'),
}


def rope_mode(posemb):
  """'axial', 'mixed', or None (no RoPE) for a `posemb` value."""
  return ROPE_POSEMBS.get(posemb, (posemb, None))[1]


def absolute_posemb(posemb):
  """The absolute embedding a `posemb` value adds to the tokens: 'learn', 'sincos2d' or None."""
  return ROPE_POSEMBS.get(posemb, (posemb, None))[0]


def grid_positions(grid_hw, base_grid_hw=None):
  """(1, gh * gw, 2) float32 (row, column) of each patch, in the patches' row-major order.

  With `base_grid_hw` (a FlexiViT call at another patch size) the positions are measured in
  cells of the base grid, so the same pixel offset turns by the same angle at every patch size.
  """
  rows, cols = jnp.meshgrid(jnp.arange(grid_hw[0], dtype=jnp.float32),
                            jnp.arange(grid_hw[1], dtype=jnp.float32), indexing='ij')
  if base_grid_hw is not None:
    rows = rows * (base_grid_hw[0] / grid_hw[0])
    cols = cols * (base_grid_hw[1] / grid_hw[1])
  return jnp.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1)[None]


def axial_frequencies(head_dim, theta=AXIAL_THETA):
  """(head_dim // 4,) float32: theta^(-4i/D), the frequencies of each axis."""
  return 1.0 / theta**(jnp.arange(0, head_dim, 4, dtype=jnp.float32)[:head_dim // 4] / head_dim)


def axial_angles(positions, head_dim, theta=AXIAL_THETA):
  """(batch, tokens, 1, D/2) angles: the first D/4 pairs by row, the last D/4 by column.

  positions: (batch or 1, tokens, 2) as from `grid_positions`.
  """
  freqs = axial_frequencies(head_dim, theta)
  rows = positions[..., 0:1] * freqs
  cols = positions[..., 1:2] * freqs
  return jnp.concatenate([rows, cols], axis=-1)[:, :, None, :]


def mixed_angles(positions, freqs):
  """(batch, tokens, heads, D/2) angles f_x * column + f_y * row.

  positions: (batch or 1, tokens, 2) (row, column); freqs: (2, heads, D/2), [0] x, [1] y.
  """
  freqs = freqs.astype(jnp.float32)
  cols = positions[..., 1][:, :, None, None]
  rows = positions[..., 0][:, :, None, None]
  return cols * freqs[0] + rows * freqs[1]


def init_mixed_freqs(key, shape, dtype=jnp.float32, theta=MIXED_THETA):
  """RoPE-ViT's initial mixed frequencies, `shape` = (2, heads, D/2).

  Each head gets magnitudes theta^(-4i/D) for i < D/4 in a random direction a, and the same
  magnitudes at a + 90 degrees for its other D/4 pairs, so every head starts able to see both axes.
  """
  _, num_heads, half = shape
  magnitudes = axial_frequencies(2 * half, theta)  # (D/4,)
  angles = jax.random.uniform(key, (num_heads, 1), jnp.float32, 0.0, 2 * math.pi)
  freqs_x = jnp.concatenate([magnitudes * jnp.cos(angles),
                             magnitudes * jnp.cos(angles + math.pi / 2)], axis=-1)
  freqs_y = jnp.concatenate([magnitudes * jnp.sin(angles),
                             magnitudes * jnp.sin(angles + math.pi / 2)], axis=-1)
  return jnp.stack([freqs_x, freqs_y]).astype(dtype)


def rotate(x, angles):
  """Turns pair (x[j], x[j + D/2]) of each head by angles[j]; float32 inside, x.dtype out.

  x: (batch, tokens, heads, D); angles: broadcastable to (batch, tokens, heads, D/2).
  """
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  turned = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return turned.astype(x.dtype)


class RotaryEmbedding2D(nn.Module):
  """Rotates the patch tokens' queries and keys; the tokens in front of them stay as they are.

  Holds `freqs` (2, heads, D/2) in mixed mode; nothing in axial mode.
  """
  mode: str  # axial | mixed
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query, key, positions):
    """query, key: (batch, tokens, heads, D); positions: (batch or 1, patches, 2).

    The last `patches` tokens are the patch tokens (the class and register tokens come first).
    """
    _, num_tokens, num_heads, head_dim = query.shape
    if self.mode == 'axial':
      angles = axial_angles(positions, head_dim)
    else:
      freqs = self.param('freqs', init_mixed_freqs, (2, num_heads, head_dim // 2),
                         self.param_dtype)
      angles = mixed_angles(positions, freqs)
    num_prefix = num_tokens - positions.shape[1]

    def turn(x):
      return jnp.concatenate([x[:, :num_prefix], rotate(x[:, num_prefix:], angles)], axis=1)

    return turn(query), turn(key)
