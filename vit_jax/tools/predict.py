"""Classify images with a trained or converted ViT, and show where it looked.

  python -m vit_jax.tools.predict --workdir DIR [--weights ema|params] IMAGE [IMAGE ...]
  python -m vit_jax.tools.predict --checkpoint PATH [--model ViT-B/16] [--num_classes 1000] \
      [--image_size 224] [--class_names names.json] IMAGE [IMAGE ...]

Prints the top-5 classes with their probabilities for each image. `--attention_out PNG` writes
each image beside its attention rollout (Abnar & Zuidema 2020); `--heads PNG` writes the
pooling query's attention per head. What the maps show depends on the pooling:
- `token`: the CLS token's rollout row / the last layer's CLS attention per head;
- `gap`: the mean over patch queries of the rollout / of the last layer's attention per head;
- `map`: the rollout mixed by the MAP probe's attention / the probe's attention per head.
Images are prepared as the eval split was in training (host resize and crop, then the on-device
resize and [-1, 1] normalisation), so the model sees what it saw at eval. A NaFlex run
(config.data.naflex_max_tokens), or `--naflex_max_tokens N` with any ViT, takes each image at its
own aspect ratio as patches (`vit_jax.data.naflex`); the attention maps need square grids.
"""

import argparse
import dataclasses
import json
import os
import sys

import jax
import numpy as np

from vit_jax.tools import visualize
from vit_jax.train import checkpoint
from vit_jax import errors
from vit_jax.errors import UserError

TOP_K = 5


def load_images(paths):
  """The files at `paths` as uint8 (H, W, 3) arrays (grey and RGBA become RGB)."""
  from PIL import Image, UnidentifiedImageError
  images = []
  for path in paths:
    try:
      with Image.open(path) as image:
        images.append(np.asarray(image.convert('RGB'), np.uint8))
    except FileNotFoundError:
      raise UserError(f'image {path} does not exist') from None
    except (UnidentifiedImageError, OSError) as e:
      raise UserError(f'{path} is not an image PIL can read ({e})') from None
  return images


def prepare_images(images, image_size, host_image_size=None, crop_fraction=1.0):
  """uint8 images of any sizes -> float (N, image_size, image_size, 3) in [-1, 1].

  The eval path of training: the host resizes to `host_image_size / crop_fraction` and crops
  the centre (`vit_jax.data.augment.eval_preprocess`), then the device resizes to `image_size`
  and normalises (`vit_jax.data.device.preprocess`). With `host_image_size` None (weights with
  no training config) the host step is skipped and each image is resized on the device alone.
  """
  from vit_jax.data import device
  if host_image_size is None:
    return np.concatenate([np.asarray(device.preprocess(image[None], image_size), np.float32)
                           for image in images])
  host_images = []
  for image in images:
    if image.shape[:2] == (host_image_size, host_image_size) and crop_fraction >= 1.0:
      host_images.append(image)   # eval_preprocess would return it unchanged: skip TensorFlow
    else:
      from vit_jax.data import augment
      host_images.append(np.asarray(augment.eval_preprocess(image, host_image_size,
                                                            crop_fraction)))
  return np.asarray(device.preprocess(np.stack(host_images), image_size), np.float32)


def prepare_patches(images, patch_hw, max_tokens, crop_fraction=1.0):
  """uint8 images of any sizes -> the NaFlex model input: each image at its own aspect ratio in
  at most `max_tokens` patches, scaled to [-1, 1], as a NaFlex run's eval batches are."""
  from vit_jax.data import device
  from vit_jax.data import naflex
  batch = naflex.batch_from_images(images, naflex.Spec(tuple(patch_hw), max_tokens),
                                   crop_fraction)
  return {key: np.asarray(value) for key, value in device.preprocess_patches(batch).items()}


def top_k(probabilities, k=TOP_K):
  """(N, classes) -> (indices (N, k), probabilities (N, k)), most probable first."""
  k = min(k, probabilities.shape[-1])
  indices = np.argsort(-probabilities, axis=-1, kind='stable')[:, :k]
  return indices, np.take_along_axis(probabilities, indices, axis=-1)


def format_predictions(path, class_names, indices, probabilities):
  """One image's block of output: its path, then `rank. probability  name` lines."""
  lines = [str(path)]
  for rank, (index, probability) in enumerate(zip(indices, probabilities), start=1):
    lines.append(f'  {rank}. {probability:.4f}  {class_names[index]}')
  return '\n'.join(lines)


