"""Per-example host preprocessing in TensorFlow: decode, crop, resize, flip, RandAugment.

Every random choice uses a stateless op seeded by a (2,) int64 `seed` that the caller derives
from (config.seed, position of the example in the global stream), so the same example at the
same step always gets the same crop: that is what makes `train_batches(start_step)` resumable.
Images stay uint8 (H, W, 3) at the host size; scaling to [-1, 1] happens on the device.
"""

from vit_jax.data.tensorflow_import import tf

from vit_jax.data import randaugment


def decode(encoded):
  """Encoded JPEG/PNG/BMP/GIF/WebP bytes -> uint8 (H, W, 3)."""
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def to_rgb(image):
  """uint8 (H, W, 1 or 3) -> uint8 (H, W, 3); grey is repeated over the channels."""
  if image.shape[-1] == 1:
    return tf.tile(image, [1, 1, 3])
  return image


def resize(image, size):
  """Square resize (bilinear, antialiased), skipped when the image already has that size."""
  def do_resize():
    resized = tf.image.resize(image, [size, size], method='bilinear', antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
  shape = tf.shape(image)
  already = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))
  resized = tf.cond(already, lambda: tf.cast(image, tf.uint8), do_resize)
  return tf.ensure_shape(resized, [size, size, 3])


def inception_crop(image, seed, min_area):
  """A random crop of area fraction in [min_area, 1] and aspect ratio in [3/4, 4/3]."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      area_range=(min_area, 1.0), aspect_ratio_range=(3 / 4, 4 / 3), min_object_covered=0.0,
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  return tf.slice(image, begin, crop_size)


def pad_and_random_crop(image, seed, pad):
  """CIFAR-style: zero-pad by `pad` pixels on each side, then crop back to the input size."""
  height, width = image.shape[0], image.shape[1]
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  return tf.image.stateless_random_crop(padded, [height, width, 3], seed=seed)


def train_preprocess(image, seed, aug, host_image_size, resize_fn=None):
  """uint8 (H, W, 3) of any size -> augmented uint8 (host_image_size, host_image_size, 3).

  Args:
    image: uint8 (H, W, 3).
    seed: int64 (2,), unique to this example at this step.
    aug: config.aug (crop, inception_min_area, random_crop_pad, flip, randaugment_*).
    host_image_size: output side length.
    resize_fn: image -> image in place of the square resize to host_image_size (NaFlex: each
      image to its own grid, `vit_jax.data.naflex`); the output then has its size.
  """
  crop_seed, flip_seed, randaugment_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=3))
  if aug.crop == 'inception_crop':
    image = inception_crop(image, crop_seed, aug.inception_min_area)
  image = resize(image, host_image_size) if resize_fn is None else resize_fn(image)
  if aug.crop == 'random_crop':
    image = pad_and_random_crop(image, crop_seed, aug.random_crop_pad)
  if aug.flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  if aug.randaugment_layers > 0:
    image = randaugment.randaugment(
        image, randaugment_seed, aug.randaugment_layers, aug.randaugment_magnitude)
  return image


def eval_preprocess(image, host_image_size, crop_fraction):
  """Resize to host_image_size / crop_fraction, then take the central host_image_size crop."""
  if crop_fraction >= 1.0:
    return resize(image, host_image_size)
  resized_size = int(round(host_image_size / crop_fraction))
  image = resize(image, resized_size)
  offset = (resized_size - host_image_size) // 2
  return image[offset:offset + host_image_size, offset:offset + host_image_size]
