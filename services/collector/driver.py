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
  """Runs `policy` in `env`; `observer` receives each transition and the next Q-values.

  `policy(time_step)` returns a PolicyStep whose info holds the Q-values of
  the observations it acted on (collector.Collector.act). The observer gets
  (time_step, action_step, next_time_step) and the Q-values of
  next_time_step's observations: the pipeline has computed them, to choose
  the next actions, by the time it observes a transition, and they bootstrap
  the actor-side priorities (core/rl/priorities.py).
  """

  def __init__(self, env: BatchedEnvironment, policy, observer):
    self.env, self.policy, self.observer = env, policy, observer
    self._pending = None  # the newest transition, not yet observed

  def run(self, time_step: ts.TimeStep, steps: int) -> ts.TimeStep:
    """`steps` batched steps from `time_step`; returns the newest time step."""
    for _ in range(steps):
      action_step = self.policy(time_step)
      self.env.send(action_step.action)
      self.flush(action_step)  # while the environments step
      next_time_step = self.env.receive()
      self._pending = (time_step, action_step, next_time_step)
      time_step = next_time_step
    return time_step

  def flush(self, next_action_step=None) -> None:
    """Observes the pending transition, whose next observations `next_action_step` acted on.

    Without it (the last transition, at the end) the observer has no
    bootstrap Q-values for that transition's items.
    """
    if self._pending is not None:
      pending, self._pending = self._pending, None
      q_values = None if next_action_step is None else next_action_step.info["q_values"]
      self.observer(pending, q_values)
