"""Tests for vit_jax.models: sizes, shapes, dtypes, layouts, names, and user errors."""

import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.errors import UserError
from vit_jax.models import resnet, vit

TINY = dict(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2, patch_size=8)
IMAGE_SIZE = 32  # A 4x4 grid of 8x8 patches.


def _images(batch=2, size=IMAGE_SIZE, seed=0):
  return jax.random.uniform(jax.random.key(seed), (batch, size, size, 3), minval=-1, maxval=1)


_INIT_CACHE = {}


def _init(model, images=None):
  """Initial params; cached per (module, image shape), as several tests share a model."""
  images = _images() if images is None else images
  key = (model, images.shape)
  if key not in _INIT_CACHE:
    _INIT_CACHE[key] = model.init(jax.random.key(0), images)['params']
  # A fresh copy of the dicts, so a test may edit its params.
  return jax.tree.map(lambda leaf: leaf, _INIT_CACHE[key])


def _shapes(model, images=None):
  """(output, params) as shapes only: jax.eval_shape traces without compiling or allocating."""
  images = _images() if images is None else images
  output, variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x), images)
  return output, variables['params']


def _randomize(params, seed=1):
  """Random values everywhere, so the zero-initialised head cannot hide a difference."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      0.1 * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)])


# --- sizes -----------------------------------------------------------------------------------

@pytest.mark.parametrize('name,published', [
    ('ViT-Ti/16', 5.7e6), ('ViT-S/16', 22.1e6), ('ViT-B/16', 86.6e6),
    ('ViT-L/16', 304.3e6), ('ViT-H/14', 632e6)])
def test_param_counts_match_published(name, published):
  count = models.count_params(name, num_classes=1000, image_size=224)
  assert abs(count / published - 1) < 0.005, (name, count)


def test_decode_name_sizes():
  _, fields = models.decode_name('ViT-g/14')
  assert (fields['hidden_size'], fields['num_layers'], fields['num_heads'],
          fields['mlp_dim'], fields['patch_size']) == (1408, 40, 16, 6144, (14, 14))
  _, fields = models.decode_name('ViT-S/8')  # Any patch size.
  assert fields['patch_size'] == (8, 8) and fields['hidden_size'] == 384
  _, fields = models.decode_name('Mixer-L/16')
  assert (fields['hidden_size'], fields['num_layers'], fields['tokens_mlp_dim'],
          fields['channels_mlp_dim']) == (1024, 24, 512, 4096)
  model_cls, fields = models.decode_name('R50+ViT-B/16')
  assert model_cls is models.VisionTransformer
  assert fields['resnet_layers'] == (3, 4, 9) and fields['patch_size'] == (1, 1)


# --- shapes ----------------------------------------------------------------------------------

@pytest.mark.parametrize('name', [
    'ViT-Ti/16', 'ViT-S/16', 'ViT-B/16', 'ViT-B/32', 'ViT-L/16', 'ViT-L/32', 'ViT-H/14',
    'ViT-g/14', 'R50+ViT-B/16', 'Mixer-B/16', 'Mixer-L/16'])
def test_every_name_gives_logits_of_the_right_shape(name):
  model = models.create_model(name, num_classes=7)
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  logits = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], images)
  assert logits.shape == (2, 7)


@pytest.mark.parametrize('classifier,num_classes,expected', [
    ('token', 5, (2, 5)), ('gap', 5, (2, 5)), ('map', 5, (2, 5)), ('unpooled', 5, (2, 16, 5)),
    ('token', 0, (2, 32)), ('gap', None, (2, 32)), ('unpooled', None, (2, 16, 32))])
def test_pooling_output_shapes(classifier, num_classes, expected):
  model = models.create_model('ViT-B/16', num_classes, classifier=classifier, num_registers=1,
                              **TINY)
  output, params = _shapes(model)
  assert output.shape == expected
  assert ('MAPHead_0' in params) == (classifier == 'map')


def test_representation_layer_and_head_bias():
  model = models.create_model('ViT-B/16', 3, representation_size=12, head_bias_init=-2.0,
                              **TINY)
  params = _init(model)
  assert params['pre_logits']['kernel'].shape == (32, 12)
  assert params['head']['kernel'].shape == (12, 3)
  # Zero kernel: the logits at init are the bias.
  np.testing.assert_allclose(model.apply({'params': params}, _images()), -2.0)


def test_hybrid_shapes_follow_the_16x_resnet_root():
  hybrid = models.create_model('R50+ViT-B/16', 4, hidden_size=32, num_heads=2, mlp_dim=64,
                               num_layers=1)
  logits, params = _shapes(hybrid)
  assert logits.shape == (2, 4)
  # 32 px / 16 = a 2x2 map of 1x1 patches of the 1024-channel third stage, behind the cls.
  assert params['embedding']['kernel'].shape == (1, 1, 1024, 32)
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 5, 32)


class _TinyStem(flax.linen.Module):
  @flax.linen.compact
  def __call__(self, x):
    return resnet.resnet_stem(x, stage_sizes=(1,), width=32)


def test_resnet_root_standardises_its_conv_weights():
  stem = _TinyStem()
  images = _images()
  params = stem.init(jax.random.key(0), images)['params']
  features = stem.apply({'params': params}, images)
  assert features.shape == (2, 8, 8, 128)  # 4x down in the root; 4 * width channels out.
  # Standardised kernels: scaling and shifting a stored kernel changes nothing downstream.
  params['conv_root']['kernel'] = params['conv_root']['kernel'] * 3.0 + 0.5
  params['block1']['unit1']['conv2']['kernel'] = params['block1']['unit1']['conv2']['kernel'] * 7
  np.testing.assert_allclose(stem.apply({'params': params}, images), features, atol=1e-4)


def test_mixer_runs_and_mixes_tokens():
  mixer = models.create_model('Mixer-B/16', 4, hidden_size=32, num_layers=2, patch_size=8,
                              tokens_mlp_dim=8, channels_mlp_dim=16)
  images = _images()
  params = _randomize(_init(mixer, images))
  logits = mixer.apply({'params': params}, images)
  assert logits.shape == (2, 4)
  # The token-mixing MLPs take effect: without them the output changes.
  for i in range(2):
    token_mlp = params[f'MixerBlock_{i}']['token_mixing']['Dense_1']
    token_mlp['kernel'] = jnp.zeros_like(token_mlp['kernel'])
    token_mlp['bias'] = jnp.zeros_like(token_mlp['bias'])
  assert not np.allclose(mixer.apply({'params': params}, images), logits, atol=1e-4)


# --- published parameter names -------------------------------------------------------------

def _paths(params):
  return {'/'.join(str(k.key) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_vit_parameter_names_are_the_published_ones():
  model = models.create_model('ViT-B/16', 10, representation_size=16, **TINY)
  _, params = _shapes(model)
  paths = _paths(params)
  for expected in [
      'embedding/kernel', 'cls', 'Transformer/posembed_input/pos_embedding',
      'Transformer/encoder_norm/scale', 'pre_logits/kernel', 'head/kernel', 'head/bias',
      'Transformer/encoderblock_1/LayerNorm_0/scale',
      'Transformer/encoderblock_1/LayerNorm_2/bias',
      'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel',
      'Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias',
      'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel',
      'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/bias']:
    assert expected in paths, expected
  attention = params['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_1']
  assert attention['query']['kernel'].shape == (32, 2, 16)  # (D, heads, head_dim)
  assert attention['out']['kernel'].shape == (2, 16, 32)  # (heads, head_dim, D)
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 1 + 16, 32)


def test_optional_parameters_appear_only_when_enabled():
  plain = _paths(_shapes(models.create_model('ViT-B/16', 2, **TINY))[1])
  assert not any('norm' in p and 'query' in p or 'layer_scale' in p for p in plain)
  full = _paths(_shapes(models.create_model(
      'ViT-B/16', 2, qk_norm=True, layer_scale_init=1e-5, num_registers=3, **TINY))[1])
  block = 'Transformer/encoderblock_0/'
  for expected in [block + 'MultiHeadDotProductAttention_1/query_norm/scale',
                   block + 'MultiHeadDotProductAttention_1/key_norm/scale',
                   block + 'layer_scale_1', block + 'layer_scale_2', 'registers']:
    assert expected in full, expected
  # Registers get no position embedding.
  _, gap = _shapes(models.create_model('ViT-B/16', 2, classifier='gap', num_registers=3,
                                       **TINY))
  assert gap['Transformer']['posembed_input']['pos_embedding'].shape == (1, 16, 32)
  assert 'cls' not in gap


def test_default_vit_has_exactly_the_published_parameters():
  """The options' defaults add and drop nothing: the tree of the published checkpoints."""
  _, params = _shapes(models.create_model('ViT-B/16', 10, **TINY))
  block = {'LayerNorm_0/scale', 'LayerNorm_0/bias', 'LayerNorm_2/scale', 'LayerNorm_2/bias',
           'MlpBlock_3/Dense_0/kernel', 'MlpBlock_3/Dense_0/bias', 'MlpBlock_3/Dense_1/kernel',
           'MlpBlock_3/Dense_1/bias'} | {
               f'MultiHeadDotProductAttention_1/{name}/{leaf}'
               for name in ('query', 'key', 'value', 'out') for leaf in ('kernel', 'bias')}
  expected = {'embedding/kernel', 'embedding/bias', 'cls', 'head/kernel', 'head/bias',
              'Transformer/posembed_input/pos_embedding', 'Transformer/encoder_norm/scale',
              'Transformer/encoder_norm/bias'} | {
                  f'Transformer/encoderblock_{i}/{path}' for i in range(2) for path in block}
  assert _paths(params) == expected


