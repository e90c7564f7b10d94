"""From a resolved config to the objects a run is made of: model, initial state, jitted steps.

One place, so the trainer, the benchmark, the FLOP counter and `restore` build exactly the same
model and the same steps (sharded the same way, the state donated the same way). Every function
takes the config `vit_jax.train.config.resolve` returned: nothing here fills a default.
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models
from vit_jax.data import device as device_data
from vit_jax.train import distill
from vit_jax.train import flexi
from vit_jax.train import optim
from vit_jax.train import sharding
from vit_jax.train import step as step_lib


# For programs that run once (a model's init), where only their compile time counts: LLVM at -O1
# in place of XLA's default -O3 on the CPU. Measured (jax 0.10, this repository's 2-core CPU,
# fresh compiles in turns): the init of a 1-layer 16-wide ViT compiled in 0.57x the time, the
# quickstart's in 0.69x, ViT-S/4's in 0.87x, ViT-Ti/16's in 0.98x, the values bit for bit the
# same. Other backends keep their defaults.
_ONE_OFF_CPU_COMPILER_OPTIONS = {'xla_backend_optimization_level': 1}


def jit_one_off(fn, mesh, **jit_kwargs):
  """`jax.jit(fn, **jit_kwargs)` for a program that runs once on `mesh` (compiled for speed of
  compiling on the CPU; see above)."""
  on_cpu = all(device.platform == 'cpu' for device in mesh.devices.flat)
  return jax.jit(fn, compiler_options=_ONE_OFF_CPU_COMPILER_OPTIONS if on_cpu else None,
                 **jit_kwargs)


def _check_resolved(config):
  if 'model_fields' not in config:
    raise TypeError('build needs a resolved config: pass vit_jax.train.config.resolve(config)')


def model_from_config(config, num_classes, **extra_overrides):
  """The Flax module of a resolved config, with a `num_classes` head (None: features out)."""
  _check_resolved(config)
  fields = {**config.model_fields, **extra_overrides}
  return models.create_model(config.model_name, num_classes, **fields)


def abstract_params(config, model):
  """The shapes and dtypes of `model`'s params at `config.image_size` (nothing allocated)."""
  images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                        images)['params']


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


def step_functions(config, model, tx, schedule, num_classes, mesh, state_shardings,
                   teacher=None):
  """`(train_fns, eval_fns)`: the jitted steps, sharded over `mesh`, the train state donated.

  Each is a dict from patch size to step: FlexiViT's sizes (`vit_jax.train.flexi`), or the one
  key None (the model's own patch size). With a `teacher` (`vit_jax.train.distill.Teacher`,
  its params abstract or not) a train step takes its params as a third argument, sharded as
  the student's are.
  """
  batch_sharding = sharding.batch_sharding(mesh)
  distill_settings, teacher_args = {}, {}
  in_shardings = (state_shardings, batch_sharding)
  if teacher is not None:
    distill_settings = dict(distill_kind=config.distill.kind,
                            distill_alpha=config.distill.alpha,
                            distill_temperature=config.distill.temperature or 1.0)
    teacher_args = dict(teacher_model=teacher.model)
    in_shardings += (sharding.state_shardings(mesh, teacher.params),)

  platform = mesh.devices.flat[0].platform

  def train_fn(patch_size):
    settings = step_lib.StepSettings(
        image_size=config.image_size, num_classes=num_classes, seed=config.seed,
        accum_steps=config.accum_steps, mixup_alpha=config.aug.mixup_alpha,
        cutmix_alpha=config.aug.cutmix_alpha, label_smoothing=config.aug.label_smoothing,
        ema_decay=config.optimizer.ema_decay, prng_impl=config.prng_impl,
        patch_size=patch_size, guard=step_lib.guard_for(platform), **distill_settings)
    return jax.jit(
        functools.partial(step_lib.train_step, model=model, tx=tx, schedule=schedule,
                          settings=settings, **teacher_args,
                          param_labels=optim.trained_labels(config.optimizer,
                                                            state_shardings.params)),
        in_shardings=in_shardings,
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,))

  def eval_fn(patch_size):
    return jax.jit(
        functools.partial(step_lib.eval_step, model=model, image_size=config.image_size,
                          patch_size=patch_size),
        in_shardings=(state_shardings.params, batch_sharding),
        out_shardings=sharding.replicated(mesh))

  return ({size: train_fn(size) for size in flexi.train_patch_sizes(config)},
          {size: eval_fn(size) for size in flexi.eval_patch_sizes(config)})


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
  train_fns: Any           # {patch size: jitted (state, batch) -> (state, metrics)}, the state
                           # donated; the one key None unless FlexiViT trains several sizes
  eval_fns: Any            # {patch size: jitted (params, batch) -> metrics}, likewise
  eval_patch_size: Any     # the key of `train_fn` and `eval_fn`

  @property
  def train_fn(self):
    """The train step at the eval patch size (the only one without FlexiViT)."""
    return self.train_fns.get(self.eval_patch_size, next(iter(self.train_fns.values())))

  @property
  def eval_fn(self):
    """The eval step at the eval patch size (the only one without FlexiViT)."""
    return self.eval_fns[self.eval_patch_size]

  def new_state(self):
    """A freshly initialised TrainState, laid out on the mesh."""
    return jit_one_off(self.init_state, self.mesh, out_shardings=self.state_shardings)(
        self.init_key)


def parts(config, num_classes, mesh=None, teacher=None, **model_overrides):
  """`Parts` for `config` with a `num_classes` head; `mesh` defaults to `config.mesh`'s.

  `teacher`: the distillation teacher (`vit_jax.train.distill.load_teacher`) of a config with
  `distill.teacher` set; the train steps then take the teacher's params third. Without one, the
  train steps are the student's alone (what restoring a model, or timing the student, needs).
  """
  if teacher is not None and not distill.enabled(config):
    raise ValueError('a teacher was given for a config without distill.teacher')
  mesh = mesh or sharding.create_mesh(config.mesh)
  model = model_from_config(config, num_classes, **model_overrides)
  tx, schedule = optim.create_optimizer(config, abstract_params(config, model))
  init_state, abstract_state, state_shardings = state_initializer(config, model, tx, mesh)
  train_fns, eval_fns = step_functions(config, model, tx, schedule, num_classes, mesh,
                                       state_shardings, teacher)
  eval_patch_size = config.flexi.eval_patch_size if flexi.enabled(config) else None
  return Parts(mesh, model, tx, schedule, init_state,
               jax.random.key(config.seed, impl=config.prng_impl), abstract_state,
               state_shardings, train_fns, eval_fns, eval_patch_size)


def abstract_batch(config, size, with_mask=False):
  """Shapes and dtypes of a global batch of `size` as the host delivers it (for lowering)."""
  if config.data.naflex_max_tokens:  # Patches at each image's own grid (vit_jax/data/naflex.py)
    shapes = device_data.naflex_batch_shapes(config.model_fields.patch_size,
                                             config.data.naflex_max_tokens, size)
    batch = {key: jax.ShapeDtypeStruct(*shape) for key, shape in shapes.items()}
  else:
    host_size = config.data.host_image_size
    batch = {'images': jax.ShapeDtypeStruct((size, host_size, host_size, 3), np.uint8)}
  batch['labels'] = jax.ShapeDtypeStruct((size,), np.int32)
  if with_mask:
    batch['mask'] = jax.ShapeDtypeStruct((size,), np.float32)
  return batch
