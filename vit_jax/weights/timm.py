"""timm ViT state dicts: `.safetensors` (and `.pth` / `.bin` with PyTorch) <-> the vit_jax layout.

A timm checkpoint is `model.state_dict()` of `timm.models.VisionTransformer` (or DeiT's
`VisionTransformerDistilled`). Its keys and shapes do not say everything: the head count, the
GELU form, the LayerNorm epsilon and, with a class token, token vs mean pooling are not stored.
So reading takes a description, from (later ones win):
  1. a timm model name: `config.json` beside the file (a timm hub folder: `architecture`,
     `num_classes`, `global_pool`, `model_args`, `pretrained_cfg.input_size`) or `timm_model`;
  2. the constructor kwargs: `model_args` in that config.json, `timm_kwargs` in `NAME.json`
     beside `NAME.safetensors` (what `write` leaves there), or `timm_args` from the caller.
A description is timm's constructor call: what it leaves out is timm's default (exact GELU,
eps 1e-6, token pooling, ...). The class count and image size, when not stated, come from the
head and position-embedding shapes. Without any description that gives the head count, reading
stops and asks for one. Everything stored must then be what timm would build from that
description: any missing, unexpected or mis-shaped key is an error naming the keys, and so is
any layer vit_jax has no equivalent of (SwiGLU, a conv stem, ...) or does not convert yet (timm's
RoPE, though `vit_jax/models/rope.py` has its own). The description also may carry
`layer_norm_eps`, which timm can only take as a `norm_layer` object.

The two layouts (timm's torch Linear weights are (out, in)):
  timm                              vit_jax
  patch_embed.proj.weight (D,C,P,P) embedding/kernel (P, P, C, D)
  cls_token, dist_token, reg_token  cls, dist, registers
  pos_embed                         Transformer/posembed_input/pos_embedding
  norm_pre, norm, fc_norm           Transformer/pre_norm, Transformer/encoder_norm, fc_norm
  blocks.{i}.norm1 / norm2          Transformer/encoderblock_{i}/LayerNorm_0 / LayerNorm_2
  blocks.{i}.attn.qkv (3D, D)       .../MultiHeadDotProductAttention_1/{query,key,value} (D,h,d)
  blocks.{i}.attn.{q,k}_norm        .../MultiHeadDotProductAttention_1/{query,key}_norm
  blocks.{i}.attn.proj (D, D)       .../MultiHeadDotProductAttention_1/out (h, d, D)
  blocks.{i}.ls1 / ls2.gamma        .../layer_scale_1 / layer_scale_2
  blocks.{i}.mlp.fc1 / fc2          .../MlpBlock_3/Dense_0 / Dense_1
  attn_pool.latent, q, kv, proj     MAPHead_0/probe, MultiHeadDotProductAttention_0/query,
                                    key + value, out
  attn_pool.norm, mlp               MAPHead_0/LayerNorm_0, MlpBlock_0
  head, head_dist                   head, head_dist
One table (`_layout`) serves both directions, so reading and writing cannot drift apart.
"""

import json
import os
import re

import numpy as np
from safetensors import SafetensorError
import safetensors.numpy

from vit_jax.errors import UserError
from vit_jax.weights import tree

SUFFIXES = ('.safetensors', '.pth', '.pt', '.bin')
HUB_CONFIG = 'config.json'
HUB_WEIGHTS = ('model.safetensors', 'pytorch_model.bin')
VIT_CLASS = 'timm.models.vision_transformer.VisionTransformer'
DISTILLED_CLASS = 'timm.models.deit.VisionTransformerDistilled'

# timm's VisionTransformer defaults for the arguments that shape the weights or the function.
TIMM_DEFAULTS = dict(
    img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool='token',
    embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, qk_norm=False,
    proj_bias=True, init_values=None, class_token=True, pos_embed='learn', no_embed_class=False,
    reg_tokens=0, pre_norm=False, final_norm=True, fc_norm=None, pool_include_prefix=False,
    act_layer=None, norm_layer=None, scale_attn_norm=False, scale_mlp_norm=False,
    embed_norm_layer=None)
# Arguments that change only training or the input handling, never the weights or eval logits.
IGNORED_ARGS = ('drop_rate', 'pos_drop_rate', 'patch_drop_rate', 'proj_drop_rate',
                'attn_drop_rate', 'drop_path_rate', 'weight_init', 'fix_init',
                'dynamic_img_size', 'dynamic_img_pad', 'device', 'dtype', 'pretrained_cfg',
                'pretrained_cfg_overlay', 'features_only', 'out_indices')
EXTRA_ARGS = ('layer_norm_eps',)  # Ours: what timm takes as a norm_layer object.
GELUS = {None: False, 'gelu': False, 'gelu_tanh': True}  # act_layer -> gelu_approximate
NORMS = (None, 'layernorm')
POOLS = {'token': 'token', 'avg': 'gap', 'map': 'map'}  # timm global_pool -> classifier

