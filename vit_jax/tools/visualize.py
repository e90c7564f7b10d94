"""Seeing inside a ViT: attention rollout, per-head attention, position-embedding similarity,
patch-embedding filters, and PNG writers for each.

The maths works on NumPy arrays so it can be checked by hand; the writers use matplotlib's
object-oriented API (`Figure`, rendered by Agg) so nothing here touches pyplot's global state or
needs a display. Every writer makes a figure of a fixed, documented size: `PANEL_PX` pixels per
panel, so a caller (or a test) knows the size of the PNG before it is written.

What each pooling shows:
- `token`: the CLS token's row. The classifier reads only the CLS token's output, so its row of
  the rollout says how much each patch flowed into what the head saw.
- `gap`: there is no CLS query; the head averages the patch tokens' outputs, so we show the mean
  over all patch queries of their rows (what flowed into the average).
- `map`: the MAP head's learned probe attends over the patch tokens' outputs. Given the probe's
  attention (`ModelAttention.probe`, averaged over its heads), the rollout is carried one step
  further through it: the probe-weighted mix of the patch queries' rows. Without it, the plain
  mean over patch queries is shown, as for `gap`. Per head, `map` shows the probe's own heads.
Prefix tokens (CLS, registers) are dropped from the key axis, so a map covers patches only and
need not sum to one (what is missing went to the CLS or register tokens).
"""

import math
from typing import NamedTuple, Optional

import jax
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from vit_jax.errors import UserError

PANEL_PX = 200     # pixels per panel in every figure written here
_DPI = 100
POOLINGS = ('token', 'gap', 'map')


# --------------------------------------------------------------------------------------------
# Getting the attention out of a model.


class ModelAttention(NamedTuple):
  """What `model_attentions` returns."""
  logits: np.ndarray        # (batch, classes)
  layers: np.ndarray        # (layers, batch, heads, q, k): the encoder blocks, in order
  probe: Optional[np.ndarray]  # (batch, heads, patches): the MAP head's probe; None otherwise


def model_attentions(model, params, images):
  """Runs `model` on float `images` (batch, H, W, C) in [-1, 1]; returns a `ModelAttention`.

  The attention is read from the `intermediates` the model sows (per-layer `encoderblock_{i}`,
  or one scanned `encoderblock` with a leading layer axis).
  """
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False,
                                          mutable=['intermediates']))
  logits, state = apply(params, images)
  intermediates = state['intermediates']
  return ModelAttention(np.asarray(logits, np.float32), collect_attentions(intermediates),
                        collect_probe_attention(intermediates))


def collect_probe_attention(intermediates):
  """The MAP head probe's attention (batch, heads, patches), or None when there is no MAP head."""
  head = intermediates.get('MAPHead_0', {}).get('MultiHeadDotProductAttention_0', {})
  if 'attention_weights' not in head:
    return None
  return np.asarray(head['attention_weights'][0], np.float32)[:, :, 0]


def collect_attentions(intermediates):
  """Stacks the encoder's sown `attention_weights` into (layers, batch, heads, q, k).

  Attention sown outside the encoder blocks (e.g. a MAP head's probe) is left out.
  """
  per_block = []   # (block index, array (layers_in_entry, batch, heads, q, k))
  for path, value in jax.tree_util.tree_flatten_with_path(
      intermediates, is_leaf=lambda x: isinstance(x, (tuple, list))
      and all(hasattr(v, 'shape') for v in x))[0]:
    names = [str(getattr(key, 'key', getattr(key, 'idx', key))) for key in path]
    if 'attention_weights' not in names:
      continue
    blocks = [n for n in names if n.startswith('encoderblock')]
    if not blocks:
      continue
    weights = np.asarray(value[0] if isinstance(value, (tuple, list)) else value, np.float32)
    suffix = blocks[0][len('encoderblock'):].lstrip('_')
    if suffix:   # per-layer layout: encoderblock_{i}, one (batch, heads, q, k) each
      per_block.append((int(suffix), weights[None]))
    else:        # scanned layout: one entry with a leading layer axis
      per_block.append((0, weights if weights.ndim == 5 else weights[None]))
  if not per_block:
    raise UserError('the model sowed no encoder attention_weights; attention maps need a ViT '
                    '(Mixer has no attention)')
  per_block.sort(key=lambda item: item[0])
  return np.concatenate([w for _, w in per_block], axis=0)


