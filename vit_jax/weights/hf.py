"""HuggingFace transformers ViT directories: `config.json` + `model.safetensors`.

Written so that `transformers.ViTForImageClassification.from_pretrained(dir)` loads it; read back
from any ViT directory transformers writes (ViTForImageClassification, or ViTModel whose pooler
holds the published `pre_logits`). Only safetensors is handled, read and written with
`safetensors.numpy`, so neither direction needs PyTorch.

The two layouts differ by names and by how Dense kernels are stored:
  vit_jax                                           HF (torch Linear weight is (out, in))
  embedding/kernel (P, P, C, D)                     ...patch_embeddings.projection.weight (D, C, P, P)
  .../query/kernel (D, heads, head_dim)             ...attention.attention.query.weight (D, D)
  .../out/kernel (heads, head_dim, D)               ...attention.output.dense.weight (D, D)
  .../MlpBlock_3/Dense_0/kernel (D, M)              ...intermediate.dense.weight (M, D)
HF ViT classifies from the class token, so only classifier='token' models without
representation_size, registers, qk_norm, layer scale or the timm/DeiT options can be written.
`hidden_act` and `layer_norm_eps` map onto the model's `gelu_approximate` and `layer_norm_eps`
both ways ('gelu' is the exact erf form, 'gelu_pytorch_tanh' the tanh one), and `qkv_bias`
onto `qkv_bias`, so a directory made with transformers' defaults reads and writes back as it is.
"""

import json
import os
import re

import numpy as np
from safetensors import SafetensorError
import safetensors.numpy

from vit_jax.errors import UserError
from vit_jax.weights import tree

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# flax's nn.gelu defaults to the tanh approximation (as the published vit_jax models); these are
# HF's names for the same function. HF's plain 'gelu' is the exact erf form.
TANH_GELUS = ('gelu_pytorch_tanh', 'gelu_new', 'gelu_fast')
EXACT_GELU = 'gelu'
WRITTEN_TANH_GELU = 'gelu_pytorch_tanh'
LAYER_NORM_EPS = 1e-12  # ViTConfig's default, when a config.json leaves it out.

_EMB = 'vit.embeddings.'
_LAYER = 'vit.encoder.layer.{}.'
# Names transformers >= 5 gives its modules (it still writes and reads the ones above).
_NEW_NAMES = (
    (re.compile(r'^vit\.layers\.(\d+)\.'), r'vit.encoder.layer.\1.'),
    (re.compile(r'\.attention\.q_proj\.'), '.attention.attention.query.'),
    (re.compile(r'\.attention\.k_proj\.'), '.attention.attention.key.'),
    (re.compile(r'\.attention\.v_proj\.'), '.attention.attention.value.'),
    (re.compile(r'\.attention\.o_proj\.'), '.attention.output.dense.'),
    (re.compile(r'\.mlp\.fc1\.'), '.intermediate.dense.'),
    (re.compile(r'\.mlp\.fc2\.'), '.output.dense.'),
)


def is_hf_dir(path):
  """Whether `path` is a directory with a config.json and safetensors weights."""
  return (os.path.isdir(path) and os.path.exists(os.path.join(path, CONFIG_FILE))
          and (os.path.exists(os.path.join(path, WEIGHTS_FILE))
               or os.path.exists(os.path.join(path, INDEX_FILE))))


# ---------------------------------------------------------------------------------------------
# Reading.


