"""Weights in and out: published `.npz`, big_vision `.npz`, HF transformers, timm state dicts,
train.py workdirs.

  python -m vit_jax.tools.convert ViT-B_16.npz hf_vit_b16/          # npz -> HF directory
  python -m vit_jax.tools.convert hf_vit_b16/ back.npz              # HF -> npz (timm's npz loader too)
  python -m vit_jax.tools.convert workdir/ model.npz                # a training run's latest step
  python -m vit_jax.tools.convert workdir/ raw.npz --weights params  # its raw params, not the EMA
  python -m vit_jax.tools.convert ViT-B_16.npz hf/ --model ViT-B/16 --num_classes 10 --image_size 384
  python -m vit_jax.tools.convert model.safetensors out.npz --timm_model vit_base_patch16_224
  python -m vit_jax.tools.convert vit.pth out.npz --timm_args '{"num_heads": 6, "global_pool": "avg"}'
  python -m vit_jax.tools.convert ViT-B_16.npz vit_b16.safetensors  # -> timm state dict (+ .json)

Formats are read from the path (`.npz`; `.safetensors`, `.pth`, `.bin`: timm; a directory's
files) or forced with `--from` / `--to`: `npz` is the published vit_jax layout (which timm's
npz loader also reads), `timm` timm's own state dicts. The old spelling `--to timm` with a
`.npz` path still writes npz, with a note. A timm state dict does not store its head count or
GELU form: `vit_jax.weights.timm` reads them from a description (a config.json or NAME.json
beside the file, `--timm_model`, `--timm_args`). With `--model`, `--num_classes` or
`--image_size` the weights are fitted to that model first (`load_for_finetune`): checked key by
key, a fresh head for a new class count, position embeddings resized for a new resolution.
A workdir whose run kept an EMA of its params gives that EMA (what the run evaluated; the
choice is printed), `--weights params` the raw params. Nothing is written when anything fails.

In a notebook or in `train.py`:
  params, metadata = convert.load_weights('ViT-B_16.npz')
  params = convert.load_for_finetune(path, init_params, model_kwargs)
  convert.to_hf(params, model_kwargs, 'out_dir', image_size=224)
"""

import argparse
import dataclasses
import json
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models
from vit_jax import errors
from vit_jax.errors import UserError
from vit_jax.weights import hf, npz, timm, tree, workdir
from vit_jax.models import layout

READ_FORMATS = ('npz', 'hf', 'timm', 'workdir')
WRITE_FORMATS = ('npz', 'hf', 'timm')
READERS = {'npz': npz.read, 'hf': hf.read}  # timm: `_read_timm`; workdir: `workdir.read`.
LEGACY_TIMM_NOTE = ("note: format 'timm' now means timm's own state dicts (.safetensors); {path} "
                    "is {verb} in the published npz layout, which timm's npz loader reads: "
                    "say 'npz' to skip this note")

POSEMB_KEY = npz.POSEMB_KEY
# Options no parameter shows: an npz holds them only at the published models' values.
NPZ_UNSTORED_DEFAULTS = dict(gelu_approximate=True, layer_norm_eps=1e-6)
HEAD_PREFIXES = ('head/', 'head_dist/', 'pre_logits/')
# The options a model must share with the weights it starts from, where the weights say them
# (timm, HF, workdirs): the sizes (the shapes show them too; this names them) and what no shape
# shows (GELU form, LayerNorm eps, pooling). The head and pre_logits are fitted instead; layer
# scale is compared as on or off (its init value is overwritten by the stored scales).
MATCHING_OPTIONS = (
    'patch_size', 'hidden_size', 'num_layers', 'num_heads', 'mlp_dim', 'tokens_mlp_dim',
    'channels_mlp_dim', 'resnet_layers', 'resnet_width', 'classifier', 'num_registers', 'posemb',
    'gelu_approximate', 'layer_norm_eps', 'qk_norm', 'qkv_bias', 'fc_norm', 'no_embed_class',
    'pre_norm', 'distilled', 'layer_scale_init')


