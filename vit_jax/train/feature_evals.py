"""Evaluation beyond the head: k-NN and few-shot linear probes on frozen features.

`create(config, datasets, run)` is None unless `config.evals` turns an evaluator on; at each
eval the loop calls the result with the eval params (the EMA when on) and adds its metrics to
the eval's. The features are the model's pre-logits, what the head reads (the pooled token,
`fc_norm`, the `representation_size` layer; for a distilled model the mean of its class and
distillation tokens), computed in float32 by one jitted forward sharded over the mesh, compiled
once, over un-augmented images made as the eval split's are:

- the *memory*: `data.train_split`, or at most `evals.max_train_examples` of it (a fixed
  random subset of an in-memory split, the first records of a streamed tfds one: the same for
  every run, so runs compare);
- each of `evals.splits` (resolved: `(data.eval_split,)` when not given).

k-NN (DINO's, Caron et al. 2021; Wu et al. 2018): features scaled to unit length, each query's
`knn_k` most cosine-similar memory examples vote for their class with weight
exp(similarity / `knn_temperature`); the class with most weight is the prediction. On the
device, in chunks of queries, so memory stays bounded (50k × 10k is a second's work on a GPU).

Few-shot (the ViT paper's few-shot figures; big_vision's `fewshot_lsr`): for each n of
`evals.fewshot_shots`, n memory examples of each class (drawn once, seeded by `SHOT_SEED` and
the class alone; a class with fewer gives all it has), their features standardised with their
own mean and deviation plus a constant feature for the bias, closed-form ridge regression onto
±1 one-vs-all targets with penalty `fewshot_l2`; the class of the largest output.

Metric names: `knn_<k>_accuracy` and `fewshot_<n>shot_accuracy` on `data.eval_split`; on
another split the same with `_<split>` appended, the split spelled by
`vit_jax.train.config.split_suffix` ('train[:50%]' -> `knn_20_accuracy_train_to_50pct`).
"""

import functools
import logging
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.data import device as device_data
from vit_jax.train import build
from vit_jax.train import config as config_lib
from vit_jax.train import sharding

SHOT_SEED = 0                  # the few-shot draws, the same for every run
BIAS_FEATURE = 100.0           # large, so the bias is all but unpenalised (big_vision's value)
MAX_CHUNK_ELEMENTS = 2 ** 26   # similarities (or votes) held at once per k-NN chunk: 256 MiB
_HIGHEST = jax.lax.Precision.HIGHEST  # float32 products, also where f32 matmuls default lower


class Features(NamedTuple):
  """One pass over a split: the padded rows of every batch, in order."""
  features: jax.Array    # float32 (rows, width), replicated over the mesh
  labels: np.ndarray     # int32 (rows,)
  valid: np.ndarray      # bool (rows,): False on padding


def enabled(config):
  """Whether the config asks for a k-NN (`evals.knn_k`) or few-shot (`evals.fewshot_shots`) eval."""
  return bool(config.evals.knn_k or config.evals.fewshot_shots)


def create(config, datasets, run, log=print):
  """The evaluator of `config.evals` for a run's data and parts (`build.parts`); None when off.

  Every split is opened here, so a split that does not exist fails before the run writes
  anything.
  """
  if not enabled(config):
    return None
  return FeatureEvals(config, datasets, run.mesh, run.state_shardings.params,
                      run.eval_patch_size, log)


def feature_step(params, batch, *, model, image_size, patch_size=None):
  """One padded eval batch (square images or NaFlex patches) -> float32 features (batch,
  width) of `model` (built without a head: a params tree that has one is read without it),
  with the labels and mask."""
  images = device_data.model_inputs(batch, image_size)  # or NaFlex patches
  kwargs = {} if patch_size is None else {'patch_size': (patch_size, patch_size)}
  features = model.apply({'params': params}, images, train=False, **kwargs)
  return {'features': features.astype(jnp.float32), 'labels': batch['labels'],
          'mask': batch['mask']}


