"""A local Ray instance that stays on the loopback interface, for the bulk engine's local mode
and the tests.

    init_local_ray(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": root}})

Ray started without an address picks this machine's own network address (the one that routes
outside) for its GCS, raylet and object store, so a job on one laptop or CI runner listens on
its LAN address. Here every part is given 127.0.0.1, the dashboard is off, and the call returns
only once the instance reports its CPUs, polled up to `timeout_s` (Ray's own start-up waits are
fixed and short for a loaded machine). A cluster (`address=...`) is joined with ray.init as is.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any

LOOPBACK = "127.0.0.1"
# On Linux Ray resolves "127.0.0.1" to the machine's routable address unless clustering is
# off, which this variable of Ray's controls (read when ray is first imported).
_RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_local_ray(*, num_cpus: int | None = None, runtime_env: dict | None = None,
                   timeout_s: float = 300.0, **kwargs: Any) -> None:
    """Start a local Ray instance bound to 127.0.0.1 (no dashboard, no log forwarding) and
    wait, polling, until it reports its resources; TimeoutError after `timeout_s`."""
    os.environ.setdefault(_RAY_CLUSTER_ENV, "0")  # the raylet and the workers inherit it
    import ray
    with contextlib.suppress(ImportError, AttributeError):  # ray imported before us
        from ray._private import ray_constants
        ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env=runtime_env, _node_ip_address=LOOPBACK, **kwargs)
    deadline = time.monotonic() + timeout_s
    while not ray.cluster_resources().get("CPU"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the local Ray instance reported no CPU within {timeout_s:g} s")
        time.sleep(0.2)


def node_addresses() -> set[str]:
    """The addresses of the nodes of the running Ray instance (for tests)."""
    import ray
    return {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
