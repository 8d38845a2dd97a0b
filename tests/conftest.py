"""Hypothesis profiles: ``ci`` (the default: test_fuzz.py in about 15 s) and ``long`` (a
fuzzing run of about 10 minutes on one core).

Select one with ``HYPOTHESIS_PROFILE=long pytest tests/test_fuzz.py``. The stateful tests in
``test_fuzz.py`` run a quarter of ``max_examples``, each of ``stateful_step_count`` steps.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=5000,
    stateful_step_count=50,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
