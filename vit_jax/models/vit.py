"""The Vision Transformer (Dosovitskiy et al. 2020), in Flax linen.

The path an image takes:
  images (N, H, W, C)
  -> `embedding`: a P x P conv with stride P, one D-vector per patch   (N, H/P, W/P, D)
     (`flexi.py`: the kernel PI-resized when called at another patch size)
  -> flatten to tokens, prepend the class token `cls` (classifier='token') and the DeiT
     distillation token `dist` (distilled=True)
  -> `Transformer`: add position embeddings (to the patches only with no_embed_class, the class
     and distillation tokens then prepended after), drop patches (`patch_dropout.py`,
     training only), insert register tokens, dropout,
     `pre_norm` (CLIP style, optional), L pre-LayerNorm blocks (LN -> attention -> residual;
     LN -> MLP -> residual), final LayerNorm `encoder_norm` (absent with fc_norm); with RoPE
     (`rope.py`) attention turns the patch tokens' queries and keys by their grid positions
  -> pool (class token, mean, attention probe, or none) -> `fc_norm` (optional, timm style)
  -> `pre_logits` (Dense + tanh, only with representation_size) -> `head` (zero-initialised);
     a distilled model also has `head_dist` on the distillation token.

NaFlex (`naflex.py`): in place of images, a padded sequence of patches at each image's own grid
(a dict of patches, positions, patch_mask, grid_hw); the same kernel embeds them as a matmul, the
learned table is resized per image to its grid, attention and pooling never read padding.

Module and parameter names are those of the published vit_jax checkpoints, so those files load
as they are. Options follow big_vision: defaults live in the dataclass fields, and the defaults
build exactly the published model (tanh GELU, LayerNorm eps 1e-6, qkv biases, one final norm).
The options other libraries need (timm's `fc_norm`, `no_embed_class`, `pre_norm`, `qkv_bias`,
DeiT's distillation token, HF's exact GELU and eps) add parameters only when they are on.
"""

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.errors import UserError
from vit_jax.models import flexi, naflex, patch_dropout, resnet, rope

CLASSIFIERS = ('token', 'gap', 'map', 'unpooled')
POSEMBS = ('learn', 'sincos2d') + tuple(rope.ROPE_POSEMBS)
REMAT_POLICIES = {
    'none': None,  # No remat at all.
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn', 'deferred_norm')
# From this many keys on, 'auto' on a CPU picks 'deferred_norm' over XLA's softmax: one layer's
# attention, forward and backward, took 0.50-0.78 of XLA's time at 65-257 keys (jax 0.10 and
# 0.12), but 1.03-1.35 at 16 (the quickstart's); see BENCHMARKS.md.
DEFERRED_NORM_MIN_KEYS = 64
BOOL_FIELDS = ('gelu_approximate', 'fc_norm', 'no_embed_class', 'qkv_bias', 'pre_norm',
               'distilled')

Dtype = Any


def _check_choice(what, value, valid):
  if value not in valid:
    raise UserError(f'unknown {what} {value!r}; valid: {", ".join(map(str, valid))}')


def _is_number(value):
  return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def _check_rate(what, value, one_allowed=False):
  """A rate in [0, 1): a dropout of 1 would keep nothing; [0, 1] with `one_allowed` (stochastic
  depth at 1 skips the last block's branches, a residual still carries the tokens)."""
  if not (_is_number(value) and 0 <= value and (value <= 1 if one_allowed else value < 1)):
    raise UserError(f'{what} must be a number in [0, {"1]" if one_allowed else "1)"}, '
                    f'got {value!r}')


def posemb_prefix_tokens(model_kwargs):
  """How many tokens before the patch tokens carry a position embedding.

  1 with a class token, 2 with the DeiT distillation token as well, 0 with no_embed_class
  (position embeddings on the patches only). Registers never have one. Reads the model config
  (the dict `vit_jax.models.model_kwargs` returns) rather than guessing from a token count: a
  14x14 grid has 196 tokens, 197 with a class token.
  """
  if model_kwargs.get('no_embed_class'):
    return 0
  if model_kwargs.get('classifier') != 'token':
    return 0
  return 2 if model_kwargs.get('distilled') else 1


def posemb_sincos_2d(grid_hw, width, temperature=10_000., dtype=jnp.float32):
  """Fixed 2-D sine-cosine position embeddings (MoCo v3 / big_vision): (1, gh * gw, width)."""
  if width % 4:
    raise UserError(f'posemb=sincos2d needs a width divisible by 4, got {width}')
  y, x = jnp.mgrid[:grid_hw[0], :grid_hw[1]]
  omega = jnp.arange(width // 4) / (width // 4 - 1)
  omega = 1. / (temperature**omega)
  y = jnp.einsum('m,d->md', y.flatten(), omega)
  x = jnp.einsum('m,d->md', x.flatten(), omega)
  pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
  return jnp.asarray(pe, dtype)[None, :, :]


def resize_posemb(posemb, new_grid_hw, num_prefix_tokens, old_grid_hw=None):
  """Resizes a learned position-embedding table to a new patch grid, bilinearly.

  Args:
    posemb: (1, num_prefix_tokens + gh * gw, D), as stored under
      `Transformer/posembed_input/pos_embedding`.
    new_grid_hw: (gh', gw') of the new grid; need not be square.
    num_prefix_tokens: entries before the grid that are kept as they are (the class token):
      use `posemb_prefix_tokens(model_kwargs)`, never a guess from the token count.
    old_grid_hw: (gh, gw) of the stored grid; None: square, inferred from the token count.

  Returns:
    (1, num_prefix_tokens + gh' * gw', D), a numpy array when `posemb` was one, else a jax
    array; the same object when the grid does not change.
  """
  posemb_shape = tuple(posemb.shape)
  if len(posemb_shape) != 3 or posemb_shape[0] != 1:
    raise UserError(f'position embeddings must be (1, tokens, width), got {posemb_shape}')
  num_grid_tokens = posemb_shape[1] - num_prefix_tokens
  if old_grid_hw is None:
    side = math.isqrt(max(num_grid_tokens, 0))
    if side * side != num_grid_tokens:
      raise UserError(
          f'cannot infer a square grid from {posemb_shape[1]} tokens with {num_prefix_tokens} '
          'prefix tokens; pass old_grid_hw or check num_prefix_tokens')
    old_grid_hw = (side, side)
  old_grid_hw, new_grid_hw = tuple(old_grid_hw), tuple(new_grid_hw)
  if old_grid_hw[0] * old_grid_hw[1] != num_grid_tokens:
    raise UserError(f'old_grid_hw {old_grid_hw} does not match {num_grid_tokens} grid tokens')
  if old_grid_hw == new_grid_hw:
    return posemb

  is_numpy = isinstance(posemb, np.ndarray)
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  grid = jnp.reshape(jnp.asarray(grid, jnp.float32), (*old_grid_hw, -1))
  # Bilinear as big_vision's resample_posemb (antialiased when shrinking).
  grid = jax.image.resize(grid, (*new_grid_hw, grid.shape[-1]), method='bilinear')
  grid = jnp.reshape(grid, (1, new_grid_hw[0] * new_grid_hw[1], -1)).astype(posemb.dtype)
  resized = jnp.concatenate([jnp.asarray(prefix), grid], axis=1)
  return np.asarray(resized) if is_numpy else resized


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch for a random subset of examples."""

  @nn.compact
  def __call__(self, x, rate, deterministic):
    # `rate` is a Python float per layer, or a traced scalar inside nn.scan.
    if deterministic or (isinstance(rate, (int, float)) and rate == 0):
      return x
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(self.make_rng('dropout'), keep_prob,
                                (x.shape[0],) + (1,) * (x.ndim - 1))
    # Rescale the kept examples so the expectation is unchanged; rate 1 drops everything.
    scale = jnp.where(keep, 1.0 / jnp.maximum(keep_prob, 1e-12), 0.0)
    return x * scale.astype(x.dtype)


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout, back to the input width."""
  mlp_dim: int
  dropout_rate: float = 0.0
  gelu_approximate: bool = True  # tanh form (flax's default); False: exact erf (PyTorch's).
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic):
    width = x.shape[-1]
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6))
    x = nn.gelu(dense(self.mlp_dim, 'Dense_0')(x), approximate=self.gelu_approximate)
    x = nn.Dropout(self.dropout_rate)(x, deterministic)
    x = dense(width, 'Dense_1')(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic)