# timm model names whose constructor arguments are fixed by the name (`vit_base_patch16_224`,
# `deit_small_distilled_patch16_224`, `deit3_base_patch16_384`, `vit_small_patch14_reg4_dinov2`),
# with an optional pretrained tag (`.augreg_in21k`). Others need model_args / timm_args.
_SIZES = {'tiny': (192, 12, 3), 'small': (384, 12, 6), 'medium': (512, 12, 8),
          'base': (768, 12, 12), 'large': (1024, 24, 16), 'huge': (1280, 32, 16)}


def _sized(size, patch, **args):
  embed_dim, depth, num_heads = _SIZES[size]
  return dict(patch_size=int(patch), embed_dim=embed_dim, depth=depth, num_heads=num_heads,
              **args)


# The image size is left to the stored position embeddings (timm's own default follows the
# pretrained tag: 518 for DINOv2).
_NAMES = (  # (pattern, match -> kwargs)
    (re.compile(r'^vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)$'),
     lambda m: _sized(m[1], m[2], distilled=False)),
    (re.compile(r'^deit_(tiny|small|base)_(distilled_)?patch(16)_(224|384)$'),
     lambda m: _sized(m[1], m[3], distilled=bool(m[2]))),
    (re.compile(r'^deit3_(small|medium|base|large|huge)_patch(14|16)_(224|384)$'),
     lambda m: _sized(m[1], m[2], no_embed_class=True, init_values=1e-6, distilled=False)),
    (re.compile(r'^vit_(small|base|large)_patch(14)_(reg4_)?dinov2$'),
     lambda m: _sized(m[1], m[2], init_values=1e-5, distilled=False,
                      **(dict(reg_tokens=4, no_embed_class=True) if m[3] else {}))),
)
_NEEDS_DESCRIPTION = ('a timm state dict does not store its number of attention heads, GELU form '
                      'or pooling')
# Keys of layers vit_jax has no equivalent of or does not convert yet, named in the refusal.
_UNSUPPORTED = (
    (re.compile(r'\.mlp\.fc1_[gx]\.|\.mlp\.w12\.'), 'a SwiGLU MLP'),
    (re.compile(r'rope|freqs'), 'rotary position embeddings (RoPE: not converted yet)'),
    (re.compile(r'^patch_embed\.backbone\.|^stem\.'), 'a convolutional stem'),
    (re.compile(r'^patch_embed\.norm\.'), 'a patch-embedding norm'),
    (re.compile(r'\.attn\.norm\.|\.mlp\.norm\.'), 'scale norms inside the blocks'),
    (re.compile(r'\.attn\.gate\.'), 'gated attention'),
    (re.compile(r'mask_token'), 'a mask token'),
    (re.compile(r'\.attn\.(q|k|v)_proj\.|\.attn\.(q|v)_bias'), 'split or BEiT-style attention'),
)


# ---------------------------------------------------------------------------------------------
# Descriptions: what the file does not store.


def name_args(name):
  """Constructor kwargs fixed by a timm model name (a pretrained tag is dropped), or None."""
  base = name.split('.')[0]
  for pattern, args in _NAMES:
    match = pattern.match(base)
    if match:
      return args(match)
  return None


def _unknown_name(name, source):
  return UserError(f'{source}: timm model {name!r} is not one whose arguments vit_jax knows '
                   '(vit_<tiny|small|base|large|huge>_patch<P>_<size>, '
                   'deit_<size>_[distilled_]patch16_<size>, deit3_..., '
                   'vit_<size>_patch14_[reg4_]dinov2); give its constructor kwargs '
                   '(model_args in config.json, or timm_args / --timm_args)')


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {path}: {e}') from None


def sidecar_path(path):
  """`NAME.json` beside `NAME.safetensors`: the description `write` leaves with the weights."""
  return os.path.splitext(path)[0] + '.json'


def describe(path, timm_model=None, timm_args=None):
  """The description of the timm checkpoint at `path` from the files beside it and the caller.

  Returns:
    (args, notes): args a dict of timm constructor kwargs (only those stated, plus
    `distilled` when the class or name says, and `layer_norm_eps` when given); notes a dict with
    `sources` (where each part came from), `class_names` and `unknown_name` (an error for a
    model name vit_jax does not know, raised only if nothing else gives the head count).
  """
  args, sources, class_names, unknown_name = {}, [], None, None

  def add_name(name, source):
    nonlocal unknown_name
    named = name_args(name)
    if named is None:
      unknown_name = _unknown_name(name, source)
    else:
      args.update(named)

  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  hub_path = os.path.join(folder, HUB_CONFIG)
  hub = _read_json(hub_path) if os.path.isfile(hub_path) else None
  if isinstance(hub, dict) and 'architecture' in hub and 'model_type' not in hub:
    add_name(str(hub['architecture']), hub_path)
    model_args = hub.get('model_args') or {}
    args.update(model_args)
    for key in ('num_classes', 'global_pool'):
      if key in hub:
        args[key] = hub[key]
    input_size = (hub.get('pretrained_cfg') or {}).get('input_size')
    if input_size and 'img_size' not in model_args:
      args['img_size'] = (input_size[1] if input_size[1] == input_size[2]
                          else list(input_size[1:]))
    if isinstance(hub.get('label_names'), list):
      class_names = [str(label) for label in hub['label_names']]
    sources.append(hub_path)
  sidecar = sidecar_path(path)
  described = None
  if not os.path.isdir(path) and os.path.isfile(sidecar):
    described = _read_json(sidecar)
  if isinstance(described, dict) and 'timm_kwargs' in described:
    args.update(described['timm_kwargs'])
    timm_class = described.get('timm_class', VIT_CLASS)
    if timm_class not in (VIT_CLASS, DISTILLED_CLASS):
      raise UserError(f'{sidecar}: timm_class {timm_class!r} is not a ViT vit_jax reads; '
                      f'valid: {VIT_CLASS}, {DISTILLED_CLASS}')
    args['distilled'] = timm_class == DISTILLED_CLASS
    if 'layer_norm_eps' in described:
      args['layer_norm_eps'] = described['layer_norm_eps']
    if isinstance(described.get('class_names'), list):
      class_names = [str(name) for name in described['class_names']]
    sources.append(sidecar)
  if timm_model:
    add_name(timm_model, 'timm_model')
    sources.append(f'timm_model={timm_model}')
  if timm_args:
    if not isinstance(timm_args, dict):
      raise UserError(f'timm_args must be a dict of timm constructor kwargs, got {timm_args!r}')
    args.update(timm_args)
    sources.append('timm_args')
  return args, {'sources': sources, 'class_names': class_names, 'unknown_name': unknown_name}