# ---------------------------------------------------------------------------------------------
# Which format a path holds.


def detect_format(path, writing=False):
  """The format of `path` from its suffix or its files; UserError when it cannot tell."""
  valid = WRITE_FORMATS if writing else READ_FORMATS
  if path.endswith('.npz'):
    return 'npz'
  if path.endswith(timm.SUFFIXES):
    return 'timm'
  if '://' in path and not writing and workdir.locate(path):
    return 'workdir'  # A training run in a bucket (gs://).
  if not writing and not os.path.exists(path):
    raise UserError(f'no such file or directory: {path}')
  if os.path.isdir(path):
    if not writing and timm.is_hub_dir(path):
      return 'timm'
    if hf.is_hf_dir(path):
      return 'hf'
    if not writing and workdir.locate(path):
      return 'workdir'
    if writing and not os.listdir(path):
      return 'hf'
  elif writing and not os.path.exists(path) and not os.path.splitext(path)[1]:
    return 'hf'  # A new path without a suffix: a directory.
  raise UserError(f'cannot tell the format of {path}; name a .npz file, a timm .safetensors '
                  'file, an HF directory (config.json + model.safetensors)'
                  + ('' if writing else ' or a train.py workdir')
                  + f', or force one of: {", ".join(valid)}')


def _check_format(format, valid, path, writing, log):
  """The format to use: `format`, or the path's when 'auto'; the old npz spelling 'timm' noted."""
  if format not in valid + ('auto',):
    raise UserError(f'unknown format {format!r} for {path}; valid: auto, {", ".join(valid)}')
  if format == 'auto':
    return detect_format(path, writing=writing)
  if format == 'timm' and path.endswith('.npz'):
    log(LEGACY_TIMM_NOTE.format(path=path, verb='written' if writing else 'read'))
    return 'npz'
  return format


def _read_timm(path, timm_model=None, timm_args=None):
  return timm.read(path, timm_model=timm_model, timm_args=timm_args)


# ---------------------------------------------------------------------------------------------
# Reading and writing.


def load_weights(path, format='auto', timm_model=None, timm_args=None, log=print,
                 weights=None):
  """Reads any supported checkpoint into the vit_jax layout, as it is (no model needed).

  Args:
    path: a `.npz` file, a timm state dict (`.safetensors`; `.pth` / `.bin` with PyTorch) or
      timm hub folder, an HF ViT directory, or a train.py workdir (or one of its step folders).
    format: 'auto' (from the path) or one of READ_FORMATS.
    timm_model, timm_args: for timm state dicts, the timm model name and constructor kwargs
      that describe what the file does not store (see `vit_jax.weights.timm`); a config.json or
      NAME.json beside the file describes it too.
    log: prints notes (the old format spelling, which weights of a workdir were read).
    weights: for workdirs, 'ema' or 'params' (None: 'ema' when the run kept an EMA, else
      'params'; see `vit_jax.restore`); for other formats it must be None.

  Returns:
    (params, metadata): params a flat `{'Transformer/encoderblock_0/...': np.ndarray}` (per
    layer, or scanned as stored); metadata a dict with at least `format`, and for timm, HF and
    workdirs `model_kwargs`, `image_size` and `class_names`.
  """
  path = os.fspath(path)
  format = _check_format(format, READ_FORMATS, path, writing=False, log=log)
  if '://' not in path and not os.path.exists(path):  # a gs:// workdir is checked as it is read
    raise UserError(f'no such file or directory: {path}')
  if weights is not None and format != 'workdir':
    raise UserError(f"weights={weights!r} chooses between a train.py workdir's EMA and raw "
                    f'params; {path} is {format}')
  if format == 'timm':
    return _read_timm(path, timm_model=timm_model, timm_args=timm_args)
  if timm_model or timm_args:
    raise UserError(f'timm_model / timm_args describe timm state dicts; {path} is {format}')
  if format == 'workdir':
    return workdir.read(path, weights=weights, log=log)
  return READERS[format](path)


