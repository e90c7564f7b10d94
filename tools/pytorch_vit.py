r"""A plain PyTorch ViT's train step on this CPU, and ours beside it: the peer a CPU user might
pick instead (issue 18's stretch target).

  python tools/pytorch_vit.py --model quickstart [--jax] [--steps 10] [--repeats 5]
  python tools/pytorch_vit.py --model ti16 --jax

The PyTorch model is written out here (timm is not installable beside the test environment's
torch) with timm's VisionTransformer layout: a strided-conv patch embedding, learned position
embeddings, pre-LayerNorm blocks (eps 1e-6) with one fused qkv projection and
`F.scaled_dot_product_attention`, tanh GELU as ours, a final LayerNorm and a linear head. Its
parameter count equals our model's (tests/test_pytorch_vit.py). The step: forward, softmax
cross-entropy, backward, clip the global gradient norm to 1, SGD with momentum 0.9 — on float
images already at the model's size, with `torch.set_num_threads(2)`, in eager mode.

`--jax` also times our jitted train step (`vit_jax.tools.benchmark`'s pieces: the config's model,
the trainer's own step and donation, a synthetic uint8 batch at the host size resized on the
device) with the same optimizer (sgd, momentum 0.9, clip 1, no weight decay), the two timed in
turns in this process. The last line printed is one JSON object: medians in ms, and
`jax_over_torch` (ours / PyTorch's step time; < 1 means ours is faster).

In one process, ours runs without train.py's huge pages (`cpu_allocator.restart_with_huge_pages`):
XLA maps the step's temporaries afresh at every call (850 MB for Ti/16 at 224 px: 233,000 page
faults a step), and with huge pages on, PyTorch's memory churn beside it slowed ours instead.
For a model that large, compare processes: this command without `--jax` against
`python -m vit_jax.tools.benchmark` with the same model and optimizer (BENCHMARKS.md, "Page
faults of a large step").
"""

import argparse
import json
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)  # vit_jax and configs, when run as `python tools/pytorch_vit.py`

# The allocator settings train.py runs with, set before torch or JAX allocate anything: they
# hold for both steps timed here (PyTorch's CPU tensors come from the same malloc).
from vit_jax import cpu_allocator  # pylint: disable=g-import-not-at-top,wrong-import-position
cpu_allocator.tune_at_start()

# The shapes of our models: configs/quickstart.py, and configs/vit.py:Ti/16 at 224 px batch 16.
MODELS = {
    'quickstart': dict(image_size=16, patch_size=4, hidden_size=64, num_layers=4, num_heads=4,
                       mlp_dim=128, classifier='gap', num_classes=10, batch_size=128),
    'ti16': dict(image_size=224, patch_size=16, hidden_size=192, num_layers=12, num_heads=3,
                 mlp_dim=768, classifier='token', num_classes=10, batch_size=16),
}


def build_model(image_size, patch_size, hidden_size, num_layers, num_heads, mlp_dim, classifier,
                num_classes, batch_size=None):
  """A plain PyTorch ViT of these sizes (`batch_size` is accepted and ignored)."""
  del batch_size
  import torch
  from torch import nn
  from torch.nn import functional as F

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
      self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
      self.proj = nn.Linear(hidden_size, hidden_size)
      self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
      self.fc1 = nn.Linear(hidden_size, mlp_dim)
      self.fc2 = nn.Linear(mlp_dim, hidden_size)

    def forward(self, x):  # (batch, tokens, width)
      batch, tokens, width = x.shape
      qkv = self.qkv(self.norm1(x)).reshape(batch, tokens, 3, num_heads, width // num_heads)
      query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, tokens, head_dim)
      attended = F.scaled_dot_product_attention(query, key, value)
      x = x + self.proj(attended.transpose(1, 2).reshape(batch, tokens, width))
      return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate='tanh'))

  class VisionTransformer(nn.Module):
    def __init__(self):
      super().__init__()
      grid = image_size // patch_size
      self.embedding = nn.Conv2d(3, hidden_size, patch_size, stride=patch_size)
      self.cls = nn.Parameter(torch.zeros(1, 1, hidden_size)) if classifier == 'token' else None
      tokens = grid * grid + (self.cls is not None)
      self.pos_embedding = nn.Parameter(torch.randn(1, tokens, hidden_size) * 0.02)
      self.blocks = nn.Sequential(*[Block() for _ in range(num_layers)])
      self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
      self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, images):  # (batch, 3, height, width)
      x = self.embedding(images).flatten(2).transpose(1, 2)  # (batch, patches, width)
      if self.cls is not None:
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
      x = self.norm(self.blocks(x + self.pos_embedding))
      return self.head(x[:, 0] if self.cls is not None else x.mean(dim=1))

  if classifier not in ('token', 'gap'):
    raise ValueError(f'classifier {classifier!r}: this model has token or gap')
  return VisionTransformer()


