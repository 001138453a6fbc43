"""dqnfleet: distributed DQN training as three services that meet over gRPC.

    collector/  driver + epsilon-greedy collect policy + observer -> replay
    replay/     the Reverb server holding the replay table
    trainer/    replay -> DQN agent -> checkpoints and published policies
    core/       settings, specs, environments, networks and gRPC shared by all
    cli/        the `dqnfleet` command: the services, `up`, `status`, `evaluate`
"""