_QKV_BIASES = {f'Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{name}/bias'
               for i in range(2) for name in ('query', 'key', 'value')}


@pytest.mark.parametrize('option,added,removed,posemb_tokens', [
    (dict(fc_norm=True), {'fc_norm/scale', 'fc_norm/bias'},
     {'Transformer/encoder_norm/scale', 'Transformer/encoder_norm/bias'}, 17),
    (dict(pre_norm=True), {'Transformer/pre_norm/scale', 'Transformer/pre_norm/bias'},
     {'embedding/bias'}, 17),
    (dict(qkv_bias=False), set(), _QKV_BIASES, 17),
    (dict(distilled=True), {'dist', 'head_dist/kernel', 'head_dist/bias'}, set(), 18),
    (dict(no_embed_class=True), set(), set(), 16),
    (dict(no_embed_class=True, distilled=True), {'dist', 'head_dist/kernel', 'head_dist/bias'},
     set(), 16),
    (dict(gelu_approximate=False, layer_norm_eps=1e-12), set(), set(), 17),
])
def test_each_option_adds_and_drops_only_its_own_parameters(option, added, removed,
                                                            posemb_tokens):
  plain = _paths(_shapes(models.create_model('ViT-B/16', 10, **TINY))[1])
  _, params = _shapes(models.create_model('ViT-B/16', 10, **option, **TINY))
  assert _paths(params) - plain == added
  assert plain - _paths(params) == removed
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, posemb_tokens,
                                                                            32)
  assert models.posemb_prefix_tokens(models.model_kwargs('ViT-B/16', 10, **option)) == (
      posemb_tokens - 16)


