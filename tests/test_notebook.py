"""notebooks/quickstart.ipynb runs top to bottom (a short training run, on CPU)."""

import os

import pytest

NOTEBOOK = os.path.join(os.path.dirname(__file__), '..', 'notebooks', 'quickstart.ipynb')


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  nbclient = pytest.importorskip('nbclient')
  import nbformat
  workdir = tmp_path / 'quickstart'
  # The kernel inherits this process's environment.
  monkeypatch.setenv('QUICKSTART_WORKDIR', str(workdir))
  monkeypatch.setenv('QUICKSTART_STEPS', '50')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      notebook, kernel_name='python3', timeout=600,
      resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}})
  client.execute()   # raises CellExecutionError, with the cell and traceback, on any error

  outputs = [output for cell in notebook.cells if cell.cell_type == 'code'
             for output in cell.get('outputs', [])]
  assert not [o for o in outputs if o.output_type == 'error']
  images = [o for o in outputs if o.output_type == 'display_data' and 'image/png' in o.data]
  assert len(images) == 5      # curves, rollout, heads, position embeddings, filters
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert text.count('true ') == 8 and '(layers, batch, heads, queries, keys)' in text
  for name in ('curves', 'rollout', 'heads', 'posemb', 'filters'):
    assert (workdir / 'figures' / f'{name}.png').stat().st_size > 0
  assert (workdir / 'checkpoints').is_dir()
