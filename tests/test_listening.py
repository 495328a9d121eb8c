"""What the local Ray of `gazetune search` listens on: no dashboard, no metrics endpoint, and
beyond loopback only what Ray 2.60 cannot rebind (token authentication guards those)."""

from __future__ import annotations

import ipaddress

import psutil
import pytest

from search.ray_session import ray_session

# Ray 2.60 binds these processes' gRPC servers to every interface, with no option to change it;
# `RAY_AUTH_MODE=token`, on by default for a local cluster, refuses clients without the token.
GRPC_ON_ALL_INTERFACES = ("gcs_server", "raylet", "ray::", "driver")
# Two Prometheus endpoints Ray 2.60 starts with no off switch and binds to 0.0.0.0 unless the
# head's address is loopback, which Ray never uses for a local cluster (see above):
# `ray/autoscaler/_private/monitor.py` (port 44217) and `ray/dashboard/head.py` (port 44227).
METRICS_WITHOUT_OFF_SWITCH = ("autoscaler monitor", "dashboard head")
# Ray binds the HTTP servers of its runtime-env agent and its dashboard agent (port 52365 when
# free) to the node address, and turns a node address of 127.0.0.1 into the machine's own
# (`ray._private.services.resolve_ip_for_localhost`).
ON_THE_NODE_ADDRESS = ("ray::RuntimeEnvAgent", "ray::DashboardAgent")


def session_processes(session: str) -> set[int]:
    """The processes of one Ray session: their command lines name its session; other children
    of this test process (servers of earlier tests, another Ray) are not counted."""
    pids = set()
    for process in psutil.process_iter(["cmdline"]):
        if session in " ".join(process.info["cmdline"] or ()):
            pids.add(process.pid)
            # The raylet's agents rename themselves (ray::DashboardAgent): found as its children.
            pids.update(child.pid for child in process.children(recursive=True))
    return pids


def listeners(pids: set[int], driver: int) -> list[tuple[str, int, str]]:
    names = {driver: "driver"}  # this process: its core worker's gRPC server
    for pid in pids - {driver}:
        try:
            process = psutil.Process(pid)
            command = " ".join(process.cmdline())
            names[pid] = ("autoscaler monitor" if "autoscaler/_private/monitor.py" in command
                          else "dashboard head" if "dashboard/dashboard.py" in command
                          else process.name())
        except psutil.NoSuchProcess:
            pass
    return [(c.laddr.ip, c.laddr.port, names.get(c.pid, "?"))
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in names]


@pytest.mark.slow  # a local Ray start: ~10 s
def test_the_local_ray_listens_on_loopback_except_its_grpc_servers():
    me = psutil.Process()
    with ray_session(None):
        import ray

        @ray.remote
        def pid():
            import os

            return os.getpid()

        workers = set(ray.get([pid.remote() for _ in range(2)]))
        session = ray._private.worker.global_worker.node.session_name
        found = listeners({*workers, *session_processes(session)}, me.pid)
    print("\n".join(f"{ip}:{port} {name}" for ip, port, name in sorted(found)))
    assert found, "no listening socket found: the check would pass vacuously"
    for ip, port, name in found:
        address = ipaddress.ip_address(ip)
        if address.is_loopback:
            continue
        if not address.is_unspecified:
            assert name in ON_THE_NODE_ADDRESS, f"{name} listens on {ip}:{port}"
            continue
        if name in METRICS_WITHOUT_OFF_SWITCH:
            continue
        assert name.startswith(GRPC_ON_ALL_INTERFACES), (
            f"{name} listens on all interfaces ({ip}:{port}): not one of Ray's gRPC servers")
    # What this setup turned off: the dashboard, and the Prometheus metrics endpoints that an
    # unconfigured local Ray opens on 0.0.0.0 (the dashboard agent's metrics port).
    assert not any(port == 8265 for _, port, _ in found)
    agents = [(ip, port) for ip, port, name in found if "DashboardAgent" in name
              and not ipaddress.ip_address(ip).is_loopback]
    # Its gRPC server and its HTTP server (on loopback and the node address), no metrics port.
    assert len([ip for ip, _ in agents if ipaddress.ip_address(ip).is_unspecified]) <= 1, agents
