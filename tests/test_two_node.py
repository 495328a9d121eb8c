"""A real two-node Ray cluster on this machine, with token authentication: the trials of one
`gazetune search` run on both nodes."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from search.tracking import find_trial_runs

pytestmark = pytest.mark.slow  # two Ray nodes and a search: a few minutes on 2 busy cores


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class RayNode:
    """One `ray start --block` process on 127.0.0.1 with 1 CPU, in a session of its own.

    Stopped by signalling that session: `ray stop` would stop every Ray on the machine,
    including other people's. Every port is chosen here, so that the node shares none with
    another Ray running on the same machine.
    """

    def __init__(self, temp_dir: Path, env: dict, head_address: str | None = None):
        self.log = temp_dir / ("head.log" if head_address is None else "worker.log")
        ports = free_ports(8)
        self.port = ports[0]
        self.address = head_address or f"127.0.0.1:{self.port}"
        cmd = [
            str(Path(sys.executable).with_name("ray")), "start", "--block",
            "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
            f"--object-store-memory={100 * 2**20}", "--disable-usage-stats",
            f"--node-manager-port={ports[1]}", f"--object-manager-port={ports[2]}",
            f"--dashboard-agent-listen-port={ports[3]}",
            f"--dashboard-agent-grpc-port={ports[4]}",
            f"--metrics-export-port={ports[5]}", f"--runtime-env-agent-port={ports[6]}",
            "--min-worker-port=0", "--max-worker-port=0",  # any free port
        ]
        if head_address is None:
            # Its own temp dir: another person's `ray.init()` on this machine must not find
            # (and join) this cluster through /tmp/ray/ray_current_cluster.
            cmd += ["--head", f"--port={self.port}", f"--ray-client-server-port={ports[7]}",
                    "--include-dashboard=false", f"--temp-dir={temp_dir}"]
        else:
            cmd += [f"--address={head_address}"]
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)
        self._wait_started()

    def _wait_started(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text(errors="replace"):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ray start failed; log:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM to the node's session (its processes clean up), then SIGKILL what is left."""
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
            try:
                os.killpg(self._proc.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                try:
                    os.killpg(self._proc.pid, 0)
                except ProcessLookupError:
                    self._proc.poll()
                    return
                time.sleep(0.2)


def test_one_search_runs_trials_on_both_nodes(small_cache, tmp_path):
    # Token auth as on the real cluster: the same token for both nodes and the driver.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "OMP_NUM_THREADS": "1"}
    # Short: Ray's Unix sockets live under it (108 characters at most).
    temp_dir = Path(tempfile.mkdtemp(prefix="gz2n-", dir="/tmp"))
    nodes: list[RayNode] = []
    try:
        nodes.append(RayNode(temp_dir, env))
        nodes.append(RayNode(temp_dir, env, head_address=nodes[0].address))
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        search = subprocess.run(
            [sys.executable, "-m", "search", "search", "--name", "two-nodes",
             "--address", nodes[0].address, "--cache", str(small_cache),
             "--samples", "2", "--max-epochs", "1", "--grace-period", "1",
             "--cpus-per-trial", "1", "--gpus-per-trial", "0", "--max-concurrent", "2",
             "--storage", str(tmp_path / "ray_results"), "--tracking-uri", uri,
             "--set", "batch_size=8", "n_boot=50", "figures=0", "threads=1"],
            check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
        )
        assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-3000:]
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)

    runs = find_trial_runs(uri, "two-nodes")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    # Each node offers one CPU and each trial asks for one: two trials at once need both.
    assert len({r.data.tags["ray.node_id"] for r in runs}) == 2
