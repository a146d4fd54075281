"""`fab top` (issue 4): nvidia-smi figures per host and for the cluster, live or once, and hung-looking ranks.

The fake hosts have no GPUs: a stand-in `nvidia-smi` (tests/payloads/fake_nvidia_smi.py) on some
hosts' PATH prints known CSV, each host its own (Cluster's `host_env`), and one host has none at all.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fablaunch.hostfile import parse_host
from fablaunch.survey import SessionState
from fablaunch.tasks import top
from tests.cluster import Cluster, port_open
from tests.conftest import FAB, JOBS, PAYLOADS, REPO, SSH_PORT, Fab, master_port, wait_until

# The stand-in's figures. node1: two busy GPUs; node2: one GPU at idle power (11 %, as a real idle H100),
# with fields real nvidia-smi cannot always give; node3: "No devices were found"; node4: no nvidia-smi.
NODE1 = {
    "gpus": [
        {"index": 0, "uuid": "GPU-n1-0", "utilization.gpu": 97, "power.draw": "600.00", "power.limit": "700.00",
         "memory.used": 40960, "memory.total": 81920},
        {"index": 1, "uuid": "GPU-n1-1", "utilization.gpu": 99, "power.draw": "650.00", "power.limit": "700.00",
         "memory.used": 20480, "memory.total": 81920},
    ],
    "apps": [{"gpu_uuid": "GPU-n1-0", "pid": 4001, "used_memory": 40000},
             {"gpu_uuid": "GPU-n1-1", "pid": 4002, "used_memory": 20000},
             {"gpu_uuid": "GPU-n1-1", "pid": 4003, "used_memory": "[N/A]"}],
}
NODE2 = {
    "gpus": [{"index": 0, "uuid": "GPU-n2-0", "utilization.gpu": "[N/A]", "power.draw": "77.00",
              "power.limit": "700.00", "memory.used": "[Not Supported]", "memory.total": 81920}],
    "apps": [],
}
NODE3 = {"exit": 6, "message": "No devices were found"}
UNREACHABLE = f"127.0.0.49:{SSH_PORT}"


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Four fake hosts on 127.0.0.41-44 (apart from the shared cluster), three with a stand-in nvidia-smi."""
    root = tmp_path_factory.mktemp("gpu")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    shutil.copy(PAYLOADS / "fake_nvidia_smi.py", bin_dir / "nvidia-smi")
    (bin_dir / "nvidia-smi").chmod(0o755)
    host_env = {}
    for name, figures in (("node1", NODE1), ("node2", NODE2), ("node3", NODE3)):
        (root / f"{name}.json").write_text(json.dumps(figures))
        host_env[name] = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_NVIDIA_SMI": str(root / f"{name}.json")}
    assert not port_open("127.0.0.49", SSH_PORT), "the address meant to be unreachable answers"
    with Cluster(root, 4, port=SSH_PORT, base=41, env={"PATH": os.environ["PATH"]}, host_env=host_env) as c:
        yield c


@pytest.fixture
def gfab(fab: Fab, gpu_cluster: Cluster, job: str) -> Iterator[Fab]:
    """`fab` against the GPU cluster, in the test's working directory; its sessions are removed afterwards."""
    yield Fab(gpu_cluster, fab.cwd)
    for name in gpu_cluster.names:
        for line in gpu_cluster.tmux(name, "ls", "-F", "#{session_name}").stdout.split():
            if line.startswith(job):
                gpu_cluster.tmux(name, "kill-session", "-t", f"={line}:")


def output(result: subprocess.CompletedProcess[str]) -> str:
    return " ".join((result.stdout + "\n" + result.stderr).split())


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def row(text: str, host: str) -> str:
    """A host's row of the table, cells joined by single spaces (piped, a row is a line, fields two spaces apart)."""
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells and cells[0] == host:
            return " ".join(cells)
    raise AssertionError(f"no row for {host} in:\n{text}")


# --- pure: parsing nvidia-smi -------------------------------------------------------------------------------------