def save_weights(params, path, format='auto', model_kwargs=None, image_size=None,
                 class_names=None, log=print):
  """Writes params (flat or nested, per-layer or scanned) atomically; nothing on failure.

  Args:
    params: vit_jax params.
    path: a `.npz` file, a `.safetensors` file for 'timm' (a NAME.json describing the model
      goes beside it), or a directory for 'hf'.
    format: 'auto' (from the path) or one of WRITE_FORMATS.
    model_kwargs: the model's fields (`vit_jax.models.model_kwargs`); 'hf' and 'timm' need
      them, and they are inferred from the shapes when None.
    image_size: the resolution written into HF's config and timm's img_size; None: from the
      position embeddings.
    class_names: labels for HF's id2label and the timm description; None: none.
    log: prints notes (the old format spelling, a changed layout).
  """
  path = os.fspath(path)
  for_timm = format == 'timm'  # Either spelling: timm reads only ViTs.
  format = _check_format(format, WRITE_FORMATS, path, writing=True, log=log)
  flat = to_layout(tree.to_numpy(tree.flatten(params)), scanned=False)
  if for_timm and model_family(flat) not in ('ViT', 'R50+ViT'):
    raise UserError(f'timm format holds ViTs; these weights are a {model_family(flat)}: '
                    'write npz instead')
  if format == 'npz':
    if path.endswith(timm.SUFFIXES):
      raise UserError(f'{path} names a timm state dict; npz weights go in a .npz file')
    npz.write(flat, path)
    unstored = _options_npz_loses(model_kwargs or {})
    if unstored:
      log(f'note: {path} does not store {", ".join(unstored)} (npz holds arrays only); '
          'give them to the model that loads it')
    return
  model_kwargs = complete_kwargs(infer_model_kwargs(flat) if model_kwargs is None
                                 else model_kwargs)
  if image_size is None:
    image_size = infer_image_size(flat, model_kwargs)
  if format == 'timm':
    timm.write(flat, model_kwargs, path, image_size=image_size, class_names=class_names,
               log=log)
    return
  hf.check_writable(model_kwargs)
  hf.write(flat, model_kwargs, path, image_size=image_size, class_names=class_names)


def _options_npz_loses(model_kwargs):
  """The model options an npz cannot show, where they differ from the module defaults."""
  unstored = []
  for key in ('gelu_approximate', 'layer_norm_eps'):
    default = NPZ_UNSTORED_DEFAULTS[key]
    if key in model_kwargs and model_kwargs[key] != default:
      unstored.append(f'{key}={model_kwargs[key]!r}')
  return unstored


def from_hf(path):
  """Reads an HF ViT directory: `(params, model_kwargs)` with nested vit_jax params.

  `models.VisionTransformer(**model_kwargs)` is the model they belong to.
  """
  params, metadata = load_weights(path, format='hf')
  return tree.unflatten(params), metadata['model_kwargs']


def to_hf(params, model_kwargs, path, image_size=None, class_names=None):
  """Writes a token-classifier ViT as an HF `ViTForImageClassification` directory (no torch)."""
  save_weights(params, path, format='hf', model_kwargs=model_kwargs, image_size=image_size,
               class_names=class_names)


# ---------------------------------------------------------------------------------------------
# What a set of weights is.


def model_family(flat):
  """'ViT', 'R50+ViT', 'Mixer' or 'unknown', from the parameter names."""
  if 'stem/kernel' in flat or any(key.startswith('MixerBlock_') for key in flat):
    return 'Mixer'
  if 'conv_root/kernel' in flat:
    return 'R50+ViT'
  if any(key.startswith('Transformer/') for key in flat):
    return 'ViT'
  return 'unknown'


def is_scanned(flat):
  """Whether flat params hold the scanned encoder (one stacked `Transformer/encoderblock/`)."""
  return any(key.startswith('Transformer/encoderblock/') for key in flat)


def to_layout(flat, scanned):
  """Flat params in the scanned (True) or per-layer (False) encoder layout."""
  if is_scanned(flat) == scanned or not any(k.startswith('Transformer/') for k in flat):
    return flat
  convert = layout.layers_to_scan if scanned else layout.scan_to_layers
  return tree.flatten(convert(tree.unflatten(flat)))


