"""Correctness of the GPU fast path: cuDNN fused attention and bfloat16 compute.

CI has no GPU, so the cases marked `needs_gpu` skip there. The same comparisons also run with
XLA's attention on whatever backend runs the tests, which keeps the harness itself tested. On a
machine with a CUDA GPU:

  JAX_PLATFORMS=cuda python -m pytest tests/test_gpu.py -v

Tolerances are relative errors ||out - ref|| / ||ref|| against a float32 reference computed
at 'highest' matmul precision from the same (bf16-rounded) inputs, so they measure the kernel's
arithmetic, not the rounding of its inputs: bfloat16 arithmetic lands between 1e-3 and 1e-2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import train_losses_on_one_batch

from configs import quickstart
from vit_jax import models
from vit_jax.tools import benchmark
from vit_jax.train import flops
from vit_jax.models import vit

ON_GPU = jax.default_backend() == 'gpu'
needs_gpu = pytest.mark.skipif(not ON_GPU, reason='needs a CUDA GPU (cuDNN); CI has none')
IMPLEMENTATIONS = ['xla', pytest.param('cudnn', marks=needs_gpu)]
SMALL_VIT = dict(hidden_size=128, num_layers=2, num_heads=4, mlp_dim=256, patch_size=4,
                 classifier='token')  # 64 px: 256 patches + class token = 257 tokens, head 32.


def _relative_error(value, reference):
  value = np.asarray(value, np.float64)
  reference = np.asarray(reference, np.float64)
  assert np.all(np.isfinite(value)), 'non-finite values'
  return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


def _attention_and_grads(implementation, query, key, value, cotangent):
  """Output and (dq, dk, dv) of <attention(q, k, v), cotangent>."""
  def project(q, k, v):
    out = vit.fused_attention(q, k, v, None, implementation)  # As the model calls it.
    return jnp.sum(out.astype(jnp.float32) * cotangent), out
  (_, out), grads = jax.jit(jax.value_and_grad(project, argnums=(0, 1, 2), has_aux=True))(
      query, key, value)
  return out, grads


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
@pytest.mark.parametrize('seed', [0, 1])
def test_bf16_attention_and_its_gradients_match_float32(implementation, seed):
  # ViT-B/16's attention at 224 px: 197 tokens (odd: jax's cuDNN training path refuses it
  # unpadded), 12 heads of 64.
  shape = (4, 197, 12, 64)
  keys = jax.random.split(jax.random.key(seed), 4)
  query, key, value = (jax.random.normal(k, shape, jnp.float32).astype(jnp.bfloat16)
                       for k in keys[:3])
  cotangent = jax.random.normal(keys[3], shape, jnp.float32)
  with jax.default_matmul_precision('highest'):
    upcast = [x.astype(jnp.float32) for x in (query, key, value)]
    ref_out, ref_grads = _attention_and_grads('xla', *upcast, cotangent)
  out, grads = _attention_and_grads(implementation, query, key, value, cotangent)
  assert out.dtype == jnp.bfloat16 and out.shape == shape
  assert _relative_error(out, ref_out) < 1e-2
  for name, grad, ref_grad in zip('qkv', grads, ref_grads):
    assert grad.dtype == jnp.bfloat16, name
    assert _relative_error(grad, ref_grad) < 2e-2, name


@needs_gpu
def test_auto_attention_runs_cudnn_in_a_bf16_vit_on_gpu():
  model = models.create_model('ViT-B/16', 10, dtype=jnp.bfloat16, **SMALL_VIT)
  images = jnp.zeros((2, 64, 64, 3), jnp.float32)
  params = model.init(jax.random.key(0), images)['params']

  def loss(params, images):
    return jnp.sum(model.apply({'params': params}, images).astype(jnp.float32))

  lowered = jax.jit(jax.grad(loss)).lower(params, images)
  assert '__cudnn$fmha' in lowered.as_text()  # Forward and backward fused-attention calls.
  lowered.compile()  # And XLA accepts them for this GPU.
  float32_model = models.create_model('ViT-B/16', 10, dtype=jnp.float32, **SMALL_VIT)
  assert '__cudnn$fmha' not in jax.jit(float32_model.apply).lower(
      {'params': params}, images).as_text()


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_bf16_vit_logits_track_float32(implementation):
  images = jax.random.uniform(jax.random.key(1), (8, 64, 64, 3), jnp.float32, -1, 1)
  float32_model = models.create_model('ViT-B/16', 10, dtype=jnp.float32, **SMALL_VIT)
  params = float32_model.init(jax.random.key(0), images)['params']
  # The head is zero-initialised: give it weights so the logits carry the whole network.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (jax.random.normal(jax.random.key(2), x.shape, x.dtype) * 0.05
                       if 'head' in jax.tree_util.keystr(path) else x), params)
  with jax.default_matmul_precision('highest'):
    reference = float32_model.apply({'params': params}, images)
  bf16_model = models.create_model('ViT-B/16', 10, dtype=jnp.bfloat16,
                                   attention_impl=implementation, **SMALL_VIT)
  logits = jax.jit(bf16_model.apply)({'params': params}, images)
  assert logits.dtype == jnp.float32  # The model hands out float32 logits whatever it computes in.
  assert 1e-4 < _relative_error(logits, reference) < 3e-2  # bf16 did run, and stayed close.


def _train_losses(dtype):
  config = quickstart.get_config()
  with config.unlocked():
    config.model.dtype = dtype
    config.schedule.warmup_steps = 0
    config.batch_size = 32
  return train_losses_on_one_batch(config)


def test_bf16_training_follows_float32_training():
  float32_losses, _ = _train_losses('float32')
  bf16_losses, bf16_skipped = _train_losses('bfloat16')
  assert bf16_skipped == 0 and np.all(np.isfinite(bf16_losses))
  assert float32_losses[-1] < float32_losses[0]  # The batch is being fitted ...
  assert bf16_losses[-1] < bf16_losses[0]  # ... in bfloat16 too,
  np.testing.assert_allclose(bf16_losses, float32_losses, rtol=5e-2)  # along the same path.


@needs_gpu
def test_benchmark_reports_mfu_on_a_known_gpu():
  if flops.peak_flops_per_device() is None:
    pytest.skip(f'{jax.devices()[0].device_kind} is not in the peak FLOP/s table')
  config = quickstart.get_config()
  with config.unlocked():
    config.model.dtype = 'bfloat16'
  figures = benchmark.run(config, num_classes=10, steps=3, repeats=2, warmup=1, skip_data=True)
  assert 0 < figures['train_mfu'] < 1 and 0 < figures['eval_mfu'] < 1
  assert figures['peak_memory_source'] == 'device allocator peak'
  assert vit.attention_implementation('auto', jnp.bfloat16, 16) == 'cudnn'