def test_figures_parse_and_placeholders_are_none() -> None:
    assert top.number(" 76.06 ") == 76.06 and top.number("0") == 0.0
    for text in ("[N/A]", "N/A", "[Not Supported]", "[Unknown Error]", "[Insufficient Permissions]", "", " ",
                 "nan"):
        assert top.number(text) is None, text


def test_gpu_rows_parse_robustly() -> None:
    text = "\n".join([
        "0, GPU-3f1c, 0, 76.06, 700.00, 0, 81559",  # a real idle H100
        "1, GPU-aa, [N/A], [Not Supported], [N/A], [N/A], 81559",
        "",
        "garbage without enough fields",
        "2, GPU-bb, 100, 650.5, 700.00, 80000, 81559, an extra field",
    ])
    gpus = top.parse_gpus(text)
    assert [(g.index, g.uuid) for g in gpus] == [(0, "GPU-3f1c"), (1, "GPU-aa")]
    assert (gpus[0].utilization_pct, gpus[0].power_w, gpus[0].power_limit_w, gpus[0].memory_used_mib,
            gpus[0].memory_total_mib) == (0.0, 76.06, 700.0, 0.0, 81559.0)
    assert round(gpus[0].power_pct or 0, 1) == 10.9
    assert (gpus[1].utilization_pct, gpus[1].power_w, gpus[1].power_pct, gpus[1].memory_total_mib) == (
        None, None, None, 81559.0)
    assert top.parse_gpus("") == [] and top.parse_apps("") == []
    assert top.parse_apps("GPU-aa, 123, 1024\nGPU-aa, [N/A], 5\nGPU-bb, 124, [N/A]\nbad") == [
        ("GPU-aa", 123, 1024.0), ("GPU-bb", 124, None)]


def dump(*sections: tuple[str, str]) -> str:
    return "".join(f"{top.SEP}{head}\n{body}\n" for head, body in sections)


def test_a_hosts_sample_says_why_it_has_no_gpus() -> None:
    assert top.parse_sample("h", dump(("NOSMI", ""))).status == "no nvidia-smi"
    none = top.parse_sample("h", dump(("GPUS 6", "No devices were found"), ("APPS 6", "No devices were found")))
    assert (none.status, none.message) == ("no GPU", "No devices were found")
    assert top.parse_sample("h", dump(("GPUS 0", ""), ("APPS 0", ""))).status == "no GPU"
    driver = top.parse_sample("h", dump(("GPUS 9", "NVIDIA-SMI has failed because it couldn't communicate with "
                                                   "the NVIDIA driver."), ("APPS 9", "")))
    assert driver.status == "nvidia-smi failed" and "couldn't communicate" in driver.message


def test_compute_processes_are_mapped_to_their_gpus_by_uuid() -> None:
    sample = top.parse_sample("h", dump(("GPUS 0", "0, GPU-a, 90, 600, 700, 100, 200\n1, GPU-b, 0, 70, 700, 0, 200"),
                                        ("APPS 0", "GPU-a, 11, 50\nGPU-a, 12, [N/A]\nGPU-b, 11, 10\nGPU-x, 13, 1")))
    assert sample.status == "ok" and sample.processes == 3  # distinct pids, a GPU unknown to the first query too
    assert [len(g.processes) for g in sample.gpus] == [2, 1]
    assert sample.gpus[0].processes[1] == {"pid": 12, "used_memory_mib": None}
    broken = top.parse_sample("h", dump(("GPUS 0", "0, GPU-a, 90, 600, 700, 100, 200"), ("APPS 2", "Field bad")))
    assert broken.processes is None and "compute processes unknown" in broken.message


