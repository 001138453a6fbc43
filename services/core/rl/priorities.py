"""Initial priorities from the actors: the n-step TD error of each item as it is written.

Ape-X (Horgan et al. 2018) has each actor compute the priority of what it
inserts from the Q-values it already computed to act, so that prioritized
replay samples a new item by how surprising it is from its first moment in
the table, not by chance. The learner then keeps the priorities of the items
it samples up to date with its own TD errors (trainer/learner.py).

The target is the trainer's n-step target (TF-Agents' DqnAgent with
`n_step_update=n`): G = r_t + g d_t (r_t+1 + g d_t+1 (... + g d_t+n-1 V)),
with rewards scaled by `reward_scale` and g = gamma. The actor bootstraps
from its own copy of the online network, V = max_a Q(s_t+n, a) (Ape-X): it
has no target network, and both the online Q(s_t+n) and Q(s_t, a_t) come
out of the policy calls that chose a_t and a_t+n.
"""

import dataclasses

import numpy as np

# Keeps every item sampleable under prioritized replay (Reverb samples with
# probability ~ priority^alpha: a zero would never be sampled again).
PRIORITY_FLOOR = 1e-3


@dataclasses.dataclass(frozen=True)
class TdTarget:
  """The settings of the trainer's TD target that an actor needs to compute the same one.

  They travel with every published policy (core/policy/store.py), so
  collectors never disagree with the trainer that trains on their items.
  """

  gamma: float
  reward_scale: float


def n_step_targets(
  rewards: np.ndarray, discounts: np.ndarray, bootstrap: np.ndarray, target: TdTarget
) -> np.ndarray:
  """[..., n] rewards and discounts (oldest first) and [...] bootstrap values -> [...] targets."""
  returns = np.asarray(bootstrap, np.float64)
  for k in range(rewards.shape[-1] - 1, -1, -1):
    returns = target.reward_scale * rewards[..., k] + target.gamma * discounts[..., k] * returns
  return returns


def priority(td_errors) -> np.ndarray:
  """The priority prioritized replay samples by: |TD error|, never below the floor."""
  return np.abs(td_errors) + PRIORITY_FLOOR
