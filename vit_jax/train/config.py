"""The one owner of a run's config: its keys and defaults, and their resolution.

  config = defaults()                    # every key a run can use (configs/*.py start here)
  run = resolve(config, device_count=8)  # checked once; every derived value computed once

`defaults()` declares every key. A key whose meaning depends on a choice (the optimizer's
`momentum`, the data source's `cache`, the schedule's `end_lr`, ...) is a typed placeholder:
None means "not set", and `resolve` fills it with its default where it applies and refuses it
(a `UserError` naming the key and the choice) where it would do nothing. So a flag that is
accepted takes effect. The model's keys are generated from `VisionTransformer`'s own dataclass
fields (None: the model's default), so a model default is written in one place only.

`resolve` returns a frozen `ml_collections.FrozenConfigDict` with the same keys, every
placeholder that applies filled in (`eval_batch_size`, `data.host_image_size`,
`optimizer.momentum`, ...) and the others None, plus `model_fields`: the module's fields but
`num_classes`, which come from the data. Everything after it reads these values; nothing else
resolves a default or validates a key. `config.json` in a workdir holds the resolved config with
a schema version (`SCHEMA_VERSION`), package versions and the code's git commit; `migrate`
reads the older files.
"""

import dataclasses
import datetime
import importlib.metadata
import math
import os
import re
import subprocess
import typing

import jax.numpy as jnp
import ml_collections
from ml_collections.config_dict import placeholder

from vit_jax import models
from vit_jax.errors import UserError

SCHEMA_VERSION = 2  # 1: the flat config.json written before the config had an owner.

PRNG_IMPLS = ('threefry2x32', 'rbg', 'unsafe_rbg')
SOURCES = ('tfds', 'folder', 'digits')
CROPS = ('resize', 'random_crop', 'inception_crop')
NAN_POLICIES = ('stop', 'skip')
SCHEDULES = ('cosine', 'linear', 'rsqrt', 'constant')
DISTILL_KINDS = ('hard', 'soft')
# Each optimizer's own keys and their defaults; a key of another optimizer is an error.
OPTIMIZER_KEYS = {
    'sgd': {'momentum': 0.9},
    'adamw': {'b1': 0.9, 'b2': 0.999, 'eps': 1e-8},
    'lamb': {'b1': 0.9, 'b2': 0.999, 'eps': 1e-8},
    'adafactor': {},
}
OPTIMIZERS = tuple(OPTIMIZER_KEYS)
# Schedules that decay towards `schedule.end_lr` (the others have no end value).
DECAYING_SCHEDULES = ('cosine', 'linear')
DEFAULT_SHUFFLE_BUFFER = 50_000

# Keys that may change between a run and its resumption: they change when and how much is
# logged or kept, or where inputs are found, never what is computed.
RESUMABLE_CHANGES = (
    'log_every', 'eval_every', 'checkpoint_every', 'keep_checkpoints', 'plot_every_eval',
    'data.prefetch_batches', 'data.data_dir', 'data.download', 'pretrained.url', 'xla_flags',
    # What is evaluated beyond the head, never what is trained.
    'evals.knn_k', 'evals.knn_temperature', 'evals.fewshot_shots', 'evals.fewshot_l2',
    'evals.splits', 'evals.max_train_examples',
)
# VisionTransformer fields that a config does not set: they come from the model name or data.
_NAME_FIELDS = ('num_classes', 'patch_size', 'resnet_layers', 'resnet_width', 'parent', 'name')
_XLA_FLAG = re.compile(r'--\w+(=\S*)?')


# ---------------------------------------------------------------------------------------------
# The keys.


def _placeholder_type(field):
  """The type of a config placeholder for a model field (dtypes are spelled as strings)."""
  if field.name in ('dtype', 'param_dtype'):
    return str
  kind = field.type
  if typing.get_origin(kind) is typing.Union:  # Optional[X]
    kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
  return kind if kind in (bool, int, float, str) else None


def model_keys():
  """`config.model`: one placeholder per settable `VisionTransformer` field (None: its default).

  Generated from the dataclass, so the model's defaults are written once, in the model.
  """
  keys = {}
  for field in dataclasses.fields(models.VisionTransformer):
    kind = _placeholder_type(field)
    if field.name not in _NAME_FIELDS and kind is not None:
      keys[field.name] = placeholder(kind)
  return ml_collections.ConfigDict(keys)