def test_numeric_options_take_effect():
  images = _images()
  plain = models.create_model('ViT-B/16', 5, **TINY)
  # Unit-scale weights: the two GELU forms differ where |x| is about 1 to 3.
  params = jax.tree.map(lambda leaf: 10 * leaf, _randomize(_init(plain, images)))
  expected = plain.apply({'params': params}, images)
  explicit = models.create_model('ViT-B/16', 5, gelu_approximate=True, layer_norm_eps=1e-6,
                                 **TINY)
  np.testing.assert_array_equal(explicit.apply({'params': params}, images), expected)
  for option in (dict(gelu_approximate=False), dict(layer_norm_eps=1e-1)):
    changed = models.create_model('ViT-B/16', 5, **option, **TINY)
    assert np.abs(changed.apply({'params': params}, images) - expected).max() > 1e-5, option


def test_no_embed_class_is_the_class_token_holding_its_position_embedding():
  images = _images()
  plain = models.create_model('ViT-B/16', 5, num_registers=2, **TINY)
  params = _randomize(_init(plain, images))
  posemb = params['Transformer']['posembed_input']['pos_embedding']  # (1, 1 + 16, 32)
  moved = jax.tree.map(lambda leaf: leaf, params)
  moved['cls'] = params['cls'] + posemb[:, :1]
  moved['Transformer']['posembed_input']['pos_embedding'] = posemb[:, 1:]
  no_embed = models.create_model('ViT-B/16', 5, num_registers=2, no_embed_class=True, **TINY)
  np.testing.assert_allclose(no_embed.apply({'params': moved}, images),
                             plain.apply({'params': params}, images), atol=1e-6)


def test_distilled_model_averages_its_heads_at_eval_and_returns_both_in_training():
  images = _images()
  model = models.create_model('ViT-B/16', 5, distilled=True, **TINY)
  params = _randomize(_init(model, images))
  logits, dist_logits = model.apply({'params': params}, images, train=True)
  assert logits.shape == dist_logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert np.abs(logits - dist_logits).max() > 1e-3
  np.testing.assert_allclose(model.apply({'params': params}, images),
                             (logits + dist_logits) / 2, atol=1e-6)
  features = models.create_model('ViT-B/16', None, distilled=True, **TINY)
  del params['head'], params['head_dist']
  assert features.apply({'params': params}, images, train=True).shape == (2, 32)


