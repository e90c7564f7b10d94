"""Weight conversion: HF parity with transformers, npz layouts, fitting to a model, the CLI."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import shared_fixtures
from vit_jax import models
from vit_jax.weights import convert
from vit_jax.errors import UserError
from vit_jax.weights import hf, tree
from vit_jax.train import workdir as workdir_lib

TINY = dict(patch_size=8, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)


def tiny_kwargs(num_classes=5, **overrides):
  return models.model_kwargs('ViT-B/16', num_classes, **{**TINY, **overrides})


def random_params(model_kwargs, image_size, seed=0):
  """Params of the model with every leaf random (the init zeroes the head and class token)."""
  model_cls = models.MlpMixer if 'tokens_mlp_dim' in model_kwargs else models.VisionTransformer
  images = jnp.zeros((1, image_size, image_size, 3))
  shapes = jax.eval_shape(lambda: model_cls(**model_kwargs).init(jax.random.key(0), images))
  rng = np.random.default_rng(seed)
  flat = {}
  for key, leaf in tree.flatten(shapes['params']).items():
    value = rng.normal(0, 0.2, leaf.shape).astype(np.float32)
    flat[key] = value + 1 if key.endswith('scale') else value
  return tree.unflatten(flat)


_COMPILED = {}


def apply(model_kwargs, params, images):
  """Logits, with one compiled function per model shared by the tests (CPU time is scarce)."""
  key = repr(sorted(model_kwargs.items()))
  if key not in _COMPILED:
    model_cls = (models.MlpMixer if 'tokens_mlp_dim' in model_kwargs
                 else models.VisionTransformer)
    model = model_cls(**model_kwargs)
    _COMPILED[key] = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
  return np.asarray(_COMPILED[key](params, images))


def random_images(image_size, seed=1):
  return np.random.default_rng(seed).uniform(-1, 1, (2, image_size, image_size, 3)).astype(
      np.float32)


def max_abs_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# ---------------------------------------------------------------------------------------------
# HuggingFace transformers: logits parity both ways, on two architectures.

HF_ARCHS = [
    # (image_size, model overrides)
    (64, dict(patch_size=8, hidden_size=48, num_layers=3, num_heads=4, mlp_dim=96)),
    (224, dict(patch_size=16, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)),
]


# Model options HF ViT holds: our defaults (tanh GELU, eps 1e-6), and transformers' defaults.
HF_OPTIONS = {
    'published': dict(),
    'hf_defaults': dict(gelu_approximate=False, layer_norm_eps=1e-12),
    'exact_no_qkv_bias': dict(gelu_approximate=False, qkv_bias=False),
}


@pytest.mark.parametrize('options', HF_OPTIONS)
@pytest.mark.parametrize('image_size,arch', HF_ARCHS, ids=['p8_64px', 'p16_224px'])
def test_vit_jax_to_hf_logits_match_transformers(tmp_path, image_size, arch, options):
  transformers = pytest.importorskip('transformers')
  torch = pytest.importorskip('torch')
  kwargs = models.model_kwargs('ViT-B/16', 7, **arch, **HF_OPTIONS[options])
  params = random_params(kwargs, image_size)
  images = random_images(image_size)

  convert.to_hf(params, kwargs, tmp_path / 'hf', class_names=[f'c{i}' for i in range(7)])
  hf_model, info = transformers.ViTForImageClassification.from_pretrained(
      tmp_path / 'hf', output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  assert hf_model.config.id2label[3] == 'c3'
  assert hf_model.config.hidden_act == ('gelu_pytorch_tanh' if kwargs['gelu_approximate']
                                        else 'gelu')
  assert hf_model.config.layer_norm_eps == kwargs['layer_norm_eps']
  with torch.no_grad():
    hf_logits = hf_model(torch.from_numpy(images.transpose(0, 3, 1, 2))).logits.numpy()

  ours = apply(kwargs, params, images)
  assert ours.shape == hf_logits.shape == (2, 7)
  assert np.abs(ours).max() > 0.1  # Not a degenerate all-zero comparison.
  assert max_abs_diff(ours, hf_logits) <= 1e-4


# HF configs: the tanh GELU and eps of the published models, and ViTConfig's own defaults
# (exact GELU, eps 1e-12), which most hub models keep.
HF_CONFIGS = {
    'tanh_eps1e-6': dict(hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6),
    'vitconfig_defaults': dict(),
}


@pytest.mark.parametrize('hf_options', HF_CONFIGS)
@pytest.mark.parametrize('image_size,arch', HF_ARCHS, ids=['p8_64px', 'p16_224px'])
def test_hf_to_vit_jax_logits_match_transformers(tmp_path, image_size, arch, hf_options):
  transformers = pytest.importorskip('transformers')
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  config = transformers.ViTConfig(
      hidden_size=arch['hidden_size'], num_hidden_layers=arch['num_layers'],
      num_attention_heads=arch['num_heads'], intermediate_size=arch['mlp_dim'],
      image_size=image_size, patch_size=arch['patch_size'], num_labels=6,
      **HF_CONFIGS[hf_options])
  hf_model = transformers.ViTForImageClassification(config).eval()
  with torch.no_grad():  # LayerNorms start at (1, 0) and biases at 0: make them count.
    for tensor in hf_model.state_dict().values():
      tensor.add_(0.1 * torch.randn_like(tensor))
  hf_model.save_pretrained(tmp_path / 'hf')
  images = random_images(image_size)
  with torch.no_grad():
    hf_logits = hf_model(torch.from_numpy(images.transpose(0, 3, 1, 2))).logits.numpy()

  params, kwargs = convert.from_hf(tmp_path / 'hf')
  assert kwargs['num_layers'] == arch['num_layers'] and kwargs['num_classes'] == 6
  assert (kwargs['gelu_approximate'], kwargs['layer_norm_eps']) == (
      config.hidden_act != 'gelu', config.layer_norm_eps)
  ours = apply(convert.complete_kwargs(kwargs), params, images)
  assert max_abs_diff(ours, hf_logits) <= 1e-4

  # And back: the written directory holds exactly the tensors transformers saved, and the
  # config the same activation and epsilon.
  from safetensors.numpy import load_file
  convert.to_hf(params, kwargs, tmp_path / 'again', image_size=image_size)
  saved, again = (load_file(tmp_path / d / 'model.safetensors') for d in ('hf', 'again'))
  assert saved.keys() == again.keys()
  for key in saved:
    np.testing.assert_array_equal(saved[key], again[key], err_msg=key)
  written = json.loads((tmp_path / 'again' / 'config.json').read_text())
  assert (written['hidden_act'], written['layer_norm_eps']) == (config.hidden_act,
                                                                config.layer_norm_eps)


def test_hf_default_config_fixture_loads_with_transformers_logits(capsys):
  """A model transformers saved with ViTConfig's defaults (see shared/fixtures/README.md)."""
  folder = shared_fixtures('hf_vit_default')
  notes = []
  flat, metadata = convert.load_weights(folder, log=notes.append)
  assert notes == [] and capsys.readouterr().out == ''  # No note about the GELU any more.
  kwargs = convert.complete_kwargs(metadata['model_kwargs'])
  assert (kwargs['gelu_approximate'], kwargs['layer_norm_eps']) == (False, 1e-12)
  expected = np.load(os.path.join(folder, 'logits.npy'))
  ours = apply(kwargs, tree.unflatten(flat), np.load(os.path.join(folder, 'x.npy')))
  assert np.abs(expected).max() > 0.1
  assert max_abs_diff(ours, expected) <= 1e-4
  # The published model's tanh GELU and eps 1e-6 would be outside the promise (2.5e-4 off).
  tanh = apply({**kwargs, 'gelu_approximate': True, 'layer_norm_eps': 1e-6},
               tree.unflatten(flat), np.load(os.path.join(folder, 'x.npy')))
  assert max_abs_diff(tanh, expected) > 1e-4


