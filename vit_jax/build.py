"""From a config to the objects a run is made of: model, initial state, and the jitted steps.

One place, so the trainer, the benchmark, the FLOP counter and `restore` build exactly the same
model and the same steps (sharded the same way, the state donated the same way).
"""

import functools
import os
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models
from vit_jax import optim
from vit_jax import sharding
from vit_jax import step as step_lib
from vit_jax.errors import UserError


_XLA_FLAG = re.compile(r'--\w+(=\S*)?')


def apply_xla_flags(config, environ=None):
  """Appends `config.xla_flags` to XLA_FLAGS in `environ` (default os.environ); returns them.

  XLA reads XLA_FLAGS once, when the first backend starts, so the command-line tools call this
  right after parsing their flags, before anything touches a device (in a notebook whose jax has
  already started, it changes nothing). The environment's flags stay first and the config's come
  last, and a flag given twice takes its last value. A token that is not `--name[=value]` is a
  UserError; a well-formed name XLA does not know stops XLA itself when the backend starts.
  """
  environ = os.environ if environ is None else environ
  added = config.get('xla_flags', '') or ''
  for token in added.split():
    if not _XLA_FLAG.fullmatch(token):
      raise UserError(f'xla_flags: {token!r} is not an XLA flag; write --name=value, '
                      f'e.g. --xla_gpu_enable_latency_hiding_scheduler=true')
  if added.split():
    environ['XLA_FLAGS'] = ' '.join([environ.get('XLA_FLAGS', ''), *added.split()]).strip()
  return environ.get('XLA_FLAGS', '')


def model_from_config(config, num_classes, **extra_overrides):
  """`models.create_model` for `config.model_name` with the overrides in `config.model`."""
  overrides = {**config.model.to_dict(), **extra_overrides}
  return models.create_model(config.model_name, num_classes, **overrides)


def state_initializer(config, model, tx, mesh):
  """`(init_state(key), abstract_state, state_shardings)` for a model and optimizer on a mesh.

  `abstract_state` carries shapes, dtypes and shardings (what a checkpoint restores into).
  """
  def init_state(key):
    images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    params = model.init(key, images, train=False)['params']
    return step_lib.create_train_state(params, tx, config.optimizer.ema_decay)

  abstract_state = jax.eval_shape(init_state, jax.random.key(0))
  state_shardings = sharding.state_shardings(mesh, abstract_state)
  abstract_state = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_state, state_shardings)
  return init_state, abstract_state, state_shardings


def step_functions(config, model, tx, schedule, num_classes, mesh, state_shardings):
  """`(train_fn, eval_fn)`: the jitted steps, sharded over `mesh`, the train state donated."""
  settings = step_lib.StepSettings(
      image_size=config.image_size, num_classes=num_classes, seed=config.seed,
      accum_steps=config.accum_steps, mixup_alpha=config.aug.mixup_alpha,
      cutmix_alpha=config.aug.cutmix_alpha, label_smoothing=config.aug.label_smoothing,
      ema_decay=config.optimizer.ema_decay, prng_impl=config.prng_impl)
  batch_sharding = sharding.batch_sharding(mesh)
  train_fn = jax.jit(
      functools.partial(step_lib.train_step, model=model, tx=tx, schedule=schedule,
                        settings=settings),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))
  eval_fn = jax.jit(
      functools.partial(step_lib.eval_step, model=model, image_size=config.image_size),
      in_shardings=(state_shardings.params, batch_sharding),
      out_shardings=sharding.replicated(mesh))
  return train_fn, eval_fn


class Parts(NamedTuple):
  """What a run is made of, built from its config; nothing is allocated or compiled yet."""
  mesh: Any
  model: Any
  tx: Any                  # the optax optimizer
  schedule: Any            # step -> learning rate
  init_state: Callable     # key -> TrainState (to jit with out_shardings=state_shardings)
  init_key: Any            # the config's seed as a key of its prng_impl
  abstract_state: Any      # shapes, dtypes and shardings of the TrainState
  state_shardings: Any
  train_fn: Any            # jitted (state, batch) -> (state, metrics), the state donated
  eval_fn: Any             # jitted (params, batch) -> metrics

  def new_state(self):
    """A freshly initialised TrainState, laid out on the mesh."""
    return jax.jit(self.init_state, out_shardings=self.state_shardings)(self.init_key)


def parts(config, num_classes, mesh=None, **model_overrides):
  """`Parts` for `config` with a `num_classes` head; `mesh` defaults to `config.mesh`'s."""
  mesh = mesh or sharding.create_mesh(config.mesh)
  model = model_from_config(config, num_classes, **model_overrides)
  tx, schedule = optim.create_optimizer(config)
  init_state, abstract_state, state_shardings = state_initializer(config, model, tx, mesh)
  train_fn, eval_fn = step_functions(config, model, tx, schedule, num_classes, mesh,
                                     state_shardings)
  return Parts(mesh, model, tx, schedule, init_state,
               jax.random.key(config.seed, impl=config.prng_impl), abstract_state,
               state_shardings, train_fn, eval_fn)


def abstract_batch(config, size, with_mask=False):
  """Shapes and dtypes of a global batch of `size` as the host delivers it (for lowering)."""
  host_size = config.data.host_image_size or config.image_size
  batch = {'images': jax.ShapeDtypeStruct((size, host_size, host_size, 3), np.uint8),
           'labels': jax.ShapeDtypeStruct((size,), np.int32)}
  if with_mask:
    batch['mask'] = jax.ShapeDtypeStruct((size,), np.float32)
  return batch