def torch_train_step(sizes, seed=0):
  """`(step, model)`: `step()` runs one SGD update on one fixed random batch, returns the loss."""
  import torch
  torch.manual_seed(seed)
  model = build_model(**sizes)
  model.train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  images = torch.randn(sizes['batch_size'], 3, sizes['image_size'], sizes['image_size'])
  labels = torch.randint(0, sizes['num_classes'], (sizes['batch_size'],))

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.detach()

  return step, model


def jax_train_call(name):
  """`(call, compile seconds)`: our compiled train step on the same model and batch size."""
  import jax
  import numpy as np
  from configs import quickstart
  from configs import vit as vit_config
  from vit_jax.tools import benchmark
  from vit_jax.train import build
  from vit_jax.train import config as config_lib
  sizes = MODELS[name]
  config = quickstart.get_config() if name == 'quickstart' else vit_config.get_config('Ti/16,cifar10')
  config.image_size, config.batch_size = sizes['image_size'], sizes['batch_size']
  config.optimizer.name, config.optimizer.weight_decay = 'sgd', 0.0
  config.optimizer.grad_clip_norm = 1.0
  config = config_lib.resolve(config, jax.device_count())
  run_parts = build.parts(config, sizes['num_classes'])
  holder = {'state': run_parts.new_state()}
  batch = benchmark.synthetic_batch(config, config.batch_size, sizes['num_classes'],
                                    run_parts.mesh, np.random.default_rng(0))
  start = time.perf_counter()
  compiled = run_parts.train_fn.lower(holder['state'], batch).compile()
  compile_s = time.perf_counter() - start

  def call():
    holder['state'], metrics = compiled(holder['state'], batch)
    return metrics

  return call, compile_s


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', choices=sorted(MODELS), default='quickstart')
  parser.add_argument('--steps', type=int, default=10, help='steps per timed repeat')
  parser.add_argument('--repeats', type=int, default=5, help='timed repeats; medians reported')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps first')
  parser.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
  parser.add_argument('--jax', action='store_true', help='also time our train step, in turns')
  args = parser.parse_args(argv)
  import jax
  import torch
  from vit_jax.tools import benchmark
  torch.set_num_threads(args.threads)
  sizes = MODELS[args.model]
  torch_step, model = torch_train_step(sizes)
  calls = [torch_step]
  results = {'date': time.strftime('%Y-%m-%d'), 'model': args.model, **sizes,
             'torch_version': torch.__version__, 'torch_threads': torch.get_num_threads(),
             'params': sum(p.numel() for p in model.parameters()),
             'load_average': os.getloadavg()}
  if args.jax:
    jax.config.update('jax_enable_compilation_cache', False)
    jax_call, results['jax_compile_s'] = jax_train_call(args.model)
    results['jax_version'] = jax.__version__
    calls.append(jax_call)
  for call in calls:
    for _ in range(args.warmup):
      jax.block_until_ready(call())
  # In turns (torch, ours, torch, ...), so the shared machine's load falls on both alike.
  medians = [statistics.median(times)
             for times in benchmark.time_interleaved(calls, args.steps, args.repeats)]
  results['torch_step_ms'] = 1e3 * medians[0]
  if args.jax:
    results['jax_step_ms'] = 1e3 * medians[1]
    results['jax_over_torch'] = medians[1] / medians[0]
  print(json.dumps(results), flush=True)


if __name__ == '__main__':
  main()