def num_prefix_tokens(classifier, num_registers=0):
  """Tokens before the patches in the encoder's sequence: CLS (for `token`), then registers."""
  if classifier not in POOLINGS:
    raise UserError(f'classifier={classifier!r} has no attention map; valid: {POOLINGS}')
  return (1 if classifier == 'token' else 0) + num_registers


def grid_shape_for(num_tokens, num_prefix):
  """The (gh, gw) patch grid of a square image, from the sequence length."""
  side = math.isqrt(num_tokens - num_prefix)
  if side * side != num_tokens - num_prefix:
    raise UserError(f'{num_tokens} tokens less {num_prefix} prefix tokens is not a square grid; '
                    'pass grid_shape=(gh, gw)')
  return side, side


# --------------------------------------------------------------------------------------------
# The maths.


def rollout_matrix(attentions):
  """Attention rollout (Abnar & Zuidema 2020) over all layers: (batch, tokens, tokens).

  `attentions` is (layers, batch, heads, q, k) (or a list of (batch, heads, q, k)). Per layer:
  average the heads, add the identity for the residual path, renormalise the rows; then multiply
  the layers, first layer rightmost. Each row of the result sums to one.
  """
  attentions = np.asarray(attentions, np.float64)
  if attentions.ndim != 5 or attentions.shape[-1] != attentions.shape[-2]:
    raise UserError(f'attentions of shape {attentions.shape}; expected '
                    '(layers, batch, heads, tokens, tokens)')
  num_tokens = attentions.shape[-1]
  rollout = np.broadcast_to(np.eye(num_tokens), attentions.shape[1:2] + (num_tokens,) * 2)
  for layer in attentions:
    mixed = layer.mean(axis=1) + np.eye(num_tokens)           # (batch, q, k)
    mixed /= mixed.sum(axis=-1, keepdims=True)
    rollout = mixed @ rollout
  return rollout


def attention_rollout(attentions, classifier='token', num_prefix=None, grid_shape=None,
                      probe=None):
  """The rollout map over the patch grid: (batch, gh, gw).

  For `token` pooling it is the CLS row of `rollout_matrix`; for `gap` the mean of the patch
  queries' rows; for `map` their mix weighted by `probe` (batch, heads, patches), the MAP
  probe's attention, or the mean without it (see the module docstring). `num_prefix` is the
  count of tokens before the patches (default: 1 for `token`, else 0; add registers);
  `grid_shape` defaults to a square grid.
  """
  rollout = rollout_matrix(attentions)
  query_weights = _probe_weights(probe, classifier)
  return _pooled_rows(rollout, classifier, num_prefix, grid_shape, query_weights)


def cls_attention_per_head(attentions, classifier='token', num_prefix=None, grid_shape=None,
                           probe=None):
  """The pooling query's attention over the patches, per head: (batch, heads, gh, gw).

  For `token` pooling it is the last layer's CLS row; for `map` with `probe` given, the MAP
  probe's own heads; for `gap` (and `map` without `probe`) the last layer's mean over the patch
  queries (there is no CLS query).
  """
  if classifier == 'map' and probe is not None:
    probe = np.asarray(probe, np.float64)          # (batch, heads, patches)
    return probe.reshape(probe.shape[:2] + tuple(grid_shape or grid_shape_for(probe.shape[-1], 0)))
  last = np.asarray(attentions[-1], np.float64)    # (batch, heads, q, k)
  batch, heads = last.shape[:2]
  maps = _pooled_rows(last.reshape((batch * heads,) + last.shape[2:]), classifier, num_prefix,
                      grid_shape)
  return maps.reshape((batch, heads) + maps.shape[1:])


def _probe_weights(probe, classifier):
  """(batch, patches) query weights from the MAP probe, averaged over its heads; or None."""
  if probe is None or classifier != 'map':
    return None
  return np.asarray(probe, np.float64).mean(axis=1)


def _pooled_rows(matrix, classifier, num_prefix, grid_shape, query_weights=None):
  """(n, q, k) -> (n, gh, gw): the CLS row, or the patch queries' rows mixed by
  `query_weights` (n, patches) (default: their mean), over patch keys."""
  if num_prefix is None:
    num_prefix = num_prefix_tokens(classifier)
  elif classifier not in POOLINGS:
    raise UserError(f'classifier={classifier!r} has no attention map; valid: {POOLINGS}')
  if classifier == 'token' and num_prefix < 1:
    raise UserError('token pooling needs the CLS token: num_prefix must be >= 1')
  num_tokens = matrix.shape[-1]
  grid_shape = grid_shape or grid_shape_for(num_tokens, num_prefix)
  if num_prefix + grid_shape[0] * grid_shape[1] != num_tokens:
    raise UserError(f'grid_shape={tuple(grid_shape)} plus {num_prefix} prefix tokens does not '
                    f'match {num_tokens} tokens')
  if classifier == 'token':
    rows = matrix[:, 0, num_prefix:]
  elif query_weights is None:
    rows = matrix[:, num_prefix:, num_prefix:].mean(axis=1)
  else:
    rows = np.einsum('nq,nqk->nk', query_weights, matrix[:, num_prefix:, num_prefix:])
  return rows.reshape((-1,) + tuple(grid_shape))


