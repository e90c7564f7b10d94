"""Attention rollout, per-head maps, position-embedding similarity, filters and their PNGs."""

import numpy as np
import pytest
from PIL import Image

from vit_jax.tools import visualize
from vit_jax.errors import UserError


def _random_attention(rng, layers=3, batch=2, heads=4, tokens=17):
  logits = rng.normal(size=(layers, batch, heads, tokens, tokens))
  weights = np.exp(logits)
  return weights / weights.sum(-1, keepdims=True)      # rows sum to one, like a softmax


def test_rollout_of_identity_attention_is_identity():
  tokens = 1 + 16
  identity = np.broadcast_to(np.eye(tokens), (4, 2, 3, tokens, tokens))
  rollout = visualize.rollout_matrix(identity)
  assert rollout.shape == (2, tokens, tokens)
  np.testing.assert_allclose(np.diagonal(rollout, axis1=1, axis2=2), 1.0)   # uniform diagonal
  np.testing.assert_allclose(rollout, np.broadcast_to(np.eye(tokens), rollout.shape))


def test_identity_attention_maps_per_pooling():
  tokens = 1 + 16
  identity = np.broadcast_to(np.eye(tokens), (2, 1, 3, tokens, tokens))
  # token: the CLS token attended only to itself, so no patch reached it.
  np.testing.assert_allclose(visualize.attention_rollout(identity, 'token'), 0.0)
  # gap (no CLS here: 16 patch tokens): each patch only sees itself, so the mean is uniform.
  patches_only = np.broadcast_to(np.eye(16), (2, 1, 3, 16, 16))
  gap = visualize.attention_rollout(patches_only, 'gap')
  assert gap.shape == (1, 4, 4)
  np.testing.assert_allclose(gap, 1 / 16)


def test_rollout_rows_sum_to_one_and_match_hand_computation():
  rng = np.random.default_rng(0)
  attentions = _random_attention(rng)
  rollout = visualize.rollout_matrix(attentions)
  np.testing.assert_allclose(rollout.sum(-1), 1.0, rtol=1e-10)
  # Layer by layer, written out the long way for batch element 1.
  expected = np.eye(17)
  for layer in attentions[:, 1]:
    mixed = 0.5 * layer.mean(0) + 0.5 * np.eye(17)     # rows of softmax + I sum to 2
    expected = mixed @ expected
  np.testing.assert_allclose(rollout[1], expected, rtol=1e-10)
  cls_map = visualize.attention_rollout(attentions, 'token')
  np.testing.assert_allclose(cls_map[1], expected[0, 1:].reshape(4, 4), rtol=1e-10)


def test_registers_are_dropped_from_the_map():
  rng = np.random.default_rng(1)
  attentions = _random_attention(rng, tokens=1 + 2 + 9)   # CLS, 2 registers, 3x3 patches
  maps = visualize.attention_rollout(attentions, 'token', num_prefix=3)
  assert maps.shape == (2, 3, 3)
  np.testing.assert_allclose(maps[0], visualize.rollout_matrix(attentions)[0, 0, 3:].reshape(3, 3))
  with pytest.raises(UserError, match='grid'):
    visualize.attention_rollout(attentions, 'token', num_prefix=3, grid_shape=(2, 2))


def test_cls_attention_per_head_reads_the_last_layer():
  rng = np.random.default_rng(2)
  attentions = _random_attention(rng)
  heads = visualize.cls_attention_per_head(attentions, 'token')
  assert heads.shape == (2, 4, 4, 4)
  np.testing.assert_allclose(heads[1, 2], attentions[-1, 1, 2, 0, 1:].reshape(4, 4))
  gap_heads = visualize.cls_attention_per_head(attentions[..., 1:, 1:], 'gap')
  np.testing.assert_allclose(gap_heads[0, 3], attentions[-1, 0, 3, 1:, 1:].mean(0).reshape(4, 4))


def test_unknown_classifier_is_a_user_error():
  with pytest.raises(UserError, match='unpooled'):
    visualize.attention_rollout(np.ones((1, 1, 1, 5, 5)) / 5, 'unpooled')


def test_collect_attentions_orders_per_layer_and_reads_scanned():
  blocks = {f'encoderblock_{i}': {'MultiHeadDotProductAttention_1': {
      'attention_weights': (np.full((2, 3, 5, 5), float(i)),)}} for i in (0, 10, 2)}
  blocks['MAPHead_0'] = {'attention_weights': (np.zeros((2, 3, 1, 5)),)}
  stacked = visualize.collect_attentions({'Transformer': blocks})
  assert stacked.shape == (3, 2, 3, 5, 5)
  assert list(stacked[:, 0, 0, 0, 0]) == [0.0, 2.0, 10.0]
  scanned = {'Transformer': {'encoderblock': {'MultiHeadDotProductAttention_1': {
      'attention_weights': (np.zeros((4, 2, 3, 5, 5)),)}}}}
  assert visualize.collect_attentions(scanned).shape == (4, 2, 3, 5, 5)
  with pytest.raises(UserError, match='attention'):
    visualize.collect_attentions({})