def test_totals_count_only_what_gpus_report() -> None:
    a = top.HostSample("a", "ok", gpus=[top.Gpu(0, "A0", 90.0, 600.0, 700.0, 1024.0, 2048.0),
                                        top.Gpu(1, "A1", None, None, 700.0, None, 2048.0)], processes=2)
    b = top.HostSample("b", "ok", gpus=[top.Gpu(0, "B0", 10.0, 70.0, 700.0, 0.0, 2048.0)], processes=0)
    empty = top.HostSample("c", "no GPU")
    t = top.totals([a, b, empty])
    assert (t.gpus, t.utilization_pct, t.power_w, t.power_limit_w, t.memory_used_mib, t.memory_total_mib,
            t.processes) == (3, 50.0, 670.0, 1400.0, 1024.0, 6144.0, 2)
    assert t.power_pct == 47.9  # the GPU without a power reading neither counts as idle nor dilutes
    assert top.totals([empty]) == top.Totals()
    assert a.totals().power_pct == round(600 / 7, 1)


# --- pure: flagging -----------------------------------------------------------------------------------------------


def state(rank: int | None, host: str, age: float | None, state: str = "running", mode: str = "gpus",
          node: int = 0) -> SessionState:
    stem = f"rank-{rank}" if mode == "gpus" else f"node-{node}"
    return SessionState("j", mode, host, f"j-{stem}", rank, node, state, log=f"/h/j/{host}/{stem}.log", log_age=age)


def gpu(index: int, power: float | None) -> top.Gpu:
    return top.Gpu(index, f"G{index}", 100.0, power, 700.0, 0.0, 1.0)


def test_ranks_on_idle_gpus_or_with_silent_logs_are_flagged() -> None:
    samples = {"n1": top.HostSample("n1", "ok", gpus=[gpu(0, 600.0), gpu(1, 77.0)]),
               "n2": top.HostSample("n2", "no nvidia-smi")}
    states = [state(0, "n1", 5), state(2, "n1", 5), state(1, "n2", 400), state(3, "n2", 500, "failed"),
              state(4, "n2", None)]
    flags = {f.rank: f for f in top.flag(states, samples, stall=300)}
    # rank 2 is n1's second rank, local rank 1, so GPU 1 (idle) is its own; rank 0's GPU 0 is busy.
    assert sorted(flags) == [1, 2]
    assert flags[2].reasons == ["GPU 1 at 11% of power limit (near idle)"] and flags[2].power_pct == 11.0
    assert flags[1].reasons == ["log silent for 6m"] and flags[1].log_age == 400
    assert top.flag(states, samples, stall=1000, idle_pct=5) == []


def test_a_torchrun_node_is_judged_by_its_latest_attempts_worker_logs() -> None:
    node = state(None, "n1", 9999, mode="torchrun")
    base = "/h/j/n1/node-0.torchrun/run/"
    ages = {"n1": {f"{base}attempt_0/0/stdout.log": 9000, f"{base}attempt_1/0/stdout.log": 2,
                   f"{base}attempt_1/0/stderr.log": 700, f"{base}attempt_1/1/stdout.log": 400,
                   f"{base}attempt_1/1/stderr.log": 500}}
    samples = {"n1": top.HostSample("n1", "ok", gpus=[gpu(0, 600.0), gpu(1, 10.0)])}
    [f] = top.flag([node], samples, stall=300, worker_ages=ages)
    assert f.reasons[0] == "worker 1 log silent for 6m" and f.log_age == 400
    assert f.power_pct == 43.6 and len(f.reasons) == 1  # a node's GPUs count together
    assert top.flag([node], samples, stall=450, worker_ages=ages) == []
    # No worker logs yet (stuck in rendezvous): the node's own log tells.
    assert top.flag([node], samples, stall=300, worker_ages={})[0].reasons == ["log silent for 2h46m"]


# --- the payload in a real bash, without SSH -----------------------------------------------------------------------


