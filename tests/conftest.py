"""Fixtures shared by test modules."""

from __future__ import annotations

import pytest

from p2pserve.testing.swarm import Swarm


@pytest.fixture(scope="session")
def swarm2(tmp_path_factory):
    from p2pserve.ranks.world import free_port

    with Swarm(tmp_path_factory.mktemp("swarm2")) as swarm:
        http = f"127.0.0.1:{free_port()}"
        swarm.start_bootstrap("--hetero-config", "1", "1", "--pp-partition", "15", "15", "--http", http)
        swarm.http_url = f"http://{http}/v1"
        swarm.start_worker("--stage", "0")
        swarm.start_worker("--stage", "1")
        yield swarm
