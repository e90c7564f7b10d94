"""Tests of vit_jax.data: sources, resumable batches, sharding, errors, device ops, throughput."""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from vit_jax.data.tensorflow_import import tf
import tensorflow_datasets as tfds

from conftest import run_python
from vit_jax import data
from vit_jax.data import device
from vit_jax.data import digits
from vit_jax.data import randaugment
from vit_jax.data import tfds_source
from vit_jax.errors import UserError
from vit_jax.train import config as config_lib


def create(config, process_index=0, process_count=1):
  """create_datasets on the config as a run resolves it."""
  resolved = config_lib.resolve(config, process_count=process_count)
  return data.create_datasets(resolved, process_index, process_count)


def digits_config(**aug):
  config = config_lib.defaults()
  config.data.source = 'digits'
  config.data.train_split, config.data.eval_split = 'train', 'test'
  config.batch_size = 64
  config.aug.flip = False
  config.aug.update(aug)
  return config


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


# Cheap random augmentation; the resume test adds RandAugment (slower to trace).
AUGMENTED = dict(crop='random_crop', random_crop_pad=2, flip=True)


def test_digits_splits_shapes_and_no_overlap():
  datasets = create(digits_config())
  assert datasets.num_classes == 10 and datasets.class_names == [str(d) for d in range(10)]
  assert datasets.num_train_examples + datasets.num_eval_examples == 1797
  assert datasets.num_eval_examples == int(np.ceil(0.2 * 1797))
  assert datasets.host_image_size == 8
  batch = next(datasets.train_batches())
  assert batch['images'].shape == (64, 8, 8, 3) and batch['images'].dtype == np.uint8
  assert batch['labels'].shape == (64,) and batch['labels'].dtype == np.int32
  # 0..16 scaled to 0..255, grey repeated over the channels.
  assert batch['images'].max() == 255
  np.testing.assert_array_equal(batch['images'][..., 0], batch['images'][..., 2])
  labels = np.arange(1797) % 10
  train_rows, test_rows = digits.split_rows('train', labels), digits.split_rows('test', labels)
  assert not set(train_rows) & set(test_rows)
  assert len(set(train_rows) | set(test_rows)) == 1797


