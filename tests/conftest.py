"""Test-wide settings.

Hypothesis runs without per-example deadlines: this machine is shared and
noisy, and speed belongs in bench/, not in tests. ``HYPOTHESIS_PROFILE=thorough``
runs many more examples (nightly-style); the default keeps CI quick.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile(
    "thorough", deadline=None, max_examples=1000, suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
