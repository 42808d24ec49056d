"""Fixtures of the SDK suite: the server run.sh started, and its keys (from the environment)."""

import os

import pytest
from tensorlake.sandbox import Sandbox


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.exit(f"{name} is not set: run this suite with tests/python/run.sh", returncode=2)
    return value


@pytest.fixture(scope="session")
def server():
    """Connection settings for the namespace the tests own, as SDK keyword arguments."""
    return {
        "api_url": _env("STASIS_URL"),
        "api_key": _env("STASIS_KEY"),
        "namespace": _env("STASIS_NAMESPACE"),
        "request_timeout": 60,
    }


@pytest.fixture(scope="session")
def other_namespace():
    """Connection settings for another namespace on the same server."""
    return {
        "api_url": _env("STASIS_URL"),
        "api_key": _env("STASIS_OTHER_KEY"),
        "namespace": _env("STASIS_OTHER_NAMESPACE"),
        "request_timeout": 60,
    }


@pytest.fixture
def sandbox(server):
    """A fresh sandbox from the default image (MicroPython at /bin/micropython.wasm)."""
    sb = Sandbox.create(**server)
    yield sb
    try:
        sb.terminate()
    except Exception:
        pass
