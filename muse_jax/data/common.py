"""Small pieces the sources share: retried reads and splitting a source between hosts."""

from collections.abc import Callable
import time
from typing import Any, TypeVar

T = TypeVar("T")


def read_with_retries(read: Callable[[], T], retries: int) -> T:
  """Calls `read`, retrying I/O errors with exponential back-off (0.1 s, 0.2 s, ...).

  Remote storage fails transiently now and then; a missing file does not come back, so
  FileNotFoundError is raised at once.
  """
  for attempt in range(retries + 1):
    try:
      return read()
    except FileNotFoundError:
      raise
    except OSError:
      if attempt == retries:
        raise
      time.sleep(0.1 * 2**attempt)
  raise AssertionError("unreachable")


def host_range(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  """Host p's contiguous part [start, stop) of n examples; parts differ by at most one."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  return (n * process_index) // process_count, (n * (process_index + 1)) // process_count


class HostSlice:
  """The examples [start, stop) of a random-access source, as a source of its own."""

  def __init__(self, source: Any, start: int, stop: int):
    self.source, self.start, self.stop = source, start, stop

  def __repr__(self) -> str:
    return f"{self.source!r}[{self.start}:{self.stop}]"

  @property
  def startup_events(self) -> dict[str, int]:
    return getattr(self.source, "startup_events", {})

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, index: int):
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} outside [0, {len(self)})")
    return self.source[self.start + int(index)]