def load_workdir(workdir, step=None, weights=None):
  """`(model, params, class_names, view)` from a training workdir: its EMA weights when the
  run kept them, else its params (`weights='ema'|'params'` chooses; see `vit_jax.restore`).

  `view` holds what preparing images and reading attention need: image_size, host_image_size,
  crop_fraction, classifier, num_registers.
  """
  import vit_jax
  from vit_jax.train import workdir as workdir_lib
  model, params, config = vit_jax.restore(workdir, step=step, weights=weights)
  view = dict(image_size=config.image_size,
              host_image_size=config.data.host_image_size,
              crop_fraction=config.aug.eval_crop_fraction,
              classifier=config.model_fields.classifier,
              num_registers=config.model_fields.num_registers,
              patch_size=tuple(config.model_fields.patch_size),
              naflex_max_tokens=config.data.naflex_max_tokens)
  return model, params, workdir_lib.RunFiles(workdir).read_class_names(), view


def load_checkpoint(path, model_name=None, num_classes=None, image_size=None,
                    class_names_path=None, fmt='auto', weights=None):
  """`(model, params, class_names, view)` from converted weights (npz, HF dir, timm, workdir).

  The architecture is read from the weights (`vit_jax.weights.convert.infer_model_kwargs`); with
  `model_name` the model is built from that name instead (pooling and registers still from the
  weights) and the weights must fit it. `num_classes` must match the weights' head;
  `image_size` defaults to the weights' own (position embeddings are resized to any other).
  `weights` chooses a workdir's EMA or raw params (None: its default).
  """
  from vit_jax import models
  from vit_jax.weights import convert
  flat, metadata = convert.load_weights(
      path, format=fmt, weights=weights, log=lambda note: print(note, file=sys.stderr))
  inferred = dict(metadata.get('model_kwargs') or convert.infer_model_kwargs(flat))
  head_classes = inferred.get('num_classes')
  if not head_classes:
    raise UserError(f'{path} has no classification head; predict needs one')
  if num_classes is not None and num_classes != head_classes:
    raise UserError(f'--num_classes {num_classes} does not match the {head_classes} classes of '
                    f'the head in {path}')
  image_size = image_size or metadata.get('image_size') or convert.infer_image_size(flat,
                                                                                    inferred)
  if model_name:
    options = {f.name for f in dataclasses.fields(models.VisionTransformer)}
    options -= set(models.ARCHITECTURE_FIELDS) | {'parent', 'name', 'dtype', 'param_dtype'}
    overrides = {key: value for key, value in inferred.items() if key in options}
    kwargs = models.model_kwargs(model_name, head_classes, **overrides)
    model = models.create_model(model_name, head_classes, **overrides)
  else:
    kwargs = convert.complete_kwargs(inferred)
    model_cls = models.MlpMixer if 'tokens_mlp_dim' in kwargs else models.VisionTransformer
    model = model_cls(**kwargs)
  # Shapes are all fit_to_model needs here: the head matches, so none of init's values is used.
  target_shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(
      (1, image_size, image_size, 3), np.float32))['params']
  params = convert.fit_to_model(flat, target_shapes, kwargs, source_name=str(path),
                                model_name=model_name,
                                log=lambda note: print(note, file=sys.stderr))
  class_names = metadata.get('class_names')
  if class_names_path:
    with open(class_names_path) as f:
      class_names = json.load(f)
  if class_names is None:
    class_names = [str(i) for i in range(head_classes)]
  if len(class_names) != head_classes:
    raise UserError(f'{class_names_path} names {len(class_names)} classes; the head has '
                    f'{head_classes}')
  view = dict(image_size=image_size, host_image_size=None, crop_fraction=1.0,
              classifier=kwargs.get('classifier', 'token'),
              num_registers=kwargs.get('num_registers', 0),
              patch_size=tuple(kwargs['patch_size']), naflex_max_tokens=None)
  return model, params, class_names, view