def defaults():
  """Every key a run can use, at its default; not meant to be trained as it is.

  Configs start from this and state only what differs; `train.py` locks the result, so a
  misspelt `--config.<key>` fails. None-valued placeholders are resolved per choice by
  `resolve` (the comments say their default and when they apply).
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  # The random-bit generator of init, dropout, drop-path and mixup: threefry2x32 (jax's default,
  # the same bits on every backend) | rbg | unsafe_rbg (the hardware generator: far fewer
  # operations per random bit on GPU/TPU; a different stream, so a run resumes only with its own).
  config.prng_impl = 'threefry2x32'
  # Appended to the XLA_FLAGS environment variable before the backend starts (train.py and the
  # benchmark), e.g. '--xla_gpu_enable_latency_hiding_scheduler=true'; '' adds none.
  config.xla_flags = ''

  # Model: a name for `vit_jax.models.create_model` ('ViT-B/16', 'R50+ViT-B/16', 'Mixer-B/16'),
  # and overrides of the module's fields (vit_jax/models/vit.py; None: the name's or the
  # field's default). A Mixer takes only hidden_size, num_layers, head_bias_init and the dtypes.
  config.model_name = 'ViT-B/16'
  config.model = model_keys()
  config.image_size = 224          # the resolution the model sees (resized on the device)

  # FlexiViT (Beyer et al. 2023; vit_jax/train/flexi.py): each train step runs at a patch size
  # drawn from `patch_sizes` (by `weights`; one compiled step per size). What is stored is the
  # base: the patch-embedding kernel at the model's own patch size and the learned position
  # table on the grid that patch gives at image_size; each step PI-resizes the kernel and
  # resizes the table bilinearly to its own patch size. ViTs only (not hybrids or Mixers).
  config.flexi = ml_collections.ConfigDict(dict(
      patch_sizes=(),              # square patch sides, e.g. (8, 10, 12, 16); (): off
      weights=(),                  # the chance of each patch size, any scale; (): uniform
      # the eval's test_accuracy and test_loss (each listed size also gets test_accuracy_p<k>
      # and test_loss_p<k>); with patch_sizes (default: the model's own patch side)
      eval_patch_size=placeholder(int),
  ))

  # Data (vit_jax/data). source: tfds | folder | digits.
  config.data = ml_collections.ConfigDict(dict(
      source='tfds',
      name=placeholder(str),       # tfds: the data set name; folder: its path; digits: unset
      data_dir=placeholder(str),   # tfds only; None: tfds' default (~/tensorflow_datasets)
      download=placeholder(bool),  # tfds only: may tfds download when online (default True)
      train_split='train',
      eval_split='test',
      host_image_size=placeholder(int),  # size the host delivers; None: 8 for digits, else
                                         # image_size
      shuffle_buffer=placeholder(int),   # streamed tfds only (default 50,000); in-memory
                                         # sources are permuted whole each epoch
      cache=placeholder(bool),     # tfds and folder: decode the split into memory (default
                                   # False); digits always are
      prefetch_batches=2,          # batches in flight, host -> device; 0: none at all
      # NaFlex (vit_jax/data/naflex.py): each image keeps its aspect ratio, resized to the
      # largest grid of the model's patches within this many tokens and padded to it, so one
      # compiled step serves every shape; None: square images. image_size then only sets the
      # grid the learned position table is stored for (image_size // patch).
      naflex_max_tokens=placeholder(int),
  ))

  # Augmentation: host side (crop, flip, randaugment) then device side (mixup/cutmix).
  config.aug = ml_collections.ConfigDict(dict(
      crop='resize',               # resize | random_crop | inception_crop
      inception_min_area=placeholder(float),  # inception_crop only (default 0.05)
      random_crop_pad=0,           # random_crop only, > 0: pad then crop (CIFAR style), host px
      flip=True,
      randaugment_layers=0,        # 0: off
      randaugment_magnitude=placeholder(int),  # with randaugment_layers > 0 (default 10)
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
      momentum=placeholder(float),  # sgd only (default 0.9; 0: plain SGD)
      b1=placeholder(float),       # adamw, lamb (default 0.9)
      b2=placeholder(float),       # adamw, lamb (default 0.999)
      eps=placeholder(float),      # adamw, lamb (default 1e-8)
      weight_decay=0.0,            # decoupled; kernels only (not biases, norms, embeddings)
      grad_clip_norm=1.0,          # global norm; 0: off
      ema_decay=0.0,               # 0: no EMA of the params
      nan_policy='stop',           # stop | skip
      # Fine-tuning as BEiT, MAE and DINOv2 do (vit_jax/train/optim.py). Parameters are named
      # by regexes searched in their '/'-joined paths ('head/kernel',
      # 'Transformer/encoderblock_3/MlpBlock_3/Dense_0/kernel', 'cls', ...); each pattern must
      # match some parameter of the model.
      layer_decay=1.0,             # layer-wise lr decay: encoderblock_i of L gets
                                   # decay^(L - i), the embeddings decay^(L + 1), the head and
                                   # final norm 1; 1: off
      lr_multipliers='',           # 'PATTERN=X,...': the lr of matching params times X
                                   # (e.g. 'head=10,pos_embedding=0'); several matches multiply
      wd_multipliers='',           # 'PATTERN=X,...': the weight decay of matching kernels times X
      frozen='',                   # PATTERN: matching params are not trained (no optimizer state)
      trainable='',                # PATTERN: only matching params are trained ('^head/': a
                                   # linear probe); '': all but `frozen`
  ))
  config.schedule = ml_collections.ConfigDict(dict(
      name='cosine',               # cosine | linear | rsqrt | constant
      base_lr=0.03,
      warmup_steps=500,
      end_lr=placeholder(float),   # cosine, linear: the rate at total_steps (default 0)
  ))

  # Distillation (DeiT; vit_jax/train/distill.py): a frozen teacher's predictions as a second
  # target, through the distillation token (model.distilled=True) or else the one head.
  config.distill = ml_collections.ConfigDict(dict(
      teacher=placeholder(str),    # any checkpoint vit_jax.weights reads; None: off
      teacher_format=placeholder(str),  # with teacher: auto (default) or a vit_jax.weights format
      teacher_model=placeholder(str),   # with teacher: its model name, for a file that does not
                                        # describe its model (.npz); else the file's own
      kind=placeholder(str),       # with teacher: hard (default; DeiT's) | soft
      alpha=placeholder(float),    # with teacher: the teacher term's weight (default 0.5)
      temperature=placeholder(float),  # soft only (default 1.0)
  ))

  # Initialise from a pretrained checkpoint (npz, HF dir, timm, workdir). The head is
  # re-initialised for the new classes, position embeddings resized to the new grid.
  config.pretrained = ml_collections.ConfigDict(dict(
      path=placeholder(str),
      url=placeholder(str),        # with path: fetched into it when online and absent
      format=placeholder(str),     # with path: auto (default) or a vit_jax.weights format
  ))

  # Evaluation beyond the head, at each eval (vit_jax/train/feature_evals.py): k-NN and
  # few-shot linear probes on the frozen pre-logits (what the head reads) of the eval params.
  # The train split (data.train_split) is the memory the neighbours and shots come from.
  config.evals = ml_collections.ConfigDict(dict(
      knn_k=0,                     # k nearest neighbours by cosine similarity, each voting
                                   # exp(similarity / T) (DINO's k-NN; DINO reports k=20);
                                   # metric knn_<k>_accuracy; 0: off
      knn_temperature=placeholder(float),  # with knn_k: T (default 0.07, DINO's)
      fewshot_shots=(),            # e.g. (1, 5, 10): closed-form ridge regression on that many
                                   # train examples per class (a fixed draw); metric
                                   # fewshot_<n>shot_accuracy; (): off
      fewshot_l2=placeholder(float),  # with fewshot_shots: the ridge penalty (default 1024,
                                      # big_vision's)
      splits=(),                   # the splits evaluated, e.g. ('test', 'train[:2%]'); another
                                   # split than data.eval_split adds _<split> to the metric
                                   # names; (): data.eval_split
      max_train_examples=placeholder(int),  # with an evaluator: the memory is at most this many
                                            # train examples (a fixed subset); None: all
  ))

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # -1: all remaining devices

  config.log_every = 50
  config.eval_every = 1000         # 0: only at the end
  config.checkpoint_every = 1000   # 0: only at the end
  config.keep_checkpoints = 3
  config.plot_every_eval = True    # refresh curves.png at each eval
  return config


# ---------------------------------------------------------------------------------------------
# Resolution: check once, fill every default once.


def _choice(key, value, valid):
  if value not in valid:
    raise UserError(f'{key}={value!r} is unknown; valid: {", ".join(map(str, valid))}')


def _only_with(section, key, condition, default):
  """Fills `section[key]` with `default` when `condition` says it applies, else refuses it."""
  applies, why_not = condition
  if applies:
    if section[key] is None:
      section[key] = default
  elif section[key] is not None:
    raise UserError(f'{key}={section[key]!r} has no effect {why_not}; remove it')


def _positive(key, value, allow_zero=False):
  if value < 0 or (value == 0 and not allow_zero):
    raise UserError(f'{key}={value} must be {">= 0" if allow_zero else "positive"}')


def xla_flag_tokens(xla_flags):
  """The tokens of `config.xla_flags`; a token that is not `--name[=value]` is a UserError."""
  tokens = (xla_flags or '').split()
  for token in tokens:
    if not _XLA_FLAG.fullmatch(token):
      raise UserError(f'xla_flags: {token!r} is not an XLA flag; write --name=value, '
                      f'e.g. --xla_gpu_enable_latency_hiding_scheduler=true')
  return tokens


def _resolve_model(config):
  """Checks `model_name` and `config.model`; returns the module's fields but num_classes."""
  overrides = {key: value for key, value in config.model.items() if value is not None}
  try:
    fields = models.model_kwargs(config.model_name, None, **overrides)
  except UserError as e:
    if 'model_name' in str(e) or 'model name' in str(e):
      raise
    raise UserError(f'model_name={config.model_name!r} with the model keys set: {e}') from None
  fields.pop('num_classes')
  if not fields.get('resnet_layers'):  # A hybrid's patches tile the ResNet map instead.
    patch_h, patch_w = fields['patch_size']
    if config.image_size % patch_h or config.image_size % patch_w:
      raise UserError(f'patch size {patch_h}x{patch_w} of {config.model_name} does not divide '
                      f'image_size={config.image_size}; set image_size to a multiple of '
                      f'{patch_h}')
  # Plain values, so the fields can be written to config.json and compared.
  return {key: (value.name if hasattr(value, 'name') and key.endswith('dtype') else
                list(value) if isinstance(value, tuple) else value)
          for key, value in fields.items()}