def infer_model_kwargs(flat):
  """The module fields a set of weights was made for, from their names and shapes alone.

  Returns a dict for `models.VisionTransformer(**kw)` or `models.MlpMixer(**kw)` (Mixer: it has
  `tokens_mlp_dim`). The pooling of a ViT without class token or MAP head is taken as 'gap'.
  What no key holds stays at the module default: the tanh GELU and LayerNorm eps 1e-6 of the
  published models (timm and HF readers return their own `model_kwargs` with the right ones).
  A class token without a position embedding (no_embed_class) is recognised when the table has
  exactly a square grid of entries.
  """
  family = model_family(flat)
  if family == 'Mixer':
    hidden = flat['stem/kernel'].shape
    return dict(
        patch_size=tuple(hidden[:2]), hidden_size=hidden[-1],
        num_layers=len({k.split('/')[0] for k in flat if k.startswith('MixerBlock_')}),
        tokens_mlp_dim=flat['MixerBlock_0/token_mixing/Dense_0/kernel'].shape[-1],
        channels_mlp_dim=flat['MixerBlock_0/channel_mixing/Dense_0/kernel'].shape[-1],
        num_classes=flat['head/bias'].shape[0] if 'head/bias' in flat else None)
  if family == 'unknown' or 'embedding/kernel' not in flat:
    raise UserError('these weights are neither a ViT nor a Mixer (no embedding/kernel, '
                    f'Transformer/ or MixerBlock_0/; first keys: {", ".join(sorted(flat)[:5])})')
  flat = to_layout(flat, scanned=False)
  block = 'Transformer/encoderblock_0/'
  embedding = flat['embedding/kernel'].shape  # (P, P, C, D)
  if 'cls' in flat:
    classifier = 'token'
  elif 'MAPHead_0/probe' in flat:
    classifier = 'map'
  else:
    classifier = 'gap'
  kwargs = dict(
      patch_size=tuple(embedding[:2]), hidden_size=embedding[-1],
      num_layers=len({k.split('/')[1] for k in flat if k.startswith('Transformer/encoderblock_')}),
      num_heads=flat[block + 'MultiHeadDotProductAttention_1/query/kernel'].shape[1],
      mlp_dim=flat[block + 'MlpBlock_3/Dense_0/kernel'].shape[-1],
      classifier=classifier,
      posemb='learn' if POSEMB_KEY in flat else 'sincos2d',
      num_registers=flat['registers'].shape[1] if 'registers' in flat else 0,
      representation_size=flat['pre_logits/bias'].shape[0] if 'pre_logits/bias' in flat else None,
      qk_norm=block + 'MultiHeadDotProductAttention_1/query_norm/scale' in flat,
      layer_scale_init=1e-5 if block + 'layer_scale_1' in flat else None,
      fc_norm='fc_norm/scale' in flat,
      pre_norm='Transformer/pre_norm/scale' in flat,
      qkv_bias=block + 'MultiHeadDotProductAttention_1/query/bias' in flat,
      distilled='dist' in flat,
      num_classes=flat['head/bias'].shape[0] if 'head/bias' in flat else None)
  kwargs['no_embed_class'] = _infer_no_embed_class(flat, kwargs)
  if family == 'R50+ViT':
    stages = sorted({int(m.group(1)) for m in map(re.compile(r'^block(\d+)/').match, flat) if m})
    kwargs['resnet_layers'] = tuple(
        len({k.split('/')[1] for k in flat if k.startswith(f'block{s}/')}) for s in stages)
    kwargs['resnet_width'] = flat['conv_root/kernel'].shape[-1]
  return kwargs


def _infer_no_embed_class(flat, kwargs):
  """Whether the position embeddings skip the class (and distillation) token: their count is a
  square grid without them, and is not one with them."""
  prefix = int(kwargs['classifier'] == 'token') + int(kwargs['distilled'])
  if POSEMB_KEY not in flat or not prefix:
    return False
  tokens = flat[POSEMB_KEY].shape[1]
  is_square = lambda n: n > 0 and math.isqrt(n) ** 2 == n
  return is_square(tokens) and not is_square(tokens - prefix)


