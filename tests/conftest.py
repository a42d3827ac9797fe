"""Fixtures shared across test modules."""

import pytest


@pytest.fixture(scope="session")
def demo_cache_dir(tmp_path_factory):
    """One cache of simulated demo cohorts for the whole test session (a cohort is built once per settings)."""
    return tmp_path_factory.mktemp("demo_cohorts")


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """``tiny_trained(bundle)`` -> (bundle_root, tiny overlay): the bundle's tiny settings trained once per test
    session through MONAI's runner (tests/tiny_bundles.py). Tests write their outputs elsewhere."""
    from tiny_bundles import train_tiny

    trained = {}

    def get(bundle: str):
        if bundle not in trained:
            trained[bundle] = train_tiny(bundle, tmp_path_factory.mktemp(bundle))
        return trained[bundle]

    return get
