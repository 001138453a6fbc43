"""The collector service: the environments' side of the loop.

    collector.py  the service: its loop, the fleet-wide epsilon schedule, status
    driver.py     steps E environments with one policy call for all of them
    observer.py   writes each environment's transitions to replay

Imports core only.
"""