def posemb_similarity(posemb, grid_shape=None, num_prefix=0):
  """Cosine similarity of each patch's position embedding to every other's: (gh, gw, gh, gw).

  `posemb` is (1, num_prefix + gh*gw, D) or (num_prefix + gh*gw, D), as in
  `Transformer/posembed_input/pos_embedding`; `num_prefix` is the count of non-grid entries
  (1 for a CLS token, see `vit_jax.models.posemb_prefix_tokens`). Entry [i, j] is the picture
  of the ViT paper's figure 7 (centre) for the patch at row i, column j.
  """
  posemb = np.asarray(posemb, np.float64)
  posemb = posemb.reshape(-1, posemb.shape[-1])[num_prefix:]   # (gh*gw, D)
  grid_shape = tuple(grid_shape or grid_shape_for(posemb.shape[0], 0))
  if grid_shape[0] * grid_shape[1] != posemb.shape[0]:
    raise UserError(f'grid_shape={grid_shape} does not match {posemb.shape[0]} position '
                    'embeddings')
  unit = posemb / np.maximum(np.linalg.norm(posemb, axis=-1, keepdims=True), 1e-12)
  return (unit @ unit.T).reshape(grid_shape * 2)


def patch_embedding_filters(kernel, num_components=28):
  """The principal components of the patch-embedding filters: (components, P, P, C).

  `kernel` is the `embedding/kernel` (P, P, C, D): D filters of P*P*C pixels. As in the ViT
  paper's figure 7 (left), we show the top principal components of those D filters (centred,
  by SVD), not the filters themselves: the components are ordered by how much of the filters'
  variation they carry, so the first few show the basis the model uses to read a patch.
  """
  kernel = np.asarray(kernel, np.float64)
  if kernel.ndim != 4:
    raise UserError(f'embedding kernel of shape {kernel.shape}; expected (P, P, C, D)')
  filters = kernel.reshape(-1, kernel.shape[-1]).T                  # (D, P*P*C)
  filters = filters - filters.mean(axis=0, keepdims=True)
  _, _, components = np.linalg.svd(filters, full_matrices=False)    # (min(D, PPC), P*P*C)
  components = components[:num_components]
  return components.reshape((-1,) + kernel.shape[:3])


# --------------------------------------------------------------------------------------------
# PNG writers. Each figure is (columns * PANEL_PX) x (rows * PANEL_PX) pixels.


def save_attention_overlay(images, maps, path, titles=None, alpha=0.5):
  """Writes, per image, the image and the image with `maps` overlaid: one row per image.

  `images` (N, H, W, 3) uint8 (or one (H, W, 3)), `maps` (N, gh, gw). Size: 2*PANEL_PX wide,
  N*PANEL_PX high.
  """
  images, maps = _batched(images, 4), _batched(maps, 3)
  fig = _figure(rows=len(images), cols=2)
  for row, (image, heat) in enumerate(zip(images, maps)):
    title = titles[row] if titles else None
    _panel(fig, len(images), 2, 2 * row + 1, image, title)
    _panel(fig, len(images), 2, 2 * row + 2, _overlay(image, heat, alpha), 'attention rollout')
  _save(fig, path)


def save_head_grid(images, head_maps, path, alpha=0.5):
  """Writes, per image, the image then each head's map overlaid: one row per image.

  `images` (N, H, W, 3) uint8, `head_maps` (N, heads, gh, gw). Size: (1 + heads)*PANEL_PX wide,
  N*PANEL_PX high.
  """
  images, head_maps = _batched(images, 4), _batched(head_maps, 4)
  rows, cols = len(images), 1 + head_maps.shape[1]
  fig = _figure(rows=rows, cols=cols)
  for row, (image, heads) in enumerate(zip(images, head_maps)):
    _panel(fig, rows, cols, row * cols + 1, image, 'image')
    for head, heat in enumerate(heads):
      _panel(fig, rows, cols, row * cols + head + 2, _overlay(image, heat, alpha), f'head {head}')
  _save(fig, path)


