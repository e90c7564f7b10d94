"""The benchmark CLI, the FLOP counts MFU is built on, and the peak FLOP/s table."""

import json
import math
import statistics
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python

from configs import quickstart
from configs import vit as vit_config
from vit_jax.train import cli
from vit_jax.train import config as config_lib
from vit_jax import models
from vit_jax.tools import benchmark
from vit_jax.train import build
from vit_jax.train import flops
from vit_jax.tools import memory
from vit_jax.errors import UserError

REQUIRED_KEYS = ('device', 'train_compile_s', 'eval_compile_s', 'train_step_ms',
                 'train_img_per_sec', 'eval_img_per_sec', 'data_img_per_sec', 'train_mfu',
                 'eval_mfu', 'peak_memory_bytes', 'textbook_step_ms', 'step_overhead',
                 'textbook_compile_s', 'compile_overhead')
TINY = ['--config.model.hidden_size=32', '--config.model.num_layers=1',
        '--config.model.num_heads=2', '--config.model.mlp_dim=64', '--config.batch_size=16',
        '--config.eval_batch_size=8']


def test_benchmark_cli_prints_every_figure_as_json_last(tmp_path):
  # The command compiles afresh: a persistent cache in the environment is neither read nor
  # written (the tests' own cache would otherwise turn compile times into cache reads).
  cache = tmp_path / 'xla_cache'
  result = run_python(['-m', 'vit_jax.tools.benchmark', '--config', 'configs/quickstart.py', *TINY,
                       '--steps', '2', '--repeats', '2', '--warmup', '1', '--data_batches', '2',
                       '--baseline', '--compile_repeats', '2'],
                      env={'JAX_COMPILATION_CACHE_DIR': str(cache),
                           'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'})
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  figures = json.loads(lines[-1])
  missing = [key for key in REQUIRED_KEYS if key not in figures]
  assert not missing
  assert figures['device'] == 'cpu' and figures['platform'] == 'cpu'
  assert figures['batch_size'] == 16 and figures['eval_batch_size'] == 8
  assert figures['num_classes'] == 10  # From the digits data set, which was built and timed.
  for key in ('train_compile_s', 'eval_compile_s', 'train_step_ms', 'train_img_per_sec',
              'eval_img_per_sec', 'data_img_per_sec', 'train_flops_per_step', 'peak_memory_bytes',
              'textbook_step_ms', 'textbook_compile_s'):
    assert figures[key] > 0, key
  assert figures['train_img_per_sec'] == pytest.approx(16 / figures['train_step_ms'] * 1e3)
  # What the train step pays the kernel (Linux keeps both counters): numbers, not None.
  assert figures['train_page_faults_per_step'] >= 0 and figures['train_kernel_ms_per_step'] >= 0
  assert len(figures['step_overhead_repeats']) == 2  # One ratio per repeat, in turns.
  assert figures['step_overhead'] == pytest.approx(statistics.median(
      figures['step_overhead_repeats']))
  assert figures['train_recompile_s'] > 0
  assert len(figures['compile_overhead_repeats']) == 2  # --compile_repeats pairs.
  assert figures['compile_overhead'] == pytest.approx(statistics.median(
      figures['compile_overhead_repeats']))
  for key in ('step_overhead', 'compile_overhead'):
    assert math.isfinite(figures[key]) and figures[key] > 0, key
  assert figures['persistent_compilation_cache'] is False
  assert not cache.exists() or not any(cache.iterdir())
  # CPU has no peak in the table: no MFU rather than a made-up one.
  assert figures['train_mfu'] is None and figures['eval_mfu'] is None
  assert figures['peak_memory_source'] == 'XLA memory plan of the train step'
  table = lines[:-1]  # The table comes first.
  for row in ('train step', 'compile train / eval', 'textbook train step', 'step overhead',
              'textbook compile', 'compile overhead'):
    assert any(line.startswith(row + ' ') for line in table), row


def test_without_baseline_the_textbook_figures_are_null(monkeypatch):
  config = quickstart.get_config()
  with config.unlocked():
    config.model.update(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)
    config.batch_size, config.eval_batch_size = 8, 8
  figures = benchmark.run(config, num_classes=10, steps=1, repeats=1, warmup=0, skip_data=True)
  assert figures['train_step_ms'] > 0 and figures['train_compile_s'] > 0
  assert all(figures[key] is None for key in benchmark.TEXTBOOK_KEYS)
  with pytest.raises(UserError, match='--baseline'):
    benchmark.run(config, data_only=True, baseline=True)


