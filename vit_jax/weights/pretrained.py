"""The pretrained weights a fine-tune starts from: found, fetched when absent, fitted."""

import os
import urllib.request

from vit_jax.errors import UserError


def load_pretrained(pretrained, init_params, model_kwargs, log=print):
  """The params of `pretrained.path` fitted to a model: head re-initialised, posemb resized.

  Any format `vit_jax.weights.convert` reads (`.npz`, a timm `.safetensors` with its description
  beside it, an HF folder, a workdir: its EMA weights when it kept them). Where the file states
  its model options (timm, HF, workdirs), the config's model must have the same ones.

  Args:
    pretrained: the resolved `config.pretrained` (path, url, format).
    init_params: the freshly initialised params of the model (numpy), whose head and shapes
      the result takes.
    model_kwargs: the model's fields, num_classes included.
    log: where progress notes go.
  """
  from vit_jax.weights import convert  # pylint: disable=g-import-not-at-top
  path = ensure_present(pretrained, log)
  log(f'loading pretrained weights from {path}')
  return convert.load_for_finetune(path, init_params, model_kwargs, format=pretrained.format,
                                   log=log, options_hint=' (config.model.<option>)')


def ensure_present(pretrained, log=print):
  """`pretrained.path`, fetched from `pretrained.url` when absent; UserError if neither is there.

  Cheap, so a run checks it before it spends seconds initialising the model it would fit.
  """
  path = pretrained.path
  if not os.path.exists(path):
    if pretrained.url:
      download(pretrained.url, path, log)
    else:
      raise UserError(f'pretrained checkpoint {path} does not exist')
  return path


def download(url, path, log=print, timeout_s=10):
  """Fetches `url` to `path`; offline, fails at once saying where to put the file."""
  log(f'{path} is absent: downloading {url}')
  partial = path + '.partial'
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(partial, 'wb') as f:
      while chunk := response.read(1 << 20):
        f.write(chunk)
  except (OSError, ValueError) as e:
    if os.path.exists(partial):
      os.remove(partial)
    raise UserError(f'pretrained checkpoint {path} is absent and {url} could not be fetched '
                    f'({type(e).__name__}); download it elsewhere and put it at {path}, or set '
                    f'--config.pretrained.path') from None
  os.replace(partial, path)
