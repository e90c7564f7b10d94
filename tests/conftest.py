"""Shared test set-up: CPU only, the repository root importable, a helper to run train.py."""

import os
import subprocess
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)


def run_python(args, env=None, timeout=600, cwd=REPO_ROOT):
  """Runs `python <args>` from the repository root; returns the CompletedProcess."""
  full_env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu', **(env or {}))
  return subprocess.run([sys.executable] + list(args), cwd=cwd, env=full_env, timeout=timeout,
                        capture_output=True, text=True)


def run_train(args, env=None, timeout=600):
  """Runs `python train.py <args>`."""
  return run_python(['train.py'] + list(args), env=env, timeout=timeout)
