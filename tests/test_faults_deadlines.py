"""Deadlines (issue 8) on a real cluster: a host whose remote shell never answers, or that never sends an
SSH banner, costs its deadline, is named in the output, and leaves nothing of its command running.

The file has its own three-host cluster whose node2 is stuck (its remote shells block in their startup
files, like a hung NFS home; see `Cluster(stuck=...)`), on addresses the session cluster never uses,
so its sshds and leftovers cannot disturb other tests. Deadlines are kept to a few seconds; timings are
only checked loosely (`timeout=` is a hang guard), since this machine runs other tests at once.

Ending a stuck remote shell: the executor asks sshd to SIGKILL the command's process group (an SSH
"signal" request), then closes the channel. OpenSSH before 10.0 refuses that request for root logins,
which is what this cluster uses, and logs the refusal; there the shell lives on until its host recovers,
and must then die on its first write (the executor's STARTED line) having run nothing of its script.
`assert_stuck_command_ended` checks whichever of the two applies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster, silent_listener
from tests.conftest import (
    FAB,
    JOBS,
    REPO,
    SSH_PORT,
    Fab,
    fresh_workdir,
    live_pids,
    master_port,
    sessions,
    wait_until,
)

BASE = 31  # node1..node3 on 127.0.0.31-33; the session cluster uses 11-13
SILENT = f"127.0.0.{BASE + 3}"  # a listener that never speaks SSH
STUCK = "node2"
REFUSED = "session signalling requires privilege separation"  # sshd's log line for a refused signal request


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """This file's own cluster (it shadows the session fixture): node2's shells never answer."""
    with Cluster(tmp_path_factory.mktemp("dl"), 3, port=SSH_PORT, base=BASE, env={"PATH": os.environ["PATH"]},
                 stuck={STUCK}) as c:
        yield c


@pytest.fixture
def fab(cluster: Cluster, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Fab]:
    """A `fab` runner against this file's cluster, with `hosts` (all three) and `healthy` (node1, node3).

    Afterwards the test's jobs are killed, and any stuck shell left is let go and waited for, so one
    failing test cannot leave work for the next.
    """
    prefix = fresh_workdir(request, tmp_path)
    runner = Fab(cluster, tmp_path)
    runner.write("hosts", *cluster.names)
    runner.write("healthy", "node1", "node3")
    assert not cluster.stuck_pids(), "a stuck shell of an earlier test is still there"
    yield runner
    for pid in live_pids(prefix):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for name in cluster.names:
        for line in cluster.tmux(name, "ls", "-F", "#{session_name}").stdout.split():
            if line.startswith(prefix):
                cluster.tmux(name, "kill-session", "-t", f"={line}:")
    cluster.unstick()
    try:
        wait_until(lambda: not cluster.stuck_pids(), timeout=30)
    finally:
        cluster.stick()


def output(result: subprocess.CompletedProcess[str]) -> str:
    """stdout and stderr of a `fab` call, whitespace collapsed so table wrapping never matters."""
    return " ".join((result.stdout + "\n" + result.stderr).split())


def refusals(cluster: Cluster, name: str = STUCK) -> int:
    """How many signal requests the host's sshd has refused so far (its log says each)."""
    log = cluster.host_dir(name) / "sshd.log"
    return log.read_text(errors="replace").count(REFUSED) if log.exists() else 0