class FeatureEvals:
  """k-NN and few-shot accuracies of a model's frozen features; `__call__(params)`."""

  def __init__(self, config, datasets, mesh, params_shardings, patch_size=None, log=print):
    evals = config.evals
    self.knn_k, self.knn_temperature = evals.knn_k, evals.knn_temperature
    self.shots, self.fewshot_l2 = tuple(evals.fewshot_shots), evals.fewshot_l2
    self.splits, self.eval_split = tuple(evals.splits), config.data.eval_split
    self.memory_split, self.max_train_examples = config.data.train_split, evals.max_train_examples
    self.num_classes = datasets.num_classes
    self.datasets = datasets
    self.log = log
    for split in (self.memory_split,) + self.splits:
      datasets.split_batches(split)  # Opens the split (a bad one is a UserError now).
    model = build.model_from_config(config, None)
    self._feature_step = jax.jit(
        functools.partial(feature_step, model=model, image_size=config.image_size,
                          patch_size=patch_size),
        in_shardings=(params_shardings, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh))
    self._mesh = mesh
    self._timed = False

  def features(self, params, split, max_examples=None):
    """`Features` of `split` (at most `max_examples` of it) under `params`."""
    outputs = [self._feature_step(params, sharding.global_batch(batch, self._mesh))
               for batch in self.datasets.split_batches(split, max_examples)]
    # One fetch at the end, so the device runs the batches back to back.
    features, labels, mask = (jnp.concatenate([out[key] for out in outputs])
                              for key in ('features', 'labels', 'mask'))
    return Features(features, np.asarray(labels, np.int32), np.asarray(mask) > 0)

  def __call__(self, params):
    """{metric name: accuracy} of every evaluator on every split."""
    start = time.perf_counter()
    memory = self.features(params, self.memory_split, self.max_train_examples)
    shot_rows = {}
    for shots in self.shots:
      shot_rows[shots] = draw_shots(memory.labels, memory.valid, shots, self.num_classes)
      short = np.sum(np.bincount(memory.labels[shot_rows[shots]],
                                 minlength=self.num_classes) < shots)
      if short and not self._timed:
        logging.warning('evals.fewshot_shots: %d of the %d classes have fewer than %d examples '
                        'in the memory; they use all they have', short, self.num_classes, shots)
    results = {}
    for split in self.splits:
      reuse = split == self.memory_split and self.max_train_examples is None
      queries = memory if reuse else self.features(params, split)
      suffix = '' if split == self.eval_split else '_' + config_lib.split_suffix(split)
      if self.knn_k:
        predictions = knn_predictions(
            memory.features, memory.labels, memory.valid, queries.features, k=self.knn_k,
            temperature=self.knn_temperature, num_classes=self.num_classes)
        results[f'knn_{self.knn_k}_accuracy{suffix}'] = accuracy(predictions, queries)
      for shots, rows in shot_rows.items():
        predictions = ridge_predictions(
            memory.features[rows], memory.labels[rows], queries.features,
            num_classes=self.num_classes, l2=self.fewshot_l2)
        results[f'fewshot_{shots}shot_accuracy{suffix}'] = accuracy(predictions, queries)
    if not self._timed:
      self._timed = True
      self.log(f'feature evals ({", ".join(results)}): {int(memory.valid.sum())} memory '
               f'examples, {time.perf_counter() - start:.1f} s with compiling')
    return results


def accuracy(predictions, queries):
  """The fraction of the real (unpadded) queries whose prediction is their label."""
  hits = (np.asarray(predictions) == queries.labels) & queries.valid
  return float(hits.sum() / max(queries.valid.sum(), 1))


def draw_shots(labels, valid, shots, num_classes, seed=SHOT_SEED):
  """int64 rows: `shots` valid rows of each class (all of a class that has fewer), by class.

  Each class's rows are a permutation seeded by (seed, class) alone, so the draw does not
  depend on the other classes, and n shots are the first n of the same order for any n.
  """
  rows = []
  for label in range(num_classes):
    candidates = np.flatnonzero(valid & (labels == label))
    rows.append(np.random.default_rng([seed, label]).permutation(candidates)[:shots])
  return np.concatenate(rows).astype(np.int64)


def _unit(features):
  """Rows scaled to unit length (zero rows, the padding, stay zero)."""
  squared = jnp.sum(features * features, axis=-1, keepdims=True)
  return features * jax.lax.rsqrt(jnp.maximum(squared, 1e-24))


