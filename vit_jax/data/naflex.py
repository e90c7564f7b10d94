"""NaFlex on the host: each image at its own aspect ratio, cut into at most `max_tokens` patches.

As big_vision's `resize_to_sequence` + `patchify` (SigLIP 2) and timm's NaFlex loader: an image
of H x W pixels is resized, keeping its aspect ratio, to the largest size whose grid of patches
fits in `max_tokens` (`grid_for`; each side rounded up to whole patches, at least one), cut into
patches in row-major order and padded to `max_tokens` (`patchify`). The batch is then

  patches     uint8 (batch, max_tokens, ph * pw * 3), real patches first, zeros after
  positions   int32 (batch, max_tokens, 2), each patch's (row, column); (0, 0) on padding
  patch_mask  bool (batch, max_tokens), True on real patches
  grid_hw     int32 (batch, 2), each image's grid; (0, 0) for a padding example of an eval batch

plus 'labels' (and the eval 'mask' of real examples), the layout `vit_jax.models.naflex` reads
once `vit_jax.data.device.preprocess_patches` has scaled the patches. Small images are resized
up, large ones down: every image fills the sequence as far as its aspect ratio allows.
"""

import dataclasses

import numpy as np
from vit_jax.data.tensorflow_import import tf

from vit_jax.data import augment
from vit_jax.data import device


@dataclasses.dataclass(frozen=True)
class Spec:
  """How images become patch sequences: the model's patch and the tokens per image."""
  patch_hw: tuple  # (ph, pw)
  max_tokens: int


def grid_for(height, width, spec):
  """int32 (2,): the largest grid (gh, gw) with gh * gw <= max_tokens at the image's aspect ratio.

  At scale r the image is resized to (ceil(H r / ph) * ph, ceil(W r / pw) * pw), at least one
  patch a side; the token count grows with r, so the largest r that fits is one where a side
  just reaches a whole number k of patches: r = k ph / H or r = k pw / W. All 2 * max_tokens of
  those are tried at once (in exact integer arithmetic) and the largest that fits is taken.
  """
  patch_h, patch_w = spec.patch_hw
  height, width = tf.cast(height, tf.int64), tf.cast(width, tf.int64)
  k = tf.range(1, spec.max_tokens + 1, dtype=tf.int64)
  ceil_div = lambda a, b: -(-a // b)
  # Rows reach k patches: r = k ph / H, columns ceil(W r / pw); and the other way round.
  rows_first = tf.stack([k, tf.maximum(ceil_div(width * k * patch_h, height * patch_w), 1)], 1)
  cols_first = tf.stack([tf.maximum(ceil_div(height * k * patch_w, width * patch_h), 1), k], 1)
  grids = tf.concat([rows_first, cols_first], axis=0)  # (2 * max_tokens, 2)
  scales = tf.concat([tf.cast(k * patch_h, tf.float64) / tf.cast(height, tf.float64),
                      tf.cast(k * patch_w, tf.float64) / tf.cast(width, tf.float64)], axis=0)
  fits = grids[:, 0] * grids[:, 1] <= spec.max_tokens
  best = tf.argmax(tf.where(fits, scales, tf.zeros_like(scales) - 1.0))
  return tf.cast(grids[best], tf.int32)


def resize_to_grid(image, spec):
  """uint8 (H, W, 3) -> (uint8 (gh * ph, gw * pw, 3), grid (gh, gw)): bilinear, antialiased."""
  grid = grid_for(tf.shape(image)[0], tf.shape(image)[1], spec)
  size = grid * tf.constant(spec.patch_hw, tf.int32)
  resized = tf.image.resize(image, size, method='bilinear', antialias=True)
  resized = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
  return resized, grid


def patchify(image, grid, spec):
  """uint8 (gh * ph, gw * pw, 3) -> one example's patches, positions, patch_mask and grid_hw,
  padded to max_tokens (the patch layout of `vit_jax.models.naflex.patchify`)."""
  patch_h, patch_w = spec.patch_hw
  grid_h, grid_w = grid[0], grid[1]
  num_patches = grid_h * grid_w
  patches = tf.reshape(image, [grid_h, patch_h, grid_w, patch_w, 3])
  patches = tf.reshape(tf.transpose(patches, [0, 2, 1, 3, 4]),
                       [num_patches, patch_h * patch_w * 3])
  rows, cols = tf.meshgrid(tf.range(grid_h), tf.range(grid_w), indexing='ij')
  positions = tf.stack([tf.reshape(rows, [-1]), tf.reshape(cols, [-1])], axis=1)
  padding = spec.max_tokens - num_patches
  return {
      'patches': tf.ensure_shape(tf.pad(patches, [[0, padding], [0, 0]]),
                                 [spec.max_tokens, patch_h * patch_w * 3]),
      'positions': tf.ensure_shape(tf.pad(positions, [[0, padding], [0, 0]]),
                                   [spec.max_tokens, 2]),
      'patch_mask': tf.range(spec.max_tokens) < num_patches,
      'grid_hw': tf.ensure_shape(tf.cast(grid, tf.int32), [2]),
  }


def train_preprocess(image, seed, aug, spec):
  """uint8 (H, W, 3) -> an augmented example: config.aug's crop (resize or inception_crop),
  then the resize to its grid, flip and RandAugment, then the patches (seeded as
  `augment.train_preprocess`)."""
  image = augment.train_preprocess(image, seed, aug, host_image_size=None,
                                   resize_fn=lambda cropped: resize_to_grid(cropped, spec)[0])
  grid = tf.shape(image)[:2] // tf.constant(spec.patch_hw, tf.int32)
  return patchify(image, grid, spec)


def eval_preprocess(image, spec, crop_fraction=1.0):
  """uint8 (H, W, 3) -> its patches: the central `crop_fraction` of each side (all of it at 1),
  resized to its grid."""
  if crop_fraction < 1.0:
    image = tf.image.central_crop(image, crop_fraction)
  resized, grid = resize_to_grid(image, spec)
  return patchify(resized, grid, spec)


def empty_inputs(spec, count):
  """Zeros of `count` examples (no patch real): the padding of a short eval batch."""
  shapes = device.naflex_batch_shapes(spec.patch_hw, spec.max_tokens, count)
  return {key: np.zeros(shape, dtype) for key, (shape, dtype) in shapes.items()}


def batch_from_images(images, spec, crop_fraction=1.0):
  """uint8 (H, W, 3) arrays of any sizes -> a NaFlex batch (numpy), as an eval batch has them."""
  examples = [eval_preprocess(tf.convert_to_tensor(image), spec, crop_fraction)
              for image in images]
  return {key: np.stack([example[key].numpy() for example in examples])
          for key in examples[0]}