def timed(fab: Fab, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    result = fab(*args, timeout=60)  # only a hang guard
    return result, time.monotonic() - start


def launch_healthy(fab: Fab, job: str) -> None:
    """A sleeping rank on each healthy host (node1, node3)."""
    result = fab("launch-gpus", "--job", job, "--gpus", "healthy", "--port", str(master_port()), "--",
                 "behave.py", "*=sleep")
    assert result.returncode == 0, output(result)


def assert_stuck_command_ended(cluster: Cluster, refused_before: int, job: str | None = None) -> None:
    """After fab exited, nothing of the command it gave up on is left running on the stuck host.

    Either sshd took the executor's KILL (the stuck shells are gone), or it refused it (its log says
    so: the request arrived, well-formed) and the shells wait in their startup files: then, once the
    host recovers, they end without running their script (nothing of `job` appears there).
    """
    wait_until(lambda: not cluster.stuck_pids(STUCK) or refusals(cluster) > refused_before, timeout=10)
    if not cluster.stuck_pids(STUCK):
        return
    assert refusals(cluster) > refused_before, "stuck shells survive, and no signal request reached sshd"
    cluster.unstick()
    try:
        wait_until(lambda: not cluster.stuck_pids(STUCK), timeout=20)
        if job:
            time.sleep(1)  # what a blind script would do, it would have done by now
            assert sessions(cluster, job)[STUCK] == [] and live_pids(job) == []
            # Not even the files a launch payload writes before its own guard (a lock, the job dir).
            assert [p for p in (JOBS / job).rglob("*") if STUCK in p.name] == []
    finally:
        cluster.stick()


def test_status_names_the_stuck_host_and_shows_the_others(fab: Fab, cluster: Cluster, job: str) -> None:
    launch_healthy(fab, job)
    before = refusals(cluster)
    result, seconds = timed(fab, "-T", "3", "status", "--job", job, "--hosts", "hosts")
    text = output(result)
    assert result.returncode == 1, text
    assert "node2: unreachable (timed out after 3s)" in text
    assert text.count("running") >= 2 and "node1" in text and "node3" in text  # the others' sessions
    assert seconds < 3 + 15, f"took {seconds:.1f}s"
    assert_stuck_command_ended(cluster, before)


def test_stop_stops_the_others_and_names_the_stuck_host(fab: Fab, cluster: Cluster, job: str) -> None:
    launch_healthy(fab, job)
    assert live_pids(job)
    before = refusals(cluster)
    result, _ = timed(fab, "-T", "4", "stop", "--job", job, "--grace", "1", "--hosts", "hosts")
    text = output(result)
    assert result.returncode == 1, text
    assert "timed out after 4s" in text and "node2" in text and text.count("stopped") >= 2
    assert live_pids(job) == [] and sessions(cluster, job) == {n: [] for n in cluster.names}
    assert_stuck_command_ended(cluster, before)


@pytest.mark.parametrize("preflight", [True, False], ids=["preflight", "no-preflight"])
def test_a_launch_with_a_stuck_host_leaves_nothing_running_anywhere(fab: Fab, cluster: Cluster, job: str,
                                                                     preflight: bool) -> None:
    """With preflight the stuck host fails the check; without, its launch payload is cut and the rest
    rolled back. Either way its shell, should it ever get going, must not start the job late."""
    before = refusals(cluster)
    result, _ = timed(fab, "-T", "3", "launch-gpus", "--job", job, "--gpus", "hosts", "--port", str(master_port()),
                      *([] if preflight else ["--no-preflight"]), "--", "behave.py", "*=sleep")
    text = output(result)
    assert result.returncode == 1, text
    assert "timed out after 3s" in text and "node2" in text
    assert sessions(cluster, job) == {n: [] for n in cluster.names} and live_pids(job) == []
    assert_stuck_command_ended(cluster, before, job)


def test_following_logs_is_patient_the_stuck_host_is_cut_and_the_others_stream_to_the_end(
        fab: Fab, cluster: Cluster, job: str) -> None:
    """`logs --follow` runs longer than its deadline on hosts whose shells started; only node2 is cut."""
    result = fab("launch-gpus", "--job", job, "--gpus", "healthy", "--port", str(master_port()), "--env", "DELAY_0=8",
                 "--env", "DELAY_1=8", "--", "behave.py", "*=exit:0")
    assert result.returncode == 0, output(result)
    before = refusals(cluster)
    result, _ = timed(fab, "-T", "2", "logs", "--follow", "--job", job, "--hosts", "hosts")
    text = output(result)
    assert "node2: unreachable (timed out after 2s)" in text
    assert "[node1 rank 0] rank 0 on node1 does exit 0" in text and "[node3 rank 1] rank 1 on node3 does exit 0" in text
    assert live_pids(job) == []  # it followed until the ranks ended (8 s), well past its 2 s deadline
    assert_stuck_command_ended(cluster, before)


def test_a_host_that_never_sends_a_banner_costs_the_connect_deadline_once(fab: Fab) -> None:
    fab.write("silent", "node1", f"root@{SILENT}:{SSH_PORT}")
    with silent_listener(SILENT, SSH_PORT) as accepted:
        result, seconds = timed(fab, "-t", "2", "status", "--hosts", "silent")
    text = output(result)
    assert result.returncode == 1, text
    assert f"root@{SILENT}:{SSH_PORT}: unreachable (unreachable: no SSH banner within 2s)" in text
    assert len(accepted) == 1  # a banner that never came is not retried
    assert seconds < 30, f"took {seconds:.1f}s"  # was about a minute: 15 s banner wait x 4 tries


def test_wait_with_a_stuck_host_does_not_hang(fab: Fab, cluster: Cluster, job: str) -> None:
    launch_healthy(fab, job)
    before = refusals(cluster)
    result, _ = timed(fab, "-T", "2", "wait", "--job", job, "--timeout", "5", "--hosts", "hosts")
    assert result.returncode == 124, output(result)  # the job keeps running: --timeout, not a hang
    assert_stuck_command_ended(cluster, before)


def test_sigterm_ends_the_remote_commands_in_flight(fab: Fab, cluster: Cluster) -> None:
    before = refusals(cluster)
    proc = subprocess.Popen([FAB, "-r", str(REPO), "-S", str(fab.ssh_config), "-T", "60", "status", "--hosts", "hosts"],
                            cwd=fab.cwd, env=fab.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: cluster.stuck_pids(STUCK), timeout=30)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out + err
    assert "Traceback" not in err, err
    assert_stuck_command_ended(cluster, before)

