"""tools/step_profile.py: a config's compiled train step, op by op, from XLA's CPU trace."""

import json

from conftest import TINY_MODEL, run_python


def test_the_profile_names_the_models_ops_and_sums_to_the_step():
  # The tests' 16-wide model at two layers, so that a row can fold the layers together.
  two_layers = [flag for flag in TINY_MODEL if 'num_layers' not in flag]
  result = run_python(['tools/step_profile.py', '--config', 'configs/quickstart.py',
                       '--config.batch_size=16', '--config.model.num_layers=2', *two_layers,
                       '--top', '5'])
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  profile = json.loads(lines[-1])
  assert len(lines) == 6  # The top five rows, then the JSON.
  rows = profile['rows']
  assert profile['step_ms'] > 0 and all(row['ms'] >= 0 for row in rows)
  assert abs(sum(row['ms'] for row in rows) - profile['step_ms']) < 1e-6 * profile['step_ms']
  assert [row['ms'] for row in rows] == sorted((row['ms'] for row in rows), reverse=True)
  # The two blocks' first MLP matmuls, forward, fold into one row of two ops, each of 16 images'
  # 16 tokens (16 px, 4 px patches) by the MLP's 32 units.
  mlp = [row for row in rows if row['op_name'].startswith('jvp(VisionTransformer)/Transformer/'
                                                          'encoderblock_N/MlpBlock_3/Dense_0')
         and 'dot_general' in row['op_name']]
  assert len(mlp) == 1 and mlp[0]['count'] == 2 and mlp[0]['shape'] == 'f32[256,32]', rows[:8]
