"""`.npz` files: the published vit_jax / big_vision checkpoints, and what timm's ViT loader reads.

A published file is a flat `np.savez` of the parameter tree with keys joined by '/'
(`Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`). Reading also accepts what big_vision
writes, and brings it to the vit_jax layout:
  - a `params/` (or `params/img/` for two-tower models, or `opt/target/` for old vit_jax
    optimizer checkpoints) prefix, dropped with every key outside it (optimizer state);
  - block children auto-named by linen (`MultiHeadDotProductAttention_0`, `LayerNorm_1`,
    `MlpBlock_0`), renamed to the published `_1`, `_2`, `_3`;
  - a top-level `pos_embedding` over the patches only (big_vision adds it before prepending the
    class token), moved to `Transformer/posembed_input/pos_embedding` with a zero row in front
    for the class token, which gives the same sums;
  - GroupNorm scales and biases stored as (1, 1, 1, C) by pre-2021 flax, squeezed to (C,).
The scanned form (`Transformer/encoderblock/...` with a leading layer axis) is kept as it is;
`vit_jax.models.layout` converts it where a model needs the other layout.

Writing produces the published per-layer layout with no prefix, which vit_jax, big_vision and
timm (`timm.models.vision_transformer._load_weights`) all read.
"""

import math
import os
import re
import zipfile

import numpy as np

from vit_jax.errors import UserError
from vit_jax.weights import tree

_PREFIXES = ('opt/target/', 'params/img/', 'params/')
# linen auto-names -> the published (pre-linen) names, inside an encoder block.
_BIG_VISION_BLOCK_NAMES = {
    'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
    'LayerNorm_1': 'LayerNorm_2',
    'MlpBlock_0': 'MlpBlock_3',
}
_BLOCK_KEY = re.compile(r'^(Transformer/encoderblock(?:_\d+)?/)([^/]+)(/.*)$')
_GROUPNORM_KEY = re.compile(r'(^|/)gn(\d+|_root|_proj)/(scale|bias)$')
POSEMB_KEY = 'Transformer/posembed_input/pos_embedding'


def read(path):
  """Reads an `.npz` checkpoint into the vit_jax layout.

  Returns:
    (params, metadata): params a flat `{'a/b': np.ndarray}`; metadata a dict with `format`,
    `prefix` (the prefix that was dropped) and `fixes` (what was changed, in words).
  """
  if os.path.isfile(path) and not zipfile.is_zipfile(path):
    # np.load would guess a pickle and suggest allow_pickle=True: never the right advice here.
    raise UserError(f'cannot read {path} as a .npz checkpoint: it is not a zip archive '
                    '(truncated, or another kind of file)')
  try:
    with np.load(path, allow_pickle=False) as archive:
      params = {key: archive[key] for key in archive.files}
  except FileNotFoundError:
    raise UserError(f'no such file: {path}') from None
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise UserError(f'cannot read {path} as a .npz checkpoint ({type(e).__name__}: '
                    f'{str(e).splitlines()[0] if str(e) else "unreadable"})') from None
  if not params:
    raise UserError(f'{path} holds no arrays')
  params, prefix = _strip_prefix(params)
  params, fixes = from_big_vision(params)
  return params, {'format': 'npz', 'prefix': prefix, 'fixes': fixes}


def _strip_prefix(params):
  """Keeps only the keys under the first known prefix that is present, without it."""
  for prefix in _PREFIXES:
    if any(key.startswith(prefix) for key in params):
      kept = {key[len(prefix):]: value for key, value in params.items()
              if key.startswith(prefix)}
      if prefix == 'params/' and any(key.startswith('img/') for key in kept):
        continue  # Found by the longer 'params/img/' prefix.
      return kept, prefix
  return params, ''


def from_big_vision(params):
  """big_vision's (and old flax's) names and shapes -> the vit_jax layout; see the module doc.

  Returns (params, fixes) with `fixes` a list of what changed, in words (empty: nothing did).
  """
  params = dict(params)
  fixes = []

  renamed = {}
  for key, value in params.items():
    match = _BLOCK_KEY.match(key)
    if match and match.group(2) in _BIG_VISION_BLOCK_NAMES:
      block = match.group(1)
      # Rename only blocks in linen naming (their attention is `_0`), never published ones.
      if f'{block}MultiHeadDotProductAttention_0/query/kernel' in params:
        key = block + _BIG_VISION_BLOCK_NAMES[match.group(2)] + match.group(3)
    renamed[key] = value
  if renamed.keys() != params.keys():
    fixes.append('renamed linen block names (MultiHeadDotProductAttention_0, LayerNorm_1, '
                 'MlpBlock_0) to the published _1, _2, _3')
  params = renamed

  for old_key in ('pos_embedding', 'Transformer/pos_embedding'):
    if old_key in params and POSEMB_KEY not in params:
      posemb = params.pop(old_key)  # (1, tokens, width)
      tokens = posemb.shape[1]
      if 'cls' in params and math.isqrt(tokens)**2 == tokens:
        # Patches only: a zero entry for the class token adds nothing, as in big_vision.
        posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
        fixes.append(f'moved {old_key} to {POSEMB_KEY}, with a zero entry for the class token')
      else:
        fixes.append(f'moved {old_key} to {POSEMB_KEY}')
      params[POSEMB_KEY] = posemb

  if 'probe' in params:  # MAP head inlined at the top (big_vision's ViT-g development runs).
    inlined = ('probe', 'MultiHeadDotProductAttention_0', 'LayerNorm_0', 'MlpBlock_0')
    params = {(f'MAPHead_0/{key}' if key.split('/')[0] in inlined else key): value
              for key, value in params.items()}
    fixes.append('moved the inlined MAP head under MAPHead_0')

  for key, value in params.items():
    if _GROUPNORM_KEY.search(key) and value.ndim > 1:
      params[key] = value.reshape(-1)
      if not any(fix.startswith('squeezed') for fix in fixes):
        fixes.append('squeezed GroupNorm scales and biases to 1-D')
  return params, fixes


def write(params, path):
  """Writes a flat `{'a/b': array}` as the published `.npz` layout, atomically.

  bfloat16 arrays are written as float32 (exact): numpy has no portable bfloat16, and every
  reader of these files expects float arrays.
  """
  if os.path.isdir(path):
    raise UserError(f'{path} is a directory; give a .npz file path')
  arrays = {}
  for key, value in tree.to_numpy(params).items():
    if value.dtype.name == 'bfloat16':
      value = value.astype(np.float32)
    arrays[key] = value
  with tree.atomic_output(path) as tmp:
    with open(tmp, 'wb') as f:  # A file object: np.savez would append '.npz' to a name.
      np.savez(f, **arrays)