def test_scan_keeps_the_options():
  images = _images()
  options = dict(qkv_bias=False, pre_norm=True, fc_norm=True, qk_norm=True,
                 layer_scale_init=0.1, gelu_approximate=False, classifier='gap')
  per_layer = models.create_model('ViT-B/16', 5, **options, **TINY)
  scanned = models.create_model('ViT-B/16', 5, scan=True, **options, **TINY)
  params = _randomize(_init(per_layer, images))
  np.testing.assert_allclose(scanned.apply({'params': models.layers_to_scan(params)}, images),
                             per_layer.apply({'params': params}, images), atol=1e-5)


def test_the_options_are_config_keys():
  """Generated from the dataclass: `--config.model.<option>` sets each one."""
  from vit_jax.train import config as config_lib
  keys = config_lib.model_keys()
  for option in ('gelu_approximate', 'fc_norm', 'no_embed_class', 'qkv_bias', 'pre_norm',
                 'distilled', 'layer_norm_eps'):
    assert option in keys and keys[option] is None, option  # None: the model's default.


def test_hybrid_and_mixer_parameter_names_are_the_published_ones():
  hybrid = models.create_model('R50+ViT-B/16', 2, hidden_size=32, num_heads=2, mlp_dim=64,
                               num_layers=1)
  paths = _paths(_shapes(hybrid)[1])
  for expected in ['conv_root/kernel', 'gn_root/scale', 'block1/unit1/conv_proj/kernel',
                   'block1/unit1/gn_proj/bias', 'block1/unit3/conv3/kernel',
                   'block2/unit4/gn2/scale', 'block3/unit9/conv1/kernel', 'embedding/kernel']:
    assert expected in paths, expected
  assert 'block3/unit10/conv1/kernel' not in paths and 'block4/unit1/conv1/kernel' not in paths
  mixer = models.create_model('Mixer-B/16', 2, hidden_size=32, num_layers=2, tokens_mlp_dim=8,
                              channels_mlp_dim=16)
  paths = _paths(_shapes(mixer)[1])
  for expected in ['stem/kernel', 'MixerBlock_1/LayerNorm_0/scale',
                   'MixerBlock_1/token_mixing/Dense_0/kernel',
                   'MixerBlock_0/channel_mixing/Dense_1/bias', 'MixerBlock_0/LayerNorm_1/bias',
                   'pre_head_layer_norm/scale', 'head/kernel']:
    assert expected in paths, expected


# --- dtypes ----------------------------------------------------------------------------------

@pytest.mark.parametrize('scan', [False])  # Scanned blocks are the same module.
def test_bfloat16_reaches_every_block(scan):
  model = models.create_model('ViT-B/16', 3, dtype='bfloat16', classifier='map', scan=scan,
                              qk_norm=True, layer_scale_init=0.1, **TINY)
  images = _images()
  params = _init(model, images)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  logits, state = model.apply({'params': params}, images, capture_intermediates=True,
                              mutable=['intermediates'])
  assert logits.dtype == jnp.float32
  transformer = state['intermediates']['Transformer']
  blocks = ([transformer['encoderblock']] if scan else
            [transformer[f'encoderblock_{i}'] for i in range(TINY['num_layers'])])
  for block in blocks:
    arrays = [leaf for leaf in jax.tree.leaves(block) if hasattr(leaf, 'dtype')]
    assert len(arrays) > 10  # Every Dense, LayerNorm and attention inside was captured.
    assert {a.dtype for a in arrays} == {jnp.dtype(jnp.bfloat16)}
  for name in ['encoder_norm']:
    assert jax.tree.leaves(transformer[name])[0].dtype == jnp.bfloat16
  assert jax.tree.leaves(state['intermediates']['MAPHead_0'])[0].dtype == jnp.bfloat16


def test_param_dtype_is_used_for_every_parameter():
  model = models.create_model('ViT-B/16', 3, param_dtype=jnp.bfloat16, classifier='map',
                              num_registers=1, **TINY)
  _, params = _shapes(model)
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


# --- attention -------------------------------------------------------------------------------