def attention_implementation(attention_impl, dtype, head_dim, device=None, kv_tokens=0):
  """The attention `fused_attention` runs: 'cudnn', 'xla' or 'deferred_norm'.

  'auto' picks cuDNN's fused (flash) attention where jax can run it: a CUDA GPU of compute
  capability 8.0 or later (Ampere, Hopper, ...), bfloat16 or float16, and a head width that is a
  multiple of 8 up to 128 (256 from Hopper on), the limits jax checks before it calls cuDNN.
  On a CPU with `kv_tokens` >= DEFERRED_NORM_MIN_KEYS it picks 'deferred_norm'
  (`deferred_norm_attention`, faster there). Everywhere else (TPU, float32 GPUs, odd head
  widths, short CPU sequences) it picks XLA's softmax(QK^T)V. It does not leave the choice to
  jax (implementation=None), which as of jax 0.10-0.12 always takes XLA. An explicit choice is
  passed through. `device` defaults to the first device (a mesh here is always of one platform).
  """
  device = device or jax.devices()[0]
  if attention_impl == 'cudnn' and device.platform != 'gpu':
    raise UserError(f'attention_impl=cudnn needs a CUDA GPU, but this runs on '
                    f'{device.platform}; use attention_impl=auto (cuDNN where it runs) or xla')
  if attention_impl != 'auto':
    return attention_impl
  if device.platform == 'cpu':
    return 'deferred_norm' if kv_tokens >= DEFERRED_NORM_MIN_KEYS else 'xla'
  capability = getattr(device, 'compute_capability', None)  # '9.0' on CUDA; absent elsewhere.
  try:
    major_minor = tuple(int(part) for part in str(capability).split('.')[:2])
  except ValueError:  # Not a CUDA capability (e.g. a ROCm 'gfx90a'): no cuDNN there.
    return 'xla'
  max_head_dim = 256 if major_minor >= (9, 0) else 128
  fused = (device.platform == 'gpu' and major_minor >= (8, 0)
           and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
           and head_dim % 8 == 0 and head_dim <= max_head_dim)
  return 'cudnn' if fused else 'xla'


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with the parameter layout of flax's MultiHeadDotProductAttention.

  query/key/value kernels are (D, heads, head_dim), the out kernel (heads, head_dim, D). The
  attention `attention_implementation` picks (cuDNN's or XLA's `jax.nn.dot_product_attention`,
  or `deferred_norm_attention`) runs by default; the explicit softmax path runs when the
  weights are wanted (`mutable=['intermediates']`: sown as `attention_weights`, shape
  (batch, heads, q_tokens, k_tokens)) or attention dropout is active.
  """
  num_heads: int
  attention_dropout_rate: float = 0.0
  qk_norm: bool = False
  qkv_bias: bool = True
  layer_norm_eps: float = 1e-6
  attention_impl: str = 'auto'
  rope: Optional[str] = None  # None | axial | mixed: rotate the patch tokens' queries and keys
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, deterministic, positions=None, kv_mask=None):
    """positions: (batch or 1, patches, 2) grid positions of the last tokens, for RoPE.

    kv_mask: bool (batch, kv_tokens) or None: False on padding keys, which no query reads
    (NaFlex). The real keys come first: cuDNN reads the mask as a length per example.
    """
    width = inputs_q.shape[-1]
    if width % self.num_heads:
      raise UserError(f'num_heads {self.num_heads} does not divide the width {width}')
    head_dim = width // self.num_heads
    projection = lambda name: nn.DenseGeneral(
        (self.num_heads, head_dim), dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        use_bias=self.qkv_bias, kernel_init=nn.initializers.xavier_uniform())
    # (batch, tokens, heads, head_dim): the layout jax.nn.dot_product_attention takes.
    query = projection('query')(inputs_q)
    key = projection('key')(inputs_kv)
    value = projection('value')(inputs_kv)
    if self.qk_norm:
      norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                                       param_dtype=self.param_dtype, name=name)
      query, key = norm('query_norm')(query), norm('key_norm')(key)
    if self.rope is not None and positions is not None:
      query, key = rope.RotaryEmbedding2D(self.rope, param_dtype=self.param_dtype, name='rope')(
          query, key, positions)

    wants_weights = self.is_mutable_collection('intermediates')
    drops_weights = not deterministic and self.attention_dropout_rate > 0
    if wants_weights or drops_weights:
      # Softmax in float32, as the fused kernels do.
      weights = jax.nn.softmax(attention_logits(query, key, kv_mask), axis=-1)
      weights = weights.astype(self.dtype)
      self.sow('intermediates', 'attention_weights', weights)
      weights = nn.Dropout(self.attention_dropout_rate, broadcast_dims=())(
          weights, deterministic)
      encoded = jnp.einsum('bhqk,bkhd->bqhd', weights, value)
    else:
      _check_choice('attention_impl', self.attention_impl, ATTENTION_IMPLS)
      if self.attention_impl == 'cudnn' and jnp.dtype(self.dtype) not in (jnp.bfloat16,
                                                                          jnp.float16):
        raise UserError(f'attention_impl=cudnn needs dtype bfloat16 or float16, got '
                        f'{jnp.dtype(self.dtype).name}; use attention_impl=auto or xla')
      implementation = attention_implementation(self.attention_impl, self.dtype, head_dim,
                                                kv_tokens=key.shape[1])
      encoded = fused_attention(query, key, value, kv_mask, implementation)

    return nn.DenseGeneral(
        width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype, name='out',
        kernel_init=nn.initializers.xavier_uniform())(encoded)


def attention_logits(query, key, kv_mask=None):
  """Q K^T / sqrt(head_dim) in float32, (batch, heads, q_tokens, kv_tokens), of (batch, tokens,
  heads, head_dim) arrays; keys where `kv_mask` (bool (batch, kv_tokens)) is False get float32's
  lowest value, which the softmax turns into a zero weight. The scale goes on the queries, the
  smaller operand."""
  scale = jnp.asarray(query.shape[-1] ** -0.5, query.dtype)
  logits = jnp.einsum('bqhd,bkhd->bhqk', query * scale, key, preferred_element_type=jnp.float32)
  if kv_mask is not None:
    logits = jnp.where(kv_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  return logits


def deferred_norm_attention(query, key, value, kv_mask=None):
  """softmax(Q K^T / sqrt(head_dim)) V of (batch, tokens, heads, head_dim) arrays, dividing by
  the softmax's row sums after the product with V rather than before (flash attention's order).

  The same function as XLA's path up to rounding, with less work per (query, key) pair: the
  division runs over (tokens, head_dim) outputs, not (tokens, tokens) weights; the scale goes on
  the queries (`attention_logits`); and the backward pass needs no row sum over the weights'
  gradient. Logits, exp and row sums in float32. `kv_mask`: bool (batch, kv_tokens) or None;
  False keys are not read.
  """
  logits = attention_logits(query, key, kv_mask)
  # Softmax does not change with a shift per row, so the max that keeps exp in range needs no
  # gradient.
  weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  row_sums = jnp.swapaxes(jnp.sum(weights, axis=-1), 1, 2)[..., None]  # (batch, q, heads, 1)
  encoded = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(value.dtype), value,
                       preferred_element_type=jnp.float32)
  return (encoded / row_sums).astype(value.dtype)


def fused_attention(query, key, value, kv_mask, implementation, pad_to_even=None):
  """`jax.nn.dot_product_attention` of (batch, tokens, heads, head_dim) arrays, with the padding
  mask `kv_mask` (bool (batch, kv_tokens) or None) in the form `implementation` takes;
  'deferred_norm' runs `deferred_norm_attention`.

  cuDNN's fused attention, as jax 0.10-0.12 differentiates it, refuses an odd number of query or
  key tokens (its backward is set up as if a bias were given, and a bias needs even lengths):
  ViT-B/16's 197 tokens at 224 px failed on an H200. With `pad_to_even` (default: for cuDNN),
  an odd token axis gets one zero token, which no query reads (a key length per example) and
  whose output row is dropped: the result is the unpadded attention's.
  """
  if implementation == 'deferred_norm':
    return deferred_norm_attention(query, key, value, kv_mask)
  if pad_to_even is None:
    pad_to_even = implementation == 'cudnn'
  batch, q_tokens, kv_tokens = query.shape[0], query.shape[1], key.shape[1]
  padding = pad_to_even and (q_tokens % 2 or kv_tokens % 2)
  if padding:
    pad = lambda x: jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, 0), (0, 0)))
    query, key, value = pad(query), pad(key), pad(value)
  if implementation == 'cudnn' or padding:
    # A key length per example (the real keys come first, as NaFlex lays them out), which cuDNN
    # takes as is where it would expand a boolean mask into a dense bias; the zero token of the
    # padding lies past every length.
    if kv_mask is not None:
      masking = {'key_value_seq_lengths':
                 jnp.maximum(jnp.sum(kv_mask, axis=-1), 1).astype(jnp.int32)}
    elif padding:
      masking = {'key_value_seq_lengths': jnp.full((batch,), kv_tokens, jnp.int32)}
    else:
      masking = {}
  else:
    masking = {} if kv_mask is None else {'mask': kv_mask[:, None, None, :]}
  encoded = jax.nn.dot_product_attention(query, key, value, implementation=implementation,
                                         **masking)
  return encoded[:, :q_tokens]


class EncoderBlock(nn.Module):
  """One pre-LayerNorm transformer block (published name: Encoder1DBlock)."""
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  layer_scale_init: Optional[float] = None
  qk_norm: bool = False
  qkv_bias: bool = True
  gelu_approximate: bool = True
  layer_norm_eps: float = 1e-6
  attention_impl: str = 'auto'
  rope: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, drop_path_rate, deterministic, positions=None, mask=None):
    """x: (batch, tokens, width); mask: bool (batch, tokens), False on padding (NaFlex)."""
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)

    def layer_scale(y, name):
      if self.layer_scale_init is None:
        return y
      scale = self.param(name, nn.initializers.constant(self.layer_scale_init),
                         (y.shape[-1],), self.param_dtype)
      return y * scale.astype(y.dtype)

    y = norm('LayerNorm_0')(x)
    y = MultiHeadDotProductAttention(
        num_heads=self.num_heads, attention_dropout_rate=self.attention_dropout_rate,
        qk_norm=self.qk_norm, qkv_bias=self.qkv_bias, layer_norm_eps=self.layer_norm_eps,
        attention_impl=self.attention_impl, rope=self.rope, dtype=self.dtype,
        param_dtype=self.param_dtype, name='MultiHeadDotProductAttention_1')(
            y, y, deterministic, positions, mask)
    y = nn.Dropout(self.dropout_rate)(y, deterministic)
    x = x + DropPath()(layer_scale(y, 'layer_scale_1'), drop_path_rate, deterministic)

    y = norm('LayerNorm_2')(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                 gelu_approximate=self.gelu_approximate, dtype=self.dtype,
                 param_dtype=self.param_dtype, name='MlpBlock_3')(y, deterministic)
    x = x + DropPath()(layer_scale(y, 'layer_scale_2'), drop_path_rate, deterministic)
    return x, None  # (carry, per-layer output) so nn.scan can run it.


class Encoder(nn.Module):
  """Position embeddings, register tokens, the stack of blocks and the final LayerNorm."""
  num_layers: int
  num_heads: int
  mlp_dim: int
  posemb: str = 'learn'
  num_prefix_tokens: int = 1  # Tokens before the grid that get a position embedding.
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  patch_dropout: float = 0.0
  layer_scale_init: Optional[float] = None
  qk_norm: bool = False
  qkv_bias: bool = True
  gelu_approximate: bool = True
  layer_norm_eps: float = 1e-6
  pre_norm: bool = False
  final_norm: bool = True  # False with fc_norm: the model normalises after pooling instead.
  attention_impl: str = 'auto'
  scan: bool = False
  remat_policy: str = 'none'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, grid_hw, unembedded=None, *, train=False, base_grid_hw=None,
               patch_layout=None):
    """Runs the encoder.

    Args:
      x: (batch, num_prefix_tokens + gh * gw, width), the tokens that get position embeddings.
      grid_hw: (gh, gw), the patch grid.
      unembedded: (batch, K, width) or None: tokens with no position embedding (registers;
        with no_embed_class also the class and distillation tokens in front of them), inserted
        after the first `num_prefix_tokens` tokens.
      train: dropout, drop-path and patch dropout on.
      base_grid_hw: the grid the learned table is stored for, when it differs from `grid_hw`
        (a FlexiViT call at another patch size; see `vit_jax.models.flexi`).
      patch_layout: NaFlex (`vit_jax.models.naflex`), with grid_hw None: a dict of the
        patches' `positions`, `patch_mask`, `grid_hw` and `rope_scale` (RoPE positions are
        multiplied by it: patch / base patch, as `rope.grid_positions` does for FlexiViT).

    Returns:
      (batch, tokens, width), after the final LayerNorm when `final_norm`; with patch_layout
      the pair (that, patch_mask (batch, patches) of the patches kept).
    """
    patch_mask = None
    rope_mode = rope.rope_mode(self.posemb)
    if patch_layout is None:
      posemb = self._position_embeddings(x.shape, grid_hw, base_grid_hw)
      positions = rope.grid_positions(grid_hw, base_grid_hw) if rope_mode else None
    else:
      posemb = self._patch_position_embeddings(x.shape[-1], patch_layout)
      positions = None
      if rope_mode:
        positions = (patch_layout['positions'].astype(jnp.float32)
                     * jnp.asarray(patch_layout['rope_scale'], jnp.float32))
      patch_mask = patch_layout['patch_mask']
    if posemb is not None:
      x = x + posemb.astype(x.dtype)
    if train and self.patch_dropout:
      x, positions, kept = patch_dropout.drop_patches(
          self.make_rng('dropout'), x, positions, self.num_prefix_tokens, self.patch_dropout,
          patch_mask)
      if patch_mask is not None:  # The rate applies to each example's real patches.
        patch_mask = jnp.take_along_axis(patch_mask, kept, axis=1)
    num_front = self.num_prefix_tokens
    if unembedded is not None:
      prefix = self.num_prefix_tokens
      x = jnp.concatenate([x[:, :prefix], unembedded.astype(x.dtype), x[:, prefix:]], axis=1)
      num_front += unembedded.shape[1]
    token_mask = None  # The class, distillation and register tokens are always real.
    if patch_mask is not None:
      token_mask = jnp.concatenate(
          [jnp.ones((x.shape[0], num_front), bool), patch_mask], axis=1)
    x = nn.Dropout(self.dropout_rate)(x, not train)
    if self.pre_norm:  # CLIP: one LayerNorm on the embedded tokens, before the first block.
      x = self._norm('pre_norm')(x)

    # Linear stochastic depth: 0 at the first block, drop_path_rate at the last.
    rates = [self.drop_path_rate * i / max(self.num_layers - 1, 1)
             for i in range(self.num_layers)]
    block_kwargs = dict(
        num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        layer_scale_init=self.layer_scale_init, qk_norm=self.qk_norm, qkv_bias=self.qkv_bias,
        gelu_approximate=self.gelu_approximate, layer_norm_eps=self.layer_norm_eps,
        attention_impl=self.attention_impl, rope=rope_mode, dtype=self.dtype,
        param_dtype=self.param_dtype)
    block_cls = EncoderBlock
    if self.remat_policy != 'none':
      # (self, x, rate, deterministic, positions, mask): inside scan the rate is traced, so only
      # `deterministic` can be static there.
      block_cls = nn.remat(EncoderBlock, prevent_cse=not self.scan,
                           policy=REMAT_POLICIES[self.remat_policy],
                           static_argnums=(3,) if self.scan else (2, 3))
    if self.scan:
      scanned_rates = jnp.asarray(rates, jnp.float32) if self.drop_path_rate else 0.0
      x, _ = nn.scan(
          block_cls, variable_axes={'params': 0, 'intermediates': 0},
          split_rngs={'params': True, 'dropout': True},
          in_axes=(0 if self.drop_path_rate else nn.broadcast, nn.broadcast, nn.broadcast,
                   nn.broadcast),
          length=self.num_layers)(name='encoderblock', **block_kwargs)(
              x, scanned_rates, not train, positions, token_mask)
    else:
      for i in range(self.num_layers):
        x, _ = block_cls(name=f'encoderblock_{i}', **block_kwargs)(
            x, rates[i], not train, positions, token_mask)
    x = self._norm('encoder_norm')(x) if self.final_norm else x
    return x if patch_layout is None else (x, patch_mask)

  def _norm(self, name):
    return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=name)

  def _position_embeddings(self, tokens_shape, grid_hw, base_grid_hw=None):
    """(1, prefix + gh * gw, width): learned, or fixed sin-cos with zeros for the prefix; None
    with RoPE alone. A learned table stored for `base_grid_hw` (FlexiViT) is resized bilinearly."""
    _, num_tokens, width = tokens_shape
    if rope.absolute_posemb(self.posemb) is None:
      return None
    if self.posemb == 'sincos2d':
      prefix = jnp.zeros((1, self.num_prefix_tokens, width), jnp.float32)
      return jnp.concatenate([prefix, posemb_sincos_2d(grid_hw, width)], axis=1)
    shape, table_grid_hw = (1, num_tokens, width), grid_hw
    if base_grid_hw is not None:  # FlexiViT: the table is stored for the base grid.
      table_grid_hw = tuple(base_grid_hw)
      shape = (1, self.num_prefix_tokens + math.prod(table_grid_hw), width)
    scope = 'posembed_input'
    # Catch a grid change here with a useful message, before flax's shape check does.
    if self.has_variable('params', scope):
      stored = self.get_variable('params', scope)['pos_embedding'].shape
      if tuple(stored) != shape:
        raise UserError(
            f'position embeddings were made for {stored[1]} tokens but the images give '
            f'{shape[1]} ({table_grid_hw[0]}x{table_grid_hw[1]} patches + '
            f'{self.num_prefix_tokens}); '
            'resize them with vit_jax.models.resize_posemb')
    table = AddPositionEmbs(param_dtype=self.param_dtype, name=scope)(shape)
    if base_grid_hw is not None:
      table = resize_posemb(table, grid_hw, self.num_prefix_tokens, base_grid_hw)
    return table


  def _patch_position_embeddings(self, width, patch_layout):
    """(batch, prefix + patches, width) for a NaFlex input; None with RoPE alone.

    The learned table is stored for a square grid (the square model's: its image_size //
    patch; initialised from a patch input, the largest square within its tokens) and read
    per image at its own grid (`naflex.gather_posemb`).
    """
    positions = patch_layout['positions']
    batch, num_patches, _ = positions.shape
    absolute = rope.absolute_posemb(self.posemb)
    if absolute is None:
      return None
    if absolute == 'sincos2d':
      prefix = jnp.zeros((batch, self.num_prefix_tokens, width), jnp.float32)
      return jnp.concatenate([prefix, naflex.sincos_posemb(positions, width)], axis=1)
    scope = 'posembed_input'
    if self.has_variable('params', scope):
      shape = tuple(self.get_variable('params', scope)['pos_embedding'].shape)
    else:
      side = max(math.isqrt(num_patches), 1)
      shape = (1, self.num_prefix_tokens + side * side, width)
    table = AddPositionEmbs(param_dtype=self.param_dtype, name=scope)(shape)
    grid_h, grid_w = naflex.table_grid(shape[1] - self.num_prefix_tokens)
    grid_table = jnp.reshape(table[0, self.num_prefix_tokens:], (grid_h, grid_w, width))
    patches = naflex.gather_posemb(grid_table, patch_layout['grid_hw'], positions)
    prefix = jnp.broadcast_to(table[:, :self.num_prefix_tokens].astype(jnp.float32),
                              (batch, self.num_prefix_tokens, width))
    return jnp.concatenate([prefix, patches], axis=1)


class AddPositionEmbs(nn.Module):
  """Holds the learned table as `pos_embedding`, as the published checkpoints do."""
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, shape):
    return self.param('pos_embedding', nn.initializers.normal(stddev=0.02), shape,
                      self.param_dtype)


class MAPHead(nn.Module):
  """Multi-head attention pooling (big_vision): a learned probe attends over the tokens.

  The layout of timm's `attn_pool` (AttentionPoolLatent with one latent): `probe` is its
  `latent`, the query/key/value/out projections its `q`, `kv` (key and value stacked) and
  `proj`, then `LayerNorm_0` and `MlpBlock_0` its `norm` and `mlp`. Its query, key and value
  always have biases (as timm's, whatever the blocks' qkv_bias).
  """
  num_heads: int
  mlp_dim: int
  gelu_approximate: bool = True
  layer_norm_eps: float = 1e-6
  attention_impl: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):  # (batch, tokens, width) -> (batch, width)
    """mask: bool (batch, tokens) or None: the tokens the probe may read (NaFlex)."""
    batch, _, width = x.shape
    probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, width),
                       self.param_dtype)
    probe = jnp.tile(probe.astype(x.dtype), [batch, 1, 1])
    x = MultiHeadDotProductAttention(
        num_heads=self.num_heads, attention_impl=self.attention_impl, dtype=self.dtype,
        param_dtype=self.param_dtype, name='MultiHeadDotProductAttention_0')(
            probe, x, True, kv_mask=mask)
    y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                     param_dtype=self.param_dtype, name='LayerNorm_0')(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim, gelu_approximate=self.gelu_approximate,
                     dtype=self.dtype, param_dtype=self.param_dtype, name='MlpBlock_0')(y, True)
    return x[:, 0]


class VisionTransformer(nn.Module):
  """A ViT classifier; `vit_jax.models.create_model` fills these fields from a name.

  Called as `model.apply({'params': params}, images, train=...)`, it returns float32 logits
  (batch, num_classes), or the pooled features without a head (num_classes None or 0), or one
  output per patch with classifier='unpooled'.

  A distilled model (DeiT: `distilled=True`, a second token `dist` read by a second head
  `head_dist`) returns at eval (train=False) the mean of its two heads' logits, as DeiT and timm
  do. With train=True it returns the pair `(logits, dist_logits)`, each (batch, num_classes):
  `logits` from the class token, for the cross-entropy with the labels, and `dist_logits` from
  the distillation token, for the loss against the teacher. Every other model returns one array
  in training as at eval.

  FlexiViT: `patch_size` is the base patch of the stored kernel; `model.apply(..., patch_size=p)`
  runs at patch p with the kernel PI-resized and a learned position table resized from the base
  grid (H // base x W // base) on the fly (`vit_jax.models.flexi`).
  """
  num_classes: Optional[int]  # None or 0: return the pre-logits features.
  patch_size: Sequence[int] = (16, 16)
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  classifier: str = 'token'  # token | gap | map | unpooled
  posemb: str = 'learn'  # learn | sincos2d | rope | rope_mixed | learn+rope | learn+rope_mixed
  num_registers: int = 0
  representation_size: Optional[int] = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  patch_dropout: float = 0.0  # Fraction of patch tokens dropped in training (0: off).
  layer_scale_init: Optional[float] = None
  qk_norm: bool = False
  # The GELU of every MLP: the tanh approximation (True, flax's and the published models') or
  # the exact erf form (False: PyTorch's nn.GELU, timm's and HF's default 'gelu').
  gelu_approximate: bool = True
  layer_norm_eps: float = 1e-6  # Every LayerNorm's epsilon (HF's default is 1e-12).
  fc_norm: bool = False  # LayerNorm after pooling (`fc_norm`), instead of `encoder_norm` before.
  # Position embeddings on the patch tokens only; the class and distillation tokens are put in
  # front after they are added (timm's no_embed_class: DeiT III, DINOv2 with registers).
  no_embed_class: bool = False
  qkv_bias: bool = True  # Biases on the blocks' query, key and value projections.
  # A LayerNorm (`Transformer/pre_norm`) on the embedded tokens before the first block, as CLIP;
  # the patch embedding then has no bias, as in CLIP and timm.
  pre_norm: bool = False
  distilled: bool = False  # DeiT's distillation token and head; see the class docstring.
  head_bias_init: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scan: bool = False
  remat_policy: str = 'none'  # none | full | dots | dots_no_batch
  attention_impl: str = 'auto'  # auto | xla | cudnn | deferred_norm
  resnet_layers: Optional[Sequence[int]] = None  # Hybrid: units per ResNet stage, e.g. (3, 4, 9).
  resnet_width: int = 64

  def check_config(self):
    """Raises UserError for a field no ViT can have."""
    _check_choice('classifier', self.classifier, CLASSIFIERS)
    _check_choice('posemb', self.posemb, POSEMBS)
    _check_choice('remat_policy', self.remat_policy, REMAT_POLICIES)
    _check_choice('attention_impl', self.attention_impl, ATTENTION_IMPLS)
    for name in BOOL_FIELDS:
      value = getattr(self, name)
      if not isinstance(value, (bool, np.bool_)):
        raise UserError(f'{name} must be True or False, got {value!r}')
    eps = self.layer_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
      raise UserError(f'layer_norm_eps must be a number between 0 and 1 (e.g. 1e-6), got {eps!r}')
    if self.hidden_size % self.num_heads:
      raise UserError(f'num_heads {self.num_heads} does not divide the width {self.hidden_size}')
    if self.num_registers < 0:
      raise UserError(f'num_registers must be >= 0, got {self.num_registers}')
    _check_rate('dropout_rate', self.dropout_rate)
    _check_rate('attention_dropout_rate', self.attention_dropout_rate)
    _check_rate('drop_path_rate', self.drop_path_rate, one_allowed=True)
    scale = self.layer_scale_init
    if scale is not None and not (_is_number(scale) and scale > 0):
      raise UserError(f'layer_scale_init must be a number > 0 (e.g. 1e-5), or None for no layer '
                      f'scale, got {scale!r}')
    if self.distilled:
      problems = []
      if self.classifier != 'token':
        problems.append(f"classifier={self.classifier!r} (valid: 'token')")
      if self.representation_size is not None:
        problems.append(f'representation_size={self.representation_size!r} (valid: None)')
      if self.fc_norm:
        problems.append('fc_norm=True (valid: False)')
      if problems:
        raise UserError('distilled=True reads the class and distillation tokens straight into '
                        'their heads; it needs ' + ', '.join(problems))
    if rope.rope_mode(self.posemb) and (self.hidden_size // self.num_heads) % 4:
      raise UserError(f'posemb={self.posemb} needs a head width (hidden_size / num_heads) '
                      f'divisible by 4, got {self.hidden_size // self.num_heads}')
    if not 0.0 <= self.patch_dropout < 1.0:
      raise UserError(f'patch_dropout must be in [0, 1), got {self.patch_dropout}')
    if self.patch_dropout and self.classifier == 'unpooled':
      raise UserError('patch_dropout with classifier=unpooled would return fewer per-patch '
                      'outputs in training than at eval; use token, gap or map')

  @nn.compact
  def __call__(self, images, *, train=False, patch_size=None):
    """images: float (batch, height, width, channels) in [-1, 1], or a NaFlex patch sequence
    (a dict of patches, positions, patch_mask and grid_hw: `vit_jax.models.naflex`).

    patch_size: (p, q) to run at instead of the base `patch_size` (FlexiViT); None: the base.
    """
    self.check_config()
    base_patch = tuple(self.patch_size)
    patch_hw = base_patch if patch_size is None else flexi.as_hw(patch_size)
    embedding = flexi.PatchEmbedding(self.hidden_size, base_patch, use_bias=not self.pre_norm,
                                     dtype=self.dtype, param_dtype=self.param_dtype,
                                     name='embedding')
    grid_hw = base_grid_hw = patch_layout = None
    if naflex.is_patch_input(images):
      x, patch_layout = self._embed_patches(images, embedding, patch_hw)
    else:
      x, grid_hw, base_grid_hw = self._embed_images(images, embedding, patch_hw)
    batch, _, width = x.shape  # (batch, patches, width)

    # Class and distillation tokens, then registers: the order of the tokens in the sequence.
    prefix = []
    if self.classifier == 'token':
      prefix.append(self.param('cls', nn.initializers.zeros, (1, 1, width), self.param_dtype))
    if self.distilled:
      prefix.append(self.param('dist', nn.initializers.normal(stddev=0.02), (1, 1, width),
                               self.param_dtype))
    prefix = [jnp.tile(token.astype(x.dtype), [batch, 1, 1]) for token in prefix]
    unembedded = []
    if self.num_registers:
      registers = self.param('registers', nn.initializers.normal(stddev=0.02),
                             (1, self.num_registers, width), self.param_dtype)
      unembedded.append(jnp.tile(registers, [batch, 1, 1]))
    if self.no_embed_class:
      unembedded = prefix + unembedded
    else:
      x = jnp.concatenate(prefix + [x], axis=1)
    num_embedded_prefix = posemb_prefix_tokens(
        dict(classifier=self.classifier, distilled=self.distilled,
             no_embed_class=self.no_embed_class))

    x = Encoder(
        num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        posemb=self.posemb, num_prefix_tokens=num_embedded_prefix,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        drop_path_rate=self.drop_path_rate, patch_dropout=self.patch_dropout,
        layer_scale_init=self.layer_scale_init,
        qk_norm=self.qk_norm, qkv_bias=self.qkv_bias, gelu_approximate=self.gelu_approximate,
        layer_norm_eps=self.layer_norm_eps, pre_norm=self.pre_norm, final_norm=not self.fc_norm,
        attention_impl=self.attention_impl, scan=self.scan, remat_policy=self.remat_policy,
        dtype=self.dtype, param_dtype=self.param_dtype, name='Transformer')(
            x, grid_hw, jnp.concatenate(unembedded, axis=1) if unembedded else None,
            train=train, base_grid_hw=base_grid_hw, patch_layout=patch_layout)
    patch_mask = None  # NaFlex: the real patches among those the encoder kept.
    if patch_layout is not None:
      x, patch_mask = x

    num_prefix = len(prefix) + self.num_registers
    patch_tokens = x[:, num_prefix:]  # (batch, gh * gw, width)
    if self.distilled:
      return self._distilled_heads(x[:, 0], x[:, 1], train)
    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = (jnp.mean(patch_tokens, axis=1) if patch_mask is None
           else naflex.masked_mean(patch_tokens, patch_mask))
    elif self.classifier == 'map':
      x = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                  gelu_approximate=self.gelu_approximate, layer_norm_eps=self.layer_norm_eps,
                  attention_impl=self.attention_impl, dtype=self.dtype,
                  param_dtype=self.param_dtype, name='MAPHead_0')(patch_tokens, patch_mask)
    else:  # unpooled: one output per patch.
      x = patch_tokens
    if self.fc_norm:
      x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                       param_dtype=self.param_dtype, name='fc_norm')(x)

    if self.representation_size is not None:
      x = nn.Dense(self.representation_size, dtype=self.dtype, param_dtype=self.param_dtype,
                   name='pre_logits')(x)
      x = nn.tanh(x)
    if self.num_classes:
      x = self._head('head')(x)
    # Logits and features leave in float32, so losses and metrics need no care about dtype.
    return x.astype(jnp.float32)

  def _embed_images(self, images, embedding, patch_hw):
    """(tokens (batch, gh * gw, width), (gh, gw), the stored table's grid or None)."""
    x = jnp.asarray(images, self.dtype)
    if self.resnet_layers is not None:
      x = resnet.resnet_stem(x, self.resnet_layers, self.resnet_width, self.dtype,
                             self.param_dtype)
    base_patch = tuple(self.patch_size)
    patch_h, patch_w = patch_hw
    if x.shape[1] % patch_h or x.shape[2] % patch_w:
      raise UserError(f'patch size {patch_h}x{patch_w} does not divide the image size '
                      f'{images.shape[1]}x{images.shape[2]}'
                      + (' (after the 16x ResNet stem)' if self.resnet_layers else ''))
    base_grid_hw = None  # The grid of the stored position table, when not this call's grid.
    if (patch_h, patch_w) != base_patch:
      base_grid_hw = (x.shape[1] // base_patch[0], x.shape[2] // base_patch[1])
    x = embedding(x, (patch_h, patch_w))
    batch, grid_h, grid_w, width = x.shape
    return jnp.reshape(x, (batch, grid_h * grid_w, width)), (grid_h, grid_w), base_grid_hw

  def _embed_patches(self, inputs, embedding, patch_hw):
    """NaFlex: (tokens (batch, patches, width), the layout the encoder reads)."""
    if self.resnet_layers is not None:
      raise UserError('a hybrid (R50+ViT) model takes images, not NaFlex patches: its ResNet '
                      'root needs the whole image')
    naflex.check_patch_input(inputs, patch_hw)
    x = embedding(jnp.asarray(inputs['patches'], self.dtype), patch_hw)
    base_patch = tuple(self.patch_size)
    layout = dict(positions=jnp.asarray(inputs['positions'], jnp.int32),
                  patch_mask=jnp.asarray(inputs['patch_mask'], bool),
                  grid_hw=jnp.asarray(inputs['grid_hw'], jnp.int32),
                  rope_scale=(patch_hw[0] / base_patch[0], patch_hw[1] / base_patch[1]))
    return x, layout

  def _head(self, name):
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.constant(self.head_bias_init), name=name)

  def _distilled_heads(self, cls_token, dist_token, train):
    """DeiT: each token through its own head; the mean at eval, both in training."""
    if not self.num_classes:
      return ((cls_token + dist_token) / 2).astype(jnp.float32)
    logits = self._head('head')(cls_token).astype(jnp.float32)
    dist_logits = self._head('head_dist')(dist_token).astype(jnp.float32)
    if train:
      return logits, dist_logits
    return (logits + dist_logits) / 2