def knn_predictions(memory, memory_labels, memory_valid, queries, *, k, temperature,
                    num_classes):
  """int32 (queries,): the weighted k-NN vote of each query row among the valid memory rows.

  memory: float (rows, width); memory_labels: int (rows,); memory_valid: bool (rows,);
  queries: float (queries, width). A chunk of queries at a time holds at most
  MAX_CHUNK_ELEMENTS similarities.
  """
  rows = memory.shape[0]
  k = min(k, rows)
  chunk = max(1, min(queries.shape[0], MAX_CHUNK_ELEMENTS // max(rows, k * num_classes)))
  return _knn(memory, np.asarray(memory_labels), np.asarray(memory_valid), queries,
              np.float32(temperature), k=k, num_classes=num_classes, chunk=chunk)


@functools.partial(jax.jit, static_argnames=('k', 'num_classes', 'chunk'))
def _knn(memory, memory_labels, memory_valid, queries, temperature, *, k, num_classes, chunk):
  memory, queries = _unit(memory.astype(jnp.float32)), _unit(queries.astype(jnp.float32))
  count = queries.shape[0]
  padded = -(-count // chunk) * chunk
  queries = jnp.pad(queries, ((0, padded - count), (0, 0)))
  queries = queries.reshape(padded // chunk, chunk, queries.shape[-1])

  def predict(query_chunk):  # (chunk, width) -> (chunk,)
    similarities = jnp.matmul(query_chunk, memory.T, precision=_HIGHEST)  # (chunk, rows)
    similarities = jnp.where(memory_valid[None, :], similarities, -jnp.inf)
    # (chunk, k), best first. The barrier keeps XLA from fusing the product and the top-k into
    # each use of their result below (on CPU that recomputed them: ten times slower).
    top_similarities, top_rows = jax.lax.optimization_barrier(
        jax.lax.top_k(similarities, k))
    # exp(s / T) relative to the best neighbour's: the same vote, without overflow at small T.
    weights = jnp.exp((top_similarities - top_similarities[:, :1]) / temperature)
    votes = jnp.einsum('qk,qkc->qc', weights,
                       jax.nn.one_hot(memory_labels[top_rows], num_classes))
    return jnp.argmax(votes, axis=-1).astype(jnp.int32)

  return jax.lax.map(predict, queries).reshape(-1)[:count]


def ridge_predictions(train_features, train_labels, queries, *, num_classes, l2):
  """int32 (queries,): the classes a ridge regression on (train_features, train_labels) gives.

  The features are standardised by the training rows' mean and deviation and get a constant
  BIAS_FEATURE column; targets are +1 for the label's class and -1 for the others; the weights
  are (XᵀX + l2·I)⁻¹XᵀY, or Xᵀ(XXᵀ + l2·I)⁻¹Y when there are fewer rows than features (the
  same weights, a smaller system).
  """
  return _ridge(train_features, np.asarray(train_labels), queries, np.float32(l2),
                num_classes=num_classes)


@functools.partial(jax.jit, static_argnames=('num_classes',))
def _ridge(train_features, train_labels, queries, l2, *, num_classes):
  train_features = train_features.astype(jnp.float32)
  mean = jnp.mean(train_features, axis=0, keepdims=True)
  std = jnp.std(train_features, axis=0, keepdims=True) + 1e-5

  def standardise(x):
    x = (x.astype(jnp.float32) - mean) / std
    return jnp.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_FEATURE)

  x = standardise(train_features)  # (n, width + 1)
  targets = 2.0 * jax.nn.one_hot(train_labels, num_classes) - 1.0  # (n, classes)
  rows, width = x.shape
  if rows >= width:
    gram = jnp.matmul(x.T, x, precision=_HIGHEST) + l2 * jnp.eye(width)
    weights = jnp.linalg.solve(gram, jnp.matmul(x.T, targets, precision=_HIGHEST))
  else:
    gram = jnp.matmul(x, x.T, precision=_HIGHEST) + l2 * jnp.eye(rows)
    weights = jnp.matmul(x.T, jnp.linalg.solve(gram, targets), precision=_HIGHEST)
  scores = jnp.matmul(standardise(queries), weights, precision=_HIGHEST)
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)
