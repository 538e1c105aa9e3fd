"""Fixtures of the observability tests that run the real consumer as a subprocess.

The subprocess helpers live with the consumer's tests (tests/consumer/consumer_harness.py);
that folder is not a package, so its directory is put on the import path here, the same way
pytest does when it collects the consumer's tests.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "consumer"))

from consumer_harness import consumers  # noqa: E402, F401 (a fixture, re-exported)

from storage_builder.settings import Settings  # noqa: E402

from .live import TcpProxy  # noqa: E402


@pytest.fixture
def s3_proxy(base_settings: Settings) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the S3 store that the test can cut and restore."""
    endpoint = base_settings.s3.endpoint_url or "http://127.0.0.1:9000"
    host_port = endpoint.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    proxy = TcpProxy((host, int(port or 80)))
    proxy.start()
    yield proxy
    proxy.close()