def _resolve_flexi(config, model_fields):
  """FlexiViT's patch sizes: each divides the image, a weight each, an eval size."""
  flexi = config.flexi
  sizes, weights = tuple(flexi.patch_sizes or ()), tuple(flexi.weights or ())
  if not sizes:
    if weights:
      raise UserError(f'flexi.weights={weights} has no effect without flexi.patch_sizes; '
                      'remove it')
    _only_with(flexi, 'eval_patch_size', (False, 'without flexi.patch_sizes'), None)
    _set_flexi(config, (), (), None)
    return
  family = models.decode_name(config.model_name)[0]
  if family is not models.VisionTransformer or model_fields.get('resnet_layers'):
    raise UserError(f'flexi.patch_sizes needs a plain ViT; model_name={config.model_name!r} '
                    'has no patch embedding to resize')
  if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
    raise UserError(f'flexi.patch_sizes={sizes} must be positive integers (square patches), '
                    'e.g. (8, 12, 16)')
  if len(set(sizes)) != len(sizes):
    raise UserError(f'flexi.patch_sizes={sizes} lists a size twice; use flexi.weights to draw '
                    'one more often')
  if weights and (len(weights) != len(sizes) or any(not w >= 0 for w in weights)
                  or not sum(weights) > 0):
    raise UserError(f'flexi.weights={weights} must be one number >= 0 per patch size '
                    f'{sizes}, not all 0')
  patch_h, patch_w = model_fields['patch_size']
  if patch_h != patch_w:
    raise UserError(f'flexi.patch_sizes needs a square base patch; {config.model_name} has '
                    f'{patch_h}x{patch_w}')
  _only_with(flexi, 'eval_patch_size', (True, ''), patch_h)
  for key, values in (('flexi.patch_sizes', sizes), ('flexi.eval_patch_size',
                                                      (flexi.eval_patch_size,))):
    for size in values:
      if size < 1 or config.image_size % size:
        raise UserError(f'{key}: patch size {size} does not divide image_size='
                        f'{config.image_size}')
  _set_flexi(config, sizes, tuple(float(w) for w in weights), flexi.eval_patch_size)


