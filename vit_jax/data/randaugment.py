"""RandAugment (Cubuk et al. 2019) in stateless TensorFlow, on uint8 (H, W, 3) images.

Each of `num_layers` rounds picks one op uniformly from `OPS` and applies it at `magnitude`
(0..30; 10 is the usual "full" strength, as in big_vision and timm). Ops with a direction
(rotate, shear, translate, colour factors) take a random sign. All randomness comes from the
(2,) seed, so an example's augmentation is fixed by (config.seed, its stream position).
"""

import math

from vit_jax.data.tensorflow_import import tf

_MAX_LEVEL = 10.0
_FILL = 128.0  # grey for pixels uncovered by a geometric transform


def _to_uint8(image):
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _blend(degenerate, image, factor):
  """PIL ImageEnhance: factor 0 gives `degenerate`, 1 the image, >1 extrapolates."""
  return degenerate + factor * (image - degenerate)


def _grey(image):
  """float (H, W, 3) -> float (H, W, 1) luminance."""
  return tf.image.rgb_to_grayscale(image)


def _transform(image, transform):
  """Projective transform (output -> input coordinates, 8 numbers) with grey fill."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  transformed = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.cast(transform, tf.float32)[None],
      output_shape=tf.stack([height, width]), fill_value=_FILL, interpolation='BILINEAR',
      fill_mode='CONSTANT')
  return transformed[0]


def identity(image, fraction, sign):
  """The image unchanged."""
  del fraction, sign
  return image


def auto_contrast(image, fraction, sign):
  """Stretch each channel to the full 0..255 range."""
  del fraction, sign
  low = tf.reduce_min(image, axis=[0, 1], keepdims=True)
  high = tf.reduce_max(image, axis=[0, 1], keepdims=True)
  scale = tf.where(high > low, 255.0 / tf.maximum(high - low, 1e-3), 1.0)
  offset = tf.where(high > low, low, 0.0)
  return (image - offset) * scale


def equalize(image, fraction, sign):
  """Histogram equalisation per channel (PIL ImageOps.equalize)."""
  del fraction, sign
  def equalize_channel(channel):  # float (H, W)
    pixels = tf.cast(channel, tf.int32)
    histogram = tf.math.bincount(pixels, minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(histogram, histogram > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    def lookup():
      lut = (tf.cumsum(histogram) + step // 2) // tf.maximum(step, 1)
      lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
      return tf.cast(tf.gather(lut, pixels), tf.float32)
    return tf.cond(step > 0, lookup, lambda: channel)
  return tf.stack([equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def rotate(image, fraction, sign):
  """Rotate about the centre by up to 30 degrees at magnitude 10."""
  angle = sign * fraction * math.radians(30.0)
  height = tf.cast(tf.shape(image)[0], tf.float32) - 1
  width = tf.cast(tf.shape(image)[1], tf.float32) - 1
  cos, sin = tf.cos(angle), tf.sin(angle)
  x_offset = (width - (cos * width - sin * height)) / 2
  y_offset = (height - (sin * width + cos * height)) / 2
  return _transform(image, tf.stack([cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0]))


def shear_x(image, fraction, sign):
  """Shear horizontally: each row shifts by up to 0.3 x its y at magnitude 10."""
  shear = sign * fraction * 0.3
  return _transform(image, tf.stack([1.0, shear, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def shear_y(image, fraction, sign):
  """Shear vertically: each column shifts by up to 0.3 x its x at magnitude 10."""
  shear = sign * fraction * 0.3
  return _transform(image, tf.stack([1.0, 0.0, 0.0, shear, 1.0, 0.0, 0.0, 0.0]))


def translate_x(image, fraction, sign):
  """Shift by up to 45% of the width at magnitude 10 (timm's translate_pct)."""
  shift = sign * fraction * 0.45 * tf.cast(tf.shape(image)[1], tf.float32)
  return _transform(image, tf.stack([1.0, 0.0, shift, 0.0, 1.0, 0.0, 0.0, 0.0]))


def translate_y(image, fraction, sign):
  """Shift by up to 45% of the height at magnitude 10 (timm's translate_pct)."""
  shift = sign * fraction * 0.45 * tf.cast(tf.shape(image)[0], tf.float32)
  return _transform(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, shift, 0.0, 0.0]))


def solarize(image, fraction, sign):
  """Invert pixels above a threshold that falls from 256 to 0 as the magnitude grows."""
  del sign
  threshold = tf.maximum(256.0 * (1.0 - fraction), 0.0)
  return tf.where(image >= threshold, 255.0 - image, image)


def posterize(image, fraction, sign):
  """Keep 8 bits at magnitude 0 down to 4 bits at magnitude 10 (at least 1)."""
  del sign
  bits = tf.clip_by_value(8 - tf.cast(tf.round(4.0 * fraction), tf.int32), 1, 8)
  shift = tf.cast(8 - bits, tf.uint8)
  pixels = tf.cast(image, tf.uint8)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(pixels, shift), shift), tf.float32)


def _factor(fraction, sign):
  return tf.maximum(1.0 + sign * fraction * 0.9, 0.0)


def color(image, fraction, sign):
  """Saturation: blend with the grey image by a factor 1 +- 0.9 at magnitude 10 (PIL's Color)."""
  return _blend(tf.tile(_grey(image), [1, 1, 3]), image, _factor(fraction, sign))


def contrast(image, fraction, sign):
  """Blend with the mean grey level by a factor 1 +- 0.9 at magnitude 10 (PIL's Contrast)."""
  mean = tf.reduce_mean(_grey(image))
  return _blend(tf.fill(tf.shape(image), mean), image, _factor(fraction, sign))


def brightness(image, fraction, sign):
  """Blend with black by a factor 1 +- 0.9 at magnitude 10 (PIL's Brightness)."""
  return _blend(tf.zeros_like(image), image, _factor(fraction, sign))


def sharpness(image, fraction, sign):
  """PIL's SMOOTH kernel as the degenerate image (edges kept as they are)."""
  kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], padding='VALID')[0]
  degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  interior = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])
  degenerate = interior * degenerate + (1.0 - interior) * image
  return _blend(degenerate, image, _factor(fraction, sign))


OPS = (identity, auto_contrast, equalize, rotate, solarize, color, posterize, contrast,
       brightness, sharpness, shear_x, shear_y, translate_x, translate_y)


def randaugment(image, seed, num_layers, magnitude):
  """uint8 (H, W, 3) -> uint8 (H, W, 3) after `num_layers` random ops at `magnitude`."""
  fraction = float(magnitude) / _MAX_LEVEL
  shape = image.shape
  layer_seeds = tf.random.experimental.stateless_split(seed, num=num_layers)  # (layers, 2)

  # A while loop rather than a Python loop: the 14 branches are traced once, not per layer.
  def one_layer(layer, image):
    op_seed, sign_seed = tf.unstack(
        tf.random.experimental.stateless_split(layer_seeds[layer], num=2))
    op_index = tf.random.stateless_uniform([], op_seed, 0, len(OPS), dtype=tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
    branches = [lambda op=op: tf.cast(_to_uint8(op(image, fraction, sign)), tf.float32)
                for op in OPS]
    return layer + 1, tf.ensure_shape(tf.switch_case(op_index, branches), shape)

  _, image = tf.while_loop(lambda layer, _: layer < num_layers, one_layer,
                           (tf.constant(0), tf.cast(image, tf.float32)))
  return tf.ensure_shape(_to_uint8(image), shape)
