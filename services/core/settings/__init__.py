"""Settings: config.py declares every setting once, as dataclass fields in groups
(one group per concern: environment, network, agent, replay, collector,
trainer, ...); flags.py turns each field into a flag, a DQNFLEET_* variable
and a config-file key, and refuses bad values naming the flag. Imports
nothing else of dqnfleet.
"""
