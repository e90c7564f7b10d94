"""Model names -> Flax modules.

  model = create_model('ViT-B/16', num_classes=1000, dtype='bfloat16')
  params = model.init(jax.random.key(0), images)['params']
  logits = model.apply({'params': params}, images, train=False)

Names: `ViT-<size>/<patch>` (size Ti S B L H g), `R50+ViT-<size>/<patch>` (hybrid; the patch
counts input pixels, so /16 is a 1x1 patch of the 16x-downsampled ResNet map), and
`Mixer-<size>/<patch>` (size S B L H).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp

from vit_jax.errors import UserError
from vit_jax.models.flexi import resize_patch_embedding
from vit_jax.models.layout import layers_to_scan, scan_to_layers
from vit_jax.models.mixer import MlpMixer
from vit_jax.models.vit import VisionTransformer, posemb_prefix_tokens, resize_posemb

# size: (hidden_size, num_layers, num_heads, mlp_dim)
VIT_SIZES = {
    'Ti': (192, 12, 3, 768),
    'S': (384, 12, 6, 1536),
    'B': (768, 12, 12, 3072),
    'L': (1024, 24, 16, 4096),
    'H': (1280, 32, 16, 5120),
    'g': (1408, 40, 16, 6144),
}
# size: (hidden_size, num_layers, tokens_mlp_dim, channels_mlp_dim)
MIXER_SIZES = {
    'S': (512, 8, 256, 2048),
    'B': (768, 12, 384, 3072),
    'L': (1024, 24, 512, 4096),
    'H': (1280, 32, 640, 5120),
}
R50_STAGES = (3, 4, 9)  # The hybrid's ResNet-50 root: its first three stages.
R50_DOWNSAMPLING = 16

# Fields that a model name decides (the rest are options: pooling, dropout, dtypes, ...).
ARCHITECTURE_FIELDS = ('num_classes', 'patch_size', 'hidden_size', 'num_layers', 'num_heads',
                       'mlp_dim', 'tokens_mlp_dim', 'channels_mlp_dim', 'resnet_layers',
                       'resnet_width')
DTYPES = ('float32', 'bfloat16', 'float16')

_NAME = re.compile(r'^(R50\+ViT|ViT|Mixer)-([A-Za-z]+)/(\d+)$')
VALID_NAMES = ('ViT-<size>/<patch> with size in ' + ' '.join(VIT_SIZES)
               + '; R50+ViT-<size>/<patch> with patch a multiple of 16'
               + '; Mixer-<size>/<patch> with size in ' + ' '.join(MIXER_SIZES))


def decode_name(name):
  """'ViT-B/16' -> (VisionTransformer, {patch_size, hidden_size, num_layers, ...})."""
  match = _NAME.match(name) if isinstance(name, str) else None
  if not match:
    raise UserError(f'unknown model name {name!r}; valid: {VALID_NAMES}')
  family, size, patch = match.group(1), match.group(2), int(match.group(3))
  sizes = MIXER_SIZES if family == 'Mixer' else VIT_SIZES
  if size not in sizes or patch <= 0:
    raise UserError(f'unknown model name {name!r}; valid: {VALID_NAMES}')
  if family == 'Mixer':
    hidden_size, num_layers, tokens_mlp_dim, channels_mlp_dim = sizes[size]
    return MlpMixer, dict(patch_size=(patch, patch), hidden_size=hidden_size,
                          num_layers=num_layers, tokens_mlp_dim=tokens_mlp_dim,
                          channels_mlp_dim=channels_mlp_dim)
  hidden_size, num_layers, num_heads, mlp_dim = sizes[size]
  fields = dict(patch_size=(patch, patch), hidden_size=hidden_size, num_layers=num_layers,
                num_heads=num_heads, mlp_dim=mlp_dim)
  if family == 'R50+ViT':
    if patch % R50_DOWNSAMPLING:
      raise UserError(f'{name!r}: a hybrid patch must be a multiple of {R50_DOWNSAMPLING} '
                      'pixels (the ResNet root downsamples 16x)')
    map_patch = patch // R50_DOWNSAMPLING
    fields.update(patch_size=(map_patch, map_patch), resnet_layers=R50_STAGES)
  return VisionTransformer, fields


def _as_dtype(key, value):
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or dtype.name not in DTYPES:
    raise UserError(f'unknown {key} {value!r}; valid: {", ".join(DTYPES)}')
  return dtype


def model_kwargs(name, num_classes, **overrides):
  """The full dataclass fields `create_model` would build the module with.

  Args:
    name: a model name (see the module docstring).
    num_classes: classes of the head; None or 0: no head (features out).
    **overrides: fields of the module the name picks (`VisionTransformer` or `MlpMixer`), e.g.
      classifier='gap' or hidden_size=64; None means "the name's or the field's default". A
      field the module does not have is a UserError, never silently dropped.

  Returns:
    A dict; `decode_name(name)[0](**model_kwargs(...))` is the model.
  """
  model_cls, fields = decode_name(name)
  settable = [f.name for f in dataclasses.fields(model_cls)
              if f.name not in ('parent', 'name', 'num_classes')]
  defaults = {f.name: f.default for f in dataclasses.fields(model_cls)
              if f.name in settable and f.default is not dataclasses.MISSING}
  fields = {**defaults, **fields}
  if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 0):
    raise UserError(f'num_classes must be a non-negative int or None, got {num_classes!r}')
  overrides = {key: value for key, value in overrides.items() if value is not None}
  unknown = sorted(set(overrides) - set(settable))
  if unknown:
    raise UserError(f'model.{unknown[0]}={overrides[unknown[0]]!r} does not apply to {name}; '
                    f'it takes: {", ".join(sorted(settable))}')
  fields.update(overrides)
  for key in ('dtype', 'param_dtype'):
    if key in fields:
      fields[key] = _as_dtype(key, fields[key])
  if isinstance(fields['patch_size'], int):
    fields['patch_size'] = (fields['patch_size'], fields['patch_size'])
  fields['patch_size'] = tuple(fields['patch_size'])
  if fields.get('resnet_layers') is not None:
    fields['resnet_layers'] = tuple(fields['resnet_layers'])
  fields['num_classes'] = num_classes
  if model_cls is VisionTransformer:
    # Checks the choices and that the heads divide the width, before anything is built.
    VisionTransformer(**fields).check_config()
  return fields


def create_model(name, num_classes, **overrides):
  """Builds the Flax module for `name`; see `model_kwargs` for the overrides."""
  model_cls, _ = decode_name(name)
  return model_cls(**model_kwargs(name, num_classes, **overrides))


def count_params(name, num_classes=1000, image_size=224, **overrides):
  """Number of parameters, from shapes alone (jax.eval_shape: nothing is allocated)."""
  model = create_model(name, num_classes, **overrides)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)['params']
  return sum(leaf.size for leaf in jax.tree.leaves(shapes))


__all__ = [
    'ARCHITECTURE_FIELDS', 'MlpMixer', 'VisionTransformer', 'count_params', 'create_model', 'decode_name',
    'layers_to_scan', 'model_kwargs', 'posemb_prefix_tokens', 'resize_patch_embedding',
    'resize_posemb', 'scan_to_layers',
]