def test_explicit_attention_matches_fused_and_sows_weights():
  model = models.create_model('ViT-B/16', 0, **TINY)  # attention_impl='auto': XLA on CPU.
  images = _images()
  params = _randomize(_init(model, images))
  fused = model.apply({'params': params}, images)
  explicit, state = model.apply({'params': params}, images, mutable=['intermediates'])
  np.testing.assert_allclose(explicit, fused, atol=1e-5, rtol=1e-5)
  (weights,) = state['intermediates']['Transformer']['encoderblock_1'][
      'MultiHeadDotProductAttention_1']['attention_weights']
  assert weights.shape == (2, 2, 17, 17)  # (batch, heads, q_tokens, k_tokens)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize('platform, capability, dtype, head_dim, kv_tokens, expected', [
    ('gpu', '9.0', jnp.bfloat16, 64, 197, 'cudnn'),     # ViT-B on an H100: the fused kernel.
    ('gpu', '8.0', jnp.float16, 128, 197, 'cudnn'),     # A100, the widest head before Hopper.
    ('gpu', '8.0', jnp.bfloat16, 256, 197, 'xla'),      # Too wide for cuDNN on Ampere ...
    ('gpu', '9.0', jnp.bfloat16, 256, 197, 'cudnn'),    # ... but not on Hopper.
    ('gpu', '9.0', jnp.float32, 64, 197, 'xla'),        # cuDNN's flash attention is half precision.
    ('gpu', '9.0', jnp.bfloat16, 20, 197, 'xla'),       # Head width not a multiple of 8.
    ('gpu', '7.0', jnp.bfloat16, 64, 197, 'xla'),       # V100: before Ampere.
    ('gpu', 'gfx90a', jnp.bfloat16, 64, 197, 'xla'),    # ROCm: no cuDNN.
    ('cpu', None, jnp.bfloat16, 64, 197, 'deferred_norm'),  # Ti/16 at 224 px on a CPU.
    ('cpu', None, jnp.float32, 64, 64, 'deferred_norm'),
    ('cpu', None, jnp.float32, 16, 63, 'xla'),          # Short sequences (the quickstart's 16).
    ('tpu', None, jnp.bfloat16, 64, 197, 'xla'),
])
def test_auto_attention_picks_cudnn_only_where_it_runs(platform, capability, dtype, head_dim,
                                                       kv_tokens, expected):
  device = types.SimpleNamespace(platform=platform)
  if capability is not None:
    device.compute_capability = capability
  assert vit.attention_implementation('auto', dtype, head_dim, device, kv_tokens) == expected
  # An explicit choice is the user's, passed through whatever the device.
  assert vit.attention_implementation('xla', dtype, head_dim, device, kv_tokens) == 'xla'
  assert vit.attention_implementation('deferred_norm', dtype, head_dim, device,
                                      kv_tokens) == 'deferred_norm'
  if platform == 'gpu':
    assert vit.attention_implementation('cudnn', dtype, head_dim, device) == 'cudnn'
  else:
    with pytest.raises(UserError, match='attention_impl=cudnn needs a CUDA GPU'):
      vit.attention_implementation('cudnn', dtype, head_dim, device)


@pytest.mark.parametrize('q_tokens, kv_tokens, masked', [
    (197, 197, False),  # ViT-B/16 at 224 px: cuDNN's training path refused it unpadded.
    (65, 65, True),     # NaFlex-style padding keys on top of the odd length.
    (64, 97, False),    # Only the key axis odd (cross-attention, MAP pooling).
])
def test_attention_padded_to_even_tokens_is_the_unpadded_attention(q_tokens, kv_tokens, masked):
  # The padding cuDNN needs is checked here with XLA's kernel, which takes both forms: the
  # same function, the same gradients, and every output row a real query's.
  keys = jax.random.split(jax.random.key(3), 4)
  query = jax.random.normal(keys[0], (2, q_tokens, 3, 8))
  key, value = (jax.random.normal(k, (2, kv_tokens, 3, 8)) for k in keys[1:3])
  kv_mask = (jnp.arange(kv_tokens)[None, :] < jnp.array([[kv_tokens - 6], [kv_tokens]])
             if masked else None)
  cotangent = jax.random.normal(keys[3], query.shape)

  def attention_and_grads(pad_to_even):
    def project(q, k, v):
      out = vit.fused_attention(q, k, v, kv_mask, 'xla', pad_to_even=pad_to_even)
      return jnp.sum(out * cotangent), out
    (_, out), grads = jax.jit(jax.value_and_grad(project, argnums=(0, 1, 2), has_aux=True))(
        query, key, value)
    return out, grads

  out, grads = attention_and_grads(pad_to_even=True)
  reference, reference_grads = attention_and_grads(pad_to_even=False)
  assert out.shape == reference.shape == query.shape
  np.testing.assert_allclose(out, reference, atol=1e-5)
  for grad, reference_grad in zip(grads, reference_grads):
    np.testing.assert_allclose(grad, reference_grad, atol=1e-5)
  if masked:  # The masked keys were not read: changing them changes nothing.
    changed = value.at[0, kv_tokens - 6:].set(100.0)
    padded = jax.jit(lambda v: vit.fused_attention(query, key, v, kv_mask, 'xla',
                                                   pad_to_even=True))
    np.testing.assert_allclose(padded(changed), out, atol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('masked', [False, True])
def test_deferred_norm_attention_is_xlas_attention(masked, dtype):
  # The same function and gradients as jax's XLA path, the same dtype out, and padding keys
  # (NaFlex's, and an example whose keys are all padding) read by no query.
  keys = jax.random.split(jax.random.key(5), 4)
  query, key, value = (jax.random.normal(k, (3, 70, 2, 16), dtype) for k in keys[:3])
  kv_mask = (jnp.arange(70)[None, :] < jnp.array([[64], [70], [0]])) if masked else None
  cotangent = jax.random.normal(keys[3], query.shape, jnp.float32)

  def attention_and_grads(implementation):
    def project(q, k, v):
      out = vit.fused_attention(q, k, v, kv_mask, implementation)
      return jnp.sum(out.astype(jnp.float32) * cotangent), out
    (_, out), grads = jax.jit(jax.value_and_grad(project, argnums=(0, 1, 2), has_aux=True))(
        query, key, value)
    return out, grads

  out, grads = attention_and_grads('deferred_norm')
  reference, reference_grads = attention_and_grads('xla')
  assert out.dtype == reference.dtype == dtype
  tolerance = 1e-5 if dtype == jnp.float32 else 3e-2
  for got, expected in zip((out,) + grads, (reference,) + reference_grads):
    assert bool(jnp.all(jnp.isfinite(got)))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                               atol=tolerance, rtol=tolerance)
  if masked:
    changed = value.at[0, 64:].set(100.0)
    np.testing.assert_allclose(
        np.asarray(vit.fused_attention(query, key, changed, kv_mask, 'deferred_norm'), np.float32),
        np.asarray(out, np.float32), atol=tolerance)


