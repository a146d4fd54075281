"""Every table at 80 and 200 columns on a terminal, and piped (issue 9, item 3), and plurals.

Each table is printed by the code `fab` runs (jobs.report, launch's results, stop's, doctor's report,
top's view, errors' report) into a rich Console standing in for `ui.console()`: a terminal of a given
width, or a file (what a pipe or a captured stdout is). On a terminal the key columns (host, rank or
node, state, exit; doctor's host and check values; top's figures) must come out whole, on one line,
never cut or `…`; the long text columns may wrap but lose nothing. Piped, every row is one plain line
with every field whole, the full log line included, and no box characters, colour or escapes.
No cluster: SessionState and the other inputs are built directly.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from invoke import Exit
from rich.cells import cell_len
from rich.console import Console

from fablaunch import failures, ui
from fablaunch.executor import Outcome
from fablaunch.failures import Failure
from fablaunch.hostfile import parse_host
from fablaunch.jobs import Stopped
from fablaunch.survey import SessionState
from fablaunch.tasks import doctor, jobs, launch, top

WIDTHS = (80, 200)
MODES = [(80, True), (200, True), (200, False)]  # (columns, is a terminal); piped output ignores the width
BOX = re.compile("[\u2500-\u257f]")  # box drawing: table borders and rules

HOSTS = ["node1.cluster.example.com", "node2.cluster.example.com", "node3.cluster.example.com"]
JOB = "train-2024-06-01-llama"
# A long last log line as PyTorch writes them: `[rank0]:` prefix, bracketed paths, markup look-alikes.
WORDS = ("[rank0]: step 1200/90000 loss 2.4813 lr 3.0e-04 grad_norm 0.913 tok/s 181234 mem 61.2GiB "
         "[/opt/gloo/transport/tcp/pair.cc:553] [bold red]not markup[/] data/shard-00017.bin epoch 3 ")
LONG = (WORDS * 3)[:300].rstrip()
assert len(LONG) >= 290


def show(monkeypatch: pytest.MonkeyPatch, width: int, terminal: bool, fn: Callable[..., Any], *args: Any) -> str:
    """What `fn` prints on stdout, on a terminal `width` columns wide or piped."""
    def make(stderr: bool) -> Console:
        return Console(width=width, force_terminal=terminal, file=io.StringIO(), color_system=None, highlight=False,
                       legacy_windows=False, stderr=stderr)

    out, err = make(False), make(True)
    monkeypatch.setattr(ui, "_console", out)
    monkeypatch.setattr(ui, "_err_console", err)
    with contextlib.suppress(Exit):  # stop and doctor end with their exit code
        fn(*args)
    return out.file.getvalue()


def cells(line: str) -> list[str]:
    """A line's fields: split at box borders (a boxed table) or at runs of two spaces (narrow and plain)."""
    return [c for c in re.split(r"\s*[│┃]\s*|\s{2,}", line.strip(" │┃")) if c]


def row(text: str, *fields: str) -> list[str]:
    """The one line that has all these fields, each a whole cell, in this order."""
    def has(have: list[str]) -> bool:
        rest = iter(have)
        return all(any(c == f for c in rest) for f in fields)  # a subsequence: in order, gaps allowed

    found = [line for line in text.splitlines() if has(cells(line))]
    assert len(found) == 1, f"{len(found)} lines with the cells {fields} in:\n{text}"
    return cells(found[0])


def collapsed(text: str) -> str:
    """Text with borders dropped and whitespace runs made one space: text wrapped at spaces reads whole again."""
    return " ".join(BOX.sub(" ", text).split())


def whole(part: str, text: str) -> bool:
    """Whether `part` is in `text`, every character in order, though wrapped or folded (mid-word too)."""
    return "".join(part.split()) in "".join(BOX.sub("", text).split())


def check_terminal(text: str, width: int) -> None:
    assert "…" not in text and "\x1b" not in text
    assert all(cell_len(line) <= width for line in text.splitlines()), text


def check_piped(text: str) -> None:
    assert "…" not in text and "\x1b" not in text and not BOX.search(text), text


# --- fab status: the job table -------------------------------------------------------------------------------


def state(host: int, rank: int | None, node: int | None, st: str, mode: str = "gpus", job: str = JOB,
          **kw: Any) -> SessionState:
    name = f"rank-{rank}" if mode == "gpus" else f"node-{node}"
    return SessionState(job, mode, HOSTS[host], f"{job}-{name}", rank, node, st, launched="2024-06-01T10:00:00",
                        log=f"/home/me/.fablaunch/jobs/{job}/{HOSTS[host]}/{name}.log", **kw)


