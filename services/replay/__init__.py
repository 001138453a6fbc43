"""The replay service: a Reverb server with the replay table, its rate limiter
and checkpoints (server.py). Imports core only.
"""
