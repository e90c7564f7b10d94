"""timm state dicts: every reference variant timm saved loads with timm's logits and writes back
as exactly the state dict timm saved; descriptions; refusals that leave nothing written."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

from conftest import shared_fixtures
from vit_jax import models
from vit_jax.errors import UserError
from vit_jax.weights import convert, timm, tree

FIXTURES = shared_fixtures('timm_vit')
# Every variant in the folder; the test below checks that none is missed.
VARIANTS = ('plain_token', 'avg_fc_norm_no_cls', 'deit_distilled', 'layer_scale_qk_norm',
            'map_pool', 'no_qkv_bias_pre_norm', 'registers_no_embed_class')
# What each variant must turn on in our model (so a loader that ignored an option would fail).
EXPECTED_OPTIONS = {
    'plain_token': dict(classifier='token'),
    'avg_fc_norm_no_cls': dict(classifier='gap', fc_norm=True),
    'deit_distilled': dict(distilled=True),
    'layer_scale_qk_norm': dict(qk_norm=True, layer_scale_init=0.1),
    'map_pool': dict(classifier='map'),
    'no_qkv_bias_pre_norm': dict(qkv_bias=False, pre_norm=True),
    'registers_no_embed_class': dict(num_registers=4, no_embed_class=True),
}
TOLERANCE = 1e-4

_COMPILED = {}


def logits_of(model_kwargs, params, images, train=False):
  """The model's output, one compiled function per model (CPU time is scarce)."""
  key = (repr(sorted(convert.complete_kwargs(model_kwargs).items())), train)
  if key not in _COMPILED:
    model = models.VisionTransformer(**convert.complete_kwargs(model_kwargs))
    _COMPILED[key] = jax.jit(lambda p, x: model.apply({'params': p}, x, train=train))
  return jax.tree.map(np.asarray, _COMPILED[key](tree.unflatten(params), images))


def fixture(name):
  return os.path.join(FIXTURES, name)


def images():
  # NHWC float32 in [-1, 1], the range the model takes; timm saw the same values as NCHW.
  return np.load(fixture('x.npy'))


def test_the_variant_list_is_the_fixture_folder():
  on_disk = {name[:-len('.safetensors')] for name in os.listdir(FIXTURES)
             if name.endswith('.safetensors')}
  assert on_disk == set(VARIANTS)


@pytest.mark.parametrize('variant', VARIANTS)
def test_variant_loads_with_timms_logits_and_writes_back_timms_state_dict(tmp_path, variant):
  source = fixture(f'{variant}.safetensors')
  params, metadata = convert.load_weights(source)  # Described by the NAME.json beside it.
  assert metadata['format'] == 'timm' and metadata['image_size'] == 32
  kwargs = metadata['model_kwargs']
  for key, value in EXPECTED_OPTIONS[variant].items():
    assert kwargs[key] == value, key
  assert kwargs['gelu_approximate'] is False and kwargs['layer_norm_eps'] == 1e-6
  expected = np.load(fixture(f'{variant}.logits.npy'))
  ours = logits_of(kwargs, params, images())
  assert ours.shape == expected.shape == (2, 5)
  assert np.abs(expected).max() > 0.1  # Not a degenerate comparison.
  assert np.abs(ours - expected).max() <= TOLERANCE

  written = tmp_path / f'{variant}.safetensors'
  convert.save_weights(params, written, model_kwargs=kwargs)
  original = safetensors.numpy.load_file(source)
  again = safetensors.numpy.load_file(written)
  assert sorted(again) == sorted(original)
  for key in original:
    assert again[key].shape == original[key].shape, key
    assert again[key].dtype == original[key].dtype, key
    np.testing.assert_array_equal(again[key], original[key], err_msg=key)

  # The description written beside it is enough to read it back into the same model.
  reloaded, metadata = convert.load_weights(written)
  assert metadata['model_kwargs'] == kwargs
  assert np.abs(logits_of(kwargs, reloaded, images()) - expected).max() <= TOLERANCE
  with open(tmp_path / f'{variant}.json') as f:
    described = json.load(f)
  with open(fixture(f'{variant}.json')) as f:
    timm_saved = json.load(f)
  assert described['timm_class'] == timm_saved['timm_class']
  for key, value in timm_saved['timm_kwargs'].items():
    assert described['timm_kwargs'][key] == value, key


