"""The trainer service: replay -> dataset -> learner -> published policy.

    trainer.py        the service: the loop and what its triggers do (publish, checkpoint, report)
    learner.py        the agent and its multi-step train graph; what a step did (StepResult)
    replay_source.py  the replay shards: batches out, priorities and deletions back, lost shards
    dataset.py        Reverb -> tf.data -> n-step Trajectory batches, invalid items left out
    checkpoints.py    saving, and resuming from the newest intact checkpoint
    triggers.py       every N train steps, every S seconds

Imports core only.
"""
