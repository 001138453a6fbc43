"""The policy API in one place: versions on disk, written atomically and
checked against their manifests, damaged ones moved aside (store.py); the
trainer's PolicyService that announces and serves them (server.py); fetching
one version (client.py); following every new one (follower.py). Imports
settings, rl and transport.
"""