def test_auto_attention_on_a_long_cpu_sequence_is_the_xla_model(monkeypatch):
  # 64 patches and a class token: 'auto' takes deferred_norm in both blocks on this CPU, and the
  # model computes what it computes with XLA's attention.
  images = _images(size=64)
  params = _randomize(_init(models.create_model('ViT-B/16', 3, **TINY), images))
  calls = []
  deferred = vit.deferred_norm_attention
  monkeypatch.setattr(vit, 'deferred_norm_attention',
                      lambda *args: calls.append(args[1].shape) or deferred(*args))
  outputs = {implementation: models.create_model(
      'ViT-B/16', 3, attention_impl=implementation, **TINY).apply({'params': params}, images)
             for implementation in ('auto', 'xla')}
  assert calls == [(2, 65, 2, 16)] * 2
  np.testing.assert_allclose(outputs['auto'], outputs['xla'], atol=1e-5, rtol=1e-5)


def test_auto_attention_lowers_without_cudnn_on_this_cpu():
  model = models.create_model('ViT-B/16', 0, dtype=jnp.bfloat16, **TINY)
  images = _images()
  hlo = jax.jit(model.init).lower(jax.random.key(0), images).as_text()
  assert 'cudnn' not in hlo.lower()


def test_scanned_model_sows_weights_per_layer():
  model = models.create_model('ViT-B/16', 0, scan=True, **TINY)
  images = _images()
  _, state = model.apply({'params': _init(model, images)}, images, mutable=['intermediates'])
  (weights,) = state['intermediates']['Transformer']['encoderblock'][
      'MultiHeadDotProductAttention_1']['attention_weights']
  assert weights.shape == (2, 2, 2, 17, 17)  # (layers, batch, heads, q, k)


# --- train vs eval ---------------------------------------------------------------------------

REGULARISED = dict(dropout_rate=0.3, attention_dropout_rate=0.3, drop_path_rate=0.5)


@pytest.mark.parametrize('scan', [False])  # The scanned drop-path is tested below.
def test_dropout_and_drop_path_are_off_at_eval(scan):
  images = _images()
  model = models.create_model('ViT-B/16', 0, scan=scan, **REGULARISED, **TINY)
  plain = models.create_model('ViT-B/16', 0, scan=scan, **TINY)
  params = _randomize(_init(model, images))
  reference = plain.apply({'params': params}, images, train=False)
  run = jax.jit(lambda key, train: model.apply({'params': params}, images, train=train,
                                                rngs={'dropout': key}), static_argnums=1)
  for seed in (0, 1):
    np.testing.assert_allclose(run(jax.random.key(seed), False), reference, atol=1e-6)
  # The rates do take effect in training.
  assert not np.allclose(run(jax.random.key(0), True), reference, atol=1e-4)


