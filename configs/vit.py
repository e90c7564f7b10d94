"""Fine-tune a ViT on a tfds data set, the ViT paper's way: `configs/vit.py:<variant>,<dataset>`.

  python train.py --config configs/vit.py:L/16,cifar10
  python train.py --config configs/vit.py:S/16,cifar100 --config.pretrained.path=vit_s16.npz

The ViT paper's fine-tuning recipe (Dosovitskiy et al. 2021, appendix B.1.1; the
google-research/vision_transformer configs): SGD momentum 0.9, global-norm clip 1, warmup 500
then cosine from 0.03, batch 512, 384 px (or the next multiple of a patch that does not divide
384: 392 px for /14), the head re-initialised and position embeddings resized. Steps: 10k for
CIFAR, 20k for ImageNet.

Weights: vision_transformer's published ImageNet-21k `.npz` exists for B/8, B/16, B/32, L/16,
L/32 and H/14 (`PUBLISHED`), fetched into `vit_models/imagenet21k/` when absent and online. Any
other variant (Ti, S, g, other patches) sets no pretrained weights: it trains from scratch on
this fine-tuning recipe unless `--config.pretrained.path` names a file of yours (any format
`vit_jax.tools.convert` reads), which must then exist.

Expected test accuracy (vision_transformer README, i21k → 384 px fine-tunes; not reproduced
here, which needs a GPU/TPU): CIFAR-10 S/16 98.7, B/16 99.0, L/16 99.1; CIFAR-100 S/16 90.0,
B/16 92.4, L/16 93.0; ImageNet B/16 84.0 (the paper's Table 2 at 384 px for L/16: 85.3). S/16's
figures need i21k S/16 weights given by path.
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
PUBLISHED = {'B/8', 'B/16', 'B/32', 'L/16', 'L/32', 'H/14'}  # the i21k files behind that URL
IMAGE_SIZE = 384  # the ViT paper's fine-tuning resolution


def get_config(arg='B/16,cifar10'):
  variant, _, dataset = arg.partition(',')
  match = re.fullmatch(r'([A-Za-z]+)/?(\d+)', variant)  # 'B/16', or 'b16' as on a shell line
  size = SIZES.get(match.group(1).lower()) if match else None
  if size is None or not int(match.group(2)) or dataset not in DATASETS:
    raise ValueError(f'configs/vit.py:{arg}: expected <size>/<patch>,<dataset> with size in '
                     f'{" ".join(SIZES.values())}, a patch >= 1 and dataset in '
                     f'{", ".join(DATASETS)}')
  patch = int(match.group(2))
  variant = f'{size}/{patch}'
  train_split, eval_split, host_size, steps = DATASETS[dataset]

  config = config_lib.defaults()
  config.model_name = f'ViT-{variant}'
  config.image_size = -(-IMAGE_SIZE // patch) * patch  # The patch must divide it.

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

  if variant in PUBLISHED:
    config.pretrained.path = f'vit_models/imagenet21k/ViT-{size}_{patch}.npz'
    config.pretrained.url = PRETRAINED_URL.format(size, patch)
  return config