def test_timed_turns_alternate_which_call_runs_first():
  # On a shared machine the block that runs right after another's sees its caches and load; the
  # order turns each repeat so that neither step of a --baseline pair always takes that place.
  order = []
  calls = [lambda: order.append('ours'), lambda: order.append('textbook')]
  per_call = benchmark.time_interleaved(calls, steps=2, repeats=3)
  assert order == ['ours'] * 2 + ['textbook'] * 4 + ['ours'] * 4 + ['textbook'] * 2
  assert [len(times) for times in per_call] == [3, 3]
  assert all(seconds >= 0 for times in per_call for seconds in times)


def test_textbook_step_is_ours_without_the_extras_and_trains():
  # From the same init on the same batch, the textbook step's first loss is our step's (the
  # same model, images and labels), and its loss falls as it trains on that batch.
  config = quickstart.get_config()
  with config.unlocked():
    config.model.update(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)
    config.batch_size = 16
    config.schedule.warmup_steps = 0
  config = config_lib.resolve(config, jax.device_count())
  run_parts = build.parts(config, 10)
  batch = benchmark.synthetic_batch(config, 16, 10, run_parts.mesh, np.random.default_rng(0))
  _, ours = run_parts.train_fn(run_parts.new_state(), batch)
  state = run_parts.new_state()
  params, opt_state = state.params, state.opt_state
  step = benchmark.textbook_step_function(run_parts)
  inputs = benchmark.textbook_inputs(config, run_parts, batch, 10)
  assert inputs[0].shape == (16, 16, 16, 3) and inputs[0].dtype == jnp.float32
  losses = []
  for _ in range(6):
    params, opt_state, loss = step(params, opt_state, *inputs)
    losses.append(float(loss))
  assert losses[0] == pytest.approx(float(ours['train_loss']), rel=1e-5)
  assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
  assert losses[-1] < losses[0] - 0.1, losses


def test_bad_flags_are_one_line_errors():
  for bad, named in ((['--steps', '0'], '--steps=0'),
                     (['--config.model.hiden_size=3'], 'hiden_size'),
                     (['--max_batch', '--skip_data'], 'reports no memory limit'),
                     (['--memory_limit_gib', '4'], 'needs --max_batch')):
    result = run_python(['-m', 'vit_jax.tools.benchmark', '--config', 'configs/quickstart.py', *bad])
    assert result.returncode == 2
    assert result.stderr.strip().startswith('error:') and named in result.stderr
    assert 'Traceback' not in result.stderr


def test_skip_data_leaves_the_pipeline_alone(monkeypatch):
  monkeypatch.setattr(benchmark, 'benchmark_steps', lambda config, num_classes, *a: {})
  monkeypatch.setattr(benchmark, 'measure_data', lambda *a: pytest.fail('data was built'))
  figures = benchmark.run(quickstart.get_config(), num_classes=7, skip_data=True)
  assert figures['data_img_per_sec'] is None and figures['num_classes'] == 7
  assert 'skipped' in figures['data_error']


def test_data_only_times_no_step(monkeypatch):
  monkeypatch.setattr(benchmark, 'benchmark_steps', lambda *a: pytest.fail('steps were timed'))
  monkeypatch.setattr(benchmark, 'measure_data', lambda config, batches: (123.0, 10, None))
  figures = benchmark.run(quickstart.get_config(), data_only=True)
  assert figures['data_img_per_sec'] == 123.0 and figures['num_classes'] == 10
  assert all(figures[key] is None for key in benchmark.STEP_KEYS)
  assert figures['analytic_forward_flops_per_image'] > 0
  with pytest.raises(UserError, match='nothing to time'):
    benchmark.run(quickstart.get_config(), data_only=True, skip_data=True)


def test_unprepared_data_is_reported_not_raised(tmp_path):
  config = vit_config.get_config('B/16,cifar10')
  config.data.data_dir, config.data.download = str(tmp_path), False
  img_per_sec, num_classes, error = benchmark.measure_data(config_lib.resolve(config),
                                                          num_batches=1)
  assert img_per_sec is None and num_classes is None
  assert 'not prepared' in error


def test_analytic_vit_b16_forward_is_35_gflops():
  b16 = models.model_kwargs('ViT-B/16', 1000)
  # The ViT paper's figure: 17.6 GMACs per 224 px image.
  assert flops.analytic_vit_flops(b16, 224) == pytest.approx(35.1e9, rel=0.01)
  # Tokens grow as (size / 16)²; attention's share grows faster still.
  assert flops.analytic_vit_flops(b16, 384) > (384 / 224) ** 2 * 35.1e9
  hybrid = models.model_kwargs('R50+ViT-B/16', 1000)
  assert flops.analytic_vit_flops(hybrid, 224) is None