def complete_kwargs(model_kwargs):
  """`model_kwargs` with every module field the dict leaves out at its dataclass default."""
  model_cls = models.MlpMixer if 'tokens_mlp_dim' in model_kwargs else models.VisionTransformer
  defaults = {field.name: field.default for field in dataclasses.fields(model_cls)
              if field.default is not dataclasses.MISSING and field.name not in ('parent', 'name')}
  return {**defaults, **model_kwargs}


def module_for(model_kwargs):
  """The Flax module with these fields: a Mixer when they have `tokens_mlp_dim`, else a ViT."""
  model_cls = models.MlpMixer if 'tokens_mlp_dim' in model_kwargs else models.VisionTransformer
  return model_cls(**model_kwargs)


def _prefix_tokens(model_kwargs):
  if 'tokens_mlp_dim' in model_kwargs:
    return 0
  return models.posemb_prefix_tokens(complete_kwargs(model_kwargs))


def infer_image_size(flat, model_kwargs):
  """Square image side the weights were trained at, from the position embeddings; else 224."""
  if POSEMB_KEY not in flat:
    return 224
  grid_tokens = flat[POSEMB_KEY].shape[1] - _prefix_tokens(model_kwargs)
  side = math.isqrt(grid_tokens)
  if side * side != grid_tokens:
    raise UserError(f'{grid_tokens} position embeddings are not a square grid; pass image_size')
  pixels_per_token = model_kwargs['patch_size'][0]
  if model_kwargs.get('resnet_layers'):
    pixels_per_token *= 2**(1 + len(model_kwargs['resnet_layers']))
  return side * pixels_per_token


def describe(model_kwargs):
  """'ViT (width 64, 4 layers, patch 4x4)': a model's fields in a few words."""
  if 'tokens_mlp_dim' in model_kwargs:
    family = 'Mixer'
  else:
    family = 'R50+ViT' if model_kwargs.get('resnet_layers') else 'ViT'
  patch = 'x'.join(map(str, model_kwargs.get('patch_size', ())))
  return (f'{family} (width {model_kwargs.get("hidden_size")}, '
          f'{model_kwargs.get("num_layers")} layers, patch {patch})')


# ---------------------------------------------------------------------------------------------
# Fitting weights to a model.


def _summarise(keys, detail=lambda key: ''):
  """Sorted keys, with per-block repeats folded: `Transformer/encoderblock_{0..11}/x`.

  Keys fold together only when `detail(key)` (e.g. their shapes) is the same.
  """
  groups = {}
  for key in keys:
    match = re.search(r'(encoderblock_|MixerBlock_|unit)(\d+)/', key)
    pattern = key[:match.start(2)] + '{}' + key[match.end(2):] if match else key
    groups.setdefault((pattern, detail(key)), []).append(int(match.group(2)) if match else None)
  parts = []
  for (pattern, text_after), ids in sorted(groups.items()):
    if ids == [None]:
      parts.append(pattern + text_after)
      continue
    ids = sorted(ids)
    if len(ids) == 1:
      text = str(ids[0])
    elif ids == list(range(ids[0], ids[-1] + 1)):
      text = f'{{{ids[0]}..{ids[-1]}}}'
    else:
      text = '{' + ','.join(map(str, ids)) + '}'
    parts.append(pattern.replace('{}', text, 1) + text_after)
  return ', '.join(parts)


def _describe_weights(flat):
  """'ViT (width 64, 4 layers, patch 4x4)' for weights that look like a model; else ''."""
  try:
    return describe(infer_model_kwargs(flat))
  except (UserError, KeyError, IndexError):
    return ''