STATES = [
    state(0, 0, 0, "running", pid=41234, runtime=3725, last_line=LONG, log_age=2),
    state(0, 1, 0, "running", pid=41235, runtime=3725, last_line="[rank1]: step 1200", log_age=2, detached=True),
    state(1, 2, 1, "failed", exit_code=3, pid=51000, runtime=1805, ended=1717236000.0,
          last_line="[rank2]: ValueError: [/opt/gloo/pair.cc:553] peer closed [/bold]", log_age=300,
          tail=["Traceback (most recent call last):", "ValueError: [/opt/gloo/pair.cc:553] peer closed [/bold]"]),
    state(1, 3, 1, "killed", signal=9, pid=51001, runtime=1806, ended=1717236001.0, last_line="killed", log_age=299),
    state(2, 4, 2, "lost", runtime=None),
]
NODES = [state(0, None, 0, "succeeded", "torchrun", "pretrain", exit_code=0, runtime=50, last_line=LONG, log_age=9),
         state(1, None, 1, "failed", "torchrun", "pretrain", exit_code=1, runtime=51, last_line="done", log_age=8)]


def status_rows(job_states: list[SessionState]) -> list[tuple[str, ...]]:
    """The key fields of each session as the table must show them."""
    return [(s.host, str(s.rank if s.mode == "gpus" else s.node), jobs.shown_state(s), jobs.describe_end(s))
            for s in job_states]


@pytest.mark.parametrize(("width", "terminal"), MODES)
def test_status_keeps_host_rank_state_and_exit_whole(monkeypatch: pytest.MonkeyPatch, width: int,
                                                     terminal: bool) -> None:
    survey = jobs.Survey([*STATES, *NODES], {"node9": "unreachable: timed out"})
    text = show(monkeypatch, width, terminal, jobs.report, survey)
    for s, fields in zip([*STATES, *NODES], status_rows([*STATES, *NODES]), strict=True):
        shown = row(text, *[f for f in fields if f])  # running sessions have no exit yet
        if not terminal or width == 200:
            assert s.session in shown  # with room, or piped, the session is on the row too
    assert "job train-2024-06-01-llama: 5 sessions, 2 running, 1 failed, 1 killed, 1 lost" in collapsed(text)
    assert "job pretrain: 2 sessions, 1 succeeded, 1 failed" in collapsed(text)
    assert "node9: unreachable (unreachable: timed out); its sessions are unknown" in collapsed(text)
    if terminal:
        check_terminal(text, width)
        assert whole(LONG, text)  # wrapped, but whole: nothing cut, no markup eaten
    else:
        check_piped(text)
        lines = [line for line in text.splitlines() if LONG in line]
        assert len(lines) == 2  # the full log line on the row's one line, rank 0's and node 0's
        [line] = [line for line in lines if f"{JOB}-rank-0" in line]
        assert cells(line)[:7] == [HOSTS[0], f"{JOB}-rank-0", "0", "running", "-", "41234", "62m"]
        assert line.endswith(f"{LONG}  (2s ago)")


def test_status_piped_header_is_one_line_and_fields_align() -> None:
    table = jobs.job_table(JOB, STATES)
    lines = table.plain_lines()
    assert lines[0] == f"job {JOB} (gpus)"
    assert cells(lines[1]) == ["host", "session", "rank", "state", "exit", "pid", "run time", "last log line"]
    assert len(lines) == 2 + len(STATES)
    column = lines[1].index("state")
    assert [line[column:].split("  ")[0] for line in lines[2:]] == [jobs.shown_state(s) for s in STATES]


def test_control_characters_stay_visible_in_plain_output(monkeypatch: pytest.MonkeyPatch) -> None:
    evil = state(0, 0, 0, "running", pid=1, runtime=5, log_age=1, last_line="\x1b[2J\rwiped\ttab [b]x[/b]")
    text = show(monkeypatch, 80, False, jobs.report, jobs.Survey([evil], {}))
    assert "\x1b" not in text and "\r" not in text
    assert "\\x1b[2J\\x0dwiped\\ttab [b]x[/b]  (1s ago)" in text


# --- launch and stop ----------------------------------------------------------------------------------------------


LAUNCH_WHY = ("workdir: /home/me/projects/very-long-project-name/experiments/2024-06-01 does not exist on this host; "
              "create it or pass --workdir")


