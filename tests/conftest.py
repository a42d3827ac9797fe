"""Fixtures shared across test modules."""

import os
import shutil

import pytest


@pytest.fixture(scope="session")
def demo_cache_dir(tmp_path_factory):
    """One cache of simulated demo cohorts for the whole test session (a cohort is built once per settings)."""
    return tmp_path_factory.mktemp("demo_cohorts")


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """``tiny_trained(bundle)`` -> (bundle_root, tiny overlay): the bundle's tiny settings trained once per test
    run through MONAI's runner (tests/tiny_bundles.py). Tests write their outputs elsewhere (a test that trains on
    takes a private copy: ``tiny_bundles.copy_trained``). Under pytest-xdist every worker has its own session; the
    workers share one training per bundle through a lock in the run's common temporary folder."""
    from filelock import FileLock
    from tiny_bundles import train_tiny

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny_bundles"
    shared.mkdir(parents=True, exist_ok=True)
    trained = {}

    def get(bundle: str):
        if bundle not in trained:
            root, done = shared / bundle, shared / f"{bundle}.trained"
            with FileLock(str(shared / f"{bundle}.lock")):
                if not done.is_file():  # trained by no worker yet, or a failed attempt: start clean
                    if root.exists():
                        shutil.rmtree(root)
                    train_tiny(bundle, root)
                    done.write_text("")
            trained[bundle] = (root, root / "tiny.json")
        return trained[bundle]

    return get
