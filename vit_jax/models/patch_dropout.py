"""Patch dropout: train on a random subset of the patch tokens (Liu et al. 2022, "PatchDropout";
FLIP, Li et al. 2023; timm's `patch_drop_rate`).

The encoder's sequence really shrinks, so every layer costs less; the tokens in front of the
patches (class token) are always kept, and register tokens are inserted after the drop. The kept
tokens carry the position embeddings already added to them and, with RoPE, their own grid
positions. The choice is drawn from the 'dropout' rng, which the train step derives from its step
key, so a resumed run keeps exactly the tokens an uninterrupted one would.

With NaFlex's padded sequences (a `patch_mask`), the rate applies to each example's real patches:
an image with n real patches keeps round((1 - rate) * n) of them, at least one, and the rest of
the kept slots are padding, which stays masked. Drawing the subset over all slots alike would
drop an image's real patches at a rate that varies with the draw, and could drop all of them.
"""

import jax
import jax.numpy as jnp


def num_kept_patches(num_patches, rate):
  """round((1 - rate) * num_patches), at least 1: how many patch tokens a training step keeps."""
  return max(1, round((1.0 - rate) * num_patches))


def drop_patches(key, tokens, positions, num_prefix_tokens, rate, patch_mask=None):
  """Keeps a random subset of each example's patch tokens, in their original order.

  Args:
    key: a jax random key (the model's 'dropout' rng).
    tokens: (batch, prefix + patches, width); the first `num_prefix_tokens` are always kept.
    positions: (batch or 1, patches, 2) RoPE grid positions, or None.
    num_prefix_tokens: tokens in front of the patches (the class token).
    rate: the fraction of patches to drop, in [0, 1).
    patch_mask: (batch, patches) bool, True on real patches (NaFlex), or None (all real).

  Returns:
    (tokens (batch, prefix + kept, width), positions (batch, kept, 2) or None,
     kept indices (batch, kept) into the patches).
  """
  batch, num_tokens, _ = tokens.shape
  num_patches = num_tokens - num_prefix_tokens
  num_keep = num_kept_patches(num_patches, rate)
  # The `num_keep` largest of i.i.d. uniform scores: a uniformly random subset per example.
  scores = jax.random.uniform(key, (batch, num_patches))
  if patch_mask is not None:
    scores = _real_patches_first(scores, patch_mask, rate)
  keep = jnp.sort(jax.lax.top_k(scores, num_keep)[1], axis=-1)  # (batch, kept)
  patches = jnp.take_along_axis(tokens[:, num_prefix_tokens:], keep[..., None], axis=1)
  tokens = jnp.concatenate([tokens[:, :num_prefix_tokens], patches], axis=1)
  if positions is not None:
    positions = jnp.broadcast_to(positions, (batch,) + positions.shape[1:])
    positions = jnp.take_along_axis(positions, keep[..., None], axis=1)
  return tokens, positions, keep


def _real_patches_first(scores, patch_mask, rate):
  """Scores in [0, 3) whose top `num_kept_patches(patches, rate)` are, per example, a uniformly
  random round((1 - rate) * real) of its real patches (at least one where it has any), then
  padding: the chosen real patches score 2 + u, padding 1 + u, the other real patches u."""
  num_real = jnp.sum(patch_mask, axis=-1, keepdims=True)
  real_to_keep = jnp.maximum(jnp.round((1.0 - rate) * num_real), jnp.minimum(num_real, 1))
  # Each real patch's rank among its example's real patches, by score (padding ranks last).
  rank = jnp.argsort(jnp.argsort(-jnp.where(patch_mask, scores, -1.0), axis=-1), axis=-1)
  chosen = patch_mask & (rank < real_to_keep)
  return scores + jnp.where(chosen, 2.0, jnp.where(patch_mask, 0.0, 1.0))
