"""ViT-S/4 from scratch on CIFAR-100 at 32 px: the CIFAR-10 scratch recipe with 100 classes.

  python train.py --config configs/vit_s4_cifar100_scratch.py

Expected: roughly 70–75% test accuracy (the range reported for small ViTs trained from scratch
on CIFAR-100 with strong augmentation, e.g. Lee et al. 2021); not yet measured with this code.
"""

from configs import vit_s4_cifar10_scratch


def get_config():
  config = vit_s4_cifar10_scratch.get_config()
  config.data.name = 'cifar100'
  return config
