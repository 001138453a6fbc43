"""The driver: steps the environments with the collect policy, feeds the observer.

TF-Agents' PyDriver steps the environments and then calls its observers, so
the environments idle while transitions are written to replay. This driver
hands transition t to the observer while the native environments compute
step t+1 in their own C++ threads: writing to replay then costs the
collector (almost) no wall-clock time (bench/collector_throughput.py).
"""

from tf_agents.trajectories import time_step as ts

from dqnfleet.core.rl.envs import BatchedEnvironment


class PipelinedDriver:
  """Runs `policy` in `env`; `observer` receives (time_step, action_step, next_time_step)."""

  def __init__(self, env: BatchedEnvironment, policy, observer):
    self.env, self.policy, self.observer = env, policy, observer
    self._pending = None  # the newest transition, not yet observed

  def run(self, time_step: ts.TimeStep, steps: int) -> ts.TimeStep:
    """`steps` batched steps from `time_step`; returns the newest time step."""
    for _ in range(steps):
      action_step = self.policy.action(time_step)
      self.env.send(action_step.action)
      self.flush()  # while the environments step
      next_time_step = self.env.receive()
      self._pending = (time_step, action_step, next_time_step)
      time_step = next_time_step
    return time_step

  def flush(self) -> None:
    """Observes the transition that is still pending."""
    if self._pending is not None:
      pending, self._pending = self._pending, None
      self.observer(pending)