def test_digits_are_scikit_learns_images_and_stratified_split_without_importing_it():
  """The digits are read from the CSV in scikit-learn's wheel, and split as its
  train_test_split(stratify=..., random_state=0) does, without its 2 s import."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  reference = sk_datasets.load_digits()
  images, labels = digits._read_digits()  # pylint: disable=protected-access
  np.testing.assert_array_equal(images, reference.images)
  np.testing.assert_array_equal(labels, reference.target)
  for target in (reference.target, np.arange(1797) % 10, np.arange(1000) % 7):
    rows = np.arange(len(target))
    train, test = model_selection.train_test_split(rows, test_size=0.2, stratify=target,
                                                   random_state=0)
    np.testing.assert_array_equal(digits.split_rows('train', target), np.sort(train))
    np.testing.assert_array_equal(digits.split_rows('test', target), np.sort(test))
  script = ('import sys; from vit_jax.data import digits; digits.load("train"); '
            'print("sklearn" in sys.modules)')
  result = run_python(['-c', script])
  assert result.returncode == 0 and result.stdout.strip() == 'False', result.stderr[-2000:]


def test_digits_eval_is_one_padded_pass():
  datasets = create(digits_config())
  batches = list(datasets.eval_batches())
  assert len(batches) == int(np.ceil(datasets.num_eval_examples / 64))
  masks = np.concatenate([b['mask'] for b in batches])
  assert masks.dtype == np.float32 and masks.sum() == datasets.num_eval_examples
  labels = np.concatenate([b['labels'] for b in batches])[masks > 0]
  assert np.bincount(labels).min() >= 30  # stratified: every digit is in the test split


def test_train_batches_are_deterministic_and_seeded():
  first = take(create(digits_config(**AUGMENTED)).train_batches(), 2)
  again = take(create(digits_config(**AUGMENTED)).train_batches(), 2)
  other_config = digits_config(**AUGMENTED)
  other_config.seed = 1
  other = take(create(other_config).train_batches(), 2)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['images'], b['images'])
    np.testing.assert_array_equal(a['labels'], b['labels'])
  assert not np.array_equal(first[0]['labels'], other[0]['labels'])


def test_resume_at_step_k_equals_uninterrupted_run_with_augmentation():
  datasets = create(digits_config(randaugment_layers=2, **AUGMENTED))
  resume_step = 21  # 1437 / 64 = 22.5 steps per epoch, so steps 21..23 cross an epoch
  uninterrupted = take(datasets.train_batches(0), resume_step + 3)[resume_step:]
  resumed = take(datasets.train_batches(start_step=resume_step), 3)
  for a, b in zip(uninterrupted, resumed):
    np.testing.assert_array_equal(a['images'], b['images'])
    np.testing.assert_array_equal(a['labels'], b['labels'])
  plain = take(create(digits_config()).train_batches(resume_step), 1)[0]
  np.testing.assert_array_equal(plain['labels'], resumed[0]['labels'])
  assert not np.array_equal(plain['images'], resumed[0]['images'])  # augmentation took effect
  with pytest.raises(UserError, match='start_step'):
    datasets.train_batches(-1)


def test_process_shards_are_disjoint_and_cover_the_global_batch():
  config = digits_config(**AUGMENTED)
  whole = take(create(config).train_batches(3), 1)[0]
  shards = [take(create(config, index, 2).train_batches(3), 1)[0]
            for index in range(2)]
  assert all(len(shard['labels']) == 32 for shard in shards)
  np.testing.assert_array_equal(np.concatenate([s['images'] for s in shards]), whole['images'])
  np.testing.assert_array_equal(np.concatenate([s['labels'] for s in shards]), whole['labels'])
  eval_shards = [list(create(config, index, 2).eval_batches()) for index in range(2)]
  assert len(eval_shards[0]) == len(eval_shards[1])
  assert sum(b['mask'].sum() for shard in eval_shards for b in shard) == 360


def test_host_image_size_and_eval_crop():
  config = digits_config(crop='inception_crop')
  config.data.host_image_size = 12
  config.aug.eval_crop_fraction = 0.75
  datasets = create(config)
  assert next(datasets.train_batches())['images'].shape == (64, 12, 12, 3)
  assert next(datasets.eval_batches())['images'].shape == (64, 12, 12, 3)


@pytest.mark.parametrize('change, message', [
    (lambda c: c.data.update(source='csv'), 'csv'),
    (lambda c: setattr(c, 'batch_size', 63), 'batch_size=63'),
    (lambda c: c.data.update(train_split='validation'), 'validation'),
    (lambda c: c.aug.update(crop='center'), 'center'),
    (lambda c: c.aug.update(random_crop_pad=4), 'random_crop_pad=4'),
])
def test_config_mistakes_are_one_line_user_errors(change, message):
  config = digits_config()
  change(config)
  with pytest.raises(UserError, match=message) as error:
    create(config, 0, 2)
  assert '\n' not in str(error.value)


def test_every_randaugment_op_keeps_shape_and_dtype():
  # Low contrast, so that auto_contrast and equalize have something to stretch.
  image = tf.constant(np.random.default_rng(0).integers(90, 160, (16, 20, 3)), tf.float32)
  for op in randaugment.OPS:
    out = op(image, 1.0, -1.0)
    assert out.shape == image.shape, op.__name__
    assert np.isfinite(out.numpy()).all(), op.__name__
  changed = [op.__name__ for op in randaugment.OPS
             if not np.allclose(op(image, 1.0, 1.0).numpy(), image.numpy())]
  assert len(changed) == len(randaugment.OPS) - 1  # all but identity alter the image


def write_image_folder(root, sizes=((20, 24), (30, 16))):
  for split, count in (('train', 3), ('test', 1)):
    for label, name in enumerate(('cat', 'dog')):
      os.makedirs(root / split / name)
      for i in range(count):
        height, width = sizes[i % len(sizes)]
        pixels = np.full((height, width, 3), 60 + 120 * label, np.uint8)
        Image.fromarray(pixels).save(root / split / name / f'{i}.png')


def folder_config(root):
  config = config_lib.defaults()
  config.data.source, config.data.name = 'folder', str(root)
  config.data.train_split, config.data.eval_split = 'train', 'test'
  config.image_size, config.batch_size = 16, 4
  return config


def test_folder_source_skips_and_counts_a_corrupt_file(tmp_path):
  write_image_folder(tmp_path)
  (tmp_path / 'train' / 'dog' / 'broken.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
  datasets = create(folder_config(tmp_path))
  assert datasets.class_names == ['cat', 'dog']
  assert datasets.num_skipped_files == 1
  assert datasets.num_train_examples == 6 and datasets.num_eval_examples == 2
  batch = next(datasets.train_batches())
  assert batch['images'].shape == (4, 16, 16, 3)
  # cat images are grey 60, dog 180: the label must follow the file's class folder.
  means = batch['images'].reshape(4, -1).mean(axis=1)
  np.testing.assert_array_equal(means > 120, batch['labels'] == 1)
  eval_batch = next(datasets.eval_batches())
  np.testing.assert_array_equal(eval_batch['mask'], [1, 1, 0, 0])


def test_folder_source_user_errors(tmp_path):
  (tmp_path / 'train').mkdir()
  (tmp_path / 'test').mkdir()
  with pytest.raises(UserError, match='no class folders'):
    create(folder_config(tmp_path))
  (tmp_path / 'train' / 'empty').mkdir()
  with pytest.raises(UserError, match='empty'):
    create(folder_config(tmp_path))
  write_image_folder(tmp_path / 'good')
  config = folder_config(tmp_path / 'good')
  config.data.eval_split = 'val'
  with pytest.raises(UserError, match='val'):
    create(config)


# In a fresh Python: a folder mistake is found before TensorFlow is imported (it imports at
# the pipeline's first use of `tf`), so the user waits ~2 s for the error, not ~8 s.
_FOLDER_MISTAKE_WITHOUT_TENSORFLOW = """
import sys
from vit_jax import data
from vit_jax.errors import UserError
from vit_jax.train import config as config_lib
from vit_jax.train import loop  # What train.py imports before it builds the data.
config = config_lib.defaults()
config.data.update(source='folder', name=sys.argv[1])
try:
  data.create_datasets(config_lib.resolve(config, 1))