def _set_flexi(config, patch_sizes, weights, eval_patch_size):
  # A new section, not assignments into the old one: a section read from config.json holds
  # lists, and assigning a tuple to a list-typed key would keep a list (() != [] when compared).
  config.flexi = ml_collections.ConfigDict(dict(
      patch_sizes=patch_sizes, weights=weights, eval_patch_size=placeholder(int)))
  config.flexi.eval_patch_size = eval_patch_size


def _resolve_data(config, process_count):
  data, aug = config.data, config.aug
  source = data.source
  _choice('data.source', source, SOURCES)
  if source == 'digits':
    _only_with(data, 'name', (False, 'with data.source=digits (the data set is fixed)'), None)
  elif data.name is None:
    raise UserError(f'data.name is required with data.source={source} '
                    + ('(a tfds name, e.g. cifar10)' if source == 'tfds' else
                       '(the folder holding train/ and test/)'))
  is_tfds = (source == 'tfds', f'with data.source={source} (tfds only)')
  _only_with(data, 'data_dir', is_tfds, None)
  _only_with(data, 'download', is_tfds, True)
  _only_with(data, 'cache', (source != 'digits', 'with data.source=digits (always in memory)'),
             False)
  streamed = source == 'tfds' and not data.cache
  _only_with(data, 'shuffle_buffer',
             (streamed, 'with an in-memory source (digits, folder, data.cache=True), which is '
                        'permuted whole each epoch'), DEFAULT_SHUFFLE_BUFFER)
  if data.shuffle_buffer is not None:
    _positive('data.shuffle_buffer', data.shuffle_buffer)
  if data.naflex_max_tokens is not None:
    _only_with(data, 'host_image_size',
               (False, 'with data.naflex_max_tokens (each image is resized to its own grid)'),
               None)
  else:
    if data.host_image_size is None:
      from vit_jax.data import digits  # Only the constant; the data module loads nothing here.
      data.host_image_size = digits.IMAGE_SIZE if source == 'digits' else config.image_size
    _positive('data.host_image_size', data.host_image_size)
  _positive('data.prefetch_batches', data.prefetch_batches, allow_zero=True)

  _choice('aug.crop', aug.crop, CROPS)
  _only_with(aug, 'inception_min_area',
             (aug.crop == 'inception_crop', f'with aug.crop={aug.crop}'), 0.05)
  if aug.inception_min_area is not None and not 0.0 < aug.inception_min_area <= 1.0:
    raise UserError(f'aug.inception_min_area={aug.inception_min_area} must be in (0, 1]')
  if (aug.crop == 'random_crop') != (aug.random_crop_pad > 0) or aug.random_crop_pad < 0:
    raise UserError(f'aug.random_crop_pad={aug.random_crop_pad} with crop={aug.crop!r}: '
                    "crop='random_crop' needs random_crop_pad > 0, other crops need 0")
  _positive('aug.randaugment_layers', aug.randaugment_layers, allow_zero=True)
  _only_with(aug, 'randaugment_magnitude',
             (aug.randaugment_layers > 0, 'with aug.randaugment_layers=0'), 10)
  if aug.randaugment_magnitude is not None and not 0 <= aug.randaugment_magnitude <= 30:
    raise UserError(f'aug.randaugment_magnitude={aug.randaugment_magnitude} must be in '
                    '[0, 30]')
  if not 0.0 < aug.eval_crop_fraction <= 1.0:
    raise UserError(f'aug.eval_crop_fraction={aug.eval_crop_fraction} must be in (0, 1]')
  if aug.mixup_alpha < 0 or aug.cutmix_alpha < 0:
    raise UserError(f'aug.mixup_alpha={aug.mixup_alpha}, aug.cutmix_alpha='
                    f'{aug.cutmix_alpha} must be >= 0 (0: off)')
  if not 0.0 <= aug.label_smoothing < 1.0:
    raise UserError(f'aug.label_smoothing={aug.label_smoothing} must be in [0, 1)')
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] % process_count:
      raise UserError(f'{key}={config[key]} must be a multiple of the process count '
                      f'{process_count}')