@pytest.mark.parametrize('name, overrides', [
    ('ViT-B/16', {}),
    ('ViT-Ti/16', {'classifier': 'map', 'num_registers': 4}),
])
def test_xla_forward_flops_match_analytic(name, overrides):
  model = models.create_model(name, 1000, **overrides)
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x)['params'], images)
  lowered = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False)).lower(params, images)
  analytic = flops.analytic_vit_flops(models.model_kwargs(name, 1000, **overrides), 224)
  assert flops.compiled_flops(lowered) == pytest.approx(analytic, rel=0.10)


def _small_config(**model_overrides):
  config = quickstart.get_config()
  config.model_name = 'ViT-S/16'
  for key in ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim'):
    config.model[key] = None
  config.model.classifier, config.model.num_layers = 'token', 4
  config.model.update(model_overrides)
  config.image_size, config.data.host_image_size = 64, 32
  config.batch_size = 4
  return config_lib.resolve(config)


def test_step_flops_used_for_mfu_match_analytic_whatever_the_fast_path():
  batch = 4
  analytic = flops.analytic_vit_flops(
      models.model_kwargs('ViT-S/16', 10, classifier='token', num_layers=4), 64)
  plain_train, plain_eval = flops.model_flops_per_step(_small_config(), 10)
  # Train: forward plus a backward of two products per forward product; the eval step also
  # resizes on the device, a little extra.
  assert plain_train == pytest.approx(3 * batch * analytic, rel=0.10)
  assert plain_eval == pytest.approx(batch * analytic, rel=0.10)
  # Scan, remat and accumulation change how the step computes, not its model FLOPs.
  config = _small_config(scan=True, remat_policy='full').as_configdict()
  config.accum_steps = 2
  assert flops.model_flops_per_step(config_lib.resolve(config), 10) == (plain_train, plain_eval)


def test_matmul_flops_count_products_convolutions_and_loops():
  lhs, rhs = jnp.ones((4, 8)), jnp.ones((8, 16))
  # The forward product and the gradient's product for `lhs` (none for `rhs`: not asked for).
  grad = jax.grad(lambda a, b: jnp.tanh(a @ b).sum())
  assert flops.matmul_flops(jax.make_jaxpr(grad)(lhs, rhs)) == 2 * (2 * 4 * 8 * 16)
  # A 16x16-patch convolution of a 32 px image into 6 features: 4 outputs x 6, 16*16*3 each.
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (16, 16), 'VALID',
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert flops.matmul_flops(jax.make_jaxpr(conv)(jnp.ones((1, 32, 32, 3)),
                                                 jnp.ones((16, 16, 3, 6)))) == 2 * 4 * 6 * 768
  square = jnp.ones((8, 8))
  scanned = lambda x: jax.lax.scan(lambda c, _: (c @ c, None), x, None, length=5)[0]
  assert flops.matmul_flops(jax.make_jaxpr(scanned)(square)) == 5 * 2 * 8**3
  branches = lambda p, x: jax.lax.cond(p, lambda y: y @ y @ y, lambda y: y, x)
  assert flops.matmul_flops(jax.make_jaxpr(branches)(True, square)) == 2 * 2 * 8**3
  assert flops.matmul_flops(jax.make_jaxpr(jax.jit(scanned))(square)) == 5 * 2 * 8**3


def test_peak_flops_table():
  def peak(kind):
    return flops.peak_flops_per_device(types.SimpleNamespace(device_kind=kind))
  assert peak('NVIDIA H100 80GB HBM3') == 989e12
  assert peak('NVIDIA H100 PCIe') == 756e12
  assert peak('NVIDIA H200') == 989e12
  assert peak('NVIDIA A100-SXM4-80GB') == 312e12
  assert peak('TPU v4') == 275e12
  assert peak('TPU v5 lite') == 197e12
  assert peak('TPU v5p') == 459e12
  assert peak('TPU v6e') == 918e12
  assert peak('cpu') is None
  assert flops.mfu(1e12, 1.0, types.SimpleNamespace(device_kind='NVIDIA H100 80GB HBM3')) \
      == pytest.approx(1e12 / 989e12)
  assert flops.mfu(1e12, 1.0, types.SimpleNamespace(device_kind='cpu')) is None