def test_gelu_form_and_eps_show_in_the_fixture_logits():
  """The reference logits tell the options apart, so the parity above means they are right."""
  params, metadata = convert.load_weights(fixture('plain_token.safetensors'))
  expected = np.load(fixture('plain_token.logits.npy'))
  for wrong in (dict(gelu_approximate=True), dict(layer_norm_eps=1e-2)):
    ours = logits_of({**metadata['model_kwargs'], **wrong}, params, images())
    assert np.abs(ours - expected).max() > 2 * TOLERANCE, wrong  # Tanh: 4e-4 off.


def test_distilled_model_returns_both_heads_in_training():
  params, metadata = convert.load_weights(fixture('deit_distilled.safetensors'))
  kwargs = metadata['model_kwargs']
  logits, dist_logits = logits_of(kwargs, params, images(), train=True)
  assert logits.shape == dist_logits.shape == (2, 5)
  assert np.abs(logits - dist_logits).max() > 0.1  # Two different heads ...
  eval_logits = logits_of(kwargs, params, images())
  np.testing.assert_allclose((logits + dist_logits) / 2, eval_logits, atol=1e-6)  # ... averaged.


# ---------------------------------------------------------------------------------------------
# Descriptions.


def alone(tmp_path, variant):
  """The variant's state dict copied without its description."""
  path = tmp_path / f'{variant}.safetensors'
  shutil.copy(fixture(f'{variant}.safetensors'), path)
  return path


def timm_kwargs(variant):
  with open(fixture(f'{variant}.json')) as f:
    return json.load(f)['timm_kwargs']


def test_without_a_description_it_asks_for_one(tmp_path):
  path = alone(tmp_path, 'plain_token')
  with pytest.raises(UserError) as error:
    convert.load_weights(path)
  message = str(error.value)
  assert '\n' not in message and 'number of attention heads' in message
  assert 'plain_token.json' in message and 'timm_args' in message


@pytest.mark.parametrize('variant', ['deit_distilled', 'registers_no_embed_class'])
def test_caller_kwargs_describe_a_bare_state_dict(tmp_path, variant):
  path = alone(tmp_path, variant)
  # The DeiT class is not in the kwargs: its dist_token says it.
  params, metadata = convert.load_weights(path, timm_args=timm_kwargs(variant))
  expected = np.load(fixture(f'{variant}.logits.npy'))
  assert np.abs(logits_of(metadata['model_kwargs'], params, images()) - expected).max() <= (
      TOLERANCE)


def test_timm_hub_folder_with_config_json(tmp_path):
  hub = tmp_path / 'hub'
  hub.mkdir()
  shutil.copy(fixture('map_pool.safetensors'), hub / 'model.safetensors')
  args = timm_kwargs('map_pool')
  config = {
      'architecture': 'vit_base_patch16_siglip_224', 'num_classes': 5, 'num_features': 48,
      'global_pool': 'map', 'label_names': [f'class {i}' for i in range(5)],
      'model_args': {k: v for k, v in args.items() if k not in ('num_classes', 'img_size')},
      'pretrained_cfg': {'input_size': [3, 32, 32], 'num_classes': 5},
  }
  (hub / 'config.json').write_text(json.dumps(config))
  assert convert.detect_format(str(hub)) == 'timm'
  params, metadata = convert.load_weights(hub)
  assert metadata['class_names'][4] == 'class 4' and metadata['image_size'] == 32
  expected = np.load(fixture('map_pool.logits.npy'))
  assert np.abs(logits_of(metadata['model_kwargs'], params, images()) - expected).max() <= (
      TOLERANCE)

  # Without model_args the name must be one whose arguments are known: this one is not.
  (hub / 'config.json').write_text(json.dumps({**config, 'model_args': {}}))
  with pytest.raises(UserError, match="timm model 'vit_base_patch16_siglip_224' is not one"):
    convert.load_weights(hub)


def test_model_names_give_their_constructor_arguments():
  assert timm.name_args('vit_base_patch16_224.augreg_in21k') == dict(
      patch_size=16, embed_dim=768, depth=12, num_heads=12, distilled=False)
  assert timm.name_args('deit_small_distilled_patch16_224')['distilled'] is True
  assert timm.name_args('deit3_base_patch16_384')['no_embed_class'] is True
  dinov2 = timm.name_args('vit_small_patch14_reg4_dinov2.lvd142m')
  assert (dinov2['reg_tokens'], dinov2['init_values'], dinov2['num_heads']) == (4, 1e-5, 6)
  assert timm.name_args('vit_giant_patch14_dinov2') is None  # SwiGLU: not in the table.