def _stored(state):
  """What the keys and shapes say about the constructor arguments."""
  facts = dict(class_token='cls_token' in state, distilled='dist_token' in state,
               reg_tokens=int(state['reg_token'].shape[1]) if 'reg_token' in state else 0,
               qkv_bias='blocks.0.attn.qkv.bias' in state,
               qk_norm='blocks.0.attn.q_norm.weight' in state,
               pre_norm='norm_pre.weight' in state, fc_norm='fc_norm.weight' in state,
               num_classes=int(state['head.weight'].shape[0]) if 'head.weight' in state else 0)
  if 'blocks.0.ls1.gamma' in state:
    facts['init_values'] = 1e-5  # Only the init of a fresh model: the stored values are used.
  proj = state.get('patch_embed.proj.weight')
  if proj is not None and proj.ndim == 4:
    width, channels, patch_h, patch_w = proj.shape
    facts.update(embed_dim=int(width), in_chans=int(channels),
                 patch_size=int(patch_h) if patch_h == patch_w else [int(patch_h), int(patch_w)])
    fc1 = state.get('blocks.0.mlp.fc1.weight')
    if fc1 is not None and fc1.ndim == 2:
      facts.update(mlp_ratio=fc1.shape[0] / width, mlp_dim=int(fc1.shape[0]))
  blocks = {int(m[1]) for m in map(re.compile(r'^blocks\.(\d+)\.').match, state) if m}
  if blocks:
    facts['depth'] = max(blocks) + 1
  return facts


def _describe_hint(source):
  return (f'a timm hub config.json or {os.path.basename(sidecar_path(source))} (with '
          "timm_kwargs) beside it, or timm_model='vit_base_patch16_224' / "
          "timm_args={'num_heads': ...} (--timm_model / --timm_args)")


def resolve(stated, state, source, unknown_name=None):
  """Full timm kwargs for a state dict and its description.

  Each argument is, in this order of preference: stated by the description; read from the
  keys and shapes (width, depth, patch, MLP ratio, tokens, biases, norms, class count); timm's
  constructor default for what no key holds (GELU form, eps, token pooling with a class token).
  Where neither says and a default would be a guess (the pooling of a model without a class
  token; mean vs token pooling beside an fc_norm), UserError asks for it, as it does for
  anything vit_jax cannot hold. The stored keys are checked against the result afterwards.
  """
  if 'num_heads' not in stated:
    if unknown_name is not None:
      raise unknown_name
    raise UserError(f'{source}: {_NEEDS_DESCRIPTION}; describe it: {_describe_hint(source)}')
  unknown = sorted(set(stated) - set(TIMM_DEFAULTS) - set(IGNORED_ARGS) - set(EXTRA_ARGS)
                   - {'distilled'})
  if unknown:
    raise UserError(f'{source}: timm arguments {", ".join(unknown)} have no vit_jax equivalent '
                    '(only a plain VisionTransformer / DeiT is read)')
  stated = {k: v for k, v in stated.items()
            if k not in IGNORED_ARGS and not (k == 'distilled' and v is None)}
  facts = _stored(state)
  if 'mlp_ratio' in stated:
    facts.pop('mlp_dim', None)  # timm's int(embed_dim * mlp_ratio) then.
  args = {**TIMM_DEFAULTS, **facts, **stated}
  args['layer_norm_eps'] = float(args.get('layer_norm_eps', 1e-6))
  if 'global_pool' not in stated:
    if 'attn_pool.latent' in state:
      args['global_pool'] = 'map'
    elif not args['class_token'] or args['fc_norm']:
      raise UserError(f'{source}: its pooling is not stored (no class token, or a class token '
                      'beside an fc_norm); state global_pool (token, avg or map) in the '
                      f'description: {_describe_hint(source)}')
  if args['fc_norm'] is None:  # timm: fc_norm follows the pooling.
    args['fc_norm'] = args['global_pool'] in ('avg', 'avgmax', 'max')
  if 'no_embed_class' not in stated:
    args['no_embed_class'] = _stored_no_embed_class(args, state, 'img_size' in stated, source)
  _check_holdable(args, source)
  if 'img_size' not in stated and 'pos_embed' in state:
    args['img_size'] = _image_size(args, state['pos_embed'].shape, source)
  return args


