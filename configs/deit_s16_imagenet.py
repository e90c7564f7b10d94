"""DeiT-S/16 with a distillation token, from scratch on ImageNet-1k at 224 px, 300 epochs.

  python train.py --config configs/deit_s16_imagenet.py --config.data.data_dir=... \
      --config.distill.teacher=PATH

Recipe (Touvron et al. 2021, "Training data-efficient image transformers & distillation
through attention", Table 9 and the hard-distillation rows): ViT-S/16 with DeiT's distillation
token (`model.distilled`), batch 1024, AdamW lr 5e-4 x 1024/512 = 1e-3, weight decay 0.05, 5
warmup epochs then cosine, label smoothing 0.1, stochastic depth 0.1, no dropout, inception
crop and flip, RandAugment 2 layers at magnitude 9, mixup 0.8 and cutmix 1.0 (one of the two
per batch, each with probability 1/2: timm's switch, which `vit_jax.data.device.mix` makes); hard
distillation with the two losses weighted equally (alpha 0.5), evaluated on the mean of the two
heads.
Published: DeiT-S⚗ 81.2% top-1 on the validation split (the paper's model zoo,
deit_small_distilled_patch16_224), with a RegNetY-16GF teacher of 82.9%.

What differs here, plainly:
- The teacher. DeiT's was a RegNetY CNN, which this framework cannot load (it reads ViT and
  Mixer checkpoints). `distill.teacher` must name an ImageNet-1k ViT classifier instead: a
  train.py workdir, a timm ViT state dict with its description, an HF folder or an `.npz`. The
  paper (Table 2) found a transformer teacher gives a smaller gain than a convnet of the same
  accuracy, so expect less than 81.2% with one.
- No random erasing (p 0.25) and no repeated augmentation (3 repeats): neither is implemented.
Not reproduced here (that needs a TPU or GPU pod and ImageNet, a manual download into tfds'
`downloads/manual`).
"""

from vit_jax.train import config as config_lib

EPOCH_STEPS = 1_281_167 // 1024


def get_config():
  config = config_lib.defaults()
  config.model_name = 'ViT-S/16'
  config.model.distilled = True
  config.model.drop_path_rate = 0.1
  config.image_size = 224

  config.data.source = 'tfds'
  config.data.name = 'imagenet2012'
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.aug.crop = 'inception_crop'
  config.aug.inception_min_area = 0.08
  config.aug.flip = True
  config.aug.randaugment_layers = 2
  config.aug.randaugment_magnitude = 9
  config.aug.mixup_alpha = 0.8
  config.aug.cutmix_alpha = 1.0
  config.aug.label_smoothing = 0.1
  config.aug.eval_crop_fraction = 0.875

  # The teacher: an ImageNet-1k ViT classifier (see the docstring); set it on the command line.
  config.distill.teacher = 'teachers/imagenet1k_vit'
  config.distill.kind = 'hard'
  config.distill.alpha = 0.5

  config.batch_size = 1024
  config.total_steps = 300 * EPOCH_STEPS
  config.optimizer.name = 'adamw'
  config.optimizer.weight_decay = 0.05
  config.optimizer.grad_clip_norm = 0.0  # DeiT does not clip.
  config.schedule.name = 'cosine'
  config.schedule.base_lr = 1e-3
  config.schedule.warmup_steps = 5 * EPOCH_STEPS
  config.schedule.end_lr = 1e-5
  config.eval_every = 10 * EPOCH_STEPS
  config.checkpoint_every = 2_000
  return config
