"""DeiT distillation (Touvron et al. 2021): a frozen teacher's predictions as a second target.

`config.distill.teacher` names any checkpoint `vit_jax.weights.convert` reads: a train.py
workdir (its EMA weights when it kept them), a `.npz`, an HF folder or a timm file. The
teacher's architecture is the checkpoint's own description (a workdir's config, the HF or timm
config) or, for a file without one, `distill.teacher_model` (a model name; pooling and extras
follow the weights' names and shapes). The teacher runs inside the jitted train step, in eval
mode, on the same (augmented, mixed) images as the student, its params sharded like the
student's; no gradient reaches it.

The loss, for a student with DeiT's distillation token (`model.distilled=True`: logits from the
class token, `dist_logits` from the distillation token) or without one (both terms on the one
head):
  hard: (1 - alpha) CE(logits, labels) + alpha CE(dist_logits, argmax teacher)
  soft: (1 - alpha) CE(logits, labels) + alpha T^2 KL(softmax(teacher / T) || softmax(dist / T))
DeiT's recipe is hard with alpha 0.5 (its best); Hinton's soft distillation takes a
temperature T.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models
from vit_jax.errors import UserError


class Teacher(NamedTuple):
  """A frozen classifier: its Flax module and its params (numpy, in the module's layout)."""
  model: Any
  params: Any


def enabled(config):
  """Whether `config` distils from a teacher."""
  return config.distill.teacher is not None


def load_teacher(config, num_classes, log=print):
  """The teacher of a resolved `config`, checked against the student's data.

  Raises:
    UserError: an unreadable checkpoint, weights that do not fit the named model, or a teacher
      whose head does not predict `num_classes` classes.
  """
  from vit_jax.weights import convert  # pylint: disable=g-import-not-at-top
  distill = config.distill
  flat, metadata = convert.load_weights(distill.teacher, format=distill.teacher_format, log=log)
  inferred = convert.infer_model_kwargs(flat)
  if metadata.get('model_kwargs'):
    model_kwargs, described_by = dict(metadata['model_kwargs']), 'the checkpoint itself'
  elif distill.teacher_model:
    shape_fields = models.model_kwargs(distill.teacher_model, None)
    extras = {key: value for key, value in inferred.items()
              if key not in shape_fields and key not in ('resnet_layers', 'resnet_width')}
    model_kwargs = {**shape_fields, **extras}
    described_by = f'distill.teacher_model={distill.teacher_model!r}'
  else:
    # Widths, depth, heads, pooling and extras are in the names and shapes; what is not (the
    # GELU form, LayerNorm eps) stays at the published models' defaults.
    model_kwargs = dict(inferred)
    described_by = (f'the names and shapes of its {metadata.get("format")} weights; name it '
                    'with distill.teacher_model to be sure')
  teacher_classes = inferred.get('num_classes')
  if teacher_classes != num_classes:
    raise UserError(f'distill.teacher={distill.teacher} predicts {teacher_classes or "no"} '
                    f'classes; the data has {num_classes}: a teacher must be a classifier of the '
                    'same classes')
  model_kwargs['num_classes'] = num_classes
  # The teacher computes in the student's dtype (bf16 runs get a bf16 teacher) on stored params.
  model_kwargs['dtype'] = config.model_fields['dtype']
  model_kwargs = convert.complete_kwargs(model_kwargs)
  model = convert.module_for(model_kwargs)
  images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)['params']
  params = convert.fit_to_model(flat, abstract, model_kwargs, source_name=distill.teacher,
                                log=log)
  log(f'distilling from {distill.teacher} ({convert.describe(model_kwargs)}, described '
      f'by {described_by}), {distill.kind} distillation, alpha {distill.alpha}'
      + (f', temperature {distill.temperature}' if distill.kind == 'soft' else ''))
  return Teacher(model, jax.tree_util.tree_map(np.asarray, params))


def teacher_term(dist_logits, teacher_logits, *, kind, temperature):
  """The teacher's half of the loss (see the module docstring), a scalar.

  Args:
    dist_logits: (batch, classes) the student's logits that learn from the teacher (its
      distillation token's, or its only head's).
    teacher_logits: (batch, classes); no gradient flows into them.
  """
  teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  student_log_probs = jax.nn.log_softmax(dist_logits.astype(jnp.float32) / temperature, -1)
  if kind == 'hard':
    # Cross-entropy against the teacher's argmax (temperature is 1 for hard distillation).
    hard = jnp.argmax(teacher_logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(student_log_probs, hard[:, None], axis=-1))
  teacher_log_probs = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
  return temperature ** 2 * jnp.mean(kl)