def test_hf_refuses_models_it_cannot_hold(tmp_path):
  params = random_params(tiny_kwargs(classifier='gap'), 32)
  with pytest.raises(UserError, match=r"classifier='gap'"):
    convert.to_hf(params, tiny_kwargs(classifier='gap'), tmp_path / 'hf')
  assert not os.path.exists(tmp_path / 'hf')
  for option in ('fc_norm', 'pre_norm', 'no_embed_class', 'distilled'):
    kwargs = tiny_kwargs(**{option: True})
    with pytest.raises(UserError, match=f'{option}=True'):
      convert.to_hf(random_params(kwargs, 32), kwargs, tmp_path / 'hf')
  assert not os.path.exists(tmp_path / 'hf')
  mixer = models.model_kwargs('Mixer-B/16', 3, patch_size=8, hidden_size=16, num_layers=1,
                              tokens_mlp_dim=8, channels_mlp_dim=16)
  with pytest.raises(UserError, match='Mixer'):
    convert.to_hf(random_params(mixer, 32), mixer, tmp_path / 'hf')
  assert os.listdir(tmp_path) == []


def test_hf_reader_takes_new_key_names_and_refuses_unknown_activations(tmp_path):
  from safetensors.numpy import load_file, save_file
  kwargs = tiny_kwargs()
  params = random_params(kwargs, 32)
  convert.to_hf(params, kwargs, tmp_path / 'hf')
  legacy = load_file(tmp_path / 'hf' / 'model.safetensors')
  # The module names transformers >= 5 uses in memory, as another tool might save them.
  renamed = {key.replace('vit.encoder.layer.', 'vit.layers.')
             .replace('attention.attention.query', 'attention.q_proj')
             .replace('attention.attention.key', 'attention.k_proj')
             .replace('attention.attention.value', 'attention.v_proj')
             .replace('attention.output.dense', 'attention.o_proj')
             .replace('intermediate.dense', 'mlp.fc1')
             .replace('output.dense', 'mlp.fc2'): value for key, value in legacy.items()}
  assert 'vit.layers.1.mlp.fc2.weight' in renamed
  save_file(renamed, tmp_path / 'hf' / 'model.safetensors', metadata={'format': 'pt'})
  loaded, _ = convert.from_hf(tmp_path / 'hf')
  for key, value in tree.flatten(params).items():
    np.testing.assert_array_equal(tree.flatten(loaded)[key], value, err_msg=key)

  config_path = tmp_path / 'hf' / 'config.json'
  config = json.loads(config_path.read_text())
  config_path.write_text(json.dumps({**config, 'hidden_act': 'relu'}))
  with pytest.raises(UserError, match="hidden_act 'relu'"):
    convert.from_hf(tmp_path / 'hf')
  config_path.write_text(json.dumps({**config, 'hidden_act': 'gelu'}))
  _, metadata = hf.read(str(tmp_path / 'hf'))
  assert metadata['model_kwargs']['gelu_approximate'] is False  # Exact GELU: an option now.