def fit_to_model(source, init_params, model_kwargs, source_name='checkpoint', model_name=None,
                 log=print):
  """Fits flat source params to `init_params`' keys, shapes, dtypes and encoder layout.

  The head (`head/*`) and `pre_logits/*` come from `init_params` when their shapes differ or
  the checkpoint has none (a new class count: a fresh head); the checkpoint's are dropped when
  the model has none. Position embeddings are resized to the model's grid. Any other
  difference raises UserError listing every missing, unexpected and mis-shaped key.

  `init_params` may be abstract (`jax.eval_shape` output): the check needs only shapes, and
  fresh parts then come back as the `jax.ShapeDtypeStruct`s they were.

  Returns nested params (numpy arrays) with `init_params`' structure and dtypes.
  """
  target = tree.flatten(init_params)
  source = to_layout(dict(source), scanned=is_scanned(target))
  model_name = model_name or describe(model_kwargs)

  notes = []
  for prefix in HEAD_PREFIXES:
    target_keys = {k for k in target if k.startswith(prefix)}
    source_keys = {k for k in source if k.startswith(prefix)}
    if not target_keys and source_keys:
      notes.append(f'dropped the checkpoint\'s {prefix.rstrip("/")} (the model has none)')
      for key in source_keys:
        del source[key]
    elif target_keys and (target_keys != source_keys or any(
        tuple(source[k].shape) != tuple(target[k].shape) for k in target_keys)):
      shapes = lambda d, ks: ', '.join(f'{tuple(d[k].shape)}' for k in sorted(ks))
      notes.append(f'fresh {prefix.rstrip("/")} from the model\'s init ('
                   f'{shapes(source, source_keys) or "none"} in the checkpoint, '
                   f'{shapes(target, target_keys)} in the model)')
      for key in source_keys:
        del source[key]
      source.update({k: target[k] for k in target_keys})

  if POSEMB_KEY in source and POSEMB_KEY in target:
    old_shape, new_shape = source[POSEMB_KEY].shape, tuple(target[POSEMB_KEY].shape)
    if tuple(old_shape) != new_shape and old_shape[2:] == new_shape[2:]:
      num_prefix = _prefix_tokens(model_kwargs)
      grid_tokens = new_shape[1] - num_prefix
      side = math.isqrt(grid_tokens)
      if side * side != grid_tokens:
        raise UserError(f'cannot resize position embeddings to {grid_tokens} tokens: not a '
                        'square grid')
      source[POSEMB_KEY] = np.asarray(
          models.resize_posemb(np.asarray(source[POSEMB_KEY]), (side, side), num_prefix))
      notes.append(f'resized position embeddings {tuple(old_shape)} -> {new_shape}')

  missing = sorted(set(target) - set(source))
  unexpected = sorted(set(source) - set(target))
  misshaped = sorted(k for k in set(source) & set(target)
                     if tuple(source[k].shape) != tuple(target[k].shape))
  if missing or unexpected or misshaped:
    parts = []
    if missing:
      parts.append('missing ' + _summarise(missing))
    if unexpected:
      parts.append('unexpected ' + _summarise(unexpected))
    if misshaped:
      parts.append('wrong shape ' + _summarise(misshaped, lambda k: (
          f' {tuple(source[k].shape)} (model: {tuple(target[k].shape)})')))
    family = model_family(source)
    target_family = model_family(target)
    if family != target_family:
      hint = f' (the checkpoint is a {family}, the model a {target_family})'
    else:
      hint = f' (the checkpoint is a {_describe_weights(source)})' if _describe_weights(
          source) else ''
    raise UserError(f'{source_name} does not match {model_name}{hint}: ' + '; '.join(parts))

  for note in notes:
    log(f'{source_name}: {note}')
  fitted = {}
  for key, value in source.items():
    if isinstance(value, jax.ShapeDtypeStruct):
      fitted[key] = value  # A fresh part of abstract init params: the caller fills it.
    else:
      fitted[key] = np.asarray(value).astype(target[key].dtype)
  return tree.unflatten(fitted)


