"""Evaluation beyond the head (vit_jax/train/feature_evals.py): k-NN and few-shot linear probes
on frozen features — the math on hand-made features, the config's refusals, the quickstart
model's features, and the rows a run writes to metrics.jsonl."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from conftest import TINY_QUICKSTART, run_train
from vit_jax.errors import UserError
from vit_jax.train import config as config_lib
from vit_jax.train import feature_evals

from configs import quickstart


def knn(memory, labels, queries, valid=None, k=3, temperature=0.07, num_classes=3):
  valid = np.ones(len(labels), bool) if valid is None else valid
  return np.asarray(feature_evals.knn_predictions(
      np.asarray(memory, np.float32), np.asarray(labels), valid,
      np.asarray(queries, np.float32), k=k, temperature=temperature, num_classes=num_classes))


def test_knn_votes_by_cosine_similarity():
  # Three classes along three directions; the length of a feature does not matter (cosine).
  memory = [[1, 0.1], [5, -0.5], [0.1, 1], [-0.2, 3], [-1, 0.05], [-4, -0.3]]
  labels = [0, 0, 1, 1, 2, 2]
  queries = [[10, 1], [0.3, 0.2], [0, -0.01 + 1], [-2, 0.1], [0.01, 7]]
  np.testing.assert_array_equal(knn(memory, labels, queries, k=1), [0, 0, 1, 2, 1])
  np.testing.assert_array_equal(knn(memory, labels, queries, k=2), [0, 0, 1, 2, 1])


def test_knn_weights_close_neighbours_by_the_temperature():
  # One neighbour of class 0 almost on the query, two of class 1 further away: a low
  # temperature lets the closest decide, a high one counts heads (DINO's exp(sim / T) vote).
  memory = [[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]]
  labels = [0, 1, 1]
  query = [[1.0, 0.01]]
  assert knn(memory, labels, query, k=3, temperature=0.07)[0] == 0
  assert knn(memory, labels, query, k=3, temperature=10.0)[0] == 1
  # A tiny temperature does not overflow: the weights are relative to the best neighbour's.
  assert knn(memory, labels, query, k=3, temperature=1e-4)[0] == 0


def test_knn_ignores_padding_and_chunks_give_the_same_answer(monkeypatch):
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 16)) * 3
  labels = np.repeat(np.arange(4), 25)
  memory = centres[labels] + rng.normal(size=(100, 16))
  queries = centres[np.repeat(np.arange(4), 10)] + rng.normal(size=(40, 16))
  # A padding row of the memory (valid False), equal to a query, labelled wrongly: never voted.
  valid = np.ones(101, bool)
  valid[-1] = False
  padded_memory = np.concatenate([memory, queries[:1]])
  padded_labels = np.concatenate([labels, [3 - np.repeat(np.arange(4), 10)[0]]])
  whole = knn(padded_memory, padded_labels, queries, valid, k=5, num_classes=4)
  np.testing.assert_array_equal(whole, np.repeat(np.arange(4), 10))
  monkeypatch.setattr(feature_evals, 'MAX_CHUNK_ELEMENTS', 101 * 7)  # chunks of 7 queries
  chunked = knn(padded_memory, padded_labels, queries, valid, k=5, num_classes=4)
  np.testing.assert_array_equal(chunked, whole)
  # k above the memory's size: every valid row votes.
  assert knn(memory[:3], [0, 1, 1], memory[:1], k=50, temperature=100.0, num_classes=2)[0] == 1


@pytest.mark.parametrize('width, shots', [(64, 2), (4, 40)])
def test_ridge_few_shot_separates_separable_features(width, shots):
  # Both forms of the closed-form solve: fewer rows than features (64 wide, 2 shots x 5
  # classes) and more (4 wide, 200 rows).
  rng = np.random.default_rng(1)
  centres = rng.normal(size=(5, width)) * 4
  train_labels = np.repeat(np.arange(5), shots)
  train = centres[train_labels] + rng.normal(size=(len(train_labels), width)) * 0.3
  test_labels = np.repeat(np.arange(5), 30)
  test = centres[test_labels] + rng.normal(size=(150, width)) * 0.3
  predictions = feature_evals.ridge_predictions(
      train.astype(np.float32), train_labels, test.astype(np.float32), num_classes=5,
      l2=2.0 ** 10)
  np.testing.assert_array_equal(np.asarray(predictions), test_labels)


def test_ridge_is_the_closed_form_least_squares():
  rng = np.random.default_rng(2)
  train, labels = rng.normal(size=(30, 6)), rng.integers(0, 3, 30)
  test = rng.normal(size=(50, 6))
  l2 = 3.0
  mean, std = train.mean(0), train.std(0) + 1e-5
  add_bias = lambda x: np.pad((x - mean) / std, ((0, 0), (0, 1)),
                              constant_values=feature_evals.BIAS_FEATURE)
  x, targets = add_bias(train), 2.0 * np.eye(3)[labels] - 1.0
  weights = np.linalg.solve(x.T @ x + l2 * np.eye(7), x.T @ targets)
  expected = np.argmax(add_bias(test) @ weights, -1)
  predictions = feature_evals.ridge_predictions(train.astype(np.float32), labels,
                                                test.astype(np.float32), num_classes=3, l2=l2)
  np.testing.assert_array_equal(np.asarray(predictions), expected)


def test_shot_draw_is_seeded_exact_per_class_and_nested():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 5, 300)
  labels[labels == 4] = 3  # class 4 has no example, class 3 many
  labels[:2] = 4  # ...now two: fewer than the shots asked for
  valid = rng.random(300) > 0.2
  valid[:2] = True
  rows = feature_evals.draw_shots(labels, valid, 10, 5)
  np.testing.assert_array_equal(rows, feature_evals.draw_shots(labels, valid, 10, 5))
  assert valid[rows].all() and len(set(rows)) == len(rows)
  np.testing.assert_array_equal(np.bincount(labels[rows], minlength=5), [10, 10, 10, 10, 2])
  five = feature_evals.draw_shots(labels, valid, 5, 5)
  for label in range(4):  # 5 shots are the first 5 of the same order as 10 shots.
    np.testing.assert_array_equal(five[labels[five] == label][:5],
                                  rows[labels[rows] == label][:5])
  assert not np.array_equal(rows, feature_evals.draw_shots(labels, valid, 10, 5, seed=1))


# --- Any split's batches (vit_jax/data: Datasets.split_batches).


def real_labels(batches):
  return np.concatenate([b['labels'][b['mask'] > 0] for b in batches])


def test_split_batches_of_digits_capped_and_sharded():
  from test_data import create, digits_config as data_config
  datasets = create(data_config())
  eval_batches, test_batches = list(datasets.eval_batches()), list(datasets.split_batches('test'))
  for a, b in zip(eval_batches, test_batches, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  capped = list(datasets.split_batches('train', max_examples=100))
  assert len(capped) == 2 and len(real_labels(capped)) == 100
  assert len(np.unique(real_labels(capped))) == 10  # a random subset, not the first rows
  again = list(datasets.split_batches('train', max_examples=100))
  np.testing.assert_array_equal(np.stack([b['images'] for b in capped]),
                                np.stack([b['images'] for b in again]))
  # Two processes: each its half of the same subset, the same number of batches.
  shards = [list(create(data_config(), index, 2).split_batches('train', max_examples=100))
            for index in range(2)]
  assert len(shards[0]) == len(shards[1])
  np.testing.assert_array_equal(np.concatenate([real_labels(shard) for shard in shards]),
                                real_labels(capped))
  with pytest.raises(UserError, match='max_examples=0 must be positive'):
    datasets.split_batches('train', max_examples=0)


def test_split_batches_of_another_image_folder_split(tmp_path):
  from test_data import create, folder_config, write_image_folder
  write_image_folder(tmp_path)
  os.makedirs(tmp_path / 'extra' / 'dog')
  (tmp_path / 'extra' / 'dog' / 'x.png').write_bytes((tmp_path / 'test/dog/0.png').read_bytes())
  datasets = create(folder_config(tmp_path))
  batches = list(datasets.split_batches('extra'))
  np.testing.assert_array_equal(real_labels(batches), [1])  # labelled by the train classes
  with pytest.raises(UserError, match='split folder .*missing does not exist'):
    datasets.split_batches('missing')


def test_split_batches_of_a_tfds_split(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds
  from test_data import create, tfds_config
  from vit_jax.data import tfds_source
  monkeypatch.setattr(tfds_source, 'tfds_host_reachable', lambda: True)
  with tfds.testing.mock_data(num_examples=20):
    datasets = create(tfds_config(tmp_path))
    assert len(real_labels(datasets.split_batches('train[:50%]', max_examples=7))) == 7
    with pytest.raises(UserError, match=r"evals.splits='train\[:200%\]' is not a tfds split"):
      datasets.split_batches('train[:200%]')  # (mock data has no split names to check)


def digits_config(**evals):
  config = quickstart.get_config()
  config.model.update(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)
  config.evals.update(evals)
  return config


def test_config_fills_defaults_and_the_eval_split():
  resolved = config_lib.resolve(digits_config(knn_k=20, fewshot_shots=(1, 5)))
  assert resolved.evals.knn_temperature == 0.07 and resolved.evals.fewshot_l2 == 1024.0
  assert resolved.evals.splits == ('test',) and resolved.evals.max_train_examples is None
  off = config_lib.resolve(digits_config())
  assert off.evals.knn_temperature is None and off.evals.fewshot_l2 is None
  assert off.evals.splits == ()
  assert config_lib.split_suffix('train[:50%]') == 'train_to_50pct'
  assert config_lib.split_suffix('train[50%:]') == 'train_50pct_to'
  assert config_lib.split_suffix('validation') == 'validation'


def test_config_json_with_evals_reads_back_and_old_ones_read_with_evals_off(tmp_path):
  from vit_jax.train import workdir as workdir_lib
  resolved = config_lib.resolve(digits_config(knn_k=20, fewshot_shots=(1, 5),
                                              splits=('test', 'train'), max_train_examples=500))
  files = workdir_lib.RunFiles(tmp_path / 'run')
  files.write_config(resolved)
  assert files.read_config() == resolved
  # A config.json written before config.evals existed: the section at its defaults (off).
  record = json.loads(files.config_json.read_text())
  del record['config']['evals']
  files.config_json.write_text(json.dumps(record))
  assert not feature_evals.enabled(files.read_config())
  # Turning the evaluators on when resuming changes nothing that is trained.
  assert not config_lib.config_differences(config_lib.to_dict(files.read_config()),
                                           config_lib.to_dict(resolved))


@pytest.mark.parametrize('evals, message', [
    (dict(knn_temperature=0.1), 'knn_temperature=0.1 has no effect with evals.knn_k=0'),
    (dict(fewshot_l2=10.0), 'fewshot_l2=10.0 has no effect without evals.fewshot_shots'),
    (dict(splits=('train',)), r"splits=\('train',\) has no effect without evals.knn_k"),
    (dict(max_train_examples=100), 'max_train_examples=100 has no effect without'),
    (dict(knn_k=-1), 'evals.knn_k=-1 must be an integer >= 0'),
    (dict(fewshot_shots=(0, 5)), r'fewshot_shots=\(0, 5\) must be positive'),
    (dict(fewshot_shots=(5, 5)), 'lists a number twice'),
    (dict(knn_k=5, knn_temperature=0.0), 'knn_temperature=0.0 must be positive'),
    (dict(fewshot_shots=(1,), fewshot_l2=-1.0), 'fewshot_l2=-1.0 must be positive'),
    (dict(knn_k=5, max_train_examples=0), 'max_train_examples=0 must be positive'),
    (dict(knn_k=5, splits=('test', 'test')), 'lists a split twice'),
    (dict(knn_k=5, splits=('a[:5]', 'a_to_5')), 'lists a split twice'),
])
def test_a_feature_eval_key_that_cannot_work_is_a_one_line_error(evals, message):
  with pytest.raises(UserError, match=message) as error:
    config_lib.resolve(digits_config(**evals))
  assert '\n' not in str(error.value)


def test_unpooled_features_are_refused():
  config = digits_config(knn_k=5)
  config.model.classifier = 'unpooled'
  with pytest.raises(UserError, match="model.classifier='unpooled' gives one per patch"):
    config_lib.resolve(config)


def test_a_split_that_does_not_exist_fails_when_the_evaluator_is_made():
  from vit_jax import data as data_lib
  from vit_jax.train import build
  config = config_lib.resolve(digits_config(knn_k=5, splits=('test', 'validation')), 1)
  datasets = data_lib.create_datasets(config)
  run = build.parts(config, datasets.num_classes)
  with pytest.raises(UserError, match="digits has no split 'validation'"):
    feature_evals.create(config, datasets, run)


@pytest.mark.parametrize('model', [dict(classifier='map'), dict(representation_size=8),
                                   dict(distilled=True, classifier='token')])
def test_the_features_are_what_the_head_reads(model):
  """feature_step on the full params tree (head included) gives the pre-logits: the head of
  the same params maps them to the model's logits. A distilled model's features are the mean
  of its class and distillation tokens: with its two heads made equal, that is exactly what
  the mean of the heads reads."""
  from vit_jax.data import device
  from vit_jax.data import digits
  from vit_jax.train import build
  config = digits_config(knn_k=5)
  config.model.update(model)
  config = config_lib.resolve(config, 1)
  full = build.model_from_config(config, 10)
  params = full.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))['params']
  heads = [name for name in ('head', 'head_dist') if name in params]
  # Heads are zero-initialised; random here so that the check means something.
  params['head'] = jax.tree_util.tree_map(
      lambda p: jax.random.normal(jax.random.key(1), p.shape), params['head'])
  if 'head_dist' in params:
    params['head_dist'] = params['head']
  images = digits.load('test').pixels[:4]
  batch = {'images': images, 'labels': np.zeros(4, np.int32), 'mask': np.ones(4, np.float32)}
  features = feature_evals.feature_step(params, batch, model=build.model_from_config(config, None),
                                        image_size=16)['features']
  logits = full.apply({'params': params}, device.preprocess(images, 16), train=False)
  from_features = np.mean([features @ params[name]['kernel'] + params[name]['bias']
                           for name in heads], axis=0)
  np.testing.assert_allclose(from_features, logits, rtol=1e-4, atol=1e-4)


def test_naflex_batches_give_features_too():
  """With data.naflex_max_tokens the evaluator reads patch batches (each digit at its own grid)
  through the same model inputs as the eval step; even an untrained model's features find the
  digits' neighbours far above chance."""
  from vit_jax import data as data_lib
  from vit_jax.train import build
  config = digits_config(knn_k=5, fewshot_shots=(5,), splits=('test', 'train'))
  config.aug.update(crop='resize', random_crop_pad=0)
  config.data.update(host_image_size=None, naflex_max_tokens=4)
  config = config_lib.resolve(config, jax.device_count())
  datasets = data_lib.create_datasets(config)
  assert 'patches' in next(datasets.split_batches('train'))
  run = build.parts(config, datasets.num_classes)
  metrics = feature_evals.create(config, datasets, run, log=lambda *a: None)(
      run.new_state().params)
  assert set(metrics) == {'knn_5_accuracy', 'fewshot_5shot_accuracy', 'knn_5_accuracy_train',
                          'fewshot_5shot_accuracy_train'}
  assert metrics['knn_5_accuracy'] > 0.5, metrics