def launch_results() -> None:
    hosts = [parse_host(h, "test") for h in HOSTS]
    plan = SimpleNamespace(hosts=hosts, on=lambda h: [0] * (8 if h is hosts[0] else 4))
    outcomes = {HOSTS[0]: Outcome(hosts[0], 0, seconds=1.234), HOSTS[1]: Outcome(hosts[1], 1, stderr=LAUNCH_WHY,
                                                                                 seconds=0.5)}
    launch._results_table(f"Launch of {JOB} failed", plan, outcomes, {HOSTS[0]: "rolled back"})  # type: ignore[arg-type]


@pytest.mark.parametrize(("width", "terminal"), MODES)
def test_launch_results(monkeypatch: pytest.MonkeyPatch, width: int, terminal: bool) -> None:
    text = show(monkeypatch, width, terminal, launch_results)
    assert row(text, HOSTS[0], "8", "1.23")
    assert row(text, HOSTS[1], "4", "0.50")
    assert row(text, HOSTS[2], "4")
    for result in ("started; rolled back", LAUNCH_WHY, "not attempted"):
        assert whole(result, text)
    if terminal:
        check_terminal(text, width)
    else:
        check_piped(text)
        assert row(text, HOSTS[1], "4", "0.50", LAUNCH_WHY)


STOPPED = [
    (None, Stopped(HOSTS[0], f"{JOB}, eval-2024-06-01", 12, 2, "stopped",
                   ((f"{JOB}-rank-0@h", "INT"), (f"{JOB}-rank-1@h", "INT"), ("eval-2024-06-01-node-0@h", "TERM")))),
    (JOB, Stopped(HOSTS[1], JOB, 3, 1, "2 processes survived SIGKILL",
                  ((f"{JOB}-rank-2@h", "KILL"), (f"{JOB}-rank-3@h", "survived")))),
    (JOB, Stopped(HOSTS[2], result="unreachable: ssh: connect to host node3.cluster.example.com port 22: "
                                   "Connection timed out")),
]


@pytest.mark.parametrize(("width", "terminal"), MODES)
def test_stop_results(monkeypatch: pytest.MonkeyPatch, width: int, terminal: bool) -> None:
    text = show(monkeypatch, width, terminal, jobs._report_stop, JOB, STOPPED)
    assert row(text, HOSTS[0], "12", "2")
    assert row(text, HOSTS[1], "3", "1")
    assert row(text, HOSTS[2])
    for _, d in STOPPED:
        assert whole(d.result, text)
    for words in ("exited on SIGINT", "needed SIGTERM", "rank 2: KILL needed", "survived SIGKILL"):
        assert whole(words, text)
    if terminal:
        check_terminal(text, width)
    else:
        check_piped(text)
        assert row(text, HOSTS[1], JOB, "3", "1", "rank 2: KILL needed; rank 3: survived SIGKILL")
        assert row(text, HOSTS[0], f"{JOB}-rank-0, {JOB}-rank-1: exited on SIGINT; eval-2024-06-01-node-0: "
                                   "needed SIGTERM")
        assert row(text, HOSTS[2], JOB, "-", "-", "-", STOPPED[2][1].result)


def test_stop_results_as_json_say_how_each_rank_ended(capsys: pytest.CaptureFixture[str]) -> None:
    with contextlib.suppress(Exit):
        jobs._report_stop(JOB, STOPPED[1:2], True)
    data = json.loads(capsys.readouterr().out)
    assert data == [{"host": HOSTS[1], "jobs": JOB, "processes": 3, "sessions": 1,
                     "result": "2 processes survived SIGKILL",
                     "ended": [{"session": f"{JOB}-rank-2", "who": "rank 2", "how": "KILL needed"},
                               {"session": f"{JOB}-rank-3", "who": "rank 3", "how": "survived SIGKILL"}]}]


def test_nothing_to_stop_on_one_host(monkeypatch: pytest.MonkeyPatch) -> None:
    text = show(monkeypatch, 80, False, jobs._report_stop, JOB, [(JOB, Stopped(HOSTS[0], "", 0, 0, "nothing to stop"))])
    assert text == f"Nothing to stop for {JOB} on 1 host.\n"


# --- doctor -----------------------------------------------------------------------------------------------------