def check_options(stored_kwargs, model_kwargs, source_name='checkpoint', hint=''):
  """UserError naming each of `MATCHING_OPTIONS` whose value in the weights' own options
  (`load_weights(...)[1]['model_kwargs']`) differs from the model's; options either leaves out
  are not compared."""
  def plain(key, value):
    if key == 'layer_scale_init':
      return 'on' if value else 'off'
    return tuple(value) if isinstance(value, (list, tuple)) else value

  mismatches = []
  for key in MATCHING_OPTIONS:
    if key not in stored_kwargs or key not in model_kwargs:
      continue
    theirs, ours = plain(key, stored_kwargs[key]), plain(key, model_kwargs[key])
    if key == 'layer_norm_eps' and None not in (theirs, ours):
      same = math.isclose(theirs, ours, rel_tol=1e-6)  # Written through JSON and back.
    else:
      same = theirs == ours
    if not same:
      mismatches.append(f'{key}={theirs!r} (the model: {ours!r})')
  if mismatches:
    raise UserError(f'{source_name} was made with ' + ', '.join(mismatches)
                    + f'; give the model the weights\' options{hint}')


def load_for_finetune(path, init_params, model_kwargs, format='auto', model_name=None,
                      log=print, timm_model=None, timm_args=None, weights=None,
                      options_hint=''):
  """Reads any supported checkpoint and fits it to a model, for fine-tuning.

  Args:
    path: a `.npz` (vit_jax, big_vision), a timm state dict or hub folder, an HF directory, or
      a train.py workdir.
    init_params: the model's freshly initialised params (nested); give the fresh head and the
      target shapes, dtypes and encoder layout (scanned or per layer).
    model_kwargs: the model's fields (`vit_jax.models.model_kwargs(...)`); `classifier` says
      how many position embeddings precede the grid.
    format: 'auto' or one of READ_FORMATS.
    model_name: named in error messages (e.g. 'ViT-B/16'); default: a description of the model.
    log: prints what was changed (fresh head, resized position embeddings).
    timm_model, timm_args: describe a timm state dict (see `load_weights`).
    weights: for a workdir, 'ema' or 'params' (see `load_weights`).
    options_hint: appended to a mismatch error (e.g. where the caller's options are set).

  The model's own options (GELU form, LayerNorm eps, sizes, ...) are the caller's: where the
  weights state theirs (timm, HF, workdirs), each of `MATCHING_OPTIONS` must agree
  (`check_options`), else UserError names the option and both values. An npz states none.

  Returns:
    Nested params as numpy arrays, with `init_params`' structure and dtypes.
  """
  source, metadata = load_weights(path, format=format, timm_model=timm_model,
                                  timm_args=timm_args, log=log, weights=weights)
  if metadata.get('model_kwargs'):
    check_options(metadata['model_kwargs'], model_kwargs, os.fspath(path), options_hint)
  return fit_to_model(source, init_params, model_kwargs, source_name=os.fspath(path),
                      model_name=model_name, log=log)


# ---------------------------------------------------------------------------------------------
# Command line.


def _init_params(model_kwargs, image_size, abstract, seed=0):
  """The params of a fresh model with these fields (on the CPU), or only their shapes."""
  model = module_for(model_kwargs)
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  init = lambda: model.init(jax.random.key(seed), images, train=False)['params']
  if abstract:
    return jax.eval_shape(init)
  with jax.default_device(jax.devices('cpu')[0]):
    return jax.device_get(jax.jit(init)())