def evaluator_for(workdir_config, **evals):
  """The evaluator of a restored run's config with `evals` on, and its data (CPU, one device)."""
  from vit_jax import data as data_lib
  from vit_jax.train import build
  plain = config_lib.to_dict(workdir_config)
  plain['evals'].update(evals)
  config = config_lib.resolve(ml_collections.ConfigDict(plain), jax.device_count())
  datasets = data_lib.create_datasets(config)
  run = build.parts(config, datasets.num_classes)
  return feature_evals.create(config, datasets, run, log=lambda *a: None), run


@pytest.mark.slow
def test_knn_and_few_shot_on_the_quickstart_models_features(trained_quickstart):
  """The trained quickstart's frozen features (EMA off: its params), memory = its 1,437 train
  digits: k-NN and 10-shot ridge on the 360 test digits are far above chance (0.1)."""
  from vit_jax import restore
  workdir, _ = trained_quickstart
  _, params, config = restore(workdir, log=lambda *a: None)
  evaluator, run = evaluator_for(config, knn_k=20, fewshot_shots=(1, 5, 10),
                                 splits=('test', 'train'))
  params = jax.device_put(params, run.state_shardings.params)
  metrics = evaluator(params)
  print(json.dumps(metrics, indent=1))
  assert metrics['knn_20_accuracy'] >= 0.9, metrics
  assert metrics['fewshot_10shot_accuracy'] >= 0.9, metrics
  assert metrics['fewshot_1shot_accuracy'] >= 0.8, metrics
  assert (metrics['fewshot_1shot_accuracy'] <= metrics['fewshot_5shot_accuracy']
          <= metrics['fewshot_10shot_accuracy'] + 0.02), metrics
  assert metrics['knn_20_accuracy_train'] >= metrics['knn_20_accuracy'] - 0.02  # itself among
  assert evaluator(params) == metrics  # deterministic                        # its neighbours
  # The head's own accuracy, for scale: the features the k-NN reads are the ones it reads.
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  head_accuracy = [r for r in rows if 'test_accuracy' in r][-1]['test_accuracy']
  assert abs(metrics['knn_20_accuracy'] - head_accuracy) < 0.05, (metrics, head_accuracy)


