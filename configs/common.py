"""Defaults shared by every config: each other config states only what differs.

Every key a run can use is declared here, so `--config.<key>=<value>` works for all of them and
a misspelt key fails (configs are locked by `train.py`). Optional values are typed placeholders
(`placeholder(int)` is None until set) so they can still be overridden from the command line.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def vit_model_overrides():
  """Every ViT knob `create_model` accepts, at the model's own defaults."""
  return ml_collections.ConfigDict(dict(
      # Architecture: None takes the value from `config.model_name` (e.g. ViT-B/16: 768 wide).
      hidden_size=placeholder(int),
      num_layers=placeholder(int),
      num_heads=placeholder(int),
      mlp_dim=placeholder(int),
      classifier='token',          # token | gap | map | unpooled
      posemb='learn',              # learn | sincos2d
      num_registers=0,             # extra learned tokens (Darcet et al. 2023)
      representation_size=placeholder(int),  # pre_logits Dense+tanh width; None: no layer
      dropout_rate=0.0,
      attention_dropout_rate=0.0,
      drop_path_rate=0.0,          # stochastic depth at the last block; linear from 0
      layer_scale_init=placeholder(float),   # e.g. 1e-5; None: no layer scale
      qk_norm=False,
      head_bias_init=0.0,
      dtype='float32',             # compute dtype: float32 | bfloat16
      param_dtype='float32',
      scan=False,                  # nn.scan over the blocks (one compiled block)
      remat_policy='none',         # none | full | dots | dots_no_batch
      attention_impl='auto',       # auto | xla | cudnn
  ))


def get_config():
  """The defaults; not meant to be trained as it is."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # The random-bit generator of init, dropout, drop-path and mixup: threefry2x32 (jax's default,
  # the same bits on every backend) | rbg | unsafe_rbg (the hardware generator: far fewer
  # operations per random bit on GPU/TPU; a different stream, so a run resumes only with its own).
  config.prng_impl = 'threefry2x32'
  # Appended to the XLA_FLAGS environment variable before the backend starts (train.py and the
  # benchmark), e.g. '--xla_gpu_enable_latency_hiding_scheduler=true'; '' adds none.
  config.xla_flags = ''

  # Model: a name for `vit_jax.models.create_model`, and keyword overrides passed to it.
  config.model_name = 'ViT-B/16'
  config.model = vit_model_overrides()
  config.image_size = 224          # the resolution the model sees (resized on the device)

  # Data (vit_jax/data). source: tfds | folder | digits.
  config.data = ml_collections.ConfigDict(dict(
      source='tfds',
      name='cifar10',              # tfds name, or the folder path for source=folder
      data_dir=placeholder(str),   # tfds data_dir; None: tfds default (~/tensorflow_datasets)
      train_split='train',
      eval_split='test',
      host_image_size=placeholder(int),  # size the host delivers; None: image_size
      shuffle_buffer=50_000,
      cache=False,                 # cache the decoded split in memory (small data sets)
      prefetch_batches=2,          # host->device batches in flight
      download=True,               # allow tfds to download when online
  ))

  # Augmentation: host side (crop, flip, randaugment) then device side (mixup/cutmix).
  config.aug = ml_collections.ConfigDict(dict(
      crop='resize',               # resize | random_crop | inception_crop
      inception_min_area=0.05,
      random_crop_pad=0,           # pad then random-crop (CIFAR style), in host pixels
      flip=True,
      randaugment_layers=0,        # 0: off
      randaugment_magnitude=10,
      mixup_alpha=0.0,
      cutmix_alpha=0.0,
      label_smoothing=0.0,
      eval_crop_fraction=1.0,      # eval: resize to size/fraction, then central crop
  ))

  config.batch_size = 512          # global, over all devices and hosts
  config.eval_batch_size = placeholder(int)  # None: batch_size
  config.accum_steps = 1           # gradient accumulation micro-batches per step
  config.total_steps = 10_000

  config.optimizer = ml_collections.ConfigDict(dict(
      name='sgd',                  # sgd | adamw | adafactor | lamb
      momentum=0.9,                # sgd
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,            # decoupled; skips biases, norms, embeddings
      grad_clip_norm=1.0,          # global norm; 0: off
      ema_decay=0.0,               # 0: no EMA of the params
      nan_policy='stop',           # stop | skip
  ))
  config.schedule = ml_collections.ConfigDict(dict(
      name='cosine',               # cosine | linear | rsqrt | constant
      base_lr=0.03,
      warmup_steps=500,
      end_lr=0.0,
  ))

  # Initialise from a pretrained checkpoint (npz, HF dir, timm npz, workdir). The head is
  # re-initialised for the new classes, position embeddings resized to the new grid.
  config.pretrained = ml_collections.ConfigDict(dict(
      path=placeholder(str),
      url=placeholder(str),        # fetched into `path` when online and the file is absent
      format='auto',
  ))

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # -1: all remaining devices

  config.log_every = 50
  config.eval_every = 1000         # 0: only at the end
  config.checkpoint_every = 1000   # 0: only at the end
  config.keep_checkpoints = 3
  config.plot_every_eval = True    # refresh curves.png at each eval
  return config
