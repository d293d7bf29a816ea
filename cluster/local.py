"""A two-node Ray cluster on this machine: ``cluster/local.sh up|down|status`` (this module does the work).

    cluster/local.sh up       # head (resource "head", label fdreamer-role=head) + worker node
                              # (resource "worker_node", label fdreamer-role=worker); idempotent
    cluster/local.sh status   # the nodes; exit 1 when the cluster is down
    cluster/local.sh down     # stops exactly what `up` started; with nothing recorded in the state folder
                              # (and no FDREAMER_CLUSTER_DIR / --dir), the one `cluster/main_job.py --keep`
                              # left in runs/main-job/cluster

Each node is its own ``ray start --block`` process in its own session (``setsid``), so ``down``
stops those two process sessions and nothing else: other Ray clusters on the machine are never
touched (no global ``ray stop``). Every Ray port is a free one chosen at ``up`` (the GCS port and the
dashboard port can be fixed), so the cluster coexists with others. State lives in a git-ignored
folder (default ``runs/local-cluster``): ``cluster.json`` (PIDs, session ids, ports, addresses),
``head.log`` / ``worker.log`` and Ray's temp dir ``ray/``.

Environment (all optional):

- ``FDREAMER_DASHBOARD_PORT`` (8265): dashboard / Jobs API port (``ray job submit --address
  http://127.0.0.1:<port>``);
- ``FDREAMER_RAY_PORT`` (a free port): the GCS port;
- ``FDREAMER_CLUSTER_DIR`` (``runs/local-cluster``): state folder;
- ``FDREAMER_STORAGE_PATH`` (``runs/cluster-storage``): shared storage for ``RunConfig(storage_path)``;
- ``FDREAMER_HEAD_CPUS`` / ``FDREAMER_WORKER_CPUS`` (2 / 2): logical CPUs per node;
- ``FDREAMER_OBJECT_STORE_MB`` (1536): object store per node.

The cluster runs with ``RAY_AUTH_MODE=disabled`` (loopback-only dev cluster; Ray 2.60's token auth
would otherwise reject ``ray job submit``) and listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RAY_BIN = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
HOST = "127.0.0.1"
ROLE_LABEL = "fdreamer-role"
# Every port Ray would otherwise take at a fixed default (another cluster on the machine holds them).
HEAD_ONLY_PORTS = ("ray-client-server-port",)
NODE_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
              "runtime-env-agent-port", "node-manager-port", "object-manager-port")


# cluster/main_job.py's default --workdir + "/cluster": the main job records its cluster there (it sets
# FDREAMER_CLUSTER_DIR), so `down` / `status` without FDREAMER_CLUSTER_DIR look there too.
MAIN_JOB_CLUSTER_DIR = REPO / "runs" / "main-job" / "cluster"
_state_dir_override: Path | None = None  # --dir, or the folder `down` found the cluster in


def state_dir() -> Path:
    if _state_dir_override is not None:
        return _state_dir_override
    return Path(os.environ.get("FDREAMER_CLUSTER_DIR", REPO / "runs" / "local-cluster")).resolve()


def use_state_dir(path: Path | str | None) -> None:
    global _state_dir_override
    _state_dir_override = Path(path).resolve() if path is not None else None


def fallback_state_dirs() -> list[Path]:
    """Other folders a cluster of this checkout may be recorded in, looked at when neither --dir nor
    FDREAMER_CLUSTER_DIR names one and the default folder records nothing (the main job's, for now)."""
    if _state_dir_override is not None or "FDREAMER_CLUSTER_DIR" in os.environ:
        return []
    return [d for d in (MAIN_JOB_CLUSTER_DIR.resolve(),) if d != state_dir() and (d / "cluster.json").is_file()]


def stop_command(sdir: Path | None = None) -> str:
    """The exact shell command that stops the cluster recorded in ``sdir`` (default: the current one)."""
    import shlex

    return f"FDREAMER_CLUSTER_DIR={shlex.quote(str(sdir or state_dir()))} {shlex.quote(str(REPO / 'cluster' / 'local.sh'))} down"


def storage_path() -> Path:
    return Path(os.environ.get("FDREAMER_STORAGE_PATH", REPO / "runs" / "cluster-storage")).resolve()


def ray_env() -> dict[str, str]:
    """Environment of the ``ray start`` processes (inherited by every Ray process and job they start)."""
    # `python ...` in a job entrypoint must be this interpreter (the project's venv), not the system one
    path = os.pathsep.join(p for p in (str(Path(sys.executable).parent), os.environ.get("PATH")) if p)
    return {**os.environ, "PATH": path, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((HOST, port)) == 0


# ----------------------------------------------------------------------------- processes


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def session_members(sids: list[int]) -> list[int]:
    """PIDs (not zombies) whose session id is one of ``sids``: the ``ray start`` process and all it spawned."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the comm field: state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) in sids:
            found.append(int(entry.name))
    return sorted(found)


def cluster_pids(state: dict[str, Any]) -> list[int]:
    """Every live process of the recorded cluster (its sessions, plus anything whose command line names its temp dir)."""
    sids = [n["sid"] for n in state.get("nodes", {}).values()]
    pids = set(session_members(sids))
    temp = state.get("temp_dir")
    if temp:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if temp in cmd and alive(int(entry.name)):
                    pids.add(int(entry.name))
    return sorted(pids)


def read_state() -> dict[str, Any] | None:
    path = state_dir() / "cluster.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_state(state: dict[str, Any]) -> None:
    path = state_dir() / "cluster.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------- dashboard queries


def http_json(url: str, timeout_s: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def list_nodes(dashboard: str) -> list[dict[str, Any]]:
    """Nodes from the dashboard's state API: id, ip, state, is_head, resources_total, labels."""
    data = http_json(f"{dashboard}/api/v0/nodes?limit=100&detail=1")
    return data["data"]["result"]["result"]


def alive_nodes(dashboard: str) -> list[dict[str, Any]]:
    try:
        return [n for n in list_nodes(dashboard) if n.get("state") == "ALIVE"]
    except Exception:  # noqa: BLE001 - dashboard not up (yet)
        return []


def jobs_api_ready(dashboard: str) -> bool:
    try:
        http_json(f"{dashboard}/api/jobs/")
        return True
    except Exception:  # noqa: BLE001
        return False


def is_running(state: dict[str, Any] | None) -> bool:
    return bool(state) and all(alive(n["pid"]) for n in state["nodes"].values()) and port_open(state["gcs_port"])


# ----------------------------------------------------------------------------- commands


def _start_node(name: str, args: list[str], log: Path) -> dict[str, int]:
    with log.open("w") as out:
        proc = subprocess.Popen([RAY_BIN, "start", "--block", *args], env=ray_env(), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=REPO)
    return {"pid": proc.pid, "sid": proc.pid}


class NodeExited(RuntimeError):
    """A node's ``ray start`` process ended while the cluster was starting (e.g. a chosen port got taken)."""


def _wait(what: str, check, state: dict[str, Any], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        for name, node in state["nodes"].items():
            if not alive(node["pid"]):
                log = state_dir() / (name + ".log")
                tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.is_file() else []
                raise NodeExited(f"the {name} node's `ray start` exited; see {log}"
                                 + "".join(f"\n  | {line[:300]}" for line in tail))
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready in {timeout_s:.0f} s; see the logs in {state_dir()}")
        time.sleep(0.5)


def describe(state: dict[str, Any]) -> str:
    return "\n".join([
        f"  dashboard / Jobs API: {state['dashboard']}   (ray job submit --address {state['dashboard']} ...)",
        f"  GCS address:          {state['address']}   (ray.init(address=...), ray status --address ...)",
        f"  storage path:         {state['storage_path']}   (RunConfig(storage_path=...), --storage_path=...)",
        f"  state / logs:         {state_dir()}",
    ])


def up(timeout_s: float = 120.0, attempts: int = 3) -> int:
    """Start the cluster; a node that exits during start-up (a port chosen free and taken before Ray bound
    it, by another process on the machine) is retried with new ports, ``attempts`` times in all."""
    for attempt in range(1, attempts + 1):
        try:
            return _up(timeout_s)
        except NodeExited as exc:
            if attempt == attempts or os.environ.get("FDREAMER_RAY_PORT"):
                print(f"up failed: {exc}; stopped what was started", file=sys.stderr)
                return 1
            print(f"up: attempt {attempt} failed ({str(exc).splitlines()[0]}); retrying with new ports",
                  file=sys.stderr)
    return 1


def _up(timeout_s: float) -> int:
    state = read_state()
    if is_running(state):
        print(f"local Ray cluster already running (head pid {state['nodes']['head']['pid']}, "
              f"worker pid {state['nodes']['worker']['pid']})")
        print(describe(state))
        return 0
    if state:  # left over from a cluster that died or was half stopped: clean it up first
        _stop(state, quiet=True)
    sdir = state_dir()
    sdir.mkdir(parents=True, exist_ok=True)
    storage = storage_path()
    storage.mkdir(parents=True, exist_ok=True)
    temp_dir = sdir / "ray"
    # Unix socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must stay < 108 bytes.
    if len(str(temp_dir)) > 50:
        temp_dir = Path(tempfile.mkdtemp(prefix="fdray-"))
    temp_dir.mkdir(parents=True, exist_ok=True)
    dash_port = int(os.environ.get("FDREAMER_DASHBOARD_PORT", "8265"))
    if port_open(dash_port):
        print(f"port {dash_port} is taken (another Ray dashboard?); set FDREAMER_DASHBOARD_PORT to a free port",
              file=sys.stderr)
        return 1
    gcs_port = int(os.environ.get("FDREAMER_RAY_PORT") or free_port())
    head_cpus = os.environ.get("FDREAMER_HEAD_CPUS", "2")
    worker_cpus = os.environ.get("FDREAMER_WORKER_CPUS", "2")
    store = int(os.environ.get("FDREAMER_OBJECT_STORE_MB", "1536")) * 2**20
    ports = {"head": {f: free_port() for f in (*HEAD_ONLY_PORTS, *NODE_PORTS)},
             "worker": {f: free_port() for f in NODE_PORTS}}
    common = [f"--temp-dir={temp_dir}", f"--node-ip-address={HOST}", "--num-gpus=0", "--disable-usage-stats",
              f"--object-store-memory={store}",
              # workers on OS-chosen ports, not the default 10002-19999 that other clusters share
              "--min-worker-port=0", "--max-worker-port=0"]
    state = {
        "address": f"{HOST}:{gcs_port}", "gcs_port": gcs_port, "dashboard": f"http://{HOST}:{dash_port}",
        "dashboard_port": dash_port, "storage_path": str(storage), "temp_dir": str(temp_dir), "ports": ports,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "nodes": {},
    }
    t0 = time.monotonic()
    state["nodes"]["head"] = _start_node("head", [
        "--head", f"--port={gcs_port}", f"--num-cpus={head_cpus}", '--resources={"head": 1}',
        f"--labels={ROLE_LABEL}=head", "--include-dashboard=true", f"--dashboard-host={HOST}",
        f"--dashboard-port={dash_port}", *common, *(f"--{f}={p}" for f, p in ports["head"].items()),
    ], sdir / "head.log")
    write_state(state)  # recorded before waiting: `down` can stop a half-started cluster
    try:
        _wait("the head's GCS", lambda: port_open(gcs_port), state, timeout_s)
        state["nodes"]["worker"] = _start_node("worker", [
            f"--address={HOST}:{gcs_port}", f"--num-cpus={worker_cpus}", '--resources={"worker_node": 1}',
            f"--labels={ROLE_LABEL}=worker", *common, *(f"--{f}={p}" for f, p in ports["worker"].items()),
        ], sdir / "worker.log")
        write_state(state)
        _wait("two alive nodes", lambda: len(alive_nodes(state["dashboard"])) >= 2, state, timeout_s)
        _wait("the Jobs API", lambda: jobs_api_ready(state["dashboard"]), state, timeout_s)
    except NodeExited:
        _stop(state, quiet=True)
        raise
    except (RuntimeError, TimeoutError) as exc:
        print(f"up failed: {exc}; stopping what was started", file=sys.stderr)
        _stop(state, quiet=True)
        return 1
    print(f"local Ray cluster up in {time.monotonic() - t0:.1f} s: head ({head_cpus} CPUs, resource 'head', "
          f"label {ROLE_LABEL}=head) + worker ({worker_cpus} CPUs, resource 'worker_node', label "
          f"{ROLE_LABEL}=worker)")
    print(describe(state))
    print(f"  export RAY_ADDRESS={state['dashboard']} RAY_AUTH_MODE=disabled")
    return 0


def _stop(state: dict[str, Any], quiet: bool = False, timeout_s: float = 30.0) -> list[int]:
    """SIGTERM each node's ``ray start --block`` (worker first), then SIGKILL whatever of its sessions is left."""
    for name in ("worker", "head"):
        node = state["nodes"].get(name)
        if node and alive(node["pid"]):
            try:
                os.kill(node["pid"], signal.SIGTERM)  # `ray start --block` stops its own processes
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout_s
            while alive(node["pid"]) and time.monotonic() < deadline:
                time.sleep(0.2)
    deadline = time.monotonic() + 10
    left = cluster_pids(state)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = cluster_pids(state)
    for pid in left:  # stragglers of *our* sessions only
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.5)
    left = cluster_pids(state)
    if not quiet and left:
        print(f"warning: processes still alive: {left}", file=sys.stderr)
    _restore_current_cluster(state)
    path = state_dir() / "cluster.json"
    if not left and path.is_file():
        path.unlink()
    return left


def _restore_current_cluster(state: dict[str, Any]) -> None:
    """``ray start --head`` records itself as the machine's current cluster; forget it if it is ours."""
    for base in {Path(tempfile.gettempdir()) / "ray", Path(state.get("temp_dir", "/nonexistent"))}:
        f = base / "ray_current_cluster"
        try:
            if f.is_file() and f.read_text().strip().endswith(f":{state['gcs_port']}"):
                f.unlink()
        except OSError:
            pass


def down() -> int:
    state = read_state()
    if not state:
        found = fallback_state_dirs()
        if found:  # e.g. left by `python cluster/main_job.py --keep`
            print(f"local Ray cluster: nothing recorded in {state_dir()}; stopping the one recorded in {found[0]}")
            use_state_dir(found[0])
            return down()
        print(f"local Ray cluster: not running (nothing recorded in {state_dir()})")
        return 0
    left = _stop(state)
    if left:
        return 1
    temp = Path(state["temp_dir"])
    if temp.name.startswith("fdray-"):
        shutil.rmtree(temp, ignore_errors=True)
    print("local Ray cluster stopped (only its own processes)")
    return 0


def status(as_json: bool = False) -> int:
    state = read_state()
    if not is_running(state):
        print("local Ray cluster: down" + (" (stale state recorded; `down` cleans it)" if state else ""))
        for other in fallback_state_dirs():
            print(f"  (a cluster is recorded in {other}: `{stop_command(other).replace(' down', ' status')}`)")
        return 1
    nodes = alive_nodes(state["dashboard"])
    if as_json:
        print(json.dumps({**state, "alive_nodes": nodes}))
        return 0 if nodes else 1
    print(f"local Ray cluster: up, {len(nodes)} alive node(s)")
    print(describe(state))
    for n in sorted(nodes, key=lambda n: not n.get("is_head_node")):
        labels = {k: v for k, v in (n.get("labels") or {}).items() if not k.startswith("ray.io/")}
        res = {k: v for k, v in (n.get("resources_total") or {}).items()
               if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
        print(f"  {'head  ' if n.get('is_head_node') else 'worker'} {n['node_id'][:12]} {n['node_ip']} {n['state']}"
              f" resources={json.dumps(res, sort_keys=True)} labels={json.dumps(labels, sort_keys=True)}")
    return 0 if nodes else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cluster/local.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("up", "down", "status"))
    p.add_argument("--json", action="store_true", help="status: one JSON object (state + alive nodes)")
    p.add_argument("--dir", help="the cluster's state folder (as FDREAMER_CLUSTER_DIR; e.g. <workdir>/cluster of "
                                 "cluster/main_job.py)")
    args = p.parse_args(argv)
    if args.dir:
        use_state_dir(args.dir)
    if args.command == "up":
        return up()
    if args.command == "down":
        return down()
    return status(args.json)


if __name__ == "__main__":
    sys.exit(main())