def test_posemb_similarity():
  rng = np.random.default_rng(3)
  posemb = rng.normal(size=(1, 1 + 12, 8))
  similarity = visualize.posemb_similarity(posemb, (3, 4), num_prefix=1)
  assert similarity.shape == (3, 4, 3, 4)
  flat = similarity.reshape(12, 12)
  np.testing.assert_allclose(np.diag(flat), 1.0)
  np.testing.assert_allclose(flat, flat.T)
  a, b = posemb[0, 1 + 5], posemb[0, 1 + 7]     # patches (1, 1) and (1, 3)
  np.testing.assert_allclose(similarity[1, 1, 1, 3], a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_patch_embedding_filters_are_orthonormal_components():
  rng = np.random.default_rng(4)
  kernel = rng.normal(size=(4, 4, 3, 64))
  components = visualize.patch_embedding_filters(kernel, num_components=10)
  assert components.shape == (10, 4, 4, 3)
  flat = components.reshape(10, -1)
  np.testing.assert_allclose(flat @ flat.T, np.eye(10), atol=1e-10)
  # The first component carries the most variance of the centred filters.
  filters = kernel.reshape(-1, 64).T
  filters = filters - filters.mean(0)
  variances = ((filters @ flat.T) ** 2).sum(0)
  assert np.all(np.diff(variances) <= 1e-9)


def _read_png(path):
  with Image.open(path) as image:
    return image.size, np.asarray(image.convert('RGB'), np.float64)


def test_pngs_have_expected_size_and_are_not_blank(tmp_path):
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
  attentions = _random_attention(rng, tokens=17)
  px = visualize.PANEL_PX

  visualize.save_attention_overlay(images, visualize.attention_rollout(attentions),
                                   tmp_path / 'overlay.png', titles=['a', 'b'])
  visualize.save_head_grid(images, visualize.cls_attention_per_head(attentions),
                           tmp_path / 'heads.png')
  visualize.save_posemb_similarity(
      visualize.posemb_similarity(rng.normal(size=(1, 17, 8)), num_prefix=1),
      tmp_path / 'posemb.png')
  visualize.save_filters(
      visualize.patch_embedding_filters(rng.normal(size=(4, 4, 3, 32))), tmp_path / 'filters.png')

  expected = {'overlay.png': (2 * px, 2 * px), 'heads.png': ((1 + 4) * px, 2 * px),
              'posemb.png': (4 * px, 4 * px), 'filters.png': (4 * px, 4 * px)}
  for name, size in expected.items():
    actual_size, pixels = _read_png(tmp_path / name)
    assert actual_size == size, name
    assert pixels.var() > 0, name


def test_map_rollout_mixes_patch_rows_by_the_probe():
  rng = np.random.default_rng(6)
  attentions = _random_attention(rng, tokens=16)
  probe = rng.dirichlet(np.ones(16), size=(2, 4))              # (batch, heads, patches)
  maps = visualize.attention_rollout(attentions, 'map', probe=probe)
  rollout = visualize.rollout_matrix(attentions)
  expected = probe[0].mean(0) @ rollout[0]
  np.testing.assert_allclose(maps[0], expected.reshape(4, 4), rtol=1e-10)
  # Without the probe, map falls back to the gap picture.
  np.testing.assert_allclose(visualize.attention_rollout(attentions, 'map'),
                             visualize.attention_rollout(attentions, 'gap'))
  heads = visualize.cls_attention_per_head(attentions, 'map', probe=probe)
  np.testing.assert_allclose(heads[1, 3], probe[1, 3].reshape(4, 4))


def test_model_attentions_from_a_scanned_map_model_with_registers():
  import jax
  from vit_jax.models import create_model
  model = create_model('ViT-Ti/8', 3, classifier='map', scan=True, num_registers=1,
                       hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)
  images = np.random.default_rng(7).uniform(-1, 1, size=(2, 24, 24, 3)).astype(np.float32)
  params = jax.jit(model.init)(jax.random.key(0), images)['params']
  seen = visualize.model_attentions(model, params, images)
  np.testing.assert_allclose(seen.logits, model.apply({'params': params}, images), atol=1e-5)
  assert seen.layers.shape == (2, 2, 2, 1 + 9, 1 + 9)         # 1 register + 3x3 patches
  assert seen.probe.shape == (2, 2, 9)
  np.testing.assert_allclose(seen.layers.sum(-1), 1.0, atol=1e-5)
  maps = visualize.attention_rollout(seen.layers, 'map', num_prefix=1, probe=seen.probe)
  assert maps.shape == (2, 3, 3) and np.all(maps > 0)