def _stored_no_embed_class(args, state, size_stated, source):
  """Whether the class / distillation / register tokens lack position embeddings, from the
  length of pos_embed: the grid alone, or the grid plus those tokens."""
  prefix = int(bool(args['class_token'])) + int(bool(args['distilled'])) + args['reg_tokens']
  if not prefix or 'pos_embed' not in state:
    return False
  tokens = state['pos_embed'].shape[1]
  if size_stated:
    return tokens == _grid_tokens(args)
  is_square = lambda n: n > 0 and int(round(n ** 0.5)) ** 2 == n
  if is_square(tokens) != is_square(tokens - prefix):
    return is_square(tokens)
  raise UserError(f'{source}: pos_embed {tuple(state["pos_embed"].shape)} does not say whether '
                  f'the {prefix} class/register tokens have position embeddings; state '
                  'no_embed_class or img_size in the description')


def _check_holdable(args, source):
  problems = []
  def need(key, valid, why=''):
    if args[key] not in valid:
      problems.append(f'{key}={args[key]!r}{why} (valid: {", ".join(map(repr, valid))})')
  need('global_pool', tuple(POOLS))
  need('act_layer', tuple(GELUS))
  need('norm_layer', NORMS)
  need('pos_embed', ('learn',))
  for key in ('proj_bias', 'final_norm'):
    need(key, (True,))
  for key in ('pool_include_prefix', 'scale_attn_norm', 'scale_mlp_norm'):
    need(key, (False,))
  need('embed_norm_layer', (None,))
  if args['class_token'] and args['global_pool'] != 'token':
    problems.append(f"class_token=True with global_pool={args['global_pool']!r} (vit_jax pools "
                    'the class token, or has none)')
  if not args['class_token'] and args['global_pool'] == 'token':
    problems.append("global_pool='token' without a class token")
  if args['reg_tokens'] and not args['no_embed_class']:
    problems.append('reg_tokens with position embeddings on them (no_embed_class=False)')
  if args['distilled'] and (args['reg_tokens'] or args['global_pool'] != 'token'
                            or args['fc_norm']):
    problems.append('a distilled model with registers, fc_norm or pooling other than token')
  if problems:
    raise UserError(f'{source}: vit_jax cannot hold this timm model: ' + '; '.join(problems))


def _prefix_with_posemb(args):
  if args['no_embed_class']:
    return 0
  return int(bool(args['class_token'])) + int(bool(args['distilled'])) + args['reg_tokens']


def _patch(args):
  patch = args['patch_size']
  return (patch, patch) if isinstance(patch, int) else tuple(patch)


def _image_size(args, posemb_shape, source):
  grid_tokens = posemb_shape[1] - _prefix_with_posemb(args)
  side = int(round(max(grid_tokens, 0) ** 0.5))
  patch_h, patch_w = _patch(args)
  if side * side != grid_tokens or patch_h != patch_w:
    raise UserError(f'{source}: pos_embed {tuple(posemb_shape)} is not a square grid; state '
                    'img_size in the description')
  return side * patch_h


