"""Hypothesis runs derandomized with no deadline, so CI results do not depend on luck or load."""

from hypothesis import settings

settings.register_profile("mcpr", derandomize=True, deadline=None, max_examples=200)
settings.load_profile("mcpr")