def read(path):
  """Reads an HF ViT directory into the vit_jax layout.

  Returns:
    (params, metadata): params a flat `{'a/b': np.ndarray}`; metadata has `format`,
    `config` (config.json as a dict), `model_kwargs` (fields for `VisionTransformer`, with the
    config's GELU form, LayerNorm eps and qkv_bias), `image_size` and `class_names` (from
    id2label, or None).
  """
  config = _read_config(path)
  state = {_legacy_name(key): value for key, value in _read_safetensors(path).items()}
  num_layers = int(config.get('num_hidden_layers', 0))
  num_heads = int(config.get('num_attention_heads', 0))
  if num_layers <= 0 or num_heads <= 0:
    raise UserError(f'{path}/{CONFIG_FILE} needs num_hidden_layers and num_attention_heads > 0')
  qkv_bias = bool(config.get('qkv_bias', True))

  act = config.get('hidden_act', EXACT_GELU)
  if act != EXACT_GELU and act not in TANH_GELUS:
    raise UserError(f'{path}: hidden_act {act!r} has no vit_jax equivalent; valid: '
                    + ', '.join((EXACT_GELU,) + TANH_GELUS))
  layer_norm_eps = config.get('layer_norm_eps', LAYER_NORM_EPS)
  if isinstance(layer_norm_eps, bool) or not isinstance(layer_norm_eps, (int, float)) or not (
      0 < layer_norm_eps < 1):
    raise UserError(f'{path}/{CONFIG_FILE}: layer_norm_eps {layer_norm_eps!r} is not a number '
                    'between 0 and 1')

  params = from_hf_state(state, num_layers, num_heads, path, qkv_bias=qkv_bias)
  hidden_size, mlp_dim = params['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'].shape
  patch_h, patch_w = params['embedding/kernel'].shape[:2]
  num_classes = params['head/bias'].shape[0] if 'head/bias' in params else None
  model_kwargs = dict(
      patch_size=(patch_h, patch_w), hidden_size=hidden_size, num_layers=num_layers,
      num_heads=num_heads, mlp_dim=mlp_dim, classifier='token', num_classes=num_classes,
      representation_size=(params['pre_logits/bias'].shape[0]
                           if 'pre_logits/bias' in params else None),
      gelu_approximate=act in TANH_GELUS, layer_norm_eps=float(layer_norm_eps),
      qkv_bias=qkv_bias)
  image_size = config.get('image_size', 224)
  id2label = config.get('id2label') or {}
  class_names = None
  if num_classes and len(id2label) == num_classes:
    class_names = [id2label.get(str(i), id2label.get(i)) for i in range(num_classes)]
  return params, {'format': 'hf', 'config': config, 'model_kwargs': model_kwargs,
                  'image_size': image_size, 'class_names': class_names}


def _read_config(path):
  config_path = os.path.join(path, CONFIG_FILE)
  try:
    with open(config_path) as f:
      config = json.load(f)
  except FileNotFoundError:
    raise UserError(f'{path} has no {CONFIG_FILE}: not a HuggingFace model directory') from None
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {config_path}: {e}') from None
  if config.get('model_type', 'vit') != 'vit':
    raise UserError(f'{config_path}: model_type {config.get("model_type")!r} is not a ViT; '
                    "vit_jax reads HF models with model_type 'vit'")
  return config


def _read_safetensors(path):
  """All tensors of the directory's safetensors file(s), as numpy arrays."""
  index_path = os.path.join(path, INDEX_FILE)
  if os.path.exists(os.path.join(path, WEIGHTS_FILE)):
    files = [WEIGHTS_FILE]
  elif os.path.exists(index_path):
    with open(index_path) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
  else:
    found = sorted(os.listdir(path)) if os.path.isdir(path) else []
    raise UserError(f'{path} has no {WEIGHTS_FILE} (found: {", ".join(found) or "nothing"}); '
                    'vit_jax reads safetensors only: re-save with save_pretrained(dir)')
  state = {}
  for name in files:
    try:
      state.update(safetensors.numpy.load_file(os.path.join(path, name)))
    except (OSError, SafetensorError, ValueError, TypeError) as e:
      raise UserError(f'cannot read {os.path.join(path, name)}: {e}') from None
  return state


def _legacy_name(key):
  """Any HF ViT key -> the ViTForImageClassification name transformers writes."""
  if key.startswith(('embeddings.', 'encoder.', 'layernorm.', 'pooler.', 'layers.')):
    key = 'vit.' + key  # A bare ViTModel.
  for pattern, replacement in _NEW_NAMES:
    key = pattern.sub(replacement, key)
  return key


