"""The train step's non-finite guard: one decision per step, nothing of a bad update reaches the
state, the skip is counted; and the compiled program stays small (the guard used to triple it)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, python_env
from configs import quickstart
from vit_jax.train import build
from vit_jax.train import config as config_lib

GUARD_SCRIPT = r'''
import sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
from configs import quickstart
from vit_jax.train import build, config as config_lib
from vit_jax.tools import benchmark

config = quickstart.get_config()
config.model.update(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)
config.batch_size = 16
config.optimizer.ema_decay = 0.9
config.mesh.fsdp = int(sys.argv[2])
config = config_lib.resolve(config, jax.device_count())
parts = build.parts(config, 10)
state = parts.new_state()
batch = benchmark.synthetic_batch(config, 16, 10, parts.mesh, np.random.default_rng(0))
state, _ = parts.train_fn(state, batch)  # One good step: the optimizer state is not all zeros.
# A NaN in the head's bias makes the loss and every gradient NaN.
head = state.params['head']
poisoned = state.replace(params=dict(state.params, head=dict(head, bias=head['bias'].at[0].set(np.nan))))
before = jax.device_get(poisoned)
after, metrics = parts.train_fn(poisoned, batch)
after = jax.device_get(after)
same = lambda a, b: all(np.asarray(x).tobytes() == np.asarray(y).tobytes()
                        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
assert not np.isfinite(float(metrics['train_loss']))
assert same(before.params, after.params), 'params changed'
assert same(before.opt_state, after.opt_state), 'optimizer state changed'
assert same(before.ema_params, after.ema_params), 'EMA changed'
assert int(after.skipped_updates) == 1 and int(after.first_nonfinite_step) == 1
assert int(after.step) == 2
print('guard ok on', jax.device_count(), 'devices')
'''


@pytest.mark.parametrize('devices, fsdp', [(1, 1), (8, 2)])
def test_a_nan_gradient_changes_no_state_and_is_counted(devices, fsdp):
  env = python_env({'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'})
  result = subprocess.run([sys.executable, '-c', GUARD_SCRIPT, REPO_ROOT, str(fsdp)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'guard ok on {devices} devices' in result.stdout


# The quickstart train step compiled to 51,180 optimized HLO lines with a select per leaf as the
# guard, 20,109 with the update inside one lax.cond, 15,750 with the decision read from the
# gradients' global norm and the update outside the cond (the textbook step: 14,797; jax 0.10.2,
# CPU). The bound keeps the tax from coming back unseen.
QUICKSTART_STEP_HLO_LINE_BOUND = 18_500


def test_the_quickstart_train_step_stays_small():
  config = config_lib.resolve(quickstart.get_config(), jax.device_count())
  parts = build.parts(config, 10)
  compiled = parts.train_fn.lower(parts.abstract_state,
                                  build.abstract_batch(config, config.batch_size)).compile()
  lines = compiled.as_text().count('\n')
  assert lines < QUICKSTART_STEP_HLO_LINE_BOUND, lines
