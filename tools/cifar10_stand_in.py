r"""Prepares tfds `cifar10` offline from synthetic images, to time the real tfds input pipeline.

tfds prepares cifar10 from the CIFAR-10 binary archive, which needs the network. This script
writes files in that archive's layout (`cifar-10-batches-bin/data_batch_{1..5}.bin`,
`test_batch.bin`, `batches.meta.txt`: one label byte then 3072 bytes of R, G, B planes per
image; 50,000 train and 10,000 test images) and runs tfds' own `Cifar10` builder on them, with
only the download step pointed at the local folder. The result is the same TFRecord files,
features and split sizes as the real data set, so `configs/vit_b16_cifar10.py` reads, decodes
and augments them exactly as it would CIFAR-10. Only the pixels differ: smooth random images
(low-frequency noise plus a little grain) whose PNGs average about the size of CIFAR-10's, so
PNG decoding costs about the same. Never train on it: the labels are random.

  python tools/cifar10_stand_in.py /tmp/tfds_stand_in
  python -m vit_jax.tools.benchmark --config configs/vit_b16_cifar10.py --data_only \
      --config.data.data_dir=/tmp/tfds_stand_in
"""

import os
import sys

import numpy as np

IMAGES_PER_TRAIN_FILE = 10_000
CLASS_NAMES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
               'truck')


def smooth_images(rng, count):
  """(count, 32, 32, 3) uint8: 8x8 colour noise upsampled 4x bilinearly, plus grain."""
  coarse = rng.uniform(0, 255, (count, 9, 9, 3))
  grid = np.linspace(0, 8, 32)
  low, frac = np.floor(grid).astype(int).clip(max=7), grid - np.floor(grid).clip(max=7)
  rows = coarse[:, low] * (1 - frac)[None, :, None, None] + coarse[:, low + 1] * frac[
      None, :, None, None]
  images = (rows[:, :, low] * (1 - frac)[None, None, :, None]
            + rows[:, :, low + 1] * frac[None, None, :, None])
  images += rng.normal(0, 6, images.shape)
  return images.clip(0, 255).astype(np.uint8)


def write_binary_batch(path, images, labels):
  """One CIFAR-10 binary file: per image, its label byte then the R, G and B planes."""
  planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # (n, 3072) channel-major
  records = np.concatenate([labels[:, None].astype(np.uint8), planes], axis=1)
  records.tofile(path)


def write_archive_layout(folder, seed=0):
  rng = np.random.default_rng(seed)
  batches = os.path.join(folder, 'cifar-10-batches-bin')
  os.makedirs(batches, exist_ok=True)
  names = [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']
  for name in names:
    labels = rng.integers(0, 10, IMAGES_PER_TRAIN_FILE)
    write_binary_batch(os.path.join(batches, name),
                       smooth_images(rng, IMAGES_PER_TRAIN_FILE), labels)
  with open(os.path.join(batches, 'batches.meta.txt'), 'w') as f:
    f.write('\n'.join(CLASS_NAMES) + '\n')


def prepare(data_dir):
  """Writes the archive layout under data_dir/downloads and prepares tfds cifar10 from it."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = os.path.join(data_dir, 'downloads', 'cifar10_stand_in')
  write_archive_layout(source)
  # The builder's only network access: hand it the local folder instead of the archive's URL.
  tfds.download.DownloadManager.download_and_extract = lambda self, url: source
  builder = tfds.builder('cifar10', data_dir=data_dir)
  builder.download_and_prepare()
  return builder


def main(argv):
  if len(argv) != 2:
    sys.exit('usage: python tools/cifar10_stand_in.py DATA_DIR')
  builder = prepare(argv[1])
  files = [os.path.join(builder.data_dir, f) for f in os.listdir(builder.data_dir)
           if '.tfrecord' in f]
  print(f'prepared {builder.info.full_name} in {builder.data_dir}: '
        f'{builder.info.splits["train"].num_examples} train, '
        f'{builder.info.splits["test"].num_examples} test, '
        f'{sum(map(os.path.getsize, files)) / 60_000:.0f} bytes per example on disk')


if __name__ == '__main__':
  main(sys.argv)
