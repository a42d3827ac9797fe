"""Fixtures shared across test modules."""

import pytest


@pytest.fixture(scope="session")
def demo_cache_dir(tmp_path_factory):
    """One cache of simulated demo cohorts for the whole test session (a cohort is built once per settings)."""
    return tmp_path_factory.mktemp("demo_cohorts")