# ---------------------------------------------------------------------------------------------
# .npz: exact round trip, the published layouts, big_vision's.


def test_npz_round_trip_is_exact_and_per_layer(tmp_path):
  kwargs = tiny_kwargs(scan=True)
  params = random_params(kwargs, 32)
  convert.save_weights(params, tmp_path / 'w.npz')
  with np.load(tmp_path / 'w.npz') as archive:
    keys = set(archive.files)
  # The published (and timm-readable) layout: per-layer, no prefix.
  assert 'Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel' in keys
  assert not any(key.startswith(('params/', 'Transformer/encoderblock/')) for key in keys)

  loaded, metadata = convert.load_weights(tmp_path / 'w.npz')
  assert metadata['format'] == 'npz'
  expected = tree.flatten(models.scan_to_layers(params))
  assert loaded.keys() == expected.keys()
  for key in expected:
    assert loaded[key].dtype == expected[key].dtype
    np.testing.assert_array_equal(loaded[key], expected[key], err_msg=key)

  # timm's npz loader reads this same layout. The old spelling of that format still works.
  notes = []
  convert.save_weights(params, tmp_path / 'for_timm.npz', format='timm', log=notes.append)
  assert len(notes) == 1 and "format 'timm' now means timm's own state dicts" in notes[0]
  with np.load(tmp_path / 'for_timm.npz') as archive:
    assert set(archive.files) == keys
  assert convert.load_weights(tmp_path / 'for_timm.npz', format='timm', log=notes.append)[
      1]['format'] == 'npz' and len(notes) == 2
  mixer = models.model_kwargs('Mixer-B/16', 3, patch_size=8, hidden_size=16, num_layers=1,
                              tokens_mlp_dim=8, channels_mlp_dim=16)
  with pytest.raises(UserError, match='timm format holds ViTs'):
    convert.save_weights(random_params(mixer, 32), tmp_path / 'mixer.npz', format='timm')
  assert not os.path.exists(tmp_path / 'mixer.npz')


