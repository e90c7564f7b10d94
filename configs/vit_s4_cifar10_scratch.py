"""ViT-S/4 from scratch on CIFAR-10 at 32 px: the small-data recipe (strong augmentation).

  python train.py --config configs/vit_s4_cifar10_scratch.py

4×4 patches on 32 px images (64 tokens), `gap` pooling, AdamW (lr 1e-3, weight decay 0.05),
RandAugment 2/9, mixup 0.8 + cutmix 1.0, label smoothing 0.1, drop-path 0.1, batch 256, 300
epochs (~58k steps). Expected: roughly 90–93% test accuracy — the range reported for small ViTs
trained from scratch on CIFAR-10 with this kind of augmentation (e.g. Lee et al. 2021, "Vision
Transformer for Small-Size Datasets"); not yet measured with this code base.
"""

from vit_jax.train import config as config_lib


def get_config():
  config = config_lib.defaults()
  config.model_name = 'ViT-S/4'
  config.model.classifier = 'gap'
  config.model.drop_path_rate = 0.1
  config.image_size = 32

  config.data.source = 'tfds'
  config.data.name = 'cifar10'
  config.data.train_split = 'train'
  config.data.eval_split = 'test'
  config.aug.crop = 'random_crop'
  config.aug.random_crop_pad = 4
  config.aug.flip = True
  config.aug.randaugment_layers = 2
  config.aug.randaugment_magnitude = 9
  config.aug.mixup_alpha = 0.8
  config.aug.cutmix_alpha = 1.0
  config.aug.label_smoothing = 0.1

  config.batch_size = 256
  config.total_steps = 58_600  # 300 epochs of 50,000 images
  config.optimizer.name = 'adamw'
  config.optimizer.weight_decay = 0.05
  config.schedule.name = 'cosine'
  config.schedule.base_lr = 1e-3
  config.schedule.warmup_steps = 5_000
  config.eval_every = 5_000
  config.checkpoint_every = 5_000
  return config
