#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one call of a lent GPU machine (see "GPU" there):
#   bash tools/gpu_figures.sh OUT_DIR [SECONDS]
# versions, issue 18's ViT-Ti/16 and ViT-S/4 in bf16 (small steps, where a
# fixed cost per step shows: on 2026-11-27 the guard's lax.cond, 0.5 ms), the GPU
# correctness tests (tests/test_gpu.py), the benchmark with --baseline for the sweep's ViT-B/16 bf16
# baseline, the quickstart in bf16, then sweep variants of the B/16 (SWEEP_ONLY, comma-separated
# names) while SECONDS (default 480) last. Each JSON line goes to
# OUT_DIR/bench.jsonl (sweep rows to OUT_DIR/sweep.jsonl), each log beside it. The machine's
# image has jax, flax, optax and orbax but no ml_collections: carry it as a wheel in .whl
# (BENCHMARKS.md says how).
set -uo pipefail
out=${1:?usage: bash tools/gpu_figures.sh OUT_DIR [SECONDS]}
seconds=${2:-480}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || exit 1
fi
left() { echo $((seconds - SECONDS)); }

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', \
jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee "$out/versions.txt"

bench() {  # name, args...: one benchmark process, its JSON line appended to bench.jsonl
  local name=$1; shift
  if (( $(left) < 40 )); then echo "$name: not run (time)"; return; fi
  timeout $(( $(left) < 150 ? $(left) : 150 )) python3 -m vit_jax.tools.benchmark --skip_data \
      --baseline --compile_repeats 1 "$@" > "$out/$name.log" 2>&1
  local status=$?
  if [[ $status == 0 ]]; then tail -1 "$out/$name.log" >> "$out/bench.jsonl"; fi
  echo "$name: exit $status"
}
bf16=--config.model.dtype=bfloat16
bench ti16_224_b16 --config configs/vit.py:Ti/16,cifar10 --config.image_size=224 $bf16 \
    --config.batch_size=16 --config.pretrained.path= --num_classes 10 --repeats 5
bench s4_32_b32 --config configs/vit.py:S/4,cifar10 --config.image_size=32 $bf16 \
    --config.batch_size=32 --config.pretrained.path= --num_classes 10 --repeats 5

JAX_PLATFORMS=cuda timeout 130 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    > "$out/test_gpu.log" 2>&1
echo "test_gpu: exit $? ($(tail -1 "$out/test_gpu.log"))"

bench b16_224_b256 --config configs/vit_b16_cifar10.py --config.image_size=224 \
    --config.data.host_image_size=224 $bf16 --config.batch_size=256 --num_classes 1000
bench quickstart --config configs/quickstart.py $bf16 --num_classes 10 --repeats 5

# The sweep's variants of the B/16 with what is left (SWEEP_ONLY= skips them).
if (( $(left) > 150 )) && [[ ${SWEEP_ONLY-x} ]]; then
  python3 -m vit_jax.tools.benchmark_sweep --out "$out/sweep.jsonl" --budget $(( $(left) - 110 )) \
      --timeout 100 --only ${SWEEP_ONLY:-remat=dots,batch=512,attention=deferred_norm,remat=full,batch=1024,xla:latency_hiding,scan} \
      > "$out/sweep.log" 2>&1
  echo "sweep: exit $?"
  python3 -m vit_jax.tools.benchmark_sweep --table "$out/sweep.jsonl"
fi
# A lent machine returns at most 8 files: the logs travel as one archive.
(cd "$out" && tar czf logs.tar.gz -- *.log && rm -f -- *.log)

python3 - "$out" <<'EOF'
import json, os, sys
if not os.path.exists(f'{sys.argv[1]}/bench.jsonl'):
  sys.exit('no benchmark finished: see the logs')
keys = ('train_step_ms', 'textbook_step_ms', 'step_overhead', 'train_compile_s',
        'textbook_compile_s', 'train_recompile_s', 'compile_overhead', 'train_mfu', 'eval_mfu')
for line in open(f'{sys.argv[1]}/bench.jsonl'):
  row = json.loads(line)
  print(row['model_name'], row['image_size'], row['batch_size'], row['device'],
        {key: round(row[key], 4) if isinstance(row[key], float) else row[key] for key in keys})
EOF