def _resolve_naflex(config, model_fields):
  """Refuses what cannot work on NaFlex batches of patches (data.naflex_max_tokens)."""
  max_tokens = config.data.naflex_max_tokens
  if max_tokens is None:
    return
  setting = f'data.naflex_max_tokens={max_tokens}'
  _positive('data.naflex_max_tokens', max_tokens)
  if models.decode_name(config.model_name)[0] is not models.VisionTransformer:
    raise UserError(f'{setting} needs a ViT; {config.model_name} mixes a fixed grid of tokens')
  if model_fields.get('resnet_layers'):
    raise UserError(f'{setting} needs a plain ViT; the ResNet root of {config.model_name} '
                    'takes whole images')
  aug = config.aug
  if aug.mixup_alpha or aug.cutmix_alpha:
    raise UserError(f'aug.mixup_alpha={aug.mixup_alpha}, aug.cutmix_alpha={aug.cutmix_alpha} '
                    f'with {setting}: mixup and cutmix blend images of one shape, and NaFlex '
                    'images each have their own grid; set both to 0')
  if aug.crop == 'random_crop':
    raise UserError(f"aug.crop='random_crop' with {setting}: it pads and crops a square host "
                    "image; use 'resize' or 'inception_crop'")
  if config.flexi.patch_sizes:
    raise UserError(f'flexi.patch_sizes={tuple(config.flexi.patch_sizes)} with {setting}: the '
                    "host cuts NaFlex patches at the model's own patch size; use one or the "
                    'other')


def _resolve_optimizer(config):
  optimizer, schedule = config.optimizer, config.schedule
  _choice('optimizer.name', optimizer.name, OPTIMIZERS)
  own = OPTIMIZER_KEYS[optimizer.name]
  for key in ('momentum', 'b1', 'b2', 'eps'):
    users = [name for name, keys in OPTIMIZER_KEYS.items() if key in keys]
    _only_with(optimizer, key, (key in own, f'with optimizer.name={optimizer.name} (it is '
                                            f'for {", ".join(users)})'), own.get(key))
  _positive('optimizer.grad_clip_norm', optimizer.grad_clip_norm, allow_zero=True)
  _positive('optimizer.weight_decay', optimizer.weight_decay, allow_zero=True)
  if not 0.0 <= optimizer.ema_decay < 1.0:
    raise UserError(f'optimizer.ema_decay={optimizer.ema_decay} must be in [0, 1)')
  _choice('optimizer.nan_policy', optimizer.nan_policy, NAN_POLICIES)
  if not 0.0 < optimizer.layer_decay <= 1.0:
    raise UserError(f'optimizer.layer_decay={optimizer.layer_decay} must be in (0, 1] '
                    '(1: off; BEiT and MAE fine-tunes use 0.65-0.75)')
  optimizer.lr_multipliers = _canonical_multipliers('optimizer.lr_multipliers',
                                                    optimizer.lr_multipliers)
  optimizer.wd_multipliers = _canonical_multipliers('optimizer.wd_multipliers',
                                                    optimizer.wd_multipliers)
  if optimizer.wd_multipliers and not optimizer.weight_decay:
    raise UserError(f'optimizer.wd_multipliers={optimizer.wd_multipliers!r} has no effect with '
                    'optimizer.weight_decay=0; set a weight decay or remove it')
  for key in ('frozen', 'trainable'):
    _check_pattern(f'optimizer.{key}', optimizer[key])

  _choice('schedule.name', schedule.name, SCHEDULES)
  _positive('schedule.base_lr', schedule.base_lr, allow_zero=True)
  if not 0 <= schedule.warmup_steps <= config.total_steps:
    raise UserError(f'schedule.warmup_steps={schedule.warmup_steps} must be in '
                    f'[0, total_steps={config.total_steps}]')
  _only_with(schedule, 'end_lr', (schedule.name in DECAYING_SCHEDULES,
                                  f'with schedule.name={schedule.name}'), 0.0)