def doctor_results() -> dict[str, dict[str, doctor.Check]]:
    def checks(torch: str, gpus: doctor.Check, port: doctor.Check) -> dict[str, doctor.Check]:
        return {"ssh": doctor.ok(0.04, "0.04s"), "tmux": doctor.ok("3.4"), "workdir": doctor.ok(True, "812.3 GiB"),
                "code": doctor.ok(True, "matches"),
                "python": doctor.ok("3.11.7"), "torch": doctor.ok(torch), "cuda": doctor.ok("12.4"),
                "nccl": doctor.ok("2.21.5"), "gpus": gpus, "port": port, "tcp": doctor.ok(True, "ok"),
                "clock": doctor.ok(0.01, "+0.01±0.00s"), "nofile": doctor.ok(1048576, "1048576"),
                "disk": doctor.ok(1, "812.3 GiB"), "state_dir": doctor.ok(1, "97.1 GiB"),
                "job": doctor.ok(None, "none"),
                "py_spy": doctor.warn(None, "missing", doctor.PY_SPY_HINT)}

    return {HOSTS[0]: checks("2.5.1+cu124", doctor.ok(8, "8/8"), doctor.ok(True, "free")),
            HOSTS[1]: checks("2.3.0+cu121", doctor.fail(4, "4/8", "4 GPUs, but the host file gives this host 8 ranks"),
                             doctor.skip())}


def doctor_report() -> None:
    results = doctor_results()
    doctor.report(results, SimpleNamespace(master_addr="10.0.0.1", port=29500, workdir="/home/me/project"))  # type: ignore[arg-type]


@pytest.mark.parametrize(("width", "terminal"), MODES)
def test_doctor_keeps_host_and_every_check_value_whole(monkeypatch: pytest.MonkeyPatch, width: int,
                                                       terminal: bool) -> None:
    text = show(monkeypatch, width, terminal, doctor_report)
    labels = [doctor.LABELS.get(n, n) for n in doctor.CHECKS]
    for host, checks in doctor_results().items():
        values = [checks[n].text or "-" for n in doctor.CHECKS]
        if terminal and width == 80:  # what does not fit beside the host goes under it, as `label: value`
            lead = row(text, host)
            assert lead == [host, *values[:len(lead) - 1]]
            for label, value in list(zip(labels, values, strict=True))[len(lead) - 1:]:
                assert f"{label}: {value}" in text
        else:
            assert row(text, host, *values) == [host, *values]
    assert "FAIL node2.cluster.example.com gpus: 4 GPUs, but the host file gives this host 8 ranks" in collapsed(text)
    if terminal:
        check_terminal(text, width)
    else:
        check_piped(text)
        assert row(text, "host", *labels)


# --- top ----------------------------------------------------------------------------------------------------------


def snapshot() -> top.Snapshot:
    gpus = [top.Gpu(i, f"GPU-{i}", 97.0 + i % 3, 650.0 - i, 700.0, 61440.0, 81920.0) for i in range(8)]
    samples = [top.HostSample(HOSTS[0], top.OK, gpus=gpus, processes=8),
               top.HostSample(HOSTS[1], top.NO_GPU, "No devices were found"),
               top.HostSample(HOSTS[2], top.UNREACHABLE, "ssh: connect to host port 22: Connection timed out")]
    why = ["log silent for 12m", "GPU 3 at 11% of power limit (near idle)"]
    flagged = [top.Flag(HOSTS[0], f"{JOB}-rank-3", 3, 0, why)]
    return top.Snapshot(1717236000.0, samples, JOB, states=STATES[:2], flagged=flagged)


@pytest.mark.parametrize(("width", "terminal"), MODES)
def test_top_keeps_host_and_figures_whole(monkeypatch: pytest.MonkeyPatch, width: int, terminal: bool) -> None:
    snap = snapshot()
    text = show(monkeypatch, width, terminal, lambda: ui.emit(top.render(snap)))
    for s in snap.samples:
        row(text, s.host, *[f for f in top._figures(s.totals()) if f])
    row(text, "cluster", *top._figures(top.totals(snap.samples)))
    assert whole(top._per_gpu(snap.samples[0].gpus), text)
    assert whole("no GPU: No devices were found", text)
    assert f"job {JOB}: 1 of 2 running sessions looks hung" in collapsed(text)
    row(text, HOSTS[0], "rank 3")
    assert whole("log silent for 12m; GPU 3 at 11% of power limit (near idle)", text)
    assert "fab top: 3 hosts at" in text
    if terminal:
        check_terminal(text, width)
    else:
        check_piped(text)
        assert row(text, HOSTS[0], *top._figures(snap.samples[0].totals()), top._per_gpu(snap.samples[0].gpus))
        assert row(text, HOSTS[0], f"{JOB}-rank-3", "rank 3", "; ".join(snap.flagged[0].reasons))