def test_payload_runs_the_stand_in_in_bash(tmp_path: Path) -> None:
    shutil.copy(PAYLOADS / "fake_nvidia_smi.py", tmp_path / "nvidia-smi")
    (tmp_path / "nvidia-smi").chmod(0o755)
    (tmp_path / "figures.json").write_text(json.dumps(NODE1))
    host = parse_host("node1", "test")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "FAKE_NVIDIA_SMI": str(tmp_path / "figures.json")}
    out = subprocess.run(["bash", "-s"], input=top.payload(host, None), env=env, capture_output=True, text=True)
    sample = top.parse_sample("node1", out.stdout)
    assert (out.returncode, sample.status, len(sample.gpus), sample.processes) == (0, "ok", 2, 3), out
    bare = {**os.environ, "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["bash", "-s"], input=top.payload(host, None), env=bare, capture_output=True, text=True)
    assert top.parse_sample("node1", out.stdout).status == "no nvidia-smi"


# --- the real CLI against fake hosts -------------------------------------------------------------------------------


def test_once_and_json_show_the_figures_and_why_a_host_has_none(gfab: Fab) -> None:
    gfab.write("hosts", "node1", "node2", "node3", "node4")
    data = json.loads(ok(gfab("top", "--json", "--hosts", "hosts")).stdout)
    hosts = {h["host"]: h for h in data["hosts"]}
    assert list(hosts) == ["node1", "node2", "node3", "node4"]
    assert [h["status"] for h in hosts.values()] == ["ok", "ok", "no GPU", "no nvidia-smi"]
    n1 = hosts["node1"]
    assert [(g["index"], g["uuid"], g["utilization_pct"], g["power_w"], g["power_limit_w"], g["memory_used_mib"],
             g["memory_total_mib"], len(g["processes"])) for g in n1["gpus"]] == [
        (0, "GPU-n1-0", 97.0, 600.0, 700.0, 40960.0, 81920.0, 1),
        (1, "GPU-n1-1", 99.0, 650.0, 700.0, 20480.0, 81920.0, 2)]
    assert n1["totals"] == {"gpus": 2, "utilization_pct": 98.0, "power_w": 1250.0, "power_limit_w": 1400.0,
                            "power_pct": 89.3, "memory_used_mib": 61440.0, "memory_total_mib": 163840.0,
                            "processes": 3}
    n2 = hosts["node2"]["gpus"][0]
    assert (n2["utilization_pct"], n2["power_pct"], n2["memory_used_mib"], n2["processes"]) == (None, 11.0, None, [])
    assert hosts["node3"]["message"] == "No devices were found" and hosts["node3"]["gpus"] == []
    assert data["totals"] == {"gpus": 3, "utilization_pct": 98.0, "power_w": 1327.0, "power_limit_w": 2100.0,
                              "power_pct": 63.2, "memory_used_mib": 61440.0, "memory_total_mib": 245760.0,
                              "processes": 3}
    assert data["unreachable"] == [] and "flagged" not in data

    table = ok(gfab("top", "--once", "--hosts", "hosts")).stdout
    assert row(table, "node1").startswith("node1 2 98% 1250/1400 W (89%) 60.0/160.0 GiB 3 97/86 99/93")
    assert row(table, "node2").startswith("node2 1 ? 77/700 W (11%) ?/80.0 GiB 0 ?/11")
    assert "no GPU: No devices were found" in row(table, "node3")
    assert "no nvidia-smi" in row(table, "node4")
    assert row(table, "cluster").startswith("cluster 3 98% 1327/2100 W (63%) 60.0/240.0 GiB 3")


def test_an_unreachable_host_is_reported_and_fails_once(gfab: Fab) -> None:
    gfab.write("hosts", "node1", UNREACHABLE)
    result = gfab("top", "--once", "--hosts", "hosts")
    assert result.returncode == 1, output(result)
    assert row(result.stdout, "node1").startswith("node1 2 98%")
    assert "unreachable" in row(result.stdout, UNREACHABLE)
    data = json.loads(gfab("top", "--json", "--hosts", "hosts").stdout)
    assert data["unreachable"] == [UNREACHABLE] and data["hosts"][0]["status"] == "ok"


def logged(job: str, where: dict[int, str]) -> bool:
    """Every rank has printed its line (so it now sleeps, silent)."""
    for rank, host in where.items():
        log = JOBS / job / host / f"rank-{rank}.log"
        if not (log.exists() and "sleeps" in log.read_text()):
            return False
    return True


def test_job_flags_the_rank_on_an_idle_gpu_and_ranks_whose_logs_went_silent(gfab: Fab, job: str) -> None:
    gfab.write("gpus", "node1", "node1", "node2")
    ok(gfab("launch-gpus", "--job", job, "--port", str(master_port()), "--", "sleeper.py"))
    wait_until(lambda: logged(job, {0: "node1", 1: "node1", 2: "node2"}), timeout=60)

    data = json.loads(ok(gfab("top", "--json", "--job", job, "--stall", "1000")).stdout)
    assert data["job"] == job and data["sessions"] == {"running": 3}
    assert [(f["rank"], f["host"], f["power_pct"]) for f in data["flagged"]] == [(2, "node2", 11.0)]
    assert data["flagged"][0]["reasons"] == ["GPU 0 at 11% of power limit (near idle)"]

    def silent() -> list[dict[str, Any]] | None:
        flagged = json.loads(ok(gfab("top", "--json", "--job", job, "--stall", "1")).stdout)["flagged"]
        return flagged if len(flagged) == 3 else None

    flagged = wait_until(silent, timeout=60, interval=1)
    assert isinstance(flagged, list)
    for f in flagged:
        assert f["reasons"][0].startswith("log silent for ") and f["log_age"] > 1, f
    assert len(flagged[2]["reasons"]) == 2

    table = output(ok(gfab("top", "--once", "--job", job, "--stall", "1")))
    assert f"job {job}: 3 of 3 running sessions look hung" in table
    assert "log silent for" in table and "near idle" in table


def test_job_in_torchrun_mode_is_judged_by_its_workers_logs(gfab: Fab, job: str) -> None:
    gfab.write("hosts", "node1 slots=1", "node2 slots=1")
    ok(gfab("launch-torchrun", "--job", job, "--hosts", "hosts", "--port", str(master_port()), "--", "sleeper.py"))

    def workers_sleep() -> bool:
        logs = [p.read_text() for p in (JOBS / job).glob("node*/node-*.torchrun/*/attempt_*/*/stdout.log")]
        return sum("sleeps" in text for text in logs) == 2

    wait_until(workers_sleep, timeout=120, interval=0.5)

    def silent() -> list[dict[str, Any]] | None:
        flagged = json.loads(ok(gfab("top", "--json", "--job", job, "--stall", "1")).stdout)["flagged"]
        return flagged if len(flagged) == 2 else None

    flagged = wait_until(silent, timeout=60, interval=1)
    assert isinstance(flagged, list)
    assert [(f["host"], f["node"], f["rank"]) for f in flagged] == [("node1", 0, None), ("node2", 1, None)]
    assert flagged[0]["reasons"][0].startswith("worker 0 log silent for ") and len(flagged[0]["reasons"]) == 1
    assert flagged[1]["reasons"][1] == "GPU 0 at 11% of power limit (near idle)"


def test_live_view_refreshes_until_ctrl_c(gfab: Fab) -> None:
    gfab.write("hosts", "node1", "node4")
    leader, follower = pty.openpty()
    cmd = [FAB, "-r", str(REPO), "-S", str(gfab.cluster.ssh_config), "top", "--interval", "0.5", "--hosts", "hosts"]
    proc = subprocess.Popen(cmd, cwd=gfab.cwd, env=gfab.env, stdin=subprocess.DEVNULL, stdout=follower,
                            stderr=follower)
    os.close(follower)
    seen = b""
    try:
        end = time.monotonic() + 120
        # Each refresh redraws the table: two node1 rows means it refreshed at least once.
        while seen.count(b"node1") < 2 and time.monotonic() < end and proc.poll() is None:
            if select.select([leader], [], [], 0.5)[0]:
                try:
                    seen += os.read(leader, 65536)
                except OSError:
                    break
        assert seen.count(b"node1") >= 2, seen.decode(errors="replace")
        text = seen.decode(errors="replace")
        assert "every 0.5s" in text and "no nvidia-smi" in text and "1250/1400 W" in text
        proc.send_signal(signal.SIGINT)
        end = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < end:  # keep reading: a full pty would block its exit
            if select.select([leader], [], [], 0.5)[0]:
                try:
                    os.read(leader, 65536)
                except OSError:
                    break
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
