"""`fab doctor`'s pure parts: the host payload's answer judged into checks, cross-host comparisons, and the
shell it sends (run here with bash; no SSH)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fablaunch import scripts
from fablaunch.errors import UsageError
from fablaunch.executor import Outcome
from fablaunch.hostfile import parse_host
from fablaunch.plan import plan_gpus
from fablaunch.spec import JobSpec
from fablaunch.tasks import doctor
from fablaunch.tasks.doctor import CHECKS, Check

HEALTHY = {
    "tmux": "tmux 3.3a", "workdir": "ok", "disk_kb": str(200 * 2**20), "nofile": "65536",
    "python_path": "/usr/bin/python3", "python": "3.11.2", "torch": "2.13.0", "cuda": "13.0", "nccl": "2.28.9",
    "python_rc": "0", "gpus": "8", "gpu_name": "NVIDIA H100", "py_spy": "py-spy 0.4.0", "job": "none", "port": "free",
    "state_path": "/home/u/.fablaunch", "state_write": "ok", "state_kb": str(50 * 2**20),
}


def judge(changes: dict[str, str | None] | None = None, expected: int | None = 8, job: str | None = "j",
          port: int | None = 5001) -> dict[str, Check]:
    fields = {**HEALTHY}
    for key, value in (changes or {}).items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    return doctor.host_checks(fields, workdir="/w", python="/usr/bin/python3", expected_gpus=expected, job=job,
                              port=port, host="node1")


def statuses(checks: dict[str, Check]) -> dict[str, str]:
    return {name: c.status for name, c in checks.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether any socket on this machine listens on TCP `port` (from /proc/net/tcp*)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    return True
    return False


# --- parsing ------------------------------------------------------------------------------------------------


def test_parse_fields_keeps_the_first_value_of_a_key_and_ignores_other_lines() -> None:
    text = "tmux=tmux 3.3a\nnoise\nTraceback: x=1\npython=3.11\npython=2.7\nempty=\nbad key=v\n"
    assert doctor.parse_fields(text) == {"tmux": "tmux 3.3a", "python": "3.11", "empty": ""}


def test_a_healthy_host_passes_every_check() -> None:
    checks = judge()
    assert set(checks) == set(CHECKS) - {"ssh", "tcp", "clock", "code"}  # those are judged apart from the payload
    assert set(statuses(checks).values()) == {"ok"}
    assert checks["tmux"].value == "3.3a" and checks["python"].value == "3.11.2" and checks["gpus"].value == 8
    assert checks["disk"].value == 200.0 and checks["port"].value == 5001 and checks["py_spy"].value == "0.4.0"
    assert checks["state_dir"].value == 50 * 1024 and checks["state_dir"].text == "50.0 GiB"


@pytest.mark.parametrize(("changes", "check", "status", "words"), [
    ({"tmux": ""}, "tmux", "fail", "tmux is not installed"),
    ({"tmux": "tmux 2.9"}, "tmux", "warn", "older than 3.2"),
    ({"tmux": "tmux next-3.5"}, "tmux", "ok", ""),
    ({"workdir": "missing", "disk_kb": None}, "workdir", "fail", "working directory /w does not exist"),
    ({"disk_kb": str(2 * 2**20)}, "disk", "warn", "only 2 GiB free in /w"),
    ({"disk_kb": ""}, "disk", "warn", "could not read"),
    ({"state_write": "mktemp: failed to create directory via template '/home/u/.fablaunch/.fablaunch-doctor-XXXXXX': "
                     "Read-only file system"}, "state_dir", "fail",
     "/home/u/.fablaunch is not writable (Read-only file system): a launch keeps every job's scripts, logs"),
    ({"state_write": "not a directory", "state_kb": None}, "state_dir", "fail", "not writable (not a directory)"),
    ({"state_kb": str(99 * 1024 + 1023)}, "state_dir", "fail", "only 99 MiB free for /home/u/.fablaunch (under 100"),
    ({"state_kb": "0"}, "state_dir", "fail", "only 0 MiB free"),
    ({"state_kb": str(100 * 1024)}, "state_dir", "warn", "only 100 MiB free for /home/u/.fablaunch (under 1024 MiB)"),
    ({"state_kb": str(1023 * 1024)}, "state_dir", "warn", "only 1023 MiB free"),
    ({"state_kb": str(1024 * 1024)}, "state_dir", "ok", ""),
    ({"state_kb": ""}, "state_dir", "warn", "could not read the free space for /home/u/.fablaunch"),
    ({"state_write": None, "state_kb": None}, "state_dir", "warn", "could not check"),
    ({"nofile": "1024"}, "nofile", "warn", "ulimit -n) is 1024"),
    ({"nofile": "unlimited"}, "nofile", "ok", ""),
    ({"py_spy": ""}, "py_spy", "warn", "pip install py-spy"),
    ({"job": "running"}, "job", "fail", "job j is already running here"),
    ({"port": "used"}, "port", "fail", "port 5001 is in use on node1"),
    ({"port": None}, "port", "warn", "could not tell"),
    ({"gpus": "4"}, "gpus", "fail", "4 GPUs, but the host file gives this host 8 ranks"),
    ({"gpus": "16"}, "gpus", "warn", "uses only 8"),
    ({"gpus": "none"}, "gpus", "ok", ""),
    ({"gpus": None, "gpu_error": "NVIDIA-SMI has failed"}, "gpus", "warn", "nvidia-smi fails: NVIDIA-SMI has failed"),
    ({"cuda": ""}, "gpus", "warn", "torch is a CPU build"),
    ({"torch": None, "cuda": None, "nccl": None, "torch_error": "ModuleNotFoundError: No module named 'torch'"},
     "torch", "fail", "torch cannot be imported by /usr/bin/python3: ModuleNotFoundError"),
])
def test_each_finding_is_judged_and_explained(changes: dict[str, str | None], check: str, status: str,
                                              words: str) -> None:
    result = judge(changes)[check]
    assert result.status == status, result
    assert words in result.message


def test_a_missing_interpreter_fails_and_skips_the_version_checks() -> None:
    checks = judge({"python_path": "", "python": None, "torch": None, "cuda": None, "nccl": None})
    assert checks["python"].status == "fail" and "/usr/bin/python3 not found" in checks["python"].message
    assert {checks[n].status for n in ("torch", "cuda", "nccl")} == {"skip"}


def test_an_interpreter_that_does_not_run_fails_with_its_error() -> None:
    checks = judge({"python": None, "torch": None, "cuda": None, "nccl": None, "python_rc": "126",
                    "python_error": "cannot execute binary file"})
    assert checks["python"].status == "fail"
    assert "does not run: cannot execute binary file" in checks["python"].message


def test_no_job_and_no_port_are_skipped_not_passed() -> None:
    checks = judge(job=None, port=None)
    assert checks["job"].status == "skip" and checks["port"].status == "skip"


def test_a_cpu_host_with_no_nvidia_smi_is_fine_whatever_the_host_file_says() -> None:
    checks = judge({"gpus": "none", "cuda": "", "nccl": ""}, expected=4)
    assert checks["gpus"].status == "ok" and checks["gpus"].text == "no GPU"
    assert checks["cuda"].status == "ok" and checks["cuda"].value is None


def test_hosts_file_without_slots_does_not_judge_the_gpu_count() -> None:
    assert judge({"gpus": "3"}, expected=None)["gpus"].status == "ok"


# --- ssh, clock, tcp ----------------------------------------------------------------------------------------


def test_ssh_check_reports_connect_time_or_why_unreachable() -> None:
    host = parse_host("node1", "t")
    assert doctor.ssh_check(Outcome(host, 0, "1.0\n", seconds=0.314)).value == 0.314
    down = doctor.ssh_check(Outcome(host, error="unreachable: connection refused"))
    assert down.status == "fail" and down.message == "unreachable: connection refused"
    assert doctor.ssh_check(Outcome(parse_host("localhost", "t"), 0, "1.0")).text == "local"
    assert doctor.ssh_check(Outcome(host, 1, "", "boom")).status == "fail"


@pytest.mark.parametrize(("remote", "local_end", "seconds", "status"), [
    ("1000.05\n", 1000.1, 0.1, "ok"),
    ("1005.0", 1000.1, 0.1, "warn"),
    ("995.0", 1000.1, 0.1, "warn"),
    ("1001.0", 1000.1, 2.0, "ok"),  # within the round trip's uncertainty plus 1 s
    ("date: invalid", 1000.1, 0.1, "warn"),
])
def test_clock_offset_is_taken_against_the_middle_of_the_round_trip(remote: str, local_end: float, seconds: float,
                                                                    status: str) -> None:
    check = doctor.clock_check(remote, local_end, seconds)
    assert check.status == status
    if status == "warn" and check.value is not None:
        assert "off this machine's" in check.message


def test_clock_offset_sign_and_value() -> None:
    assert doctor.clock_check("1010.0", 1000.2, 0.4).value == pytest.approx(10.0)


def test_tcp_check() -> None:
    assert doctor.tcp_check("tcp=ok\n", "10.0.0.1", 5001).status == "ok"
    bad = doctor.tcp_check("tcp=bash: connect: Connection refused\n", "10.0.0.1", 5001)
    assert bad.status == "fail" and bad.message.endswith("10.0.0.1:5001: connect: Connection refused")


# --- across hosts -------------------------------------------------------------------------------------------


def test_versions_that_differ_from_the_most_common_are_marked() -> None:
    results = {f"node{i}": judge() for i in range(1, 4)}
    results["node3"] = judge({"torch": "2.11.0", "nccl": "2.21.5"})
    compared = doctor.compare_versions(results)
    assert compared["node3"]["torch"].status == "fail"
    assert "torch 2.11.0 differs from 2.13.0 on node1" in compared["node3"]["torch"].message
    assert compared["node3"]["nccl"].status == "fail"
    assert all(compared[h]["torch"].status == "ok" for h in ("node1", "node2"))
    assert results["node3"]["torch"].status == "ok"  # the input is left alone
    assert doctor.exit_code(compared) == 1  # mixed torch/NCCL makes rendezvous fail or hang


def test_a_different_python_or_cuda_build_only_warns() -> None:
    compared = doctor.compare_versions({"a": judge(), "b": judge(), "c": judge({"cuda": "12.1", "python": "3.11.9"})})
    assert (compared["c"]["cuda"].status, compared["c"]["python"].status) == ("warn", "warn")
    assert doctor.exit_code(compared) == 0


def test_on_a_tie_the_first_hosts_version_is_the_reference() -> None:
    compared = doctor.compare_versions({"a": judge(), "b": judge({"python": "3.10.1"})})
    assert compared["a"]["python"].status == "ok" and compared["b"]["python"].status == "warn"


def test_equal_versions_and_missing_ones_are_not_compared() -> None:
    missing = judge({"torch": None, "cuda": None, "nccl": None, "torch_error": "x"})
    compared = doctor.compare_versions({"a": judge(), "b": missing})
    assert compared["a"]["torch"].status == "ok" and compared["b"]["torch"].status == "fail"


def test_exit_code_is_1_only_for_failures() -> None:
    assert doctor.exit_code({"a": judge({"nofile": "256", "py_spy": ""})}) == 0
    assert doctor.exit_code({"a": judge(), "b": judge({"workdir": "missing"})}) == 1


def test_json_has_one_object_per_host_with_every_check() -> None:
    results = {"node1": {"ssh": doctor.ok(0.2), "clock": doctor.ok(0.0), "tcp": doctor.ok("x"),
                         "code": doctor.ok(0, "matches"), **judge()},
               "node2": {"ssh": doctor.fail(None, "unreachable", "refused"), **doctor.unreached("refused")}}
    data = doctor.as_json(results, "node1")
    assert [d["host"] for d in data] == ["node1", "node2"] and [d["master"] for d in data] == [True, False]
    for item in data:
        assert set(item) == {"host", "master", *CHECKS}
        for name in CHECKS:
            assert set(item[name]) == {"status", "value", "message"}
    assert data[1]["ssh"]["status"] == "fail" and data[1]["torch"]["status"] == "skip"


def test_table_cells_escape_markup_and_colour_by_status() -> None:
    results = {"[red]": {**{n: doctor.ok("x") for n in CHECKS}, "port": doctor.fail(1, "[bold]", "m"),
                         "py_spy": doctor.warn(None, "missing", "m")}}
    row = doctor.table_rows(results)[0]
    assert row[0] == "\\[red]" and row[1] == "x"
    assert row[1 + CHECKS.index("port")] == "[bold red]\\[bold][/]"
    assert row[1 + CHECKS.index("py_spy")] == "[yellow]missing[/]"


def test_problems_list_failures_first() -> None:
    results = {"a": {"x": doctor.warn(1, "w", "warned"), "y": doctor.fail(1, "f", "failed")}}
    assert [c.message for _, _, c in doctor.problems(results)] == ["failed", "warned"]


@pytest.mark.parametrize(("gpus", "hosts", "spec", "present", "expected"), [
    ("g", None, {}, {"gpus"}, ("gpus", "g")),
    (None, "h", {}, {"gpus"}, ("hosts", "h")),
    (None, None, {"hosts": "sh"}, {"gpus"}, ("hosts", "sh")),
    (None, None, {"gpus": "sg"}, set(), ("gpus", "sg")),
    (None, None, {}, {"gpus"}, ("gpus", "gpus")),
    (None, None, {}, set(), ("hosts", "hosts")),
])
def test_pick_hostfile(gpus: str | None, hosts: str | None, spec: dict, present: set[str],
                       expected: tuple[str, str]) -> None:
    assert doctor.pick_hostfile(gpus, hosts, spec, lambda p: p in present) == expected


def test_pick_hostfile_refuses_two_files() -> None:
    with pytest.raises(UsageError, match="give one host file"):
        doctor.pick_hostfile("g", "h", {})


def test_expected_gpus_come_from_gpus_lines() -> None:
    a, b = parse_host("a", "t"), parse_host("b", "t")
    plan = plan_gpus(JobSpec(command=["x.py"]), [a, b, a], "j", "/py", "/w")
    assert doctor.expected_gpus(plan, a) == 2 and doctor.expected_gpus(plan, b) == 1


# --- the shell, run for real --------------------------------------------------------------------------------


def test_payloads_are_valid_bash() -> None:
    texts = [doctor.host_payload("/w d", "py thon", "j", 5001, "10.0.0.1"), doctor.host_payload("/w", "/py", None,
                                                                                                  None, "a"),
             doctor.connect_payload("10.0.0.1", 5001), doctor.listener_payload("tok", "/py", 5001, 3),
             doctor.stop_listener_payload("tok")]
    for text in texts:
        result = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True, check=False)
        assert result.returncode == 0, (result.stderr, text)


def run_bash(payload: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-s"], input=payload, capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


def test_host_payload_answers_every_key_here(tmp_path: Path) -> None:
    port = free_port()
    out = run_bash(doctor.host_payload(str(tmp_path), sys.executable, "no-such-job", port, "127.0.0.1"))
    fields = doctor.parse_fields(out.stdout)
    assert fields["workdir"] == "ok" and fields["disk_kb"].isdigit() and fields["python_path"] == sys.executable
    assert fields["python"] == ".".join(map(str, sys.version_info[:3]))
    assert fields["port"] == "free" and fields["job"] == "none"
    assert {"tmux", "nofile", "gpus", "py_spy"} <= set(fields)
    assert "torch" in fields or "torch_error" in fields


def test_host_payload_finds_a_missing_workdir_interpreter_and_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        out = run_bash(doctor.host_payload(str(tmp_path / "gone"), "/no/python", None, port, "127.0.0.1"))
    checks = doctor.host_checks(doctor.parse_fields(out.stdout), workdir=str(tmp_path / "gone"), python="/no/python",
                                expected_gpus=None, job=None, port=port, host="me")
    assert checks["workdir"].status == "fail" and checks["python"].status == "fail"
    assert checks["port"].status == "fail" and checks["port"].message == f"port {port} is in use on me"


def state_dir_answer(home: Path) -> dict[str, str]:
    """What host_payload says of ~/.fablaunch with this HOME (no interpreter: nothing slow runs)."""
    out = run_bash(doctor.host_payload("/", "/no/python", None, None, "a"), {**os.environ, "HOME": str(home)})
    return {k: v for k, v in doctor.parse_fields(out.stdout).items() if k.startswith("state_")}


def test_host_payload_tries_writing_where_launch_would_and_leaves_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    answer = state_dir_answer(home)  # no ~/.fablaunch yet: its parent must take the new directory
    assert answer["state_write"] == "ok" and answer["state_kb"].isdigit()
    assert answer["state_path"] == f"{home}/.fablaunch"
    assert list(home.iterdir()) == []
    (home / ".fablaunch" / "jobs").mkdir(parents=True)
    assert state_dir_answer(home)["state_write"] == "ok"
    assert list((home / ".fablaunch" / "jobs").iterdir()) == []


def test_host_payload_finds_a_fablaunch_dir_that_is_a_file_or_cannot_be_written(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".fablaunch").write_text("")
    checks = doctor.host_checks(state_dir_answer(home), workdir="/", python="/no/python", expected_gpus=None,
                                job=None, port=None, host="me")
    assert checks["state_dir"].status == "fail" and "not a directory" in checks["state_dir"].message
    (home / ".fablaunch").unlink()
    (home / ".fablaunch").mkdir(mode=0o555)
    if os.geteuid() != 0:  # root writes whatever the mode: tests/test_faults_limits.py mounts read-only instead
        answer = state_dir_answer(home)
        assert answer["state_write"] != "ok" and "Permission denied" in answer["state_write"]


def test_port_in_use_without_any_python_falls_back_to_connecting(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "timeout"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bin_dir)}
    test = "if {}; then echo used; else echo free; fi"
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert run_bash(test.format(scripts.port_in_use(port, "127.0.0.1", None)), env).stdout.strip() == "used"
    assert run_bash(test.format(scripts.port_in_use(port, "127.0.0.1", "/no/py")), env).stdout.strip() == "free"


def test_preflight_payload_checks_the_port_only_when_asked(tmp_path: Path) -> None:
    (tmp_path / "x.py").write_text("")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        plan = plan_gpus(JobSpec(command=["x.py"], port=port), [parse_host("localhost", "t")], "j", sys.executable,
                         str(tmp_path))
        env = {**os.environ, "TMUX_TMPDIR": str(tmp_path)}
        checked = run_bash(scripts.preflight_payload(plan, sys.executable, check_port=True), env)
        unchecked = run_bash(scripts.preflight_payload(plan, sys.executable), env)
    assert checked.returncode == 1 and f"port: port {port} is in use on localhost" in checked.stdout
    assert unchecked.returncode == 0, unchecked.stdout


def test_preflight_payload_fails_a_host_without_the_script_to_run(tmp_path: Path) -> None:
    plan = plan_gpus(JobSpec(command=["missing.py", "--x"]), [parse_host("localhost", "t")], "j", sys.executable,
                     str(tmp_path))
    out = run_bash(scripts.preflight_payload(plan, sys.executable), {**os.environ, "TMUX_TMPDIR": str(tmp_path)})
    assert out.returncode == 1 and f"script: {tmp_path}/missing.py not found" in out.stdout
    (tmp_path / "missing.py").write_text("")
    assert run_bash(scripts.preflight_payload(plan, sys.executable), {**os.environ, "TMUX_TMPDIR": str(tmp_path)}
                    ).returncode == 0


def start_listener(token: str, port: int, expect: int, limit: float = 30) -> subprocess.Popen:
    proc = subprocess.Popen(["bash", "-s"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin and proc.stdout
    proc.stdin.write(doctor.listener_payload(token, sys.executable, port, expect, limit))
    proc.stdin.close()
    assert proc.stdout.readline().startswith("listen=ready")
    return proc


def test_listener_serves_connect_payloads_and_ends_when_all_connected() -> None:
    port = free_port()
    proc = start_listener("tok-a", port, expect=2)
    for _ in range(2):
        assert run_bash(doctor.connect_payload("127.0.0.1", port)).stdout == "tcp=ok\n"
    assert proc.stdout
    out = proc.stdout.read()
    proc.wait(10)
    assert "accepted=2" in out and not listening(port)
    refused = run_bash(doctor.connect_payload("127.0.0.1", port)).stdout
    assert refused.startswith("tcp=") and refused != "tcp=ok\n"


def test_stop_listener_payload_kills_exactly_the_tokens_listener() -> None:
    port, other_port = free_port(), free_port()
    proc = start_listener("tok-b", port, expect=5)
    other = start_listener("tok-c", other_port, expect=5)
    try:
        out = run_bash(doctor.stop_listener_payload("tok-b"))
        assert out.stdout.strip() == "left=0"
        proc.wait(10)
        assert not listening(port)
        assert other.poll() is None and listening(other_port)
    finally:
        other.kill()
        other.wait()
        proc.kill()


def test_listener_ends_by_itself_after_its_limit_and_when_doctor_is_gone() -> None:
    port = free_port()
    proc = start_listener("tok-d", port, expect=5, limit=1)
    proc.wait(15)
    assert not listening(port)
    port = free_port()
    proc = start_listener("tok-e", port, expect=5)
    assert proc.stdout
    proc.stdout.close()  # what a dropped ssh connection or a killed doctor does to its output
    start = time.monotonic()
    proc.wait(15)
    assert time.monotonic() - start < 15 and not listening(port)