def published_npz(path, name, image_size, groupnorm_4d=False):
  """A file in the published key layout, from the model's shapes, with random values."""
  kwargs = models.model_kwargs(name, 1000)
  model_cls = models.MlpMixer if name.startswith('Mixer') else models.VisionTransformer
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  shapes = tree.flatten(jax.eval_shape(
      lambda x: model_cls(**kwargs).init(jax.random.key(0), x), images)['params'])
  rng = np.random.default_rng(0)
  arrays = {}
  for key, leaf in shapes.items():
    shape = leaf.shape
    if groupnorm_4d and '/gn' in f'/{key}' and len(shape) == 1:
      shape = (1, 1, 1) + shape  # As pre-2021 flax stored GroupNorm parameters.
    arrays[key] = rng.standard_normal(shape, dtype=np.float32)
  np.savez(path, **arrays)
  return kwargs, shapes, arrays


@pytest.mark.parametrize('name,published_keys', [
    ('ViT-B/16', ('cls', 'Transformer/encoderblock_11/MlpBlock_3/Dense_1/kernel')),
    ('R50+ViT-B/16', ('conv_root/kernel', 'block3/unit1/gn_proj/scale',
                      'Transformer/posembed_input/pos_embedding')),
    ('Mixer-B/16', ('stem/kernel', 'MixerBlock_11/token_mixing/Dense_0/kernel',
                    'pre_head_layer_norm/scale')),
])
def test_published_layout_loads_into_named_model(tmp_path, name, published_keys):
  kwargs, shapes, arrays = published_npz(tmp_path / 'w.npz', name, 224,
                                         groupnorm_4d=name.startswith('R50'))
  assert set(published_keys) <= set(arrays)
  params = convert.load_for_finetune(tmp_path / 'w.npz', tree.unflatten(shapes), kwargs,
                                     model_name=name)
  loaded = tree.flatten(params)
  assert loaded.keys() == shapes.keys()
  for key in loaded:
    assert loaded[key].shape == shapes[key].shape, key
    np.testing.assert_array_equal(loaded[key].reshape(-1), arrays[key].reshape(-1),
                                  err_msg=key)


def to_big_vision(params, scanned):
  """A tiny token-ViT's params as big_vision writes them (the test's own independent mapping)."""
  flat = tree.flatten(params)
  out = {}
  names = {'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0',
           'LayerNorm_2': 'LayerNorm_1', 'MlpBlock_3': 'MlpBlock_0'}
  posemb = flat.pop('Transformer/posembed_input/pos_embedding')
  out['params/pos_embedding'] = posemb[:, 1:]  # Patches only ...
  out['params/cls'] = flat.pop('cls') + posemb[:, :1]  # ... the class token's entry folded in.
  blocks = {}
  for key, value in flat.items():
    parts = key.split('/')
    if parts[0] == 'Transformer' and parts[1].startswith('encoderblock_'):
      parts[2] = names.get(parts[2], parts[2])
      if scanned:
        blocks.setdefault('/'.join(parts[2:]), {})[int(parts[1].split('_')[1])] = value
        continue
    out['params/' + '/'.join(parts)] = value
  for key, per_layer in blocks.items():
    out[f'params/Transformer/encoderblock/{key}'] = np.stack(
        [per_layer[i] for i in sorted(per_layer)])
  out['opt/acc/head/kernel'] = np.zeros(1)  # Optimizer state: ignored.
  return out


@pytest.mark.parametrize('scanned_file,scanned_model', [(True, False), (False, True)])
def test_big_vision_layout_gives_the_same_logits(tmp_path, scanned_file, scanned_model):
  kwargs = tiny_kwargs()
  params = random_params(kwargs, 32)
  images = random_images(32)
  np.savez(tmp_path / 'bv.npz', **to_big_vision(params, scanned_file))

  target_kwargs = tiny_kwargs(scan=scanned_model)
  init = random_params(target_kwargs, 32, seed=5)
  loaded = convert.load_for_finetune(tmp_path / 'bv.npz', init, target_kwargs)
  assert ('encoderblock' in loaded['Transformer']) == scanned_model
  assert max_abs_diff(apply(target_kwargs, loaded, images), apply(kwargs, params, images)) < 1e-5