except UserError as e:
  print('error:', e)
print('tensorflow imported:', 'tensorflow' in sys.modules)
"""


def test_a_folder_mistake_is_found_before_tensorflow_is_imported(tmp_path):
  result = run_python(['-c', _FOLDER_MISTAKE_WITHOUT_TENSORFLOW, str(tmp_path / 'absent')])
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'is not a folder' in result.stdout, result.stdout
  assert 'tensorflow imported: False' in result.stdout, result.stdout


def tfds_config(tmp_path, **data_overrides):
  config = config_lib.defaults()
  config.data.update(dict(dict(source='tfds', name='cifar10', data_dir=str(tmp_path)),
                          **data_overrides))
  config.image_size, config.batch_size = 32, 8
  if not config.data.cache:
    config.data.shuffle_buffer = 16
  return config


@pytest.fixture
def mock_cifar10(monkeypatch):
  # Mock data stands in for the download; the reachability check must not block it.
  monkeypatch.setattr(tfds_source, 'tfds_host_reachable', lambda: True)
  with tfds.testing.mock_data(num_examples=20):
    yield


@pytest.mark.parametrize('cache', [False, True])
def test_tfds_mock_cifar10(tmp_path, mock_cifar10, cache):
  config = tfds_config(tmp_path, train_split='train[:98%]', cache=cache)
  config.data.host_image_size = 24
  config.aug.update(crop='inception_crop')
  datasets = create(config)
  assert datasets.num_classes == 10 and len(datasets.class_names) == 10
  assert datasets.num_eval_examples == 20
  batches = take(datasets.train_batches(), 4)  # 32 examples: wraps around the 20
  assert batches[0]['images'].shape == (8, 24, 24, 3)
  assert batches[0]['images'].dtype == np.uint8 and batches[0]['labels'].dtype == np.int32
  resumed = next(datasets.train_batches(start_step=3))
  np.testing.assert_array_equal(resumed['images'], batches[3]['images'])
  eval_batches = list(datasets.eval_batches())
  assert len(eval_batches) == 3 and sum(b['mask'].sum() for b in eval_batches) == 20


def test_measure_host_throughput_on_mock_data(tmp_path, mock_cifar10):
  config = tfds_config(tmp_path)
  rate = data.measure_host_throughput(config_lib.resolve(config), num_batches=3,
                                      warmup_batches=1)
  assert rate > 0


def test_unprepared_tfds_without_download_fails_fast(tmp_path):
  start = time.monotonic()
  with pytest.raises(UserError, match='data_dir'):
    create(tfds_config(tmp_path, download=False))
  assert time.monotonic() - start < 10


def test_unprepared_tfds_offline_fails_fast(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_source, 'TFDS_STORAGE_ADDRESS', ('127.0.0.1', 9))  # nothing listens
  start = time.monotonic()
  with pytest.raises(UserError, match='unreachable.*data_dir'):
    create(tfds_config(tmp_path))
  assert time.monotonic() - start < 10


def test_unknown_tfds_name_and_bad_split(tmp_path):
  with pytest.raises(UserError, match="'cifar11'.*cifar10"):
    create(tfds_config(tmp_path, name='cifar11'))
  with pytest.raises(UserError, match=r'train\[:200%\]'):
    create(tfds_config(tmp_path, train_split='train[:200%]'))


def test_device_preprocess_resizes_and_scales():
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)), jnp.uint8)
  images = images.at[0, 0, 0].set(0).at[1, 0, 0].set(255)
  same = jax.jit(device.preprocess, static_argnums=1)(images, 8)
  np.testing.assert_allclose(same[0, 0, 0], -1.0)
  np.testing.assert_allclose(same[1, 0, 0], 1.0)
  bigger = device.preprocess(images, 32)
  assert bigger.shape == (2, 32, 32, 3) and bigger.dtype == jnp.float32
  assert float(bigger.min()) >= -1.0 and float(bigger.max()) <= 1.0
  flat = device.preprocess(jnp.full((1, 4, 4, 3), 255, jnp.uint8), 12)
  np.testing.assert_allclose(flat, 1.0, atol=1e-6)


@pytest.mark.parametrize('mixup_alpha, cutmix_alpha', [(0.0, 0.0), (0.8, 0.0), (0.0, 1.0),
                                                       (0.8, 1.0)])
def test_mix_gives_soft_targets_summing_to_one(mixup_alpha, cutmix_alpha):
  rng = jax.random.PRNGKey(0)
  images = jax.random.uniform(rng, (6, 8, 8, 3), minval=-1, maxval=1)
  labels = jnp.arange(6)  # distinct, so a row and its mirror partner differ
  mixed, targets = jax.jit(device.mix, static_argnums=(3, 4, 5, 6))(
      jax.random.PRNGKey(1), images, labels, 6, mixup_alpha, cutmix_alpha, 0.1)
  assert targets.shape == (6, 6) and mixed.shape == images.shape
  np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-5)
  assert float(targets.min()) >= 0.1 / 6 - 1e-6
  if mixup_alpha == cutmix_alpha == 0:
    np.testing.assert_allclose(targets.max(axis=1), 0.9 + 0.1 / 6, rtol=1e-6)
    np.testing.assert_array_equal(mixed, images)
  else:
    assert not np.allclose(mixed, images)
    # Each row mixes its own label with its mirror partner's.
    partner = labels[::-1]
    np.testing.assert_allclose(targets[0, labels[0]] + targets[0, partner[0]],
                               0.9 + 2 * 0.1 / 6, rtol=1e-5)