@pytest.mark.parametrize('scan', [False, True])
def test_drop_path_rises_linearly_from_zero_to_the_rate(scan):
  # With 2 layers and rate 1: block 0 is never dropped, block 1 always. So training equals
  # evaluating with block 1's residual branches zeroed, whatever the random key.
  images = _images()
  model = models.create_model('ViT-B/16', 0, scan=scan, drop_path_rate=1.0, **TINY)
  params = _randomize(_init(model, images))
  layers = models.scan_to_layers(params)
  block = layers['Transformer']['encoderblock_1']
  for branch_out in (block['MultiHeadDotProductAttention_1']['out'],
                     block['MlpBlock_3']['Dense_1']):
    for key in branch_out:
      branch_out[key] = jnp.zeros_like(branch_out[key])
  plain = models.create_model('ViT-B/16', 0, **TINY)
  expected = plain.apply({'params': layers}, images)
  train = jax.jit(lambda key: model.apply({'params': params}, images, train=True,
                                           rngs={'dropout': key}))
  for seed in (0, 1, 2):
    np.testing.assert_allclose(train(jax.random.key(seed)), expected, atol=1e-5)


def test_remat_policies_give_the_same_output():
  images = _images()
  base = models.create_model('ViT-B/16', 0, **TINY)
  params = _randomize(_init(base, images))
  expected = base.apply({'params': params}, images)
  for policy in ('full', 'dots', 'dots_no_batch'):
    rematted = models.create_model('ViT-B/16', 0, remat_policy=policy, **TINY)
    np.testing.assert_allclose(rematted.apply({'params': params}, images), expected, atol=1e-6)
  scanned = models.create_model('ViT-B/16', 0, scan=True, remat_policy='dots', **TINY)
  np.testing.assert_allclose(scanned.apply({'params': models.layers_to_scan(params)}, images),
                             expected, atol=1e-5)


# --- scanned <-> per-layer -------------------------------------------------------------------

def test_scan_and_per_layer_layouts_give_the_same_logits():
  images = _images()
  per_layer = models.create_model('ViT-B/16', 5, **TINY)
  scanned = models.create_model('ViT-B/16', 5, scan=True, **TINY)
  layer_params = _randomize(_init(per_layer, images))
  scan_params = models.layers_to_scan(layer_params)
  assert scan_params['Transformer']['encoderblock']['LayerNorm_0']['scale'].shape == (2, 32)
  expected = per_layer.apply({'params': layer_params}, images)
  np.testing.assert_allclose(scanned.apply({'params': scan_params}, images), expected,
                             atol=1e-5)
  # And back: a scanned init loads into the per-layer model.
  scan_params = _randomize(_init(scanned, images), seed=2)
  back = models.scan_to_layers(scan_params)
  assert set(back['Transformer']) == {'encoderblock_0', 'encoderblock_1', 'encoder_norm',
                                      'posembed_input'}
  np.testing.assert_allclose(per_layer.apply({'params': back}, images),
                             scanned.apply({'params': scan_params}, images), atol=1e-5)
  # Round trip, already-converted input, and a full variables dict.
  round_trip = models.scan_to_layers(models.layers_to_scan(back))
  jax.tree.map(np.testing.assert_array_equal, round_trip, back)
  assert models.scan_to_layers(back) == back
  assert 'encoderblock' in models.layers_to_scan({'params': back})['params']['Transformer']


# --- position embeddings ---------------------------------------------------------------------

def test_resize_posemb_is_exact_when_the_grid_does_not_change():
  posemb = np.random.RandomState(0).normal(size=(1, 1 + 14 * 14, 8)).astype(np.float32)
  np.testing.assert_array_equal(models.resize_posemb(posemb, (14, 14), 1), posemb)


def test_resize_posemb_keeps_the_class_token_and_handles_non_square_grids():
  rng = np.random.RandomState(0)
  posemb = rng.normal(size=(1, 1 + 4 * 4, 6)).astype(np.float32)
  resized = models.resize_posemb(posemb, (8, 6), num_prefix_tokens=1)
  assert resized.shape == (1, 1 + 48, 6)
  np.testing.assert_array_equal(resized[:, 0], posemb[:, 0])
  # A constant grid stays constant under bilinear resizing.
  constant = np.concatenate([posemb[:, :1], np.full((1, 16, 6), 0.5, np.float32)], axis=1)
  np.testing.assert_allclose(models.resize_posemb(constant, (3, 5), 1)[:, 1:], 0.5, rtol=1e-6)
  # Halving a 2x2 grid (no prefix) averages it; a non-square old grid is given explicitly.
  grid = rng.normal(size=(1, 4, 6)).astype(np.float32)
  np.testing.assert_allclose(models.resize_posemb(grid, (1, 1), 0)[0, 0], grid[0].mean(0),
                             atol=1e-6)
  wide = rng.normal(size=(1, 2 * 3, 6)).astype(np.float32)
  assert models.resize_posemb(wide, (4, 6), 0, old_grid_hw=(2, 3)).shape == (1, 24, 6)