def parse_multipliers(text, key='multipliers'):
  """`'head=10,pos_embedding=0'` -> `[('head', 10.0), ('pos_embedding', 0.0)]`.

  Items are split at the commas outside brackets (so a regex may hold `{1,2}` or `(a,b)`),
  each at its last `=` (so a regex may hold `(?=...)`); '' is no items. UserError names `key`.
  """
  items, depth, start = [], 0, 0
  text = text or ''
  for index, char in enumerate(text + ','):
    if char in '([{':
      depth += 1
    elif char in ')]}':
      depth = max(depth - 1, 0)
    elif char == ',' and depth == 0:
      if text[start:index].strip():
        items.append(text[start:index].strip())
      start = index + 1
  parsed = []
  for item in items:
    pattern, equals, value = item.rpartition('=')
    try:
      factor = float(value)
    except ValueError:
      factor = None
    if not equals or not pattern.strip() or factor is None or not factor >= 0:
      raise UserError(f'{key}: {item!r} is not PATTERN=X with X >= 0; write e.g. '
                      "'head=10,pos_embedding=0'")
    _check_pattern(key, pattern.strip())
    parsed.append((pattern.strip(), factor))
  return parsed


def _canonical_multipliers(key, text):
  """The multipliers in one spelling ('head=10.0,cls=0.0'), so equal settings compare equal."""
  return ','.join(f'{pattern}={factor!r}' for pattern, factor in parse_multipliers(text, key))


def _check_pattern(key, pattern):
  try:
    re.compile(pattern or '')
  except re.error as e:
    raise UserError(f'{key}={pattern!r} is not a regular expression ({e})') from None


def _resolve_pretrained(pretrained):
  has_path = (pretrained.path is not None, 'without pretrained.path')
  _only_with(pretrained, 'url', has_path, None)
  _only_with(pretrained, 'format', has_path, 'auto')
  if pretrained.format is not None:
    from vit_jax.weights import convert  # Only the format names.
    _choice('pretrained.format', pretrained.format, ('auto',) + convert.READ_FORMATS)


def _resolve_distill(distill):
  has_teacher = (distill.teacher is not None, 'without distill.teacher')
  _only_with(distill, 'teacher_format', has_teacher, 'auto')
  _only_with(distill, 'teacher_model', has_teacher, None)
  _only_with(distill, 'kind', has_teacher, 'hard')
  _only_with(distill, 'alpha', has_teacher, 0.5)
  if distill.kind is not None:
    _choice('distill.kind', distill.kind, DISTILL_KINDS)
  _only_with(distill, 'temperature', (distill.kind == 'soft', f'with distill.kind={distill.kind}'
                                      if distill.kind else 'without distill.teacher'), 1.0)
  if distill.teacher_format is not None:
    from vit_jax.weights import convert  # Only the format names.
    _choice('distill.teacher_format', distill.teacher_format, ('auto',) + convert.READ_FORMATS)
  if distill.teacher_model is not None:
    models.decode_name(distill.teacher_model)  # A UserError naming the valid names.
  if distill.alpha is not None and not 0.0 <= distill.alpha <= 1.0:
    raise UserError(f'distill.alpha={distill.alpha} must be in [0, 1] (the teacher term\'s '
                    'weight; DeiT uses 0.5)')
  if distill.temperature is not None and not distill.temperature > 0:
    raise UserError(f'distill.temperature={distill.temperature} must be positive')


def _resolve_evals(config, model_fields):
  """The feature evaluators: k, temperature, shots, the ridge penalty, splits, the memory cap."""
  evals = config.evals
  knn_k, shots = evals.knn_k, tuple(evals.fewshot_shots or ())
  if isinstance(knn_k, bool) or not isinstance(knn_k, int) or knn_k < 0:
    raise UserError(f'evals.knn_k={knn_k!r} must be an integer >= 0 (0: off; DINO reports 20)')
  if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shots):
    raise UserError(f'evals.fewshot_shots={shots} must be positive integers (examples per '
                    'class), e.g. (1, 5, 10)')
  if len(set(shots)) != len(shots):
    raise UserError(f'evals.fewshot_shots={shots} lists a number twice')
  evals.fewshot_shots = shots
  _only_with(evals, 'knn_temperature', (knn_k > 0, 'with evals.knn_k=0'), 0.07)
  if evals.knn_temperature is not None and not evals.knn_temperature > 0:
    raise UserError(f'evals.knn_temperature={evals.knn_temperature} must be positive')
  _only_with(evals, 'fewshot_l2', (bool(shots), 'without evals.fewshot_shots'), 2.0 ** 10)
  if evals.fewshot_l2 is not None and not evals.fewshot_l2 > 0:
    raise UserError(f'evals.fewshot_l2={evals.fewshot_l2} must be positive')
  enabled = (knn_k > 0 or bool(shots), 'without evals.knn_k or evals.fewshot_shots')
  _only_with(evals, 'max_train_examples', enabled, None)  # None: the whole train split.
  if evals.max_train_examples is not None and evals.max_train_examples < 1:
    raise UserError(f'evals.max_train_examples={evals.max_train_examples} must be positive')
  splits = tuple(evals.splits or ())
  if not enabled[0]:
    if splits:
      raise UserError(f'evals.splits={splits} has no effect {enabled[1]}; remove it')
    evals.splits = ()
    return
  if any(not isinstance(split, str) or not split for split in splits):
    raise UserError(f'evals.splits={splits} must be split names, e.g. (\'test\', \'train[:2%]\')')
  splits = splits or (config.data.eval_split,)
  suffixes = [split_suffix(split) for split in splits]
  if len(set(suffixes)) != len(suffixes):
    raise UserError(f'evals.splits={splits} lists a split twice (as metric names: '
                    f'{", ".join(suffixes)})')
  evals.splits = splits
  if model_fields.get('classifier') == 'unpooled':
    raise UserError(f'evals.knn_k={knn_k}, evals.fewshot_shots={shots}: feature evals need '
                    "one feature vector per image, and model.classifier='unpooled' gives one "
                    'per patch; use token, gap or map')


