"""The `dqnfleet` command: one entry per service, `up` for the whole fleet on one
machine, and the tools (evaluate, export, status, health). May import every
room; nothing imports it.
"""