# ---------------------------------------------------------------------------------------------
# Fitting to a model: fresh heads, resized position embeddings, exact key errors.


def test_same_model_loads_unchanged(tmp_path):
  kwargs = tiny_kwargs()
  params = random_params(kwargs, 32)
  convert.save_weights(params, tmp_path / 'w.npz')
  init = random_params(kwargs, 32, seed=9)
  messages = []
  loaded = convert.load_for_finetune(tmp_path / 'w.npz', init, kwargs, log=messages.append)
  assert messages == []
  images = random_images(32)
  np.testing.assert_array_equal(apply(kwargs, loaded, images), apply(kwargs, params, images))


def test_new_resolution_and_classes_resize_posemb_and_refresh_head(tmp_path):
  source_kwargs = tiny_kwargs(num_classes=5, patch_size=16)
  params = random_params(source_kwargs, 224)  # 14x14 grid + class token
  convert.save_weights(params, tmp_path / 'w.npz')
  target_kwargs = tiny_kwargs(num_classes=3, patch_size=16)
  init = random_params(target_kwargs, 384, seed=9)  # 24x24 grid + class token
  messages = []
  loaded = convert.load_for_finetune(tmp_path / 'w.npz', init, target_kwargs,
                                     log=messages.append)
  assert any('fresh head' in m for m in messages)
  assert any('resized position embeddings (1, 197, 32) -> (1, 577, 32)' in m for m in messages)

  np.testing.assert_array_equal(loaded['head']['kernel'], init['head']['kernel'])
  np.testing.assert_array_equal(loaded['head']['bias'], init['head']['bias'])
  posemb = loaded['Transformer']['posembed_input']['pos_embedding']
  old = params['Transformer']['posembed_input']['pos_embedding']
  np.testing.assert_array_equal(posemb[:, 0], old[:, 0])  # The class token's entry is kept.
  np.testing.assert_allclose(posemb, models.resize_posemb(old, (24, 24), 1), atol=1e-6)
  np.testing.assert_array_equal(loaded['embedding']['kernel'], params['embedding']['kernel'])
  assert apply(target_kwargs, loaded, random_images(384)).shape == (2, 3)


def test_pre_logits_dropped_when_the_model_has_none(tmp_path):
  params = random_params(tiny_kwargs(representation_size=16), 32)
  convert.save_weights(params, tmp_path / 'w.npz')
  kwargs = tiny_kwargs(num_classes=2)
  messages = []
  loaded = convert.load_for_finetune(tmp_path / 'w.npz', random_params(kwargs, 32), kwargs,
                                     log=messages.append)
  assert 'pre_logits' not in loaded
  assert any('dropped' in m and 'pre_logits' in m for m in messages)


def test_mixer_into_vit_lists_the_differing_keys(tmp_path):
  mixer = models.model_kwargs('Mixer-B/16', 5, patch_size=8, hidden_size=32, num_layers=2,
                              tokens_mlp_dim=8, channels_mlp_dim=16)
  convert.save_weights(random_params(mixer, 32), tmp_path / 'mixer.npz')
  kwargs = tiny_kwargs()
  with pytest.raises(UserError) as error:
    convert.load_for_finetune(tmp_path / 'mixer.npz', random_params(kwargs, 32), kwargs,
                              model_name='ViT-tiny')
  message = str(error.value)
  assert '\n' not in message
  assert 'does not match ViT-tiny (the checkpoint is a Mixer, the model a ViT)' in message
  assert 'missing ' in message and 'unexpected ' in message
  assert 'Transformer/encoderblock_{0..1}/MultiHeadDotProductAttention_1/query/kernel' in message
  assert 'MixerBlock_{0..1}/token_mixing/Dense_0/kernel' in message
  assert 'stem/kernel' in message and 'cls' in message


def test_wrong_width_is_reported_with_shapes(tmp_path):
  convert.save_weights(random_params(tiny_kwargs(mlp_dim=128), 32), tmp_path / 'w.npz')
  kwargs = tiny_kwargs()
  with pytest.raises(UserError, match=r'wrong shape Transformer/encoderblock_\{0\.\.1\}/'
                                      r'MlpBlock_3/Dense_0/bias \(128,\) \(model: \(64,\)\)'):
    convert.load_for_finetune(tmp_path / 'w.npz', random_params(kwargs, 32), kwargs)