def split_suffix(split):
  """A split as a metric-name suffix: 'train[:50%]' -> 'train_to_50pct' ('%' is 'pct', ':'
  is 'to', every other run of other characters one '_')."""
  spelled = split.replace('%', 'pct').replace(':', '_to_')
  return re.sub(r'[^A-Za-z0-9]+', '_', spelled).strip('_')


def resolve(config, device_count=None, process_count=1):
  """Checks `config` once and fills every default that depends on a choice.

  Args:
    config: a ConfigDict with the keys of `defaults()` (locked or not; not modified).
    device_count: devices of the whole run (batch sizes and the mesh must divide among them);
      None: the device layout is not checked (reading a workdir's config elsewhere).
    process_count: processes of the run (each reads its own shard of every batch).

  Returns:
    A `FrozenConfigDict`: the same keys, resolved, plus `model_fields` (the model module's
    fields but num_classes).

  Raises:
    UserError: the first key that cannot work, naming it and what would be valid.
  """
  plain = _lists_as_tuples(config.to_dict())
  plain.pop('model_fields', None)  # Derived here again when a resolved config comes back.
  config = ml_collections.ConfigDict(plain)  # A mutable copy to fill in.
  _positive('total_steps', config.total_steps)
  _positive('image_size', config.image_size)
  _choice('prng_impl', config.prng_impl, PRNG_IMPLS)
  xla_flag_tokens(config.xla_flags)
  _positive('batch_size', config.batch_size)
  if config.eval_batch_size is None:
    config.eval_batch_size = config.batch_size
  _positive('eval_batch_size', config.eval_batch_size)
  _positive('accum_steps', config.accum_steps)
  for key in ('eval_every', 'checkpoint_every'):
    _positive(key, config[key], allow_zero=True)
  _positive('log_every', config.log_every)
  _positive('keep_checkpoints', config.keep_checkpoints)
  _check_devices(config, device_count or 1, check_mesh=device_count is not None)

  model_fields = _resolve_model(config)
  _resolve_flexi(config, model_fields)
  _resolve_data(config, process_count)
  _resolve_naflex(config, model_fields)
  _resolve_optimizer(config)
  _resolve_pretrained(config.pretrained)
  _resolve_distill(config.distill)
  _resolve_evals(config, model_fields)
  config.model_fields = model_fields
  return ml_collections.FrozenConfigDict(config)


def _lists_as_tuples(tree):
  """Sequences as tuples, as configs write them: config.json gives lists back, and a run read
  from it must equal (and resume as) the run that wrote it."""
  if isinstance(tree, dict):
    return {key: _lists_as_tuples(value) for key, value in tree.items()}
  if isinstance(tree, list):
    return tuple(_lists_as_tuples(value) for value in tree)
  return tree


def _check_devices(config, device_count, check_mesh):
  """Batch sizes that split over the devices, and a mesh that fits them."""
  if config.batch_size % (config.accum_steps * device_count):
    raise UserError(f'batch_size={config.batch_size} must divide into accum_steps='
                    f'{config.accum_steps} micro-batches, each divisible by the {device_count} '
                    'devices')
  if config.eval_batch_size % device_count:
    raise UserError(f'eval_batch_size={config.eval_batch_size} is not divisible by the '
                    f'{device_count} devices')
  mesh_sizes = [config.mesh.data, config.mesh.fsdp]
  if mesh_sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in mesh_sizes):
    raise UserError(f'mesh data={mesh_sizes[0]}, fsdp={mesh_sizes[1]}: sizes must be positive, '
                    'or -1 (the rest) for at most one')
  known = math.prod(size for size in mesh_sizes if size != -1)
  if check_mesh and (device_count % known or (-1 not in mesh_sizes and known != device_count)):
    raise UserError(f'mesh data={mesh_sizes[0]}, fsdp={mesh_sizes[1]} does not fit '
                    f'{device_count} devices (the sizes must multiply to the device count)')


# ---------------------------------------------------------------------------------------------
# What is written to a workdir, and read back.


