"""The trainer service: replay -> dataset -> learner -> published policy.

Imports core only.
"""
