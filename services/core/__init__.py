"""What every service shares, in four rooms and the generated API.

    settings/   every setting, declared once (config.py), and how settings
                become flags, DQNFLEET_* variables and config-file keys (flags.py)
    rl/         the environments, their specs and the replay item layout, the
                Q-network, and the one seam to Reverb's private API
    transport/  gRPC servers and channels, credentials, typed status,
                metrics, summaries, logging and signals, the run record
    policy/     published policy versions: on disk, served, fetched, followed
    api/        code generated from protos/ (`make protos`)

Imports run one way: settings imports nothing else of dqnfleet; rl and
transport import settings (and api); policy imports the three others.
"""
