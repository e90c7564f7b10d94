"""ViT-B/16 fine-tuned on CIFAR-10 at 384 px from the ImageNet-21k `ViT-B_16.npz` (ViT paper).

Recipe (Dosovitskiy et al. 2021; google-research/vision_transformer): SGD momentum 0.9, no weight
decay, global-norm clip 1, 500 warmup steps then cosine from 0.03, batch 512, 10,000 steps; the
head re-initialised for 10 classes, the position embeddings resized from 14×14 to 24×24.
Expected: ≈ 98.9–99.0% test accuracy (vision_transformer README's table, ViT-B_16 → CIFAR-10 at
384 px; not reproduced here, which needs a GPU/TPU).

Data: tfds `cifar10` (prepared with network once, or point data.data_dir at a prepared copy).
The host delivers 32 px images (pad-4 random crop, flip); the device resizes them to 384 px
inside the jitted step. Weights: `pretrained.path` (vit_models/imagenet21k/ViT-B_16.npz); when
absent and online it is fetched from `pretrained.url`; offline, the run stops at once saying
where to put it.

  python train.py --config configs/vit_b16_cifar10.py
"""

from configs import vit


def get_config():
  return vit.get_config('B/16,cifar10')
