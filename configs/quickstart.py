"""Quickstart: a small ViT on the digits that ship with scikit-learn, on CPU, in about a minute.

Data: 1,797 real 8×8 handwritten digits (scikit-learn's `load_digits`, no download), split
80/20 with a fixed seed into 1,437 training and 360 test images. The host delivers the 8 px
images; the device upsamples them to 16 px, where 4×4 patches give a 4×4 grid of tokens.
Model: a 4-layer ViT, 64 wide, 4 heads, mean-pooled (`gap`).
Expected: ≥ 97% test accuracy (asserted by tests/test_train.py::
test_quickstart_reaches_97_percent_and_restores on 2 CPU cores; figures in BENCHMARKS.md).

  python train.py --config configs/quickstart.py
"""

from vit_jax.train import config as config_lib


def get_config():
  config = config_lib.defaults()
  config.model_name = 'ViT-Ti/4'
  config.model.hidden_size = 64
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.mlp_dim = 128
  config.model.classifier = 'gap'
  config.image_size = 16

  config.data.source = 'digits'
  config.data.host_image_size = 8
  config.aug.crop = 'random_crop'
  config.aug.random_crop_pad = 1
  config.aug.flip = False          # Mirrored digits are other symbols (or other digits).

  config.batch_size = 128
  # 1,000 steps at a peak rate of 4e-3: at 800, seed 2 ended at 96.94% on an AVX-512 CPU (seeds
  # 0-2: 97.50-98.61% over two CPUs, whose rounding moves a run as a seed does); at 1,000 seeds
  # 0-2 reached 97.78-98.06% there, in about 50 s (BENCHMARKS.md).
  config.total_steps = 1000
  config.optimizer.name = 'adamw'
  config.optimizer.weight_decay = 0.05
  config.optimizer.grad_clip_norm = 1.0
  config.schedule.name = 'cosine'
  config.schedule.base_lr = 4e-3
  config.schedule.warmup_steps = 80

  config.log_every = 100
  config.eval_every = 400
  config.checkpoint_every = 400
  return config
