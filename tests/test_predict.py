"""predict: top-5 from a workdir matches a direct model.apply; attention PNGs; user errors."""

import json
import re

import jax
import numpy as np
import pytest
from PIL import Image

from vit_jax.train import config as config_lib
from vit_jax.tools import predict
from vit_jax.tools import visualize
from vit_jax.errors import UserError
from vit_jax.models import create_model

IMAGE_SIZE = 24
CLASS_NAMES = [f'class_{i}' for i in range(7)]


def _make_workdir(path, classifier):
  """A workdir as train.py leaves one: config.json, class_names.json, an Orbax checkpoint."""
  import orbax.checkpoint as ocp
  config = config_lib.defaults()
  config.model_name = 'ViT-Ti/8'
  config.model.update(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32,
                      classifier=classifier, head_bias_init=0.0)
  config.image_size = IMAGE_SIZE
  model = create_model(config.model_name, len(CLASS_NAMES), **config.model.to_dict())
  params = jax.jit(model.init)(jax.random.key(0),
                               np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)))['params']
  # The head starts at zero; random weights make the probabilities differ between classes.
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda p: np.asarray(p) + 0.5 * rng.normal(size=p.shape), params)
  path.mkdir()
  config.data.source, config.data.name = 'folder', '/images'  # Host images at image_size.
  (path / 'config.json').write_text(
      json.dumps(config_lib.workdir_record(config_lib.resolve(config))))
  (path / 'class_names.json').write_text(json.dumps(CLASS_NAMES))
  manager = ocp.CheckpointManager((path / 'checkpoints').absolute(),
                                  item_names=('params', 'train_state'))
  manager.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                          train_state=ocp.args.StandardSave({'step': 3})))
  manager.wait_until_finished()
  manager.close()
  return model, params


def _write_images(tmp_path, count):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, size=(count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  paths = []
  for i, image in enumerate(pixels):
    paths.append(str(tmp_path / f'image_{i}.png'))
    Image.fromarray(image).save(paths[-1])
  return pixels, paths


def _parse(output):
  """{image path: [(name, probability), ...]} from predict's printed text."""
  parsed, current = {}, None
  for line in output.splitlines():
    match = re.match(r'^\s+\d+\. (\d\.\d+)  (\S+)$', line)
    if match:
      parsed[current].append((match.group(2), float(match.group(1))))
    elif not line.startswith('wrote '):
      current = line
      parsed[current] = []
  return parsed


@pytest.fixture(scope='module', params=['token', 'gap'])
def run(request, tmp_path_factory):
  """(workdir, model, params) of a tiny trained-looking run with this pooling."""
  workdir = tmp_path_factory.mktemp(request.param) / 'run'
  return (workdir,) + _make_workdir(workdir, request.param)


def _check_against_direct_apply(parsed, paths, model, params, pixels):
  # The same images through the model by hand: already at image_size, so only [-1, 1] scaling.
  direct = jax.jit(model.apply)({'params': params}, pixels.astype(np.float32) / 127.5 - 1.0)
  expected = np.asarray(jax.nn.softmax(direct, axis=-1))
  assert list(parsed) == paths
  for path, row in zip(paths, expected):
    printed = parsed[path]
    assert len(printed) == 5
    probabilities = [p for _, p in printed]
    assert sum(probabilities) <= 1.0 + 1e-4
    assert probabilities == sorted(probabilities, reverse=True)
    for name, probability in printed:
      assert probability == pytest.approx(row[CLASS_NAMES.index(name)], abs=1e-4)
    assert {name for name, _ in printed} == {CLASS_NAMES[i] for i in np.argsort(-row)[:5]}


def test_top5_matches_direct_apply_and_pngs_are_written(run, tmp_path, capsys):
  workdir, model, params = run
  pixels, paths = _write_images(tmp_path, 2)
  overlay, heads = tmp_path / 'overlay.png', tmp_path / 'heads.png'
  assert predict.main(['--workdir', str(workdir), *paths,
                       '--attention_out', str(overlay), '--heads', str(heads)]) == 0
  _check_against_direct_apply(_parse(capsys.readouterr().out), paths, model, params, pixels)

  px = visualize.PANEL_PX
  for path, size in ((overlay, (2 * px, 2 * px)), (heads, ((1 + 2) * px, 2 * px))):
    with Image.open(path) as image:
      assert image.size == size
      assert np.asarray(image.convert('L'), np.float64).var() > 0


def test_converted_checkpoint(run, tmp_path, capsys):
  from vit_jax.weights import convert
  _, model, params = run
  pixels, paths = _write_images(tmp_path, 1)
  convert.save_weights(params, tmp_path / 'weights.npz')
  names = tmp_path / 'names.json'
  names.write_text(json.dumps(CLASS_NAMES))
  # Architecture, pooling and image size are read from the weights.
  assert predict.main(['--checkpoint', str(tmp_path / 'weights.npz'), '--class_names',
                       str(names), *paths]) == 0
  _check_against_direct_apply(_parse(capsys.readouterr().out), paths, model, params, pixels)

  # --model and --num_classes are checked against the weights.
  assert predict.main(['--checkpoint', str(tmp_path / 'weights.npz'), '--num_classes', '10',
                       *paths]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: --num_classes 10 does not match the 7 classes')
  assert predict.main(['--checkpoint', str(tmp_path / 'weights.npz'), '--model', 'ViT-Ti/4',
                       *paths]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'ViT-Ti/4' in err and len(err.splitlines()) == 1


def test_user_errors_are_one_line(tmp_path, capsys):
  _, paths = _write_images(tmp_path, 1)
  assert predict.main(paths) == 2
  assert capsys.readouterr().err == 'error: pass exactly one of --workdir DIR or --checkpoint PATH\n'
  assert predict.main(['--workdir', str(tmp_path / 'nothing'), *paths]) == 2
  assert 'config.json' in capsys.readouterr().err
  with pytest.raises(UserError, match='does not exist'):
    predict.load_images([str(tmp_path / 'missing.png')])
  (tmp_path / 'text.png').write_text('not an image')
  with pytest.raises(UserError, match='not an image'):
    predict.load_images([str(tmp_path / 'text.png')])


def test_top_k_orders_and_truncates():
  probabilities = np.array([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.5, 0.0]])
  indices, values = predict.top_k(probabilities, k=3)
  np.testing.assert_array_equal(indices, [[1, 3, 2], [2, 0, 1]])
  np.testing.assert_allclose(values, [[0.4, 0.3, 0.2], [0.5, 0.25, 0.25]])
  assert predict.top_k(probabilities, k=10)[0].shape == (2, 4)


def test_prepare_images_resizes_any_size_and_scales_to_minus_one_one():
  flat_grey = np.full((30, 40, 3), 200, np.uint8)
  ramp = np.repeat(np.linspace(0, 255, 24).astype(np.uint8)[None, :, None], 24, 0)
  ramp = np.repeat(ramp, 3, axis=-1)                            # (24, 24, 3), dark to bright
  for host_image_size in (16, None):                            # workdir path, weights-only path
    prepared = predict.prepare_images([flat_grey, ramp], 24, host_image_size)
    assert prepared.shape == (2, 24, 24, 3) and prepared.dtype == np.float32
    np.testing.assert_allclose(prepared[0], 200 / 127.5 - 1, atol=1e-2)
    assert prepared[1].min() >= -1 and prepared[1].max() <= 1
    assert prepared[1, :, 0].mean() < -0.8 and prepared[1, :, -1].mean() > 0.8