def _key_pairs(num_layers, num_heads, qkv_bias=True):
  """(HF key, vit_jax key, HF -> ours, ours -> HF) for every tensor both layouts share.

  One table serves both directions, so reading and writing cannot drift apart.
  """
  same = (lambda x: x, lambda x: x)
  transposed = (np.transpose, np.transpose)
  pairs = [
      (_EMB + 'patch_embeddings.projection.weight', 'embedding/kernel',
       lambda w: w.transpose(2, 3, 1, 0),    # (D, C, P, P) -> (P, P, C, D)
       lambda k: k.transpose(3, 2, 0, 1)),   # and back
      (_EMB + 'patch_embeddings.projection.bias', 'embedding/bias', *same),
      (_EMB + 'cls_token', 'cls', *same),
      (_EMB + 'position_embeddings', 'Transformer/posembed_input/pos_embedding', *same),
  ]
  for i in range(num_layers):
    hf, ours = _LAYER.format(i), f'Transformer/encoderblock_{i}/'
    attention = ours + 'MultiHeadDotProductAttention_1/'
    for name in ('query', 'key', 'value'):
      pairs.append((hf + f'attention.attention.{name}.weight', attention + f'{name}/kernel',
                    lambda w: w.T.reshape(w.shape[1], num_heads, -1),  # (D', D) -> (D, h, d)
                    lambda k: k.reshape(k.shape[0], -1).T))
      if qkv_bias:
        pairs.append((hf + f'attention.attention.{name}.bias', attention + f'{name}/bias',
                      lambda b: b.reshape(num_heads, -1), lambda b: b.reshape(-1)))
    pairs.append((hf + 'attention.output.dense.weight', attention + 'out/kernel',
                  lambda w: w.T.reshape(num_heads, -1, w.shape[0]),  # (D, D') -> (h, d, D)
                  lambda k: k.reshape(-1, k.shape[-1]).T))
    pairs.append((hf + 'attention.output.dense.bias', attention + 'out/bias', *same))
    for hf_norm, our_norm in (('layernorm_before', 'LayerNorm_0'),
                              ('layernorm_after', 'LayerNorm_2')):
      pairs.append((hf + f'{hf_norm}.weight', ours + f'{our_norm}/scale', *same))
      pairs.append((hf + f'{hf_norm}.bias', ours + f'{our_norm}/bias', *same))
    for hf_dense, our_dense in (('intermediate.dense', 'Dense_0'), ('output.dense', 'Dense_1')):
      pairs.append((hf + f'{hf_dense}.weight', ours + f'MlpBlock_3/{our_dense}/kernel',
                    *transposed))
      pairs.append((hf + f'{hf_dense}.bias', ours + f'MlpBlock_3/{our_dense}/bias', *same))
  pairs.append(('vit.layernorm.weight', 'Transformer/encoder_norm/scale', *same))
  pairs.append(('vit.layernorm.bias', 'Transformer/encoder_norm/bias', *same))
  return pairs


def _dense_pairs(hf_dense, our_dense):
  """The pairs of a plain Dense layer (HF stores the kernel transposed)."""
  return [(hf_dense + '.weight', f'{our_dense}/kernel', np.transpose, np.transpose),
          (hf_dense + '.bias', f'{our_dense}/bias', lambda x: x, lambda x: x)]


def _move(source, pairs, to_ours, what):
  """Converts every pair's tensor from `source`; UserError lists missing and unexpected keys."""
  source = dict(source)
  converted, missing = {}, []
  for hf_key, our_key, hf_to_ours, ours_to_hf in pairs:
    key_in, key_out, convert = ((hf_key, our_key, hf_to_ours) if to_ours
                                else (our_key, hf_key, ours_to_hf))
    if key_in not in source:
      missing.append(key_in)
      continue
    converted[key_out] = np.ascontiguousarray(convert(np.asarray(source.pop(key_in))))
  if missing or source:
    raise UserError(what + ': ' + '; '.join(part for part in (
        'missing ' + ', '.join(missing) if missing else '',
        'unexpected ' + ', '.join(sorted(source)) if source else '') if part))
  return converted


def from_hf_state(state, num_layers, num_heads, path='the HF weights', qkv_bias=True):
  """HF ViT tensors (legacy names) -> flat vit_jax params; UserError lists missing/extra keys."""
  state = dict(state)
  state.pop('vit.embeddings.mask_token', None)  # Masked-image-modelling only; never used here.
  pairs = _key_pairs(num_layers, num_heads, qkv_bias)
  for hf_dense, our_dense in (('vit.pooler.dense', 'pre_logits'), ('classifier', 'head')):
    if hf_dense + '.weight' in state:  # Both optional: a bare ViTModel has no classifier.
      pairs += _dense_pairs(hf_dense, our_dense)
  return _move(state, pairs, to_ours=True,
               what=f'{path} is not a ViT with {num_layers} layers as its config says')


# ---------------------------------------------------------------------------------------------
# Writing.