@pytest.mark.slow
def test_benchmark_steps_need_no_tensorflow():
  # The GPU machines' image has jax, flax, optax and orbax but no TensorFlow or tfds, and has no
  # network to fetch them: timing the steps (--skip_data) must not import either.
  blocked_run = ('import runpy, sys\n'
                 'sys.modules.update(tensorflow=None, tensorflow_datasets=None)\n'
                 'sys.argv[0] = "vit_jax.tools.benchmark"\n'
                 'runpy.run_module("vit_jax.tools.benchmark", run_name="__main__", alter_sys=True)\n')
  # config.xla_flags reaches XLA before its backend starts: here it makes two CPU devices.
  result = run_python(['-c', blocked_run, '--config', 'configs/quickstart.py', '--skip_data',
                       *TINY, '--steps', '1', '--repeats', '1', '--warmup', '0',
                       '--config.xla_flags=--xla_force_host_platform_device_count=2'])
  assert result.returncode == 0, result.stderr[-2000:]
  figures = json.loads(result.stdout.strip().splitlines()[-1])
  assert figures['train_step_ms'] > 0 and figures['data_img_per_sec'] is None
  assert figures['device_count'] == 2
  assert figures['xla_flags'].endswith('--xla_force_host_platform_device_count=2')


def test_xla_flags_join_the_environment_s_and_refuse_non_flags():
  config = quickstart.get_config()
  with config.unlocked():
    config.xla_flags = '--xla_b=true  --xla_c'
  environ = {'XLA_FLAGS': '--xla_a=1'}
  assert cli.apply_xla_flags(config, environ) == '--xla_a=1 --xla_b=true --xla_c'
  assert environ['XLA_FLAGS'] == '--xla_a=1 --xla_b=true --xla_c'
  with config.unlocked():
    config.xla_flags = ''
  untouched = {}
  assert cli.apply_xla_flags(config, untouched) == '' and 'XLA_FLAGS' not in untouched
  with config.unlocked():
    config.xla_flags = '--xla_b=true latency_hiding'
  with pytest.raises(UserError, match="'latency_hiding' is not an XLA flag"):
    cli.apply_xla_flags(config, {})


def test_largest_fitting_batch_doubles_or_halves_to_the_last_that_fits():
  plan = lambda batch: 1_000 + 10 * batch  # bytes: state + activations growing with the batch
  batch, tried = memory.largest_fitting_batch(plan, limit_bytes=3_600, start=32, multiple=8,
                                              ceiling=1024)
  assert batch == 256  # 1,000 + 2,560 fits; 512 would need 6,120.
  assert [entry[0] for entry in tried] == [32, 64, 128, 256, 512]
  assert [entry[2] for entry in tried] == [True, True, True, True, False]
  batch, tried = memory.largest_fitting_batch(plan, limit_bytes=1_500, start=256, multiple=8,
                                              ceiling=1024)
  assert batch == 32 and [entry[0] for entry in tried] == [256, 128, 64, 32]
  assert memory.largest_fitting_batch(plan, 2_000, 64, 8, ceiling=64)[0] == 64  # The ceiling.
  assert memory.largest_fitting_batch(plan, 1_050, 64, 8, ceiling=1024)[0] is None
  with pytest.raises(UserError, match='multiple of 8'):
    memory.largest_fitting_batch(plan, 1_500, 12, 8, ceiling=1024)


def test_max_batch_finds_the_largest_batch_whose_train_step_plan_fits():
  config = quickstart.get_config()
  with config.unlocked():
    config.model.update(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)
    config.batch_size = 8
  plan_for = memory.train_step_planner(config_lib.resolve(config), 10)
  plan_16, plan_32 = plan_for(16), plan_for(32)
  assert plan_16 < plan_32  # Activations grow with the batch.
  figures = benchmark.run(config, num_classes=10, steps=1, repeats=1, warmup=0, skip_data=True,
                          max_batch=True, memory_limit_gib=(plan_16 + plan_32) / 2 / 2**30)
  assert figures['max_batch_size'] == 16 and figures['batch_size'] == 16
  assert [entry[0] for entry in figures['max_batch_search']] == [8, 16, 32]
  assert figures['max_batch_search'][1][1] == plan_16
  assert figures['train_img_per_sec'] == pytest.approx(16 / figures['train_step_ms'] * 1e3)
  assert config.batch_size == 8  # The caller's config is left as it was.


def test_host_cost_counts_the_pages_a_call_is_handed_afresh():
  # 64 MiB of ones per call: above glibc's mmap threshold, so mapped and faulted in anew each
  # time (at least 32 faults with 2 MiB pages, 16,384 with 4 KiB ones); a call that allocates
  # nothing faults in (next to) nothing.
  fresh_faults, fresh_kernel_ms = benchmark.host_cost_per_call(
      lambda: float(np.ones(8 << 20)[::512].sum()), 3)
  idle_faults, _ = benchmark.host_cost_per_call(lambda: 0.0, 3)
  assert fresh_faults >= 30 and fresh_kernel_ms >= 0
  assert idle_faults < fresh_faults / 4
