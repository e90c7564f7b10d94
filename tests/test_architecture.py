"""The folders are the architecture: the core never imports a tool, the models package imports
nothing from configs or training, and docs/ARCHITECTURE.md names exactly the modules there are."""

import ast
import os
import re

import pytest

from conftest import REPO_ROOT

PACKAGE = os.path.join(REPO_ROOT, 'vit_jax')


def modules():
  """{dotted module name: path} of every module in the package."""
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        relative = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, '.')
        found[relative.removesuffix('.__init__')] = path
  return found


def imported_names(path, module):
  """Every module an import statement of the file names, at any depth (lazy imports too)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parent = package.rsplit('.', node.level - 1)[0] if node.level > 1 else package
        base = f'{parent}.{base}' if base else parent
      names.add(base)
      names.update(f'{base}.{alias.name}' for alias in node.names)
  return names


MODULES = modules()
CORE = {name: path for name, path in MODULES.items() if not name.startswith('vit_jax.tools')}


def test_the_packages_are_there():
  assert {'vit_jax.models', 'vit_jax.data', 'vit_jax.train', 'vit_jax.weights',
          'vit_jax.tools'} <= set(MODULES)
  assert len(CORE) > 30 and len(MODULES) - len(CORE) >= 9


@pytest.mark.parametrize('module', sorted(CORE))
def test_no_core_module_imports_a_tool(module):
  tools = sorted(name for name in imported_names(CORE[module], module)
                 if name == 'vit_jax.tools' or name.startswith('vit_jax.tools.'))
  assert not tools, f'{module} imports {tools}'


@pytest.mark.parametrize('module', sorted(n for n in MODULES if n.startswith('vit_jax.models')))
def test_models_import_nothing_from_configs_or_training(module):
  forbidden = ('configs', 'vit_jax.train', 'vit_jax.data', 'vit_jax.weights', 'vit_jax.tools',
               'ml_collections', 'optax', 'orbax')
  bad = sorted(name for name in imported_names(MODULES[module], module)
               if any(name == f or name.startswith(f + '.') for f in forbidden))
  assert not bad, f'{module} imports {bad}'


def test_the_rule_checker_sees_lazy_and_relative_imports(tmp_path):
  path = tmp_path / 'm.py'
  path.write_text('def f():\n  from vit_jax.tools import plot\nfrom . import sibling\n')
  names = imported_names(str(path), 'vit_jax.train.m')
  assert 'vit_jax.tools.plot' in names and 'vit_jax.train.sibling' in names


def test_architecture_md_lists_exactly_the_modules():
  with open(os.path.join(REPO_ROOT, 'docs', 'ARCHITECTURE.md')) as f:
    text = f.read()
  listed = set(re.findall(r'`(vit_jax/[\w/]+\.py)`', text))
  existing = {os.path.relpath(path, REPO_ROOT) for path in MODULES.values()}
  assert listed == existing, (f'in the doc only: {sorted(listed - existing)}; '
                              f'in the package only: {sorted(existing - listed)}')
