"""On-device preprocessing, called inside the jitted train and eval steps.

The host ships small uint8 images (cheap to transfer); here they are resized to the model's
resolution, scaled to [-1, 1] and, for training, mixed (mixup / cutmix) with label smoothing.
A NaFlex batch (`vit_jax.data.naflex`) ships uint8 patches instead, scaled here alike.
Mixing pairs each example with the one mirrored in the batch (index N - 1 - i).
"""

import jax
import jax.numpy as jnp
import numpy as np


def preprocess(images, image_size):
  """uint8 (N, h, w, 3) -> float32 (N, image_size, image_size, 3) in [-1, 1].

  Bilinear, antialiased when shrinking; skipped when the size already matches.
  """
  images = images.astype(jnp.float32)
  batch, height, width, channels = images.shape
  if (height, width) != (image_size, image_size):
    images = jax.image.resize(images, (batch, image_size, image_size, channels),
                              method='bilinear', antialias=True)
  return jnp.clip(images / 127.5 - 1.0, -1.0, 1.0)


preprocess_on_device = preprocess  # the name docs/ARCHITECTURE.md uses


def naflex_batch_shapes(patch_hw, max_tokens, batch_size):
  """{key: (shape, numpy dtype)} of a NaFlex batch's inputs as the host delivers them.

  Each image's patches (its grid of `patch_hw` patches at its own aspect ratio, real patches
  first, `vit_jax.data.naflex`), padded to `max_tokens`: uint8 pixels, flattened per patch in
  (row, column, channel) order.
  """
  patch_h, patch_w = patch_hw
  return {'patches': ((batch_size, max_tokens, patch_h * patch_w * 3), np.uint8),
          'positions': ((batch_size, max_tokens, 2), np.int32),
          'patch_mask': ((batch_size, max_tokens), np.bool_),
          'grid_hw': ((batch_size, 2), np.int32)}


def preprocess_patches(batch):
  """A NaFlex batch -> the model's patch input: uint8 patches to float32 in [-1, 1] (as
  `preprocess` scales images), positions, patch_mask and grid_hw as they are."""
  patches = jnp.clip(batch['patches'].astype(jnp.float32) / 127.5 - 1.0, -1.0, 1.0)
  return {'patches': patches, 'positions': batch['positions'],
          'patch_mask': batch['patch_mask'], 'grid_hw': batch['grid_hw']}


def model_inputs(batch, image_size):
  """A host batch -> what the model takes: square images resized to `image_size` and scaled
  (`preprocess`), or, for a NaFlex batch (with 'patches'), its patches scaled."""
  if 'patches' in batch:
    return preprocess_patches(batch)
  return preprocess(batch['images'], image_size)


def smooth_labels(labels, num_classes, label_smoothing=0.0):
  """int (N,) -> float32 (N, num_classes): one-hot with `label_smoothing` spread evenly."""
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return one_hot * (1.0 - label_smoothing) + label_smoothing / num_classes


def _cutmix_mask(rng, lam, height, width):
  """bool (height, width): True inside a random box of area fraction about 1 - lam."""
  rng_y, rng_x = jax.random.split(rng)
  ratio = jnp.sqrt(1.0 - lam)
  box_h, box_w = jnp.round(height * ratio), jnp.round(width * ratio)
  center_y = jax.random.uniform(rng_y, (), maxval=height)
  center_x = jax.random.uniform(rng_x, (), maxval=width)
  top, bottom = jnp.clip(center_y - box_h / 2, 0, height), jnp.clip(center_y + box_h / 2, 0, height)
  left, right = jnp.clip(center_x - box_w / 2, 0, width), jnp.clip(center_x + box_w / 2, 0, width)
  rows = jnp.arange(height)[:, None] + 0.5
  cols = jnp.arange(width)[None, :] + 0.5
  return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


def mix(rng, images, labels, num_classes, mixup_alpha=0.0, cutmix_alpha=0.0,
        label_smoothing=0.0):
  """Mixup or cutmix plus label smoothing.

  Args:
    rng: a jax PRNG key (fold in the step so each step mixes differently).
    images: float (N, H, W, C), already preprocessed.
    labels: int (N,).
    num_classes: width of the targets.
    mixup_alpha, cutmix_alpha: Beta(alpha, alpha) parameters; 0 turns that one off. With both
      on, each batch uses one of the two, chosen with probability 1/2 (as in timm).
    label_smoothing: mass spread evenly over all classes.

  Returns:
    (images, targets): images as given or mixed; targets float32 (N, num_classes), rows sum to 1.
  """
  targets = smooth_labels(labels, num_classes, label_smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  rng_choice, rng_mixup, rng_cutmix, rng_box = jax.random.split(rng, 4)
  partner_images, partner_targets = images[::-1], targets[::-1]
  height, width = images.shape[1], images.shape[2]

  def mixup():
    lam = jax.random.beta(rng_mixup, mixup_alpha, mixup_alpha)
    return lam * images + (1.0 - lam) * partner_images, lam

  def cutmix():
    lam = jax.random.beta(rng_cutmix, cutmix_alpha, cutmix_alpha)
    inside = _cutmix_mask(rng_box, lam, height, width)
    mixed = jnp.where(inside[None, :, :, None], partner_images, images)
    return mixed, 1.0 - jnp.mean(inside.astype(jnp.float32))  # the area actually kept

  if mixup_alpha > 0 and cutmix_alpha > 0:
    mixup_images, mixup_lam = mixup()
    cutmix_images, cutmix_lam = cutmix()
    use_cutmix = jax.random.bernoulli(rng_choice)
    images = jnp.where(use_cutmix, cutmix_images, mixup_images)
    lam = jnp.where(use_cutmix, cutmix_lam, mixup_lam)
  else:
    images, lam = mixup() if mixup_alpha > 0 else cutmix()
  lam = lam.astype(jnp.float32)
  return images.astype(jnp.float32), lam * targets + (1.0 - lam) * partner_targets