def convert(src, dst, src_format='auto', dst_format='auto', model_name=None, num_classes=None,
            image_size=None, log=print, timm_model=None, timm_args=None, weights=None):
  """Converts `src` to `dst`, optionally fitted to a model first; see the module docstring."""
  source, metadata = load_weights(src, format=src_format, timm_model=timm_model,
                                  timm_args=timm_args, log=log, weights=weights)
  model_kwargs = dict(metadata.get('model_kwargs') or infer_model_kwargs(source))
  source_size = metadata.get('image_size') or infer_image_size(source, model_kwargs)
  class_names = metadata.get('class_names')

  if model_name is not None or num_classes is not None or image_size is not None:
    if model_name is not None:
      # The name sets the architecture; pooling and extras follow the checkpoint.
      _, shape_fields = models.decode_name(model_name)
      is_mixer = 'tokens_mlp_dim' in shape_fields
      if is_mixer != ('tokens_mlp_dim' in model_kwargs):
        kept = {}
      else:
        kept = {k: v for k, v in model_kwargs.items() if k not in shape_fields
                and k not in ('resnet_layers', 'resnet_width', 'num_classes')}
      model_kwargs = {**models.model_kwargs(model_name, model_kwargs.get('num_classes')),
                      **kept}
    if num_classes is not None:
      if num_classes != model_kwargs.get('num_classes'):
        class_names = None
      model_kwargs['num_classes'] = num_classes
    image_size = image_size or source_size
    # Shapes first: a mismatch is reported without initialising a large model.
    source = tree.flatten(fit_to_model(
        source, _init_params(model_kwargs, image_size, abstract=True), model_kwargs,
        source_name=src, model_name=model_name, log=log))
    fresh = [key for key, value in source.items() if isinstance(value, jax.ShapeDtypeStruct)]
    if fresh:
      init_params = tree.flatten(_init_params(model_kwargs, image_size, abstract=False))
      source.update({key: np.asarray(init_params[key]) for key in fresh})
  else:
    image_size = source_size
  save_weights(source, dst, format=dst_format, model_kwargs=model_kwargs,
               image_size=image_size, class_names=class_names, log=log)
  log(f'wrote {dst} ({describe(model_kwargs)}, {image_size} px, '
      f'{model_kwargs.get("num_classes") or "no"} classes)')


def parse_timm_args(text):
  """`--timm_args`: a JSON object, or the path of a .json file holding one; None stays None."""
  if text is None:
    return None
  if not text.lstrip().startswith('{') and os.path.isfile(text):
    with open(text) as f:
      text = f.read()
  try:
    value = json.loads(text)
  except ValueError as e:
    raise UserError(f'--timm_args is not JSON ({e}); e.g. \'{{"num_heads": 6}}\'') from None
  if not isinstance(value, dict):
    raise UserError(f'--timm_args must be a JSON object of timm kwargs, got {text!r}')
  return value


def main(argv=None):
  """Converts the weights SRC into DST as `argv` asks; the exit status."""
  parser = argparse.ArgumentParser(
      prog='python -m vit_jax.tools.convert',
      description='Convert ViT weights between vit_jax/big_vision .npz, timm state dicts, '
                  'HuggingFace and train.py workdirs.')
  parser.add_argument('src', help='.npz file, timm .safetensors/.pth/.bin or hub folder, HF '
                                  'directory, or train.py workdir / step folder')
  parser.add_argument('dst', help='.npz file, timm .safetensors file, or a directory for HF')
  parser.add_argument('--from', dest='src_format', default='auto',
                      choices=('auto',) + READ_FORMATS)
  parser.add_argument('--to', dest='dst_format', default='auto',
                      choices=('auto',) + WRITE_FORMATS)
  parser.add_argument('--model', help="fit to this model, e.g. 'ViT-B/16'")
  parser.add_argument('--num_classes', type=int, help='a fresh head with this many classes')
  parser.add_argument('--image_size', type=int, help='resize position embeddings to this')
  parser.add_argument('--timm_model', help='the timm model a timm state dict was made with, '
                                           "e.g. 'vit_base_patch16_224'")
  parser.add_argument('--timm_args', help='its timm constructor kwargs as JSON (or a .json file),'
                                          ' e.g. \'{"num_heads": 6, "global_pool": "avg"}\'')
  parser.add_argument('--weights', choices=workdir.WEIGHTS,
                      help='of a workdir: its EMA weights or its raw params (default: ema when '
                           'the run kept an EMA)')
  args = parser.parse_args(argv)
  try:
    convert(args.src, args.dst, src_format=args.src_format, dst_format=args.dst_format,
            model_name=args.model, num_classes=args.num_classes, image_size=args.image_size,
            timm_model=args.timm_model, timm_args=parse_timm_args(args.timm_args),
            weights=args.weights)
  except errors.REPORTED as e:
    return errors.report(e)
  return 0


if __name__ == '__main__':
  sys.exit(main())
