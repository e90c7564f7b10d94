"""EMA weights out: a run with `optimizer.ema_decay` evaluates its EMA, and `restore`, `predict`,
`convert` and the workdir reader give that EMA by default (`weights='params'` the raw params),
saying which; asking a run without EMA for it is a one-line error."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from configs import quickstart
import vit_jax
from vit_jax.errors import UserError
from vit_jax.tools import predict
from vit_jax.train import checkpoint
from vit_jax.weights import convert
from vit_jax.weights import workdir as workdir_weights

NO_EMA_WORKDIR = os.path.join(REPO_ROOT, 'tests', 'fixtures', 'v1_quickstart_workdir')
STEPS = 20


@pytest.fixture(scope='module')
def ema_workdir(tmp_path_factory):
  """A small quickstart run with EMA, evaluated (on the EMA) once, at its last step."""
  from vit_jax.train import loop
  config = quickstart.get_config()
  config.model.num_layers = 2
  config.batch_size = 64
  config.total_steps = STEPS
  config.schedule.warmup_steps = 5
  config.optimizer.ema_decay = 0.9
  config.eval_every = 0
  config.checkpoint_every = 0
  config.plot_every_eval = False
  workdir = str(tmp_path_factory.mktemp('ema') / 'run')
  loop.train_and_evaluate(config, workdir, log=lambda *a: None)
  return workdir


def digest(params):
  return checkpoint.tree_digest(params)


@pytest.mark.slow
def test_restore_gives_the_ema_weights_whose_accuracy_was_logged(ema_workdir):
  from vit_jax.data import device, digits
  with open(os.path.join(ema_workdir, 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f if 'test_accuracy' in line][-1]
  assert logged['step'] == STEPS

  lines = []
  model, params, config = vit_jax.restore(ema_workdir, log=lines.append)
  assert len(lines) == 1 and 'EMA weights (optimizer.ema_decay=0.9' in lines[0], lines
  test_split = digits.load('test')
  images = device.preprocess(jnp.asarray(test_split.pixels), config.image_size)
  logits = model.apply({'params': params}, images, train=False)
  accuracy = float(np.mean(np.argmax(logits, -1) == test_split.labels))
  assert accuracy == pytest.approx(logged['test_accuracy'], abs=1e-6)

  # They are the checkpoint's EMA, and weights='params' gives its raw params instead.
  state = checkpoint.restore_train_state(ema_workdir)
  assert digest(params) == digest(state.ema_params)
  _, raw, _ = vit_jax.restore(ema_workdir, weights='params', log=lines.append)
  assert 'raw params' in lines[-1]
  assert digest(raw) == digest(state.params) != digest(params)


@pytest.mark.slow
def test_predict_convert_and_the_reader_take_the_same_switch(ema_workdir, tmp_path, capsys):
  state = checkpoint.restore_train_state(ema_workdir)
  ema, raw = digest(state.ema_params), digest(state.params)

  assert digest(predict.load_workdir(ema_workdir)[1]) == ema
  assert digest(predict.load_workdir(ema_workdir, weights='params')[1]) == raw
  assert digest(predict.load_checkpoint(ema_workdir, weights='params')[1]) == raw

  from vit_jax.weights import tree
  flat, _ = workdir_weights.read(ema_workdir, log=lambda line: None)
  assert digest(tree.unflatten(flat)) == ema

  for args, expected in (([], ema), (['--weights', 'params'], raw)):
    out = str(tmp_path / f'w{len(args)}.npz')
    assert convert.main([ema_workdir, out, *args]) == 0
    written, _ = convert.load_weights(out)
    assert digest(tree.unflatten(written)) == expected
  assert 'EMA weights' in capsys.readouterr().out

  from PIL import Image
  image = str(tmp_path / 'digit.png')
  Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(image)
  assert predict.main(['--workdir', ema_workdir, '--weights', 'params', image]) == 0
  captured = capsys.readouterr()
  assert 'raw params' in captured.err and '1. ' in captured.out


@pytest.mark.slow
def test_a_workdir_as_pretrained_weights_gives_its_ema(ema_workdir):
  """train.py's `pretrained.path` at a workdir: its EMA (what it evaluated), into a new head."""
  import ml_collections
  from vit_jax.train import build
  from vit_jax.train import workdir as workdir_lib
  from vit_jax.weights import pretrained, tree
  config = workdir_lib.RunFiles(ema_workdir).read_config()
  model = build.model_from_config(config, 3)
  init = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params'])
  lines = []
  fitted = tree.flatten(pretrained.load_pretrained(
      ml_collections.ConfigDict(dict(path=ema_workdir, url=None, format='auto')), init,
      dict(config.model_fields, num_classes=3), log=lines.append))
  assert any('EMA weights' in line for line in lines), lines
  ema = tree.flatten(jax.device_get(checkpoint.restore_train_state(ema_workdir).ema_params))
  for name, value in ema.items():
    if not name.startswith('head/'):
      np.testing.assert_array_equal(fitted[name], value, err_msg=name)
  assert fitted['head/kernel'].shape == (64, 3)


def test_asking_a_run_without_ema_for_it_is_a_one_line_error(tmp_path, capsys):
  lines = []
  _, params, _ = vit_jax.restore(NO_EMA_WORKDIR, log=lines.append)
  assert 'the run kept no EMA' in lines[0] and params
  with pytest.raises(UserError, match="weights='ema': the run in .* kept no EMA") as error:
    vit_jax.restore(NO_EMA_WORKDIR, weights='ema')
  assert '\n' not in str(error.value)
  with pytest.raises(UserError, match="weights='last' is unknown; valid: ema, params"):
    vit_jax.restore(NO_EMA_WORKDIR, weights='last')
  assert predict.main(['--workdir', NO_EMA_WORKDIR, '--weights', 'ema', 'x.png']) == 2
  assert convert.main([NO_EMA_WORKDIR, str(tmp_path / 'w.npz'), '--weights', 'ema']) == 2
  assert not os.path.exists(tmp_path / 'w.npz')
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error:')]
  assert len(errors) == 2 and all('kept no EMA' in line for line in errors), errors


def test_weights_is_only_for_workdirs(tmp_path):
  from vit_jax import models
  model = models.create_model('ViT-Ti/4', 3, hidden_size=8, num_layers=1, num_heads=2,
                              mlp_dim=16)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']
  convert.save_weights(params, str(tmp_path / 'w.npz'))
  with pytest.raises(UserError, match="weights='params' chooses between a train.py workdir"):
    convert.load_weights(str(tmp_path / 'w.npz'), weights='params')
