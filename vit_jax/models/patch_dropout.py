"""Patch dropout: train on a random subset of the patch tokens (Liu et al. 2022, "PatchDropout";
FLIP, Li et al. 2023; timm's `patch_drop_rate`).

The encoder's sequence really shrinks, so every layer costs less; the tokens in front of the
patches (class token) are always kept, and register tokens are inserted after the drop. The kept
tokens carry the position embeddings already added to them and, with RoPE, their own grid
positions. The choice is drawn from the 'dropout' rng, which the train step derives from its step
key, so a resumed run keeps exactly the tokens an uninterrupted one would.
"""

import jax
import jax.numpy as jnp


def num_kept_patches(num_patches, rate):
  """round((1 - rate) * num_patches), at least 1: how many patch tokens a training step keeps."""
  return max(1, round((1.0 - rate) * num_patches))


def drop_patches(key, tokens, positions, num_prefix_tokens, rate):
  """Keeps a random subset of each example's patch tokens, in their original order.

  Args:
    key: a jax random key (the model's 'dropout' rng).
    tokens: (batch, prefix + patches, width); the first `num_prefix_tokens` are always kept.
    positions: (batch or 1, patches, 2) RoPE grid positions, or None.
    num_prefix_tokens: tokens in front of the patches (the class token).
    rate: the fraction of patches to drop, in [0, 1).

  Returns:
    (tokens (batch, prefix + kept, width), positions (batch, kept, 2) or None,
     kept indices (batch, kept) into the patches).
  """
  batch, num_tokens, _ = tokens.shape
  num_patches = num_tokens - num_prefix_tokens
  num_keep = num_kept_patches(num_patches, rate)
  # The `num_keep` largest of i.i.d. uniform scores: a uniformly random subset per example.
  scores = jax.random.uniform(key, (batch, num_patches))
  keep = jnp.sort(jax.lax.top_k(scores, num_keep)[1], axis=-1)  # (batch, kept)
  patches = jnp.take_along_axis(tokens[:, num_prefix_tokens:], keep[..., None], axis=1)
  tokens = jnp.concatenate([tokens[:, :num_prefix_tokens], patches], axis=1)
  if positions is not None:
    positions = jnp.broadcast_to(positions, (batch,) + positions.shape[1:])
    positions = jnp.take_along_axis(positions, keep[..., None], axis=1)
  return tokens, positions, keep
