"""dqnfleet: distributed DQN training as services that meet only over gRPC.

The package is the folder `services/` (pyproject.toml maps it), one room per
service in the order data flows, plus what they share:

    collector/  driver -> epsilon-greedy collect policy -> observer -> replay
    replay/     the Reverb server holding the replay table
    trainer/    replay -> dataset -> learner -> published policy
    evaluator/  published policy -> evaluation protocol -> history
    core/       settings, RL pieces, the policy API and transport, shared by all
    cli/        the `dqnfleet` command: one entry per service, `up`, tools

Imports run one way: cli may import every room; a service imports core and
never another service; core imports nothing outside core.
"""
