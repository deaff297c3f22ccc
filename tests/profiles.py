"""Hypothesis profiles of the suite (issue 17 point 9): `ci` and `deep`, registered by
tests/conftest.py with these numbers, which loads one before any test module is imported.

* ``ci``, the default: derandomized, so every run draws the same examples and a red run is
  red again on any machine (no example database, no deadline, the failure's reproduction
  blob printed). ``CI_EXAMPLES`` examples for a test that names no count of its own.
* ``deep``: ``DEEP_FACTOR`` times as many examples, on fresh random seeds each run (failures
  are kept in the local ``.hypothesis`` database and tried first next time). Select it with
  ``--hypothesis-profile=deep`` or ``OPTINFER_HYPOTHESIS_PROFILE=deep``.

A test that names its own count (expensive tests run fewer) writes
``settings(max_examples=examples(n))``: n under ``ci``, scaled like the profile's count under
any other profile, since an explicit count would otherwise override the profile's.
"""

from __future__ import annotations

from hypothesis import settings

CI_EXAMPLES = 100
DEEP_FACTOR = 20
PROFILE_VARIABLE = "OPTINFER_HYPOTHESIS_PROFILE"


def examples(n: int) -> int:
    """A test's example count: `n` under ``ci``, ``DEEP_FACTOR * n`` under ``deep``."""
    return max(1, n * settings().max_examples // CI_EXAMPLES)
