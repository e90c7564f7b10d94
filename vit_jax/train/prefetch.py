"""Host batches onto the device mesh, a few ahead of the step that needs them."""

import queue
import threading

from vit_jax.train import sharding


def device_prefetch(host_batches, mesh, depth):
  """Moves host batches onto the mesh in a background thread, `depth` batches ahead.

  `depth=0` moves each batch when it is asked for, with no thread. An exception of the host
  pipeline is re-raised in the caller's thread at the batch where it happened.
  """
  if depth <= 0:
    yield from (sharding.global_batch(b, mesh) for b in host_batches)
    return
  ready = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def producer():
    try:
      for host_batch in host_batches:
        if stop.is_set():
          return
        ready.put(sharding.global_batch(host_batch, mesh))
    except Exception as e:  # pylint: disable=broad-except  # Re-raised in the loop's thread.
      ready.put(e)

  thread = threading.Thread(target=producer, daemon=True)
  thread.start()
  try:
    while True:
      item = ready.get()
      if isinstance(item, Exception):
        raise item
      yield item
  finally:
    stop.set()