def _flatten(tree, prefix=''):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and key != 'model_fields':
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_differences(old, new):
  """`{key: (old, new)}` for the computation-changing keys that differ between two resolved
  configs (dicts), leaving out `RESUMABLE_CHANGES`."""
  old_flat, new_flat = _flatten(old), _flatten(new)
  return {key: (old_flat.get(key), new_flat.get(key))
          for key in sorted(set(old_flat) | set(new_flat))
          if key not in RESUMABLE_CHANGES and old_flat.get(key) != new_flat.get(key)}


def to_dict(resolved):
  """A resolved config as plain JSON-able values."""
  return ml_collections.ConfigDict(resolved).to_dict()


def _git_commit():
  """The commit of the code that runs, when it runs from a git checkout; else None."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    result = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=here, capture_output=True,
                            text=True, timeout=5, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  if result.returncode:
    return None
  dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=here,
                         capture_output=True, text=True, timeout=5, check=False).stdout.strip()
  return result.stdout.strip() + ('+dirty' if dirty else '')


def provenance():
  """Package versions and the git commit of the code, for a workdir's config.json."""
  versions = {}
  for package in ('vit_jax', 'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint',
                  'ml_collections', 'tensorflow', 'tensorflow-datasets', 'numpy'):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  import sys
  versions['python'] = sys.version.split()[0]
  return {'git_commit': _git_commit(), 'versions': versions,
          'written_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}


def workdir_record(resolved):
  """The content of a workdir's config.json: the resolved config, its schema and provenance."""
  return {'schema_version': SCHEMA_VERSION, 'config': to_dict(resolved), **provenance()}


def _migrate_v1(flat_config):
  """A schema-1 config.json (the flat config of the code before `resolve`) as schema 2.

  Keys that had no effect in their context then (an sgd run's b1/b2/eps, a digits run's
  data.name and cache, ...) become unset; everything that took effect keeps its value.
  """
  config = ml_collections.ConfigDict(flat_config)
  new = defaults()
  optimizer_keys = OPTIMIZER_KEYS.get(config.optimizer.name, {})
  for key in ('momentum', 'b1', 'b2', 'eps'):
    if key not in optimizer_keys:
      config.optimizer[key] = None
  data = config.data
  if data.source != 'tfds':
    data.data_dir, data.download = None, None
  if data.source == 'digits':
    data.name, data.cache = None, None
  if data.source != 'tfds' or data.cache:
    data.shuffle_buffer = None
  if config.aug.crop != 'inception_crop':
    config.aug.inception_min_area = None
  if config.aug.randaugment_layers == 0:
    config.aug.randaugment_magnitude = None
  if config.schedule.name not in DECAYING_SCHEDULES:
    config.schedule.end_lr = None
  if not config.pretrained.path:
    config.pretrained.url, config.pretrained.format = None, None
  # The model keys were every ViT option at its default; only set ones are kept, and none of
  # the ViT-only ones for a Mixer (which ignored them).
  # A key at the model's own default is unset now (None), so that it compares equal to a new
  # run's config.
  family = models.decode_name(config.model_name)[0]
  defaults_of = {f.name: f.default for f in dataclasses.fields(family)}
  def is_default(key, value):
    if key in models.ARCHITECTURE_FIELDS:  # Their default is the model name's, not the field's.
      return False
    default = defaults_of[key]
    if key.endswith('dtype'):
      return jnp.dtype(value) == jnp.dtype(default)
    return value == default
  config.model = ml_collections.ConfigDict({
      key: value for key, value in config.model.items()
      if key in new.model and key in defaults_of and not is_default(key, value)})
  merged = new
  merged.update(config)  # Keys the schema-1 file lacks keep their defaults.
  return merged


def _with_new_keys(stored, declared):
  """`stored` plus the keys declared after it was written, at their defaults (which, as every
  new key's default must, change nothing)."""
  merged = dict(stored)
  for key, value in declared.items():
    if key not in merged:
      merged[key] = value
    elif isinstance(value, dict) and isinstance(merged[key], dict):
      merged[key] = _with_new_keys(merged[key], value)
  return merged


def config_of_record(record):
  """The config part of a config.json record as it is stored (schema 1: the whole record)."""
  return record['config'] if 'schema_version' in record else record


def from_workdir_record(record, path='config.json'):
  """A workdir's config.json (any schema this code knows) -> the resolved config it describes.

  Raises:
    UserError: a schema newer than this code, or a record that is not a config.
  """
  if not isinstance(record, dict):
    raise UserError(f'{path} is not a vit_jax config (a JSON object was expected)')
  version = record.get('schema_version', 1)
  if not isinstance(version, int) or version > SCHEMA_VERSION:
    raise UserError(f'{path} has config schema version {version!r}, newer than this code '
                    f'knows ({SCHEMA_VERSION}); update vit_jax to read it')
  if version == 1:
    config = _migrate_v1(record)
  else:
    config = ml_collections.ConfigDict(_with_new_keys(record['config'], defaults().to_dict()))
  # Resolved again: the keys are checked and the derived ones recomputed. The device layout is
  # checked when the run resumes, not when it is read.
  return resolve(config)
