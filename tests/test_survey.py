"""The survey payload run by a real bash over job files laid out as a launch leaves them, then parsed.

No SSH and no tmux server: HOME points at a scratch directory and TMUX_TMPDIR at an empty one, so
the dump shows files only and every session without a live tmux session is ended or lost.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from fablaunch import survey
from fablaunch.hostfile import parse_host

HOST = parse_host("node1", "test")
ERROR = {"message": {"message": "ValueError: boom",
                     "extraInfo": {"py_callstack": "Traceback ...\nValueError: boom\n", "timestamp": "100"}}}


def job_dir(home: Path, job: str, mode: str, stems: list[str]) -> Path:
    d = home / ".fablaunch" / "jobs" / job / "node1"
    d.mkdir(parents=True)
    sessions = [{"session": f"{job}-{stem}", "host": "node1", "rank": i if mode == "gpus" else None, "node": 0}
                for i, stem in enumerate(stems)]
    (d / "manifest.json").write_text(json.dumps({"job": job, "mode": mode, "launched": "2026-11-24T10:00:00",
                                                 "sessions": sessions}))
    return d


def dump(home: Path, job: str | None) -> list[survey.SessionState]:
    env = {**os.environ, "HOME": str(home), "TMUX_TMPDIR": str(home / "no-tmux")}
    (home / "no-tmux").mkdir(exist_ok=True)
    out = subprocess.run(["bash", "-s"], input=survey.payload(HOST, job), env=env, capture_output=True, text=True,
                         errors="replace", check=True).stdout
    return survey.parse(HOST, out)


def exit_record(d: Path, stem: str, code: int, end: float) -> None:
    (d / f"{stem}.exit").write_text(json.dumps({"exit_code": code, "start_time": end - 5, "end_time": end}))


def test_states_come_from_exit_records_and_a_session_without_one_is_lost(tmp_path: Path) -> None:
    d = job_dir(tmp_path, "j", "gpus", ["rank-0", "rank-1", "rank-2", "rank-3"])
    exit_record(d, "rank-0", 0, 1000.0)
    exit_record(d, "rank-1", 3, 1001.0)
    exit_record(d, "rank-2", 128 + 9, 1002.0)
    (d / "rank-1.log").write_text("starting\n\ntraceback line\r\nlast words\n")
    states = {s.rank: s for s in dump(tmp_path, "j")}
    assert [(states[r].state, states[r].exit_code, states[r].signal) for r in range(4)] == [
        ("succeeded", 0, None), ("failed", 3, None), ("killed", None, 9), ("lost", None, None)]
    assert states[1].last_line == "last words" and states[1].tail[0] == "starting"
    assert states[1].log.endswith("/.fablaunch/jobs/j/node1/rank-1.log")
    assert survey.first_failure(list(states.values())) is states[1]


def test_an_error_file_is_read_and_its_time_makes_the_rank_fail_first(tmp_path: Path) -> None:
    d = job_dir(tmp_path, "j", "gpus", ["rank-0", "rank-1"])
    exit_record(d, "rank-0", 1, 1001.0)
    exit_record(d, "rank-1", 1, 1003.0)  # exited last (a slow teardown) ...
    (d / "rank-1.error.json").write_text(json.dumps(ERROR))
    os.utime(d / "rank-1.error.json", (1000.5, 1000.5))  # ... but raised first
    states = {s.rank: s for s in dump(tmp_path, "j")}
    assert survey.error_message(states[1].error) == "ValueError: boom"
    assert states[1].failed_at == 1000.5 and states[0].failed_at == 1001.0
    assert survey.first_failure(list(states.values())) is states[1]


def test_torchrun_worker_error_files_are_found_under_the_log_dir(tmp_path: Path) -> None:
    d = job_dir(tmp_path, "t", "torchrun", ["node-0"])
    exit_record(d, "node-0", 1, 1005.0)
    worker = d / "node-0.torchrun" / "t_abc123" / "attempt_1" / "3" / "error.json"
    worker.parent.mkdir(parents=True)
    worker.write_text(json.dumps(ERROR))
    os.utime(worker, (1004.25, 1004.25))
    (state,) = dump(tmp_path, "t")
    (w,) = state.worker_errors
    assert (w.local_rank, w.attempt, w.mtime, w.path) == (3, 1, 1004.25, str(worker))
    assert survey.error_message(w.error) == "ValueError: boom"
    assert "worker_errors" not in state.as_json()


def test_without_a_job_every_job_on_the_host_is_surveyed_and_earlier_runs_are_not(tmp_path: Path) -> None:
    job_dir(tmp_path, "a", "gpus", ["rank-0"])
    job_dir(tmp_path, "b", "torchrun", ["node-0"])
    previous = tmp_path / ".fablaunch" / "jobs" / "a" / ".previous" / "node1-1.5"
    previous.mkdir(parents=True)
    (previous / "manifest.json").write_text((tmp_path / ".fablaunch/jobs/a/node1/manifest.json").read_text())
    assert sorted((s.job, s.mode) for s in dump(tmp_path, None)) == [("a", "gpus"), ("b", "torchrun")]
    assert [s.job for s in dump(tmp_path, "b")] == ["b"]


def test_a_host_with_no_jobs_and_no_tmux_server_dumps_nothing(tmp_path: Path) -> None:
    assert dump(tmp_path, None) == []


# --- nothing a rank writes is protocol ------------------------------------------------------------------------


def test_a_log_that_prints_section_lines_and_forged_records_changes_no_state(tmp_path: Path) -> None:
    d = job_dir(tmp_path, "j", "gpus", ["rank-0", "rank-1"])
    forged = [
        "\x1eNOW not-a-number",
        f"\x1eFILE {d}/rank-0.exit", '{"exit_code": 0, "start_time": 1, "end_time": 2}',
        f"{survey.SEP[:3]}MANIFEST {d}", '{"job": 1}',
        f"==> {d}/rank-1.log <==", "injected into rank 1",
        "[rank0]: [/pair.cc:553] last",
    ]
    (d / "rank-0.log").write_text("\n".join(forged) + "\n")
    states = {s.rank: s for s in dump(tmp_path, "j")}
    assert (states[0].state, states[0].exit_code) == ("lost", None)  # no record was written, none was forged
    assert states[0].last_line == "[rank0]: [/pair.cc:553] last"
    assert states[0].tail[0].startswith(survey.SEP[:3])  # shown as the rank's text, not taken as a section
    assert states[1].tail == []  # the forged tail header put nothing into rank 1's log


def test_the_section_boundary_is_random_per_process() -> None:
    code = "from fablaunch import survey; print(survey.SEP[1:])"
    other = subprocess.run(["python3", "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert survey.SEP.startswith("\x1e") and len(survey.SEP) > 8 and other != survey.SEP[1:]


def test_an_exit_record_of_another_run_is_not_this_runs(tmp_path: Path) -> None:
    d = job_dir(tmp_path, "j", "gpus", ["rank-0", "rank-1"])
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**manifest, "run": "new"}))
    (d / "rank-0.exit").write_text(json.dumps({"run": "old", "exit_code": 137, "start_time": 1, "end_time": 2}))
    (d / "rank-1.exit").write_text(json.dumps({"run": "new", "exit_code": 3, "start_time": 1, "end_time": 2})
                                   + " " * 200 + "\n")  # padded, as the session script writes it
    states = {s.rank: s for s in dump(tmp_path, "j")}
    assert (states[0].state, states[0].signal) == ("lost", None)
    assert (states[1].state, states[1].exit_code) == ("failed", 3)


def test_a_placeholder_record_without_a_live_session_is_lost_not_succeeded(tmp_path: Path) -> None:
    d = job_dir(tmp_path, "j", "gpus", ["rank-0"])
    (d / "rank-0.exit").write_text('{"run": "", "exit_code": null, "start_time": 5.5, "end_time": null}\n')
    (state,) = dump(tmp_path, "j")
    assert (state.state, state.exit_code) == ("lost", None)


def test_a_damaged_manifest_or_record_is_skipped_and_the_other_jobs_are_still_shown(tmp_path: Path) -> None:
    good = job_dir(tmp_path, "good", "gpus", ["rank-0"])
    exit_record(good, "rank-0", 0, 10.0)
    bad = job_dir(tmp_path, "bad", "gpus", ["rank-0", "rank-1"])
    (bad / "manifest.json").write_text(json.dumps({"job": "bad", "mode": "gpus", "sessions": [{"session": 5}, 7]}))
    worse = job_dir(tmp_path, "worse", "gpus", ["rank-0"])
    (worse / "manifest.json").write_bytes(b"\xff\xfe not json")
    (good / "rank-0.exit").write_text('{"exit_code": "zero", "end_time": "soon"}')
    states = dump(tmp_path, None)
    assert [(s.job, s.state) for s in states] == [("good", "lost")]


def test_a_process_of_a_session_whose_tmux_server_died_makes_it_running_detached() -> None:
    out = "\n".join([
        f"{survey.SEP}NOW 100.0", f"{survey.SEP}TMUX", f"{survey.SEP}PROCS",
        "/proc/4242/environ:FABLAUNCH_SESSION=j-rank-0@node1",
        "/proc/4243/environ:FABLAUNCH_SESSION=j-rank-0@node1",
        "/proc/99/environ:FABLAUNCH_SESSION=j-rank-1@node1b",  # another host's label: not this host's rank 1
        "FABLAUNCH_SESSION=j-rank-1@node1",  # not a /proc line: a value with a newline in it
        f"{survey.SEP}MANIFEST /h/.fablaunch/jobs/j/node1",
        json.dumps({"job": "j", "mode": "gpus", "run": "r", "sessions": [
            {"session": "j-rank-0", "host": "node1", "rank": 0, "node": 0},
            {"session": "j-rank-1", "host": "node1", "rank": 1, "node": 0}]}),
        f"{survey.SEP}FILE /h/.fablaunch/jobs/j/node1/rank-0.exit",
        '{"run": "r", "exit_code": null, "start_time": 40.0, "end_time": null}',
    ])
    states = {s.rank: s for s in survey.parse(HOST, out)}
    assert (states[0].state, states[0].detached, states[0].pid, states[0].runtime) == ("running", True, 4242, 60.0)
    assert (states[1].state, states[1].detached) == ("lost", False)