def test_a_wrong_description_names_the_keys(tmp_path):
  path = alone(tmp_path, 'plain_token')
  with pytest.raises(UserError) as error:
    convert.load_weights(path, timm_args={**timm_kwargs('plain_token'), 'mlp_ratio': 4.0})
  assert ('wrong shape blocks.{0..1}.mlp.fc1.bias (96,) (expected (192,))'
          in str(error.value))
  with pytest.raises(UserError, match=r'unexpected dist_token, head_dist.bias, head_dist.weight'):
    convert.load_weights(alone(tmp_path, 'deit_distilled'), timm_model='deit_tiny_patch16_224',
                         timm_args={**timm_kwargs('deit_distilled')})


@pytest.mark.parametrize('change,message', [
    (dict(act_layer='quick_gelu'), "act_layer='quick_gelu'"),
    (dict(global_pool='avg'), "class_token=True with global_pool='avg'"),
    (dict(reg_tokens=4), 'reg_tokens with position embeddings on them'),
    (dict(mlp_layer='SwiGLUPacked'), 'timm arguments mlp_layer have no vit_jax equivalent'),
])
def test_models_vit_jax_cannot_hold_are_refused_by_their_description(tmp_path, change, message):
  with pytest.raises(UserError, match=message.replace('(', r'\(').replace(')', r'\)')):
    convert.load_weights(alone(tmp_path, 'plain_token'),
                         timm_args={**timm_kwargs('plain_token'), **change})


@pytest.mark.parametrize('edit,feature,key', [
    (lambda s: {**{k: v for k, v in s.items() if '.mlp.fc1.' not in k},
                **{k.replace('fc1', 'fc1_g'): v for k, v in s.items() if '.mlp.fc1.' in k},
                **{k.replace('fc1', 'fc1_x'): v for k, v in s.items() if '.mlp.fc1.' in k}},
     'a SwiGLU MLP', 'blocks.{0..1}.mlp.fc1_g.bias'),
    (lambda s: {**s, 'rope.freqs': np.zeros(8, np.float32)}, 'rotary position embeddings',
     'rope.freqs'),
    (lambda s: {**s, 'patch_embed.backbone.stem.conv.weight': np.zeros((8, 3, 7, 7),
                                                                     np.float32)},
     'a convolutional stem', 'patch_embed.backbone.stem.conv.weight'),
    (lambda s: {**s, 'head.extra': np.zeros(1, np.float32)}, None, 'unexpected head.extra'),
])
def test_layers_vit_jax_cannot_hold_are_refused_and_nothing_is_written(tmp_path, capsys, edit,
                                                                        feature, key):
  state = safetensors.numpy.load_file(fixture('plain_token.safetensors'))
  source = tmp_path / 'in' / 'model.safetensors'
  source.parent.mkdir()
  safetensors.numpy.save_file(edit(state), source)
  shutil.copy(fixture('plain_token.json'), tmp_path / 'in' / 'model.json')
  out = tmp_path / 'out'
  out.mkdir()
  assert convert.main([str(source), str(out / 'w.npz')]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1
  assert key in err
  if feature:
    assert f'it has {feature}' in err
  assert os.listdir(out) == []


# ---------------------------------------------------------------------------------------------
# Writing vit_jax models as timm state dicts.


def random_params(model_kwargs, image_size=32, seed=0):
  model = models.VisionTransformer(**model_kwargs)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             np.zeros((1, image_size, image_size, 3))))
  rng = np.random.default_rng(seed)
  return {key: rng.normal(0, 0.2, leaf.shape).astype(np.float32) + key.endswith('scale')
          for key, leaf in tree.flatten(shapes['params']).items()}


TINY = dict(patch_size=8, hidden_size=48, num_layers=2, num_heads=3, mlp_dim=96)


def test_class_token_with_registers_is_written_with_the_same_outputs(tmp_path):
  """Our default embeds the class token's position but not the registers' (timm: all or none)."""
  kwargs = models.model_kwargs('ViT-B/16', 5, num_registers=2, **TINY)
  params = random_params(kwargs)
  notes = []
  convert.save_weights(params, tmp_path / 'w.safetensors', model_kwargs=kwargs,
                       log=notes.append)
  assert len(notes) == 1 and 'no_embed_class=True' in notes[0]
  state = safetensors.numpy.load_file(tmp_path / 'w.safetensors')
  assert state['pos_embed'].shape == (1, 16, 48) and state['reg_token'].shape == (1, 2, 48)
  loaded, metadata = convert.load_weights(tmp_path / 'w.safetensors')
  assert metadata['model_kwargs']['no_embed_class'] is True
  x = images()
  np.testing.assert_allclose(logits_of(metadata['model_kwargs'], loaded, x),
                             logits_of(kwargs, params, x), atol=1e-5)


