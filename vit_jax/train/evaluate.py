"""Evaluation of a model's head on the eval split (one pass, padded batches)."""

import jax
import jax.numpy as jnp

from vit_jax.train import sharding


def evaluate(eval_fn, params, datasets, mesh, num_classes):
  """Test-split metrics: loss, top-1 and (with more than 5 classes) top-5 accuracy.

  `eval_fn(params, batch)` returns per-batch sums (`vit_jax.train.step.eval_step`); padding
  examples carry mask 0 and count for nothing.
  """
  sums = None
  for host_batch in datasets.eval_batches():
    batch_sums = eval_fn(params, sharding.global_batch(host_batch, mesh))
    sums = batch_sums if sums is None else jax.tree_util.tree_map(jnp.add, sums, batch_sums)
  sums = jax.device_get(sums)
  count = max(float(sums['count']), 1.0)
  results = {'test_loss': sums['loss_sum'] / count, 'test_accuracy': sums['top1_sum'] / count}
  if num_classes > 5:
    results['test_top5_accuracy'] = sums['top5_sum'] / count
  return {name: float(value) for name, value in results.items()}