def _grid_tokens(args):
  image = args['img_size']
  image_h, image_w = (image, image) if isinstance(image, int) else tuple(image)
  patch_h, patch_w = _patch(args)
  return (image_h // patch_h) * (image_w // patch_w)


def model_kwargs_from(args, mlp_dim):
  """vit_jax `VisionTransformer` fields for resolved timm kwargs."""
  return dict(
      patch_size=_patch(args), hidden_size=int(args['embed_dim']), num_layers=int(args['depth']),
      num_heads=int(args['num_heads']), mlp_dim=int(mlp_dim),
      classifier=POOLS[args['global_pool']], num_registers=int(args['reg_tokens']),
      representation_size=None, layer_scale_init=args['init_values'] or None,
      qk_norm=bool(args['qk_norm']), gelu_approximate=GELUS[args['act_layer']],
      layer_norm_eps=args['layer_norm_eps'], fc_norm=bool(args['fc_norm']),
      no_embed_class=bool(args['no_embed_class']), qkv_bias=bool(args['qkv_bias']),
      pre_norm=bool(args['pre_norm']), distilled=bool(args['distilled']),
      num_classes=int(args['num_classes']) or None)


# ---------------------------------------------------------------------------------------------
# The layout: one entry per timm tensor.


def _layout(args, mlp_dim):
  """[(timm key, timm shape, our keys, timm -> ours, ours -> timm)] for resolved timm kwargs.

  `timm -> ours` maps one array to a tuple (one per our key); `ours -> timm` the reverse.
  """
  width, heads, depth = int(args['embed_dim']), int(args['num_heads']), int(args['depth'])
  head_dim = width // heads
  patch_h, patch_w = _patch(args)
  channels = int(args['in_chans'])
  entries = []

  def add(timm_key, shape, ours, to_ours=lambda x: (x,), to_timm=lambda x: x):
    entries.append((timm_key, tuple(shape), (ours,) if isinstance(ours, str) else tuple(ours),
                    to_ours, to_timm))

  transposed = dict(to_ours=lambda w: (w.T,), to_timm=lambda k: k.T)
  def heads_in(n):  # (n * D, D) Linear over the input -> n (D, heads, head_dim) kernels.
    return dict(to_ours=lambda w: tuple(part.T.reshape(width, heads, head_dim)
                                        for part in np.split(w, n)),
                to_timm=lambda *ks: np.concatenate([k.reshape(width, width).T for k in ks]))
  def heads_bias(n):
    return dict(to_ours=lambda b: tuple(part.reshape(heads, head_dim) for part in np.split(b, n)),
                to_timm=lambda *bs: np.concatenate([b.reshape(-1) for b in bs]))
  out_kernel = dict(to_ours=lambda w: (w.T.reshape(heads, head_dim, width),),
                    to_timm=lambda k: k.reshape(width, width).T)
  def norm(timm_name, ours, size=width):
    add(f'{timm_name}.weight', (size,), f'{ours}/scale')
    add(f'{timm_name}.bias', (size,), f'{ours}/bias')
  def linear(timm_name, ours, out_features, in_features):
    add(f'{timm_name}.weight', (out_features, in_features), f'{ours}/kernel', **transposed)
    add(f'{timm_name}.bias', (out_features,), f'{ours}/bias')
  def mlp(timm_name, ours):
    linear(f'{timm_name}.fc1', f'{ours}/Dense_0', mlp_dim, width)
    linear(f'{timm_name}.fc2', f'{ours}/Dense_1', width, mlp_dim)

  add('patch_embed.proj.weight', (width, channels, patch_h, patch_w), 'embedding/kernel',
      to_ours=lambda w: (w.transpose(2, 3, 1, 0),), to_timm=lambda k: k.transpose(3, 2, 0, 1))
  if not args['pre_norm']:
    add('patch_embed.proj.bias', (width,), 'embedding/bias')
  if args['class_token']:
    add('cls_token', (1, 1, width), 'cls')
  if args['distilled']:
    add('dist_token', (1, 1, width), 'dist')
  if args['reg_tokens']:
    add('reg_token', (1, args['reg_tokens'], width), 'registers')
  add('pos_embed', (1, _prefix_with_posemb(args) + _grid_tokens(args), width),
      'Transformer/posembed_input/pos_embedding')
  if args['pre_norm']:
    norm('norm_pre', 'Transformer/pre_norm')
  for i in range(depth):
    timm_block, block = f'blocks.{i}.', f'Transformer/encoderblock_{i}/'
    attention = block + 'MultiHeadDotProductAttention_1/'
    norm(timm_block + 'norm1', block + 'LayerNorm_0')
    add(timm_block + 'attn.qkv.weight', (3 * width, width),
        [attention + f'{name}/kernel' for name in ('query', 'key', 'value')], **heads_in(3))
    if args['qkv_bias']:
      add(timm_block + 'attn.qkv.bias', (3 * width,),
          [attention + f'{name}/bias' for name in ('query', 'key', 'value')], **heads_bias(3))
    if args['qk_norm']:
      norm(timm_block + 'attn.q_norm', attention + 'query_norm', head_dim)
      norm(timm_block + 'attn.k_norm', attention + 'key_norm', head_dim)
    add(timm_block + 'attn.proj.weight', (width, width), attention + 'out/kernel', **out_kernel)
    add(timm_block + 'attn.proj.bias', (width,), attention + 'out/bias')
    if args['init_values']:  # As timm: 0 or None is no layer scale.
      add(timm_block + 'ls1.gamma', (width,), block + 'layer_scale_1')
      add(timm_block + 'ls2.gamma', (width,), block + 'layer_scale_2')
    norm(timm_block + 'norm2', block + 'LayerNorm_2')
    mlp(timm_block + 'mlp', block + 'MlpBlock_3')
  if args['fc_norm']:
    norm('fc_norm', 'fc_norm')
  else:
    norm('norm', 'Transformer/encoder_norm')
  if args['global_pool'] == 'map':
    pool, attention = 'MAPHead_0/', 'MAPHead_0/MultiHeadDotProductAttention_0/'
    add('attn_pool.latent', (1, 1, width), pool + 'probe')
    add('attn_pool.q.weight', (width, width), attention + 'query/kernel', **heads_in(1))
    add('attn_pool.q.bias', (width,), attention + 'query/bias', **heads_bias(1))
    add('attn_pool.kv.weight', (2 * width, width),
        [attention + 'key/kernel', attention + 'value/kernel'], **heads_in(2))
    add('attn_pool.kv.bias', (2 * width,), [attention + 'key/bias', attention + 'value/bias'],
        **heads_bias(2))
    add('attn_pool.proj.weight', (width, width), attention + 'out/kernel', **out_kernel)
    add('attn_pool.proj.bias', (width,), attention + 'out/bias')
    norm('attn_pool.norm', pool + 'LayerNorm_0')
    mlp('attn_pool.mlp', pool + 'MlpBlock_0')
  if args['num_classes']:
    linear('head', 'head', args['num_classes'], width)
    if args['distilled']:
      linear('head_dist', 'head_dist', args['num_classes'], width)
  return entries


def _mlp_dim(args):
  """The MLP width: as stored, else int(embed_dim * mlp_ratio) as timm computes it."""
  return args.get('mlp_dim') or int(args['embed_dim'] * args['mlp_ratio'])


def _summarise(keys, detail=lambda key: ''):
  """Sorted keys with per-block repeats folded: `blocks.{0..11}.attn.qkv.weight`.

  Keys fold together only when `detail(key)` (e.g. their shapes) is the same.
  """
  groups = {}
  for key in keys:
    match = re.match(r'^(blocks\.)(\d+)(\..*)$', key)
    pattern = match[1] + '{}' + match[3] if match else key
    groups.setdefault((pattern, detail(key)), []).append(int(match[2]) if match else None)
  parts = []
  for (pattern, text_after), ids in sorted(groups.items()):
    if ids == [None]:
      parts.append(pattern + text_after)
    else:
      ids = sorted(ids)
      text = str(ids[0]) if len(ids) == 1 else (
          f'{{{ids[0]}..{ids[-1]}}}' if ids == list(range(ids[0], ids[-1] + 1))
          else '{' + ','.join(map(str, ids)) + '}')
      parts.append(pattern.replace('{}', text, 1) + text_after)
  return ', '.join(parts)


def _mismatch(state, entries, source, args):
  """UserError naming every missing, unexpected and mis-shaped key, or None when they match."""
  expected = {key: shape for key, shape, *_ in entries}
  missing = sorted(set(expected) - set(state))
  unexpected = sorted(set(state) - set(expected))
  misshaped = sorted(key for key in set(state) & set(expected)
                     if tuple(state[key].shape) != expected[key])
  if not (missing or unexpected or misshaped):
    return None
  features = sorted({what for pattern, what in _UNSUPPORTED for key in unexpected
                     if pattern.search(key)})
  parts = []
  if features:
    parts.append('it has ' + ', '.join(features) + ', which vit_jax cannot read')
  if missing:
    parts.append('missing ' + _summarise(missing))
  if unexpected:
    parts.append('unexpected ' + _summarise(unexpected))
  if misshaped:
    parts.append('wrong shape ' + _summarise(misshaped, lambda key: (
        f' {tuple(state[key].shape)} (expected {expected[key]})')))
  shown = {k: args[k] for k in ('embed_dim', 'depth', 'num_heads', 'mlp_ratio', 'global_pool',
                                'class_token', 'reg_tokens', 'no_embed_class', 'distilled')}
  return UserError(f'{source} is not the timm ViT its description gives ({shown}): '
                   + '; '.join(parts))


# ---------------------------------------------------------------------------------------------
# Reading.


def is_hub_dir(path):
  """A timm hub folder: config.json with `architecture`, and weights beside it."""
  config = os.path.join(path, HUB_CONFIG)
  if not (os.path.isdir(path) and os.path.isfile(config)):
    return False
  try:
    with open(config) as f:
      content = json.load(f)
  except (OSError, ValueError):
    return False
  return (isinstance(content, dict) and 'architecture' in content and 'model_type' not in content
          and any(os.path.isfile(os.path.join(path, name)) for name in HUB_WEIGHTS))


def weights_file(path):
  """The weights file of a path: the file itself, or the weights in a timm hub folder."""
  if not os.path.isdir(path):
    return path
  for name in HUB_WEIGHTS:
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  raise UserError(f'{path} has none of {", ".join(HUB_WEIGHTS)}')


def read_state_dict(path):
  """A timm checkpoint's tensors as `{key: np.ndarray}` (PyTorch needed for .pth / .bin only)."""
  if path.endswith('.safetensors'):
    try:
      return safetensors.numpy.load_file(path)
    except (OSError, SafetensorError, ValueError, TypeError) as e:
      raise UserError(f'cannot read {path} as safetensors: {e}') from None
  try:
    import torch
  except ImportError:
    raise UserError(f'reading {path} needs PyTorch (pip install torch); or save the state dict '
                    'as .safetensors, which needs none') from None
  try:
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pickle, zip and torch errors alike.
    raise UserError(f'cannot read {path} as a PyTorch state dict: '
                    f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from None
  for wrapper in ('model', 'state_dict'):  # Training checkpoints, as timm unwraps them.
    if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
      loaded = loaded[wrapper]
  if not isinstance(loaded, dict):
    raise UserError(f'{path} holds a {type(loaded).__name__}, not a state dict')
  if loaded and all(str(key).startswith('module.') for key in loaded):
    loaded = {key[len('module.'):]: value for key, value in loaded.items()}
  state = {}
  for key, value in loaded.items():
    if not isinstance(value, torch.Tensor):
      raise UserError(f'{path}: {key!r} is a {type(value).__name__}, not a tensor; give the '
                      "model's state dict")
    value = value.detach().cpu()
    state[key] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
  return state


def read(path, timm_model=None, timm_args=None):
  """Reads a timm ViT checkpoint into the vit_jax layout.

  Args:
    path: a `.safetensors` (or, with PyTorch, `.pth` / `.bin`) state dict, or a timm hub folder.
    timm_model, timm_args: the description from the caller (see the module docstring).

  Returns:
    (params, metadata): params a flat `{'a/b': np.ndarray}`; metadata has `format`,
    `model_kwargs` (fields for `VisionTransformer`), `image_size` (None when not square),
    `class_names` (from the description, or None), `timm_kwargs` (resolved) and `sources`.
  """
  file = weights_file(path)
  state = read_state_dict(file)
  stated, notes = describe(path, timm_model, timm_args)
  args = resolve(stated, state, file, notes['unknown_name'])
  mlp_dim = _mlp_dim(args)
  entries = _layout(args, mlp_dim)
  error = _mismatch(state, entries, file, args)
  if error:
    raise error
  params = {}
  for timm_key, _, our_keys, to_ours, _ in entries:
    for our_key, value in zip(our_keys, to_ours(np.asarray(state[timm_key]))):
      params[our_key] = np.ascontiguousarray(value)
  image = args['img_size']
  image_size = image if isinstance(image, int) else (
      image[0] if len(set(image)) == 1 else None)
  num_classes = args['num_classes']
  class_names = notes['class_names']
  if class_names is not None and len(class_names) != num_classes:
    class_names = None
  return params, {'format': 'timm', 'model_kwargs': model_kwargs_from(args, mlp_dim),
                  'image_size': image_size, 'class_names': class_names,
                  'timm_kwargs': _public_args(args), 'sources': notes['sources']}


def _public_args(args):
  """Resolved kwargs as timm's constructor takes them: the non-default ones plus the sizes."""
  always = ('img_size', 'patch_size', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio',
            'num_classes')
  return {key: (list(value) if isinstance(value, tuple) else value)
          for key, value in args.items()
          if key in TIMM_DEFAULTS and (key in always or value != TIMM_DEFAULTS[key])
          # fc_norm None is timm's "True with mean pooling": say it whenever it is on.
          and not (key == 'fc_norm' and not value and args['global_pool'] == 'token')}


# ---------------------------------------------------------------------------------------------
# Writing.


def timm_args_for(model_kwargs, image_size, in_chans=3):
  """timm constructor kwargs equal to a vit_jax ViT; UserError naming what timm cannot hold."""
  if 'num_heads' not in model_kwargs:
    raise UserError('timm state dicts hold ViTs; this model has no attention heads (a Mixer?); '
                    'write npz instead')
  kw = model_kwargs
  problems = []
  for key, plain in (('representation_size', None), ('resnet_layers', None)):
    if kw.get(key, plain) != plain:
      problems.append(f'{key}={kw[key]!r} (timm ViT has none)')
  if kw.get('posemb', 'learn') != 'learn':
    problems.append(f"posemb={kw['posemb']!r} (timm stores learned embeddings: 'learn')")
  classifier = kw.get('classifier', 'token')
  if classifier not in POOLS.values():
    problems.append(f'classifier={classifier!r} (valid: token, gap, map)')
  width, mlp_dim = int(kw['hidden_size']), int(kw['mlp_dim'])
  mlp_ratio = mlp_dim / width
  if int(width * mlp_ratio) != mlp_dim:
    problems.append(f'mlp_dim={mlp_dim} (timm computes int(embed_dim * mlp_ratio), which no '
                    f'ratio makes {mlp_dim} for width {width})')
  if kw.get('layer_scale_init') is not None and not kw['layer_scale_init']:
    problems.append('layer_scale_init=0 (timm reads 0 as no layer scale)')
  if kw.get('distilled') and kw.get('num_registers'):
    problems.append('a distilled model with registers (timm\'s DeiT ignores them)')
  if problems:
    raise UserError('cannot write this model as a timm state dict: ' + '; '.join(problems)
                    + '; write npz instead')
  patch_h, patch_w = kw['patch_size']
  has_prefix = classifier == 'token'
  # Registers never have position embeddings here: timm holds that only as no_embed_class.
  no_embed_class = bool(kw.get('no_embed_class')) or bool(kw.get('num_registers'))
  args = {
      **TIMM_DEFAULTS,
      'img_size': image_size, 'patch_size': patch_h if patch_h == patch_w else [patch_h, patch_w],
      'in_chans': in_chans, 'num_classes': kw.get('num_classes') or 0,
      'global_pool': {v: k for k, v in POOLS.items()}[classifier], 'embed_dim': width,
      'depth': int(kw['num_layers']), 'num_heads': int(kw['num_heads']), 'mlp_ratio': mlp_ratio,
      'qkv_bias': bool(kw.get('qkv_bias', True)), 'qk_norm': bool(kw.get('qk_norm', False)),
      'init_values': kw.get('layer_scale_init'), 'class_token': has_prefix,
      'no_embed_class': no_embed_class, 'reg_tokens': int(kw.get('num_registers', 0)),
      'pre_norm': bool(kw.get('pre_norm', False)), 'fc_norm': bool(kw.get('fc_norm', False)),
      'act_layer': 'gelu_tanh' if kw.get('gelu_approximate', True) else None,
      'distilled': bool(kw.get('distilled', False)),
      'layer_norm_eps': float(kw.get('layer_norm_eps', 1e-6)),
  }
  return args


def _fold_prefix_posemb(params, args, log):
  """Our class (and distillation) token's position embedding, added into the token.

  A vit_jax model with a class token and registers embeds the class token's position but not
  the registers'; timm embeds all or none. The sum is what the blocks see either way, so the
  token absorbs its embedding and timm gets no_embed_class=True: the same logits.
  """
  posemb_key = 'Transformer/posembed_input/pos_embedding'
  prefix = [key for key in ('cls', 'dist') if key in params]
  posemb = params[posemb_key]
  grid_tokens = _grid_tokens(args)
  if not prefix or posemb.shape[1] == grid_tokens:
    return params
  params = dict(params)
  for i, key in enumerate(prefix):
    params[key] = params[key] + posemb[:, i:i + 1]
  params[posemb_key] = posemb[:, len(prefix):]
  log(f'note: {" and ".join(prefix)} took in their position embeddings (timm embeds register '
      'and class tokens alike, or neither): written with no_embed_class=True, same outputs')
  return params


def write(params, model_kwargs, path, image_size, class_names=None, log=print):
  """Writes flat per-layer vit_jax params as a timm state dict (`.safetensors`), atomically.

  Beside it goes `NAME.json` with `timm_class` and `timm_kwargs`: `timm_class(**timm_kwargs)`
  is the timm model (`load_state_dict` takes the file strictly), and `read` needs no other
  description. A LayerNorm eps other than timm's 1e-6 is kept there as `layer_norm_eps`
  (timm needs it as norm_layer=partial(nn.LayerNorm, eps=...)). Arrays are written as float32 (bfloat16
  upcast exactly). Nothing is written when anything fails.
  """
  if not path.endswith('.safetensors'):
    raise UserError(f'{path}: timm state dicts are written as .safetensors files; give a path '
                    'ending in .safetensors')
  if os.path.isdir(path):
    raise UserError(f'{path} is a directory; give a .safetensors file path')
  sidecar = sidecar_path(path)
  if os.path.exists(sidecar):
    existing = _read_json(sidecar)
    if not (isinstance(existing, dict) and 'timm_kwargs' in existing):
      raise UserError(f'{sidecar} exists and is not a timm description; move it, or give '
                      'another path')
  params = {key: value.astype(np.float32) if value.dtype.name == 'bfloat16' else value
            for key, value in tree.to_numpy(params).items()}
  in_chans = params['embedding/kernel'].shape[2] if 'embedding/kernel' in params else 3
  args = timm_args_for(model_kwargs, image_size, in_chans)
  if args['no_embed_class'] and not model_kwargs.get('no_embed_class'):
    params = _fold_prefix_posemb(params, args, log)
  entries = _layout(args, int(model_kwargs['mlp_dim']))
  expected_ours = {key for _, _, our_keys, _, _ in entries for key in our_keys}
  missing = sorted(expected_ours - set(params))
  unexpected = sorted(set(params) - expected_ours)
  if missing or unexpected:
    raise UserError('the parameters are not the ViT their model_kwargs describe: '
                    + '; '.join(part for part in (
                        'missing ' + ', '.join(missing) if missing else '',
                        'unexpected ' + ', '.join(unexpected) if unexpected else '') if part))
  state = {}
  for timm_key, shape, our_keys, _, to_timm in entries:
    try:
      value = np.ascontiguousarray(to_timm(*[np.asarray(params[key]) for key in our_keys]))
    except ValueError as e:
      raise UserError(f'cannot write {timm_key} from {", ".join(our_keys)}: {e}') from None
    if value.shape != shape:
      raise UserError(f'{timm_key} would be {value.shape}, timm expects {shape} (from '
                      f'{", ".join(our_keys)})')
    state[timm_key] = value
  description = {
      'timm_class': DISTILLED_CLASS if args['distilled'] else VIT_CLASS,
      'timm_kwargs': _public_args(args),
  }
  if args['layer_norm_eps'] != 1e-6:
    # timm takes it only as norm_layer=partial(nn.LayerNorm, eps=...); kept for `read`.
    description['layer_norm_eps'] = args['layer_norm_eps']
  if class_names is not None and len(class_names) == args['num_classes']:
    description['class_names'] = [str(name) for name in class_names]
  with tree.atomic_output(sidecar) as tmp_json, tree.atomic_output(path) as tmp_weights:
    safetensors.numpy.save_file(state, tmp_weights, metadata={'format': 'pt'})
    with open(tmp_json, 'w') as f:
      json.dump(description, f, indent=1)
      f.write('\n')