@pytest.mark.slow
def test_a_run_writes_the_feature_metrics_with_scan_remat_and_bf16(tmp_path):
  """A tiny digits run with both evaluators on two splits, the memory capped, the model
  scanned, rematerialised and in bfloat16: every eval row of metrics.jsonl has the metrics."""
  workdir = tmp_path / 'run'
  result = run_train(TINY_QUICKSTART + [
      '--workdir', str(workdir), '--config.eval_every=6', '--config.model.scan=True',
      '--config.model.remat_policy=full', '--config.model.dtype=bfloat16',
      '--config.evals.knn_k=10', '--config.evals.fewshot_shots=(1,5)',
      "--config.evals.splits=('test','train')", '--config.evals.max_train_examples=700'])
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  evals = [r for r in rows if 'test_accuracy' in r]
  assert [r['step'] for r in evals] == [6, 12]
  names = ('knn_10_accuracy', 'knn_10_accuracy_train', 'fewshot_1shot_accuracy',
           'fewshot_5shot_accuracy', 'fewshot_1shot_accuracy_train',
           'fewshot_5shot_accuracy_train')
  for row in evals:
    for name in names:
      assert 0.0 <= row[name] <= 1.0, (name, row)
  # Even 12 steps of a 16-wide layer give features that find digits far above chance.
  assert evals[-1]['knn_10_accuracy'] > 0.3, evals[-1]
  assert 'feature evals (knn_10_accuracy, ' in result.stdout
  assert 'knn_10_accuracy ' in result.stdout  # the printed eval line
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert set(names) <= set(final)