def test_options_no_key_holds_round_trip_through_the_description(tmp_path):
  kwargs = models.model_kwargs('ViT-B/16', 5, gelu_approximate=False, layer_norm_eps=1e-5,
                               pre_norm=True, qkv_bias=False, **TINY)
  params = random_params(kwargs)
  convert.save_weights(params, tmp_path / 'w.safetensors', model_kwargs=kwargs,
                       class_names=list('abcde'))
  loaded, metadata = convert.load_weights(tmp_path / 'w.safetensors')
  assert {key: metadata['model_kwargs'][key] for key in metadata['model_kwargs']} == {
      key: kwargs[key] for key in metadata['model_kwargs']}
  assert metadata['class_names'] == list('abcde')
  for key, value in params.items():
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)


@pytest.mark.parametrize('overrides,message', [
    (dict(posemb='sincos2d'), "posemb='sincos2d'"),
    (dict(representation_size=16), 'representation_size=16'),
    (dict(classifier='unpooled'), "classifier='unpooled'"),
])
def test_models_timm_cannot_hold_are_not_written(tmp_path, overrides, message):
  kwargs = models.model_kwargs('ViT-B/16', 5, **{**TINY, **overrides})
  with pytest.raises(UserError, match=message):
    convert.save_weights(random_params(kwargs), tmp_path / 'w.safetensors', model_kwargs=kwargs)
  assert os.listdir(tmp_path) == []


def test_npz_to_timm_and_back_through_the_cli(tmp_path, capsys):
  kwargs = models.model_kwargs('ViT-B/16', 5, classifier='map', qk_norm=True,
                               layer_scale_init=1e-5, **TINY)
  params = random_params(kwargs)
  convert.save_weights(params, tmp_path / 'w.npz')
  assert convert.main([str(tmp_path / 'w.npz'), str(tmp_path / 'w.safetensors')]) == 0
  state = safetensors.numpy.load_file(tmp_path / 'w.safetensors')
  assert 'attn_pool.kv.weight' in state and 'blocks.1.ls2.gamma' in state
  with open(tmp_path / 'w.json') as f:
    # An npz does not say its GELU: the published (tanh) one, said to timm explicitly.
    assert json.load(f)['timm_kwargs']['act_layer'] == 'gelu_tanh'
  assert convert.main([str(tmp_path / 'w.safetensors'), str(tmp_path / 'back.npz')]) == 0
  back, _ = convert.load_weights(tmp_path / 'back.npz')
  assert back.keys() == params.keys()
  for key, value in params.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_finetune_from_a_distilled_checkpoint_refreshes_both_heads():
  _, metadata = convert.load_weights(fixture('deit_distilled.safetensors'))
  kwargs = {**metadata['model_kwargs'], 'num_classes': 3}
  init = tree.unflatten(random_params(convert.complete_kwargs(kwargs), seed=4))
  notes = []
  loaded = convert.load_for_finetune(fixture('deit_distilled.safetensors'), init, kwargs,
                                     log=notes.append)
  assert any('fresh head_dist' in note for note in notes)
  np.testing.assert_array_equal(loaded['head_dist']['kernel'], init['head_dist']['kernel'])
  state = safetensors.numpy.load_file(fixture('deit_distilled.safetensors'))
  np.testing.assert_array_equal(loaded['dist'], state['dist_token'])


def test_pytorch_checkpoints_read_as_safetensors_do(tmp_path):
  torch = pytest.importorskip('torch')
  state = safetensors.numpy.load_file(fixture('layer_scale_qk_norm.safetensors'))
  torch.save({'model': {k: torch.from_numpy(v) for k, v in state.items()}, 'epoch': 3},
             tmp_path / 'checkpoint.pth')
  shutil.copy(fixture('layer_scale_qk_norm.json'), tmp_path / 'checkpoint.json')
  from_pth, _ = convert.load_weights(tmp_path / 'checkpoint.pth')
  from_safetensors, _ = convert.load_weights(fixture('layer_scale_qk_norm.safetensors'))
  assert from_pth.keys() == from_safetensors.keys()
  for key in from_pth:
    np.testing.assert_array_equal(from_pth[key], from_safetensors[key], err_msg=key)
