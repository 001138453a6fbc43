"""The RL pieces every service builds the same way: environments (envs.py),
their specs and the replay item layout (specs.py), the Q-network and the
epsilon-greedy policy (networks.py). Imports settings only.
"""
