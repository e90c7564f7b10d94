"""tools/pytorch_vit.py: the plain PyTorch ViT has our models' shapes, trains, and is timed."""

import importlib.util
import json
import os

import pytest

from conftest import REPO_ROOT
from vit_jax import models


def _load_tool():
  spec = importlib.util.spec_from_file_location(
      'pytorch_vit', os.path.join(REPO_ROOT, 'tools', 'pytorch_vit.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


pytorch_vit = _load_tool()


@pytest.mark.parametrize('name, ours', [
    ('quickstart', ('ViT-Ti/4', dict(hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128,
                                      classifier='gap'))),
    ('ti16', ('ViT-Ti/16', {})),
])
def test_the_pytorch_model_has_our_model_s_parameters(name, ours):
  sizes = pytorch_vit.MODELS[name]
  model = pytorch_vit.build_model(**sizes)
  model_name, overrides = ours
  assert sum(p.numel() for p in model.parameters()) == models.count_params(
      model_name, sizes['num_classes'], sizes['image_size'], **overrides)


def test_the_pytorch_step_trains():
  sizes = dict(pytorch_vit.MODELS['quickstart'], hidden_size=16, num_layers=1, num_heads=2,
               mlp_dim=32, batch_size=16)
  step, _ = pytorch_vit.torch_train_step(sizes)
  losses = [float(step()) for _ in range(8)]
  assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
  assert losses[-1] < losses[0] - 0.02, losses


def test_the_command_prints_its_times_as_json(capsys):
  pytorch_vit.main(['--model', 'quickstart', '--steps', '1', '--repeats', '2', '--warmup', '0'])
  figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert figures['torch_step_ms'] > 0 and figures['torch_threads'] == 2
  assert figures['batch_size'] == 128 and figures['params'] == 138_826
  assert 'jax_step_ms' not in figures  # Only with --jax.