def check_writable(model_kwargs):
  """Raises UserError unless `ViTForImageClassification` computes what this model computes."""
  if 'num_heads' not in model_kwargs:
    raise UserError('HuggingFace ViTForImageClassification holds only ViTs; this model has no '
                    'attention heads (a Mixer?); write npz instead')
  problems = []
  if model_kwargs.get('classifier', 'token') != 'token':
    problems.append(f"classifier={model_kwargs['classifier']!r} (HF ViT pools the class token: "
                    "needs 'token')")
  for key, plain in (('representation_size', None), ('num_registers', 0), ('qk_norm', False),
                     ('layer_scale_init', None), ('resnet_layers', None), ('fc_norm', False),
                     ('no_embed_class', False), ('pre_norm', False), ('distilled', False)):
    if model_kwargs.get(key, plain) != plain:
      problems.append(f'{key}={model_kwargs[key]!r} (HF ViT has none)')
  if model_kwargs.get('posemb', 'learn') != 'learn':
    problems.append(f"posemb={model_kwargs['posemb']!r} (HF ViT needs learned: 'learn')")
  if not model_kwargs.get('num_classes'):
    problems.append('num_classes=None (ViTForImageClassification needs a head)')
  if problems:
    raise UserError('cannot write this model as a HuggingFace ViTForImageClassification: '
                    + '; '.join(problems) + '; write npz instead')


def to_hf_state(params, num_layers, num_heads, qkv_bias=True):
  """Flat per-layer vit_jax params -> HF ViTForImageClassification tensors (legacy names)."""
  pairs = _key_pairs(num_layers, num_heads, qkv_bias) + _dense_pairs('classifier', 'head')
  return _move(params, pairs, to_ours=False,
               what=f'the parameters are not a ViT-for-HF with {num_layers} layers')


def hf_config(model_kwargs, image_size, num_channels, class_names=None):
  """config.json contents for `ViTForImageClassification` equal to the vit_jax model."""
  patch_h, patch_w = model_kwargs['patch_size']
  num_classes = model_kwargs['num_classes']
  if class_names is None or len(class_names) != num_classes:
    class_names = [f'LABEL_{i}' for i in range(num_classes)]
  return {
      'architectures': ['ViTForImageClassification'],
      'model_type': 'vit',
      'hidden_size': int(model_kwargs['hidden_size']),
      'num_hidden_layers': int(model_kwargs['num_layers']),
      'num_attention_heads': int(model_kwargs['num_heads']),
      'intermediate_size': int(model_kwargs['mlp_dim']),
      'hidden_act': (WRITTEN_TANH_GELU if model_kwargs.get('gelu_approximate', True)
                     else EXACT_GELU),
      'hidden_dropout_prob': float(model_kwargs.get('dropout_rate', 0.0)),
      'attention_probs_dropout_prob': float(model_kwargs.get('attention_dropout_rate', 0.0)),
      'layer_norm_eps': float(model_kwargs.get('layer_norm_eps', 1e-6)),
      'image_size': int(image_size),
      'patch_size': int(patch_h) if patch_h == patch_w else [int(patch_h), int(patch_w)],
      'num_channels': int(num_channels),
      'qkv_bias': bool(model_kwargs.get('qkv_bias', True)),
      'encoder_stride': int(patch_h),
      'id2label': {str(i): str(name) for i, name in enumerate(class_names)},
      'label2id': {str(name): i for i, name in enumerate(class_names)},
  }


def write(params, model_kwargs, path, image_size, class_names=None):
  """Writes flat per-layer vit_jax params as an HF ViT directory, atomically (no PyTorch).

  Arrays are written as float32 (bfloat16 upcast exactly), the dtype HF loads by default.
  """
  check_writable(model_kwargs)
  params = {key: value.astype(np.float32) if value.dtype.name == 'bfloat16' else value
            for key, value in tree.to_numpy(params).items()}
  state = to_hf_state(params, int(model_kwargs['num_layers']), int(model_kwargs['num_heads']),
                      bool(model_kwargs.get('qkv_bias', True)))
  config = hf_config(model_kwargs, image_size,
                     num_channels=state[_EMB + 'patch_embeddings.projection.weight'].shape[1],
                     class_names=class_names)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f'{path} is a file; an HF model is a directory: give a directory path')
  if os.path.isdir(path) and os.listdir(path) and not is_hf_dir(path):
    # Replacing it would delete whatever else is there.
    raise UserError(f'{path} exists and is not an HF model directory; give a new or empty one')
  with tree.atomic_output(path, is_dir=True) as tmp:
    safetensors.numpy.save_file(state, os.path.join(tmp, WEIGHTS_FILE),
                                metadata={'format': 'pt'})
    with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True)
      f.write('\n')
