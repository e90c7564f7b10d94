"""Fine-tune any ImageNet-21k ViT on a tfds data set: `configs/vit.py:<variant>,<dataset>`.

  python train.py --config configs/vit.py:S/16,cifar100
  python train.py --config configs/vit.py:L/16,cifar10

The ViT paper's fine-tuning recipe (Dosovitskiy et al. 2021, appendix B.1.1; the
google-research/vision_transformer configs): SGD momentum 0.9, global-norm clip 1, warmup 500
then cosine from 0.03, batch 512, 384 px, the head re-initialised and position embeddings
resized. Steps: 10k for CIFAR, 20k for ImageNet.
Expected test accuracy (vision_transformer README, i21k → 384 px fine-tunes; not reproduced
here, which needs a GPU/TPU): CIFAR-10 S/16 98.7, B/16 99.0, L/16 99.1; CIFAR-100 S/16 90.0,
B/16 92.4, L/16 93.0; ImageNet B/16 84.0 (the paper's Table 2 at 384 px for L/16: 85.3).
"""

import re

from vit_jax.train import config as config_lib

SIZES = {'ti': 'Ti', 's': 'S', 'b': 'B', 'l': 'L', 'h': 'H', 'g': 'g'}

# data set → (train split, eval split, host image size, training steps)
DATASETS = {
    'cifar10': ('train[:98%]', 'test', 32, 10_000),
    'cifar100': ('train[:98%]', 'test', 32, 10_000),
    'imagenet2012': ('train[:99%]', 'validation', None, 20_000),
}
PRETRAINED_URL = 'https://storage.googleapis.com/vit_models/imagenet21k/ViT-{}_{}.npz'


def get_config(arg='B/16,cifar10'):
  variant, _, dataset = arg.partition(',')
  match = re.fullmatch(r'([A-Za-z]+)/?(\d+)', variant)  # 'B/16', or 'b16' as on a shell line
  size = SIZES.get(match.group(1).lower()) if match else None
  if size is None or dataset not in DATASETS:
    raise ValueError(f'configs/vit.py:{arg}: expected <size>/<patch>,<dataset> with size in '
                     f'{" ".join(SIZES.values())} and dataset in {", ".join(DATASETS)}')
  patch = match.group(2)
  variant = f'{size}/{patch}'
  train_split, eval_split, host_size, steps = DATASETS[dataset]

  config = config_lib.defaults()
  config.model_name = f'ViT-{variant}'
  config.image_size = 384

  config.data.source = 'tfds'
  config.data.name = dataset
  config.data.train_split = train_split
  config.data.eval_split = eval_split
  config.data.host_image_size = host_size  # CIFAR: 32 px from the host, resized on the device.
  if host_size:
    config.aug.crop = 'random_crop'
    config.aug.random_crop_pad = 4
  else:
    config.aug.crop = 'inception_crop'
    config.aug.eval_crop_fraction = 0.875
  config.aug.flip = True

  config.batch_size = 512
  config.total_steps = steps
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.9
  config.optimizer.grad_clip_norm = 1.0
  config.schedule.name = 'cosine'
  config.schedule.base_lr = 0.03
  config.schedule.warmup_steps = 500

  config.pretrained.path = f'vit_models/imagenet21k/ViT-{size}_{patch}.npz'
  config.pretrained.url = PRETRAINED_URL.format(size, patch)
  return config