def test_prefix_tokens_come_from_the_config():
  assert models.posemb_prefix_tokens(models.model_kwargs('ViT-B/16', 10)) == 1
  assert models.posemb_prefix_tokens(
      models.model_kwargs('ViT-B/16', 10, classifier='gap')) == 0
  assert models.posemb_prefix_tokens(models.model_kwargs('Mixer-B/16', 10)) == 0


def test_a_new_resolution_needs_resize_posemb_and_then_works():
  model = models.create_model('ViT-B/16', 3, **TINY)
  params = _init(model, _images(size=32))
  larger = _images(size=48)  # 6x6 patches instead of 4x4.
  with pytest.raises(UserError, match='resize_posemb'):
    model.apply({'params': params}, larger)
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  prefix = models.posemb_prefix_tokens(models.model_kwargs('ViT-B/16', 3, **TINY))
  params['Transformer']['posembed_input']['pos_embedding'] = models.resize_posemb(
      posemb, (6, 6), prefix)
  assert model.apply({'params': params}, larger).shape == (2, 3)


def test_sincos_posemb_has_no_parameters():
  model = models.create_model('ViT-B/16', 3, posemb='sincos2d', **TINY)
  params = _init(model)
  assert 'posembed_input' not in params['Transformer']
  # Fixed embeddings follow any grid.
  assert model.apply({'params': params}, _images(size=48)).shape == (2, 3)


# --- user errors -----------------------------------------------------------------------------

@pytest.mark.parametrize('name,overrides,message', [
    ('ViT-X/16', {}, "unknown model name 'ViT-X/16'"),
    ('ResNet50', {}, 'valid: ViT-<size>/<patch>'),
    ('R50+ViT-B/8', {}, 'multiple of 16'),
    ('ViT-B/16', dict(num_heads=5), 'num_heads 5 does not divide the width 768'),
    ('ViT-B/16', dict(classifier='cls'), "unknown classifier 'cls'"),
    ('ViT-B/16', dict(posemb='rotary'), "unknown posemb 'rotary'"),
    ('ViT-B/16', dict(remat_policy='some'), "unknown remat_policy 'some'"),
    ('ViT-B/16', dict(attention_impl='flash'), "unknown attention_impl 'flash'"),
    ('ViT-B/16', dict(dtype='float64'), "unknown dtype 'float64'"),
    ('ViT-B/16', dict(layer_norm_eps=0), 'layer_norm_eps must be a number between 0 and 1'),
    ('ViT-B/16', dict(fc_norm='yes'), "fc_norm must be True or False, got 'yes'"),
    ('ViT-B/16', dict(classifier='gap', distilled=True), "distilled=True reads the class and"),
    ('ViT-B/16', dict(dropout=0.1), 'model.dropout=0.1 does not apply to ViT-B/16; it takes: '),
    ('Mixer-B/16', dict(classifier='map'), 'does not apply to Mixer-B/16'),
])
def test_user_mistakes_raise_user_error(name, overrides, message):
  with pytest.raises(UserError, match=message.replace('+', r'\+').replace('(', r'\(')):
    models.create_model(name, 10, **overrides)


def test_a_patch_that_does_not_divide_the_image_raises():
  model = models.create_model('ViT-B/16', 3, **dict(TINY, patch_size=16))
  with pytest.raises(UserError, match='patch size 16x16 does not divide the image size 40x40'):
    model.init(jax.random.key(0), _images(size=40))


def test_mixer_takes_the_unset_config_keys_and_refuses_a_set_vit_one():
  # A training config passes every model key; unset ones (None) mean "the default".
  from vit_jax.train import config as config_lib
  overrides = dict(config_lib.defaults().model.to_dict(), dtype='bfloat16', head_bias_init=-1.0)
  kwargs = models.model_kwargs('Mixer-B/16', 10, **overrides)
  assert kwargs['dtype'] == jnp.bfloat16 and kwargs['head_bias_init'] == -1.0
  assert 'classifier' not in kwargs
  with pytest.raises(UserError, match=r'model.classifier=.gap. does not apply to Mixer-B/16'):
    models.model_kwargs('Mixer-B/16', 10, **dict(overrides, classifier='gap'))


def test_model_kwargs_builds_the_same_module_as_create_model():
  kwargs = models.model_kwargs('ViT-S/16', 10, dtype='bfloat16', scan=True)
  assert kwargs['dtype'] == jnp.bfloat16 and kwargs['hidden_size'] == 384
  assert models.VisionTransformer(**kwargs) == models.create_model(
      'ViT-S/16', 10, dtype='bfloat16', scan=True)
  assert isinstance(models.create_model('ViT-S/16', 10), flax.linen.Module)
  assert vit.VisionTransformer is models.VisionTransformer