def test_unreadable_sources_name_the_path_and_formats(tmp_path):
  with pytest.raises(UserError, match='no such file'):
    convert.load_weights(tmp_path / 'absent.npz')
  (tmp_path / 'junk.npz').write_text('not a zip')
  with pytest.raises(UserError, match='junk.npz'):
    convert.load_weights(tmp_path / 'junk.npz')
  (tmp_path / 'weights.onnx').write_text('?')
  with pytest.raises(UserError, match='force one of: npz, hf, timm, workdir'):
    convert.load_weights(tmp_path / 'weights.onnx')
  (tmp_path / 'weights.safetensors').write_text('?')  # timm's suffix: named and refused.
  with pytest.raises(UserError, match='weights.safetensors'):
    convert.load_weights(tmp_path / 'weights.safetensors')
  with pytest.raises(UserError, match="unknown format 'onnx'"):
    convert.load_weights(tmp_path / 'junk.npz', format='onnx')


# ---------------------------------------------------------------------------------------------
# The command line, and train.py workdirs.


def test_cli_npz_to_hf_and_back_with_nothing_left_on_failure(tmp_path, capsys):
  kwargs = tiny_kwargs()
  params = random_params(kwargs, 32)
  convert.save_weights(params, tmp_path / 'w.npz')
  convert.main([str(tmp_path / 'w.npz'), str(tmp_path / 'hf')])
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert (config['hidden_act'], config['image_size'], config['num_labels'] if 'num_labels'
          in config else len(config['id2label'])) == ('gelu_pytorch_tanh', 32, 5)
  convert.main([str(tmp_path / 'hf'), str(tmp_path / 'back.npz')])
  back, _ = convert.load_weights(tmp_path / 'back.npz')
  for key, value in tree.flatten(params).items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)

  before = sorted(os.listdir(tmp_path))
  status = convert.main([str(tmp_path / 'w.npz'), str(tmp_path / 'out.npz'), '--model',
                         'Mixer-B/16'])
  assert status == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err
  assert sorted(os.listdir(tmp_path)) == before  # No output, no temporary files.


def test_cli_fits_to_a_new_size_and_class_count(tmp_path):
  convert.save_weights(random_params(tiny_kwargs(), 32), tmp_path / 'w.npz')
  convert.main([str(tmp_path / 'w.npz'), str(tmp_path / 'out.npz'), '--num_classes', '10',
                '--image_size', '64'])
  out, _ = convert.load_weights(tmp_path / 'out.npz')
  assert out['head/kernel'].shape == (32, 10)
  assert out['Transformer/posembed_input/pos_embedding'].shape == (1, 65, 32)


def test_workdir_converts_to_npz_and_hf(tmp_path):
  import orbax.checkpoint as ocp
  from vit_jax.train import config as config_lib
  workdir = tmp_path / 'run'
  kwargs = tiny_kwargs(num_classes=3)
  params = random_params(kwargs, 32)
  os.makedirs(workdir)
  config = config_lib.defaults()
  config.model_name, config.image_size, config.data.source = 'ViT-B/8', 32, 'digits'
  config.model.update({k: v for k, v in TINY.items() if k != 'patch_size'})
  (workdir / 'config.json').write_text(json.dumps(
      config_lib.workdir_record(config_lib.resolve(config))))
  (workdir / 'class_names.json').write_text(json.dumps(['cat', 'dog', 'eel']))
  manager = ocp.CheckpointManager(workdir / workdir_lib.CHECKPOINT_SUBDIR,
                                  item_names=('params', 'train_state'))
  manager.save(7, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                          train_state=ocp.args.StandardSave({'step': 7})))
  manager.wait_until_finished()
  manager.close()

  for src in (workdir, workdir / 'checkpoints' / '7'):
    loaded, metadata = convert.load_weights(src)
    assert metadata['format'] == 'workdir' and metadata['class_names'] == ['cat', 'dog', 'eel']
    for key, value in tree.flatten(params).items():
      np.testing.assert_array_equal(loaded[key], value, err_msg=key)
  convert.main([str(workdir), str(tmp_path / 'hf')])
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert config['id2label'] == {'0': 'cat', '1': 'dog', '2': 'eel'}