def save_posemb_similarity(similarity, path):
  """Writes the (gh, gw, gh, gw) similarities as a gh x gw mosaic of gh x gw tiles.

  Tile (i, j) shows the patch at (i, j) against all others, colour from -1 to 1 as in the paper.
  Size: PANEL_PX * 4 square (one panel holding the mosaic, with its colour bar).
  """
  similarity = np.asarray(similarity)
  gh, gw = similarity.shape[:2]
  tiles = similarity.reshape(gh * gw, gh, gw, 1)              # tile i*gw + j: patch (i, j)
  mosaic = _mosaic(tiles, cols=gw, fill=np.nan)[..., 0]
  fig = _figure(rows=4, cols=4)
  ax = fig.add_axes((0.08, 0.08, 0.74, 0.84))
  shown = ax.imshow(mosaic, cmap='viridis', vmin=-1, vmax=1, interpolation='nearest')
  ax.set_xticks([(gw + 1) * j + gw / 2 - 0.5 for j in range(gw)], [str(j + 1) for j in range(gw)])
  ax.set_yticks([(gh + 1) * i + gh / 2 - 0.5 for i in range(gh)], [str(i + 1) for i in range(gh)])
  ax.tick_params(labelsize=6, length=0)
  ax.set_xlabel('input patch column')
  ax.set_ylabel('input patch row')
  ax.set_title('position embedding similarity')
  fig.colorbar(shown, cax=fig.add_axes((0.85, 0.08, 0.03, 0.84)), label='cosine similarity')
  _save(fig, path)


def save_filters(filters, path, cols=7):
  """Writes (k, P, P, C) filters (e.g. `patch_embedding_filters`) as a mosaic, `cols` wide.

  Each filter is scaled to [0, 1] on its own. Size: PANEL_PX * 4 square.
  """
  filters = np.asarray(filters, np.float64)
  low = filters.min(axis=(1, 2, 3), keepdims=True)
  high = filters.max(axis=(1, 2, 3), keepdims=True)
  scaled = (filters - low) / np.maximum(high - low, 1e-12)
  if scaled.shape[-1] == 1:
    scaled = np.repeat(scaled, 3, axis=-1)
  mosaic = _mosaic(scaled, cols=cols, fill=1.0)
  fig = _figure(rows=4, cols=4)
  ax = fig.add_axes((0.04, 0.04, 0.92, 0.88))
  ax.imshow(mosaic, interpolation='nearest')
  ax.set_axis_off()
  ax.set_title(f'patch embedding: top {len(filters)} principal components')
  _save(fig, path)


def _batched(array, ndim):
  array = np.asarray(array)
  return array[None] if array.ndim == ndim - 1 else array


def _figure(rows, cols):
  fig = Figure(figsize=(cols * PANEL_PX / _DPI, rows * PANEL_PX / _DPI), dpi=_DPI)
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.99 - 0.1 / rows,
                      wspace=0.05, hspace=0.15)   # room for one line of title per row
  return fig


def _panel(fig, rows, cols, index, image, title):
  ax = fig.add_subplot(rows, cols, index)
  ax.imshow(image, interpolation='nearest')
  ax.set_axis_off()
  if title:
    ax.set_title(title, fontsize=8)


def _overlay(image, heat, alpha):
  """The uint8 image blended with the map, upsampled to the image, as a heat colour."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  image = image[..., :3].astype(np.float64) / (255.0 if image.dtype == np.uint8 else 1.0)
  heat = np.asarray(heat, np.float64)
  height, width = image.shape[:2]
  rows = (np.arange(height) * heat.shape[0] // height)
  cols = (np.arange(width) * heat.shape[1] // width)
  heat = heat[rows][:, cols]                                  # nearest: one block per patch
  heat = (heat - heat.min()) / max(heat.max() - heat.min(), 1e-12)
  colour = colormaps['jet'](heat)[..., :3]
  return np.clip((1 - alpha) * image + alpha * colour, 0, 1)


def _mosaic(tiles, cols, fill):
  """(n, h, w, c) tiles -> one (rows*(h+1)-1, cols*(w+1)-1, c) image with 1-pixel gaps."""
  n, h, w, c = tiles.shape
  rows = -(-n // cols)
  out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, c), fill, np.float64)
  for index, tile in enumerate(tiles):
    r, q = divmod(index, cols)
    out[r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = tile
  return out


def _save(fig, path):
  fig.savefig(path, format='png')