# --- fab errors: later failures -------------------------------------------------------------------------------------


def failure(host: int, kind: str, rank: int | None, node: int | None, local: int | None, t: float,
            **kw: Any) -> Failure:
    return Failure(JOB, HOSTS[host], f"{JOB}-x", kind, rank, node, local, t, **kw)


FAILURES = [
    failure(0, "worker", None, 1, 3, 100.0, exc_type="ValueError", message="[rank3]: bad batch [/data/x.bin]",
            traceback="Traceback (most recent call last):\n  File \"train.py\", line 9\nValueError: bad batch"),
    failure(1, "worker", None, 2, 0, 100.53, exc_type="RuntimeError",
            message="[/opt/gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:41231 while waiting "
                    "for the collective ALLREDUCE on process group 0 after 1800 seconds"),
    failure(2, "node", None, 2, None, 101.0, exit_code=1),
    failure(1, "rank", 7, None, None, 164.25, signal=9),
]


@pytest.mark.parametrize(("width", "terminal"), MODES)
def test_errors_later_failures(monkeypatch: pytest.MonkeyPatch, width: int, terminal: bool) -> None:
    text = show(monkeypatch, width, terminal, failures.report, JOB, FAILURES)
    assert f"job {JOB}: 4 failures; first: node 1 worker 3 on {HOSTS[0]}" in collapsed(text)
    for f, after in zip(FAILURES[1:], ("+0.53s", "+1.00s", "+64.25s"), strict=True):
        row(text, after, f.host, f.who)
        assert whole(failures.describe(f), text)
    if terminal:
        check_terminal(text, width)
    else:
        assert "\x1b" not in text and "…" not in text
        assert row(text, "+0.53s", HOSTS[1], "node 2 worker 0", failures.describe(FAILURES[1]))


# --- live displays and plurals --------------------------------------------------------------------------------------


def test_no_progress_bar_or_live_display_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    def use() -> None:
        with ui.progress("launching", 3) as advance:
            advance()
        with ui.live(stderr=True) as live:
            live.update(jobs.job_table(JOB, STATES), refresh=True)
            live.stop()

    show(monkeypatch, 80, False, use)
    assert ui._err_console.file.getvalue() == ""


def test_plural() -> None:
    assert [ui.plural(n, "session") for n in (0, 1, 2)] == ["0 sessions", "1 session", "2 sessions"]
    assert ui.plural(1, "process") == "1 process" and ui.plural(3, "process") == "3 processes"
    assert ui.plural(1, "GPU") == "1 GPU" and ui.plural(2, "other host") == "2 other hosts"
    assert jobs.summary(JOB, STATES[:1]) == [f"job {JOB}: 1 session, 1 running"]


# --- status: this project's jobs, newest first, old finished ones folded ------------------------------------------


def test_status_shows_newest_first_folds_old_finished_jobs_and_counts_other_projects(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = 1_800_000_000.0

    def job_states(name: str, launched: str, st: str, ended: float | None) -> list[SessionState]:
        return [SessionState(name, "gpus", "node1", f"{name}-rank-0", 0, 0, st, ended=ended, launched=launched,
                             exit_code=0 if st == "succeeded" else None)]

    survey_ = jobs.Survey([*job_states("old-done", "2024-01-01T00:00:00", "succeeded", now - 3 * 86400),
                           *job_states("new-run", "2024-03-01T00:00:00", "running", None),
                           *job_states("mid-done", "2024-02-01T00:00:00", "succeeded", now - 3600),
                           *job_states("theirs", "2024-04-01T00:00:00", "running", None)], {})
    mine = {"old-done", "new-run", "mid-done"}
    text = show(monkeypatch, 200, False, jobs.report, survey_, mine, True, now)
    assert text.index("job new-run") < text.index("job mid-done")  # newest first
    assert "job old-done" not in text and "1 finished job older than a day: old-done" in text
    assert "job theirs" not in text and "1 other job on these hosts, not launched from this directory: theirs" in text
    everything = show(monkeypatch, 200, False, jobs.report, survey_, None, False, now)
    assert all(f"job {name}" in everything for name in (*mine, "theirs"))