def main(argv=None):
  """Prints the top-5 classes of each image in `argv` (and draws the maps asked for); the exit
  status."""
  parser = argparse.ArgumentParser(
      prog='python -m vit_jax.tools.predict',
      description='Top-5 classes for images, and attention maps, from a ViT.')
  parser.add_argument('images', nargs='+', metavar='IMAGE')
  source = parser.add_argument_group('the model: a workdir, or a converted checkpoint')
  source.add_argument('--workdir', help='a training workdir (config.json, checkpoints/)')
  source.add_argument('--step', type=int, help='checkpoint step in --workdir (default: latest)')
  source.add_argument('--checkpoint', help='weights file or folder (npz, HF, timm, orbax)')
  source.add_argument('--format', default='auto', help='format of --checkpoint (default: auto)')
  source.add_argument('--model', help='model name the --checkpoint must fit, e.g. ViT-B/16 '
                      '(default: read from the weights)')
  source.add_argument('--num_classes', type=int,
                      help="classes of --checkpoint's head (checked; default: from the weights)")
  source.add_argument('--image_size', type=int,
                      help='input size for --checkpoint (default: from the weights)')
  source.add_argument('--class_names', help='JSON list of class names for --checkpoint')
  source.add_argument('--weights', choices=checkpoint.WEIGHTS,
                      help='of a workdir: its EMA weights (the default when the run kept an '
                           'EMA: what it evaluated) or its raw params')
  parser.add_argument('--naflex_max_tokens', type=int, metavar='N',
                      help='take each image at its own aspect ratio in at most N patches '
                           '(NaFlex; default: what the workdir trained with, else square)')
  parser.add_argument('--attention_out', metavar='PNG',
                      help='write each image beside its attention rollout')
  parser.add_argument('--heads', metavar='PNG',
                      help="write a grid of the pooling query's attention per head")
  args = parser.parse_args(argv)
  try:
    print(predict(args))
  except errors.REPORTED as e:
    return errors.report(e)
  return 0


def predict(args):
  """Runs the CLI's work for parsed `args`; returns the text to print."""
  if bool(args.workdir) == bool(args.checkpoint):
    raise UserError('pass exactly one of --workdir DIR or --checkpoint PATH')
  if args.workdir:
    model, params, class_names, view = load_workdir(args.workdir, args.step, args.weights)
  else:
    model, params, class_names, view = load_checkpoint(
        args.checkpoint, args.model, args.num_classes, args.image_size, args.class_names,
        args.format, args.weights)

  max_tokens = getattr(args, 'naflex_max_tokens', None) or view.get('naflex_max_tokens')
  wants_attention = bool(args.attention_out or args.heads)
  if max_tokens:
    if max_tokens < 1:
      raise UserError(f'--naflex_max_tokens {max_tokens} must be positive')
    if wants_attention:
      raise UserError('--attention_out and --heads draw square grids of patches; with NaFlex '
                      '(each image at its own grid) predict gives the classes only')
    from vit_jax import models
    if not isinstance(model, models.VisionTransformer):
      raise UserError('NaFlex needs a ViT; a Mixer mixes a fixed grid of tokens')
    images = prepare_patches(load_images(args.images), view['patch_size'], max_tokens,
                             view['crop_fraction'])
  else:
    images = prepare_images(load_images(args.images), view['image_size'],
                            view['host_image_size'], view['crop_fraction'])
  if wants_attention:
    seen = visualize.model_attentions(model, params, images)
    logits = seen.logits
  else:
    apply = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
    logits = np.asarray(apply(params, images))
  if logits.ndim != 2:
    raise UserError(f'the model gives outputs of shape {logits.shape}, not class logits '
                    '(classifier=unpooled or no head)')
  probabilities = np.asarray(jax.nn.softmax(logits, axis=-1))
  indices, top_probabilities = top_k(probabilities)
  text = '\n'.join(format_predictions(path, class_names, i, p)
                   for path, i, p in zip(args.images, indices, top_probabilities))

  if wants_attention:
    shown = np.round((images + 1.0) * 127.5).clip(0, 255).astype(np.uint8)  # what it saw
    num_prefix = visualize.num_prefix_tokens(view['classifier'], view['num_registers'])
    titles = [f'{os.path.basename(path)}: {class_names[i[0]]} ({p[0]:.2f})'
              for path, i, p in zip(args.images, indices, top_probabilities)]
    if args.attention_out:
      maps = visualize.attention_rollout(seen.layers, view['classifier'], num_prefix,
                                         probe=seen.probe)
      visualize.save_attention_overlay(shown, maps, args.attention_out, titles=titles)
      text += f'\nwrote {args.attention_out} ({_what_is_shown(view["classifier"])})'
    if args.heads:
      heads = visualize.cls_attention_per_head(seen.layers, view['classifier'], num_prefix,
                                               probe=seen.probe)
      visualize.save_head_grid(shown, heads, args.heads)
      text += f'\nwrote {args.heads} ({_what_is_shown(view["classifier"], per_head=True)})'
  return text


def _what_is_shown(classifier, per_head=False):
  if classifier == 'token':
    return "last layer's CLS attention per head" if per_head else 'rollout of the CLS token'
  if classifier == 'map':
    return "MAP probe's attention per head" if per_head else 'rollout through the MAP probe'
  return ("last layer's attention per head, mean over patch queries" if per_head
          else 'rollout, mean over patch queries')


if __name__ == '__main__':
  sys.exit(main())
