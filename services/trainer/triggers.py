"""Triggers: what the training loop does every N train steps or every S seconds.

As TF-Agents' learner triggers (`PolicySavedModelTrigger(..., interval=N)`),
a trigger is called after each learner call and runs its action when its
counter has moved on far enough. The loop needs two kinds:

  every_steps(N)    when the train step passes a multiple of N (publish,
                    checkpoint): versions stay multiples of N, whatever the
                    steps per call. A call that crosses a multiple fires
                    once; the loop caps its steps per call at the smallest
                    period, so that no multiple is crossed unseen.
  every_seconds(S)  once S seconds have passed since it last ran (report).
"""

import time
from collections.abc import Callable


class Trigger:
  """Runs `action(now, last)` when `read()` has moved on by `period` since it last ran.

  `now` is the counter's value now, `last` its value when the action last
  ran (or when the trigger was made).
  """

  def __init__(
    self,
    period: float,
    read: Callable[[], float],
    action: Callable[[float, float], None],
    *,
    aligned: bool,
  ):
    self.period = period
    self._read, self._action, self._aligned = read, action, aligned
    self.last = read()

  @classmethod
  def every_steps(
    cls, period: int, read_step: Callable[[], int], action: Callable[[int, int], None]
  ) -> "Trigger":
    return cls(period, read_step, action, aligned=True)

  @classmethod
  def every_seconds(
    cls,
    period: float,
    action: Callable[[float, float], None],
    clock: Callable[[], float] = time.monotonic,
  ) -> "Trigger":
    return cls(period, clock, action, aligned=False)

  def due(self, now: float) -> bool:
    if self._aligned:  # a multiple of the period lies in (last, now]
      return now // self.period > self.last // self.period
    return now - self.last >= self.period

  def __call__(self) -> bool:
    """Runs the action if it is due; True if it ran."""
    now = self._read()
    if not self.due(now):
      return False
    last, self.last = self.last, now
    self._action(now, last)
    return True
