"""SIGTERM and Ctrl-C as a request to save and stop, not as a kill."""

import os
import signal
import threading


class StopRequest:
  """SIGTERM or Ctrl-C: ask the loop to save and exit; a second Ctrl-C exits at once.

  The loop reads `signal_name` after each step (None until a signal came).
  """

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def install(self):
    """Takes over SIGTERM and SIGINT (only the main thread may); returns self."""
    if threading.current_thread() is not threading.main_thread():
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal_name is not None and signum == signal.SIGINT:
      os._exit(130)  # A second Ctrl-C: the user wants out now.
    self.signal_name = signal.Signals(signum).name

  def uninstall(self):
    """Gives the signals back to the handlers they had before `install`."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
