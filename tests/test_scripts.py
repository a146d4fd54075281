"""The shell fablaunch sends to hosts: session scripts run for real with bash, payloads checked as text."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fablaunch import scripts, tmux
from fablaunch.hostfile import parse_host
from fablaunch.plan import TAG_VAR, Plan, RemotePath, Session, plan_gpus, plan_torchrun, tag
from fablaunch.spec import JobSpec

JOB = "rt-job"
LAUNCHED = "2026-11-24T11:30:00+00:00"

pytestmark = pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")

DUMP = """\
import json, os, sys
from pathlib import Path
keys = [k for k in os.environ if k.startswith("V_")] + [
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_ERROR_FILE", "FABLAUNCH_TAG", "OMP_NUM_THREADS"]
out = {"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}, "cwd": os.getcwd()}
Path(__file__).with_name("out.json").write_text(json.dumps(out))
print("dumped", len(sys.argv) - 1, "args")
sys.exit(int(os.environ.get("V_EXIT", "0")))
"""

NASTY = [
    "two words", "  padded  ", "it's", 'say "hi"', "$HOME", "${PATH}", "`id`", "$(id)", "a;b", "a|b&c",
    "line1\nline2", "\n", "back\\slash", "\\", "é", "日本", "🎉🚀", "-x", "--flag=1", "", "*", "?", "[a]", "~", "~/x",
    "!!", "'\"'\"'", "\t", "\r\n", "#not a comment", "a=b", "%s%d", "\x01\x7f", "end\\",
]


def make_plan(tmp: Path, argv: list[str], env: dict[str, str], workdir: Path | None = None) -> Plan:
    script = tmp / "dump.py"
    script.write_text(DUMP, encoding="utf-8")
    spec = JobSpec(command=[str(script), *argv], env=env)
    return plan_gpus(spec, [parse_host("localhost", "t")], JOB, sys.executable, str(workdir or tmp))


def run_session(tmp: Path, plan: Plan, session: Session | None = None, shell: str = "sh",
                start: list[str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a session script the way tmux would (sh FILE START), with $HOME pointing into tmp.

    `start` is the start time argument (the launch's clock, now); [] runs the script as a user would by hand.
    """
    session = session or plan.sessions[0]
    home_dir = tmp / session.dir.removeprefix("~/")
    home_dir.mkdir(parents=True, exist_ok=True)
    path = tmp / "session.sh"
    path.write_bytes(scripts.encode(scripts.session_script(plan, session, LAUNCHED)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("V_")}
    env.update(HOME=str(tmp), LC_ALL="C.UTF-8")
    args = [f"{time.time():.6f}"] if start is None else start
    return subprocess.run([shell, str(path), *args], env=env, cwd=tmp, capture_output=True, timeout=60,
                          check=False)


def local_file(tmp: Path, remote: RemotePath) -> Path:
    assert remote.startswith("~/")
    return tmp / remote[2:]


def check_round_trip(tmp: Path, argv: list[str], env_values: list[str]) -> None:
    env = {f"V_{i}": v for i, v in enumerate(env_values)}
    plan = make_plan(tmp, argv, env)
    session = plan.sessions[0]
    started = time.time()
    result = run_session(tmp, plan)
    assert result.returncode == 0, result.stderr
    out = json.loads((tmp / "out.json").read_text())
    assert out["argv"] == argv
    for key, value in env.items():
        assert out["env"][key] == value, key
    assert out["env"]["RANK"] == "0"
    assert out["env"]["WORLD_SIZE"] == "1"
    assert out["env"]["OMP_NUM_THREADS"] == "1"
    assert out["env"]["FABLAUNCH_TAG"] == f"{JOB}@localhost"
    # A RemotePath expands `~` on the host: the error file is under this $HOME.
    assert out["env"]["TORCHELASTIC_ERROR_FILE"] == str(local_file(tmp, session.error_file))
    assert out["cwd"] == str(tmp)
    record = json.loads(local_file(tmp, session.exit_file).read_text())
    assert record["exit_code"] == 0
    assert started - 1 < record["start_time"] <= record["end_time"] < time.time() + 1
    assert f"dumped {len(argv)} args" in local_file(tmp, session.log).read_text(encoding="utf-8")
    assert not local_file(tmp, RemotePath(session.exit_file + ".tmp")).exists()


# --- session scripts, executed ---------------------------------------------------------------------------


def test_session_script_round_trips_nasty_argv_exactly(tmp_path: Path) -> None:
    check_round_trip(tmp_path, NASTY, [])


def test_session_script_round_trips_nasty_env_values_exactly(tmp_path: Path) -> None:
    check_round_trip(tmp_path, ["plain"], NASTY)


@pytest.mark.parametrize("value", NASTY)
def test_session_script_round_trips_each_nasty_value_alone(tmp_path: Path, value: str) -> None:
    check_round_trip(tmp_path, [value], [value])


def test_session_script_round_trips_undecodable_bytes(tmp_path: Path) -> None:
    # argv bytes that are not UTF-8 reach Python as surrogate escapes; they must reach the rank as the same bytes.
    raw = os.fsdecode(b"caf\xe9-\xff")
    check_round_trip(tmp_path, [raw], [raw])


# Any text an argv or environment can carry: everything but NUL and lone surrogates (which have no bytes;
# undecodable bytes arrive as surrogate escapes, covered above).
_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=30)


@settings(max_examples=25, deadline=None)
@given(argv=st.lists(_TEXT, max_size=4), env_values=st.lists(_TEXT, max_size=3))
def test_session_script_round_trips_any_text(argv: list[str], env_values: list[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        check_round_trip(Path(d), argv, env_values)


def test_session_script_records_the_commands_exit_code(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, [], {"V_EXIT": "3"})
    result = run_session(tmp_path, plan)
    assert result.returncode == 3
    record = json.loads(local_file(tmp_path, plan.sessions[0].exit_file).read_text())
    assert record["exit_code"] == 3


def test_session_script_with_missing_workdir_logs_it_and_records_exit_1(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, [], {}, workdir=tmp_path / "no such dir")
    result = run_session(tmp_path, plan)
    assert result.returncode == 1
    session = plan.sessions[0]
    assert json.loads(local_file(tmp_path, session.exit_file).read_text())["exit_code"] == 1
    log = local_file(tmp_path, session.log).read_text()
    assert "working directory" in log
    assert "no such dir" in log
    assert not (tmp_path / "out.json").exists()


def test_session_script_appends_to_the_log(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, ["x"], {})
    run_session(tmp_path, plan)
    run_session(tmp_path, plan)
    assert local_file(tmp_path, plan.sessions[0].log).read_text().count("dumped 1 args") == 2


def test_session_script_header_names_job_rank_and_host(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, [], {})
    text = scripts.session_script(plan, plan.sessions[0], LAUNCHED)
    assert text.startswith("#!/bin/sh\n")
    assert f"job {JOB}: rank 0 (local rank 0) on localhost, launched {LAUNCHED}" in text
    for shell in ("sh", "bash"):
        assert subprocess.run([shell, "-n"], input=text.encode(), check=False).returncode == 0, shell


@pytest.mark.skipif(not shutil.which("dash"), reason="needs dash, a strict POSIX sh")
def test_session_script_is_posix_sh_and_bash_runs_it_alike(tmp_path: Path) -> None:
    """tmux starts it with sh (dash on Debian); Slurm's task script, also bash, ends with the same lines."""
    for shell in ("dash", "bash"):
        plan = make_plan(tmp_path, ["a b", "$x"], {"V_EXIT": "4"})
        result = run_session(tmp_path, plan, shell=shell)
        assert result.returncode == 4, (shell, result.stderr)
        assert result.stderr == b"", shell
        assert json.loads((tmp_path / "out.json").read_text())["argv"] == ["a b", "$x"]
        assert json.loads(local_file(tmp_path, plan.sessions[0].exit_file).read_text())["exit_code"] == 4


def test_session_script_records_the_launchs_start_time_or_reads_the_clock_itself(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, [], {})
    exit_file = local_file(tmp_path, plan.sessions[0].exit_file)
    run_session(tmp_path, plan, start=["1700000000.123456"])
    record = json.loads(exit_file.read_text())
    assert record["start_time"] == 1700000000.123456
    assert time.time() - 10 < record["end_time"] <= time.time()
    before = time.time()
    run_session(tmp_path, plan, start=[])  # run by hand: no argument
    record = json.loads(exit_file.read_text())
    assert before - 1 < record["start_time"] <= record["end_time"] <= time.time()
    # Whatever the first argument holds, the record stays JSON.
    for junk in ("", "12,5", "1.2.3", '1}, "exit_code": 0', "$(touch pwned)"):
        run_session(tmp_path, plan, start=[junk])
        assert json.loads(exit_file.read_text())["start_time"] is None or junk == ""
    assert not (tmp_path / "pwned").exists()


@pytest.mark.skipif(not shutil.which("tmux"), reason="needs tmux")
@pytest.mark.parametrize("how", ["ctrl-c", "kill-server"])
def test_a_rank_stopped_in_its_tmux_pane_is_recorded_with_its_signal(tmp_path: Path, how: str,
                                                                    server: dict[str, str]) -> None:
    """Ctrl-C typed into an attached pane ends the rank (130). A killed tmux server does not: the rank
    and its log go on, and when it is stopped later (SIGTERM, as `fab stop` does) the record says so."""
    spec = JobSpec(command=["sh", "-c", "echo up $$; exec sleep 60"])
    plan = plan_gpus(spec, [parse_host("localhost", "t")], JOB, sys.executable, str(tmp_path))
    session = plan.sessions[0]
    local_file(tmp_path, session.log).parent.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "session.sh"
    script.write_bytes(scripts.encode(scripts.session_script(plan, session, LAUNCHED)))
    env = {**server, "HOME": str(tmp_path)}
    record_file, log = local_file(tmp_path, session.exit_file), local_file(tmp_path, session.log)
    subprocess.run(["tmux", "new-session", "-d", "-s", "pane", "sh", str(script), f"{time.time():.6f}"], env=env,
                   check=True)
    deadline = time.monotonic() + 20
    while "up" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = int(log.read_text().split()[1])
    if how == "ctrl-c":
        subprocess.run(["tmux", "send-keys", "-t", "=pane:", "C-c"], env=env, check=True)
    else:
        subprocess.run(["tmux", "kill-server"], env=env, check=True)
        time.sleep(0.5)
        os.kill(pid, 0)  # alive
        assert json.loads(record_file.read_text())["exit_code"] is None
        os.kill(pid, signal.SIGTERM)
    while json.loads(record_file.read_text())["exit_code"] is None and time.monotonic() < deadline:
        time.sleep(0.1)
    record = json.loads(record_file.read_text())
    assert record["exit_code"] == (130 if how == "ctrl-c" else 143)
    assert record["start_time"] <= record["end_time"] <= time.time()
    assert log.read_text() == f"up {pid}\n"


# --- masking ------------------------------------------------------------------------------------------------

SECRETS = {"HF_TOKEN": "hf_abcSECRET1", "AWS_SECRET_ACCESS_KEY": "awsSECRET2", "WANDB_API_KEY": "wbSECRET3",
           "DB_PASSWORD": "pwSECRET4"}
VISIBLE = {"NCCL_DEBUG": "INFO", "SEED": "1234", "DATA_DIR": "/data/imagenet"}


def masked_plan() -> Plan:
    spec = JobSpec(command=["train.py"], env={**SECRETS, **VISIBLE})
    return plan_gpus(spec, [parse_host("a", "t")], JOB, "python", "/w")


def test_mask_hides_secret_looking_values_and_shows_the_rest() -> None:
    plan = masked_plan()
    text = scripts.session_script(plan, plan.sessions[0], LAUNCHED, mask=True)
    for key, value in SECRETS.items():
        assert f"export {key}={scripts.MASK}\n" in text
        assert value not in text
    for key, value in VISIBLE.items():
        assert f"export {key}={shlex.quote(value)}\n" in text
    assert "export RANK=0\n" in text


def test_without_mask_secret_values_are_in_the_script() -> None:
    plan = masked_plan()
    text = scripts.session_script(plan, plan.sessions[0], LAUNCHED)
    for key, value in SECRETS.items():
        assert f"export {key}={value}\n" in text
    assert scripts.MASK not in text


@pytest.mark.parametrize(("key", "secret"), [
    ("HF_TOKEN", True), ("AWS_SECRET_ACCESS_KEY", True), ("WANDB_API_KEY", True), ("GITHUB_AUTH", True),
    ("MY_PASSWORD", True), ("PRIVATE_URL", True), ("DB_PASS", True), ("DB_PASSWD", True), ("MYSQL_PWD", True),
    ("GITHUB_PAT", True), ("PAT", True), ("gitlab_pat", True), ("hf_token", True),
    ("NCCL_DEBUG", False), ("OMP_NUM_THREADS", False), ("RANK", False), ("MASTER_ADDR", False), ("PATH", False),
    ("PATTERN", False), ("PATIENCE", False), ("SPATIAL_DIM", False), ("DATA_DIR", False),
])
def test_is_secret(key: str, secret: bool) -> None:
    assert scripts.is_secret(key) is secret


def test_keys_the_user_marks_are_secret_whatever_their_name() -> None:
    assert scripts.is_secret("MY_DSN", {"MY_DSN"})
    assert not scripts.is_secret("MY_DSN")


@pytest.mark.parametrize(("value", "shown"), [
    ("https://user:hunter2@host/x", "https://user:*****@host/x"),
    ("postgres://u:p@ss:w@db:5432/app?x=1", "postgres://u:*****@db:5432/app?x=1"),
    ("redis://:pw@cache:6379/0", "redis://:*****@cache:6379/0"),
    ("a=mysql://r:one@h1/x,b=mysql://r:two@h2/y", "a=mysql://r:*****@h1/x,b=mysql://r:*****@h2/y"),
    ("http://host:8080/a@b", "http://host:8080/a@b"),  # a port and an '@' in the path: no credentials
    ("https://user@host/x", "https://user@host/x"),  # a user name alone is not a secret
    ("/data/imagenet", "/data/imagenet"),
    ("me@example.com:pw", "me@example.com:pw"),
])
def test_a_password_inside_a_url_is_masked_whatever_the_variable_is_called(value: str, shown: str) -> None:
    assert scripts.masked("DATABASE_URL", value) == shlex.quote(shown)


def test_a_masked_dry_run_script_shows_no_url_password_or_marked_value() -> None:
    env = {"DB_URL": "postgres://app:pgSECRET5@db/x", "MY_DSN": "dsnSECRET6", "DB_PASS": "SECRET7",
           "MYSQL_PWD": "SECRET8", "GITHUB_PAT": "ghp_SECRET9", **VISIBLE}
    spec = JobSpec(command=["train.py"], env=env, secrets=["MY_DSN"])
    for plan in (plan_gpus(spec, [parse_host("a", "t")], JOB, "python", "/w"),
                 plan_torchrun(spec, [parse_host("a", "t")], JOB, "python", "/w")):
        text = scripts.session_script(plan, plan.sessions[0], LAUNCHED, mask=True)
        assert "SECRET" not in text
        assert "export DB_URL='postgres://app:*****@db/x'\n" in text
        for key in ("MY_DSN", "DB_PASS", "MYSQL_PWD", "GITHUB_PAT"):
            assert f"export {key}={scripts.MASK}\n" in text
        for key, value in VISIBLE.items():
            assert f"export {key}={shlex.quote(value)}\n" in text
        assert "pgSECRET5" in scripts.session_script(plan, plan.sessions[0], LAUNCHED)  # only a dry run masks


# --- payloads -----------------------------------------------------------------------------------------------

SECRET_VALUE = "Sup3r s3cret!value-$(nope)"


def test_a_masked_dry_run_script_shows_no_url_password_in_the_command() -> None:
    spec = JobSpec(command=["train.py", "--db", "postgres://app:pgSECRET1@db/x", "--lr", "0.1"])
    plan = plan_gpus(spec, [parse_host("a", "t")], JOB, "python", "/w")
    shown = scripts.session_script(plan, plan.sessions[0], LAUNCHED, mask=True)
    real = scripts.session_script(plan, plan.sessions[0], LAUNCHED)
    assert "pgSECRET1" not in shown and "postgres://app:*****@db/x" in shown and "--lr 0.1" in shown
    assert "postgres://app:pgSECRET1@db/x" in real


def two_host_plan(mode: str = "gpus") -> Plan:
    spec = JobSpec(command=["train.py", "--token-arg", "plainarg"], env={"HF_TOKEN": SECRET_VALUE, "OTHER": "o-v!"})
    hs = [parse_host("a", "t"), parse_host("u@b:2222", "t")]
    if mode == "gpus":
        return plan_gpus(spec, [hs[0], hs[1], hs[0]], JOB, "/py", "/work dir")
    return plan_torchrun(spec, hs, JOB, "/py", "/work dir")


@pytest.mark.parametrize("mode", ["gpus", "torchrun"])
def test_launch_payload_writes_every_script_and_the_manifest_exactly(mode: str, tmp_path: Path) -> None:
    plan = two_host_plan(mode)
    for i, host in enumerate(plan.hosts):
        sessions = plan.on(host)
        home = tmp_path / str(i)
        home.mkdir()
        result = run_payload(home, scripts.launch_payload(plan, sessions, LAUNCHED, checked=True))
        assert result.returncode == 0, result.stderr
        for s in sessions:
            script = local_file(home, s.script).read_bytes()
            assert script == scripts.encode(scripts.session_script(plan, s, LAUNCHED))
            assert shlex.quote(SECRET_VALUE).encode() in script
        manifest = json.loads(local_file(home, RemotePath(f"{sessions[0].dir}/manifest.json")).read_text())
        assert manifest["job"] == JOB
        assert [r["session"] for r in manifest["sessions"]] == [s.name for s in sessions]


def test_readable_launch_payload_shows_no_encoded_files_and_no_secrets() -> None:
    plan = two_host_plan()
    payload = scripts.launch_payload(plan, plan.on(plan.hosts[0]), LAUNCHED, readable=True)
    assert "printf '%s'" not in payload
    assert "# writes" in payload
    assert SECRET_VALUE not in payload


@pytest.mark.parametrize("mode", ["gpus", "torchrun"])
def test_payloads_are_valid_bash(mode: str) -> None:
    plan = two_host_plan(mode)
    texts = [
        *(scripts.kill_payload(job, h, grace=g) for h in plan.hosts for job in (JOB, None) for g in (2, 0.5)),
        scripts.preflight_payload(plan, "/py"),
        scripts.preflight_payload(plan, "python3"),
        scripts.preflight_payload(plan, None),
        *(scripts.launch_payload(plan, plan.on(h), LAUNCHED) for h in plan.hosts),
        *(scripts.launch_payload(plan, plan.on(h), LAUNCHED, readable=True) for h in plan.hosts),
    ]
    for text in texts:
        result = subprocess.run(["bash", "-n"], input=text.encode(), capture_output=True, check=False)
        assert result.returncode == 0, (result.stderr.decode(), text)


def fake_tmux(tmp: Path) -> Path:
    """A `tmux` that logs its argv (one JSON list per line) and lists no sessions."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    tmux_path = bin_dir / "tmux"
    tmux_path.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(tmp / 'tmux.log')!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    tmux_path.chmod(0o755)
    return bin_dir


def run_payload(tmp: Path, payload: str) -> subprocess.CompletedProcess[str]:
    bin_dir = fake_tmux(tmp)
    env = {**os.environ, "HOME": str(tmp), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "-s"], input=payload, env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def test_launch_payload_writes_private_scripts_and_starts_tagged_sessions(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    spec = JobSpec(command=["train.py"], env={"HF_TOKEN": SECRET_VALUE})
    plan = plan_gpus(spec, [parse_host("a", "t")] * 2, JOB, "/py", str(tmp_path / "work"))
    result = run_payload(tmp_path, scripts.launch_payload(plan, list(plan.sessions), LAUNCHED))
    assert result.returncode == 0, result.stderr
    assert "started 2" in result.stdout
    for s in plan.sessions:
        path = local_file(tmp_path, s.script)
        assert path.read_bytes() == scripts.encode(scripts.session_script(plan, s, LAUNCHED))
        assert path.stat().st_mode & 0o777 == 0o600
    calls = [json.loads(line) for line in (tmp_path / "tmux.log").read_text().splitlines()]
    create = calls[-1]
    assert create.count("new-session") == 2
    assert [create[i + 3] for i, a in enumerate(create) if a == "new-session"] == [s.name for s in plan.sessions]


def test_launch_payload_keeps_an_earlier_runs_files(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    plan = plan_gpus(JobSpec(command=["train.py"]), [parse_host("a", "t")], JOB, "/py", str(tmp_path / "work"))
    payload = scripts.launch_payload(plan, list(plan.sessions), LAUNCHED)
    assert run_payload(tmp_path, payload).returncode == 0
    old_log = local_file(tmp_path, plan.sessions[0].log)
    old_log.write_text("first run\n")
    shutil.rmtree(tmp_path / "bin")
    assert run_payload(tmp_path, payload).returncode == 0
    previous = list((old_log.parent.parent / ".previous").iterdir())
    assert len(previous) == 1
    assert (previous[0] / old_log.name).read_text() == "first run\n"
    assert not old_log.exists()


def tagged_sleeps(*tags: str) -> list[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if k != TAG_VAR}
    procs = [subprocess.Popen(["sleep", "60"], env={**env, TAG_VAR: t}) for t in tags]
    time.sleep(0.1)
    return procs


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_kill_payload_stops_exactly_the_jobs_processes_on_that_host(tmp_path: Path) -> None:
    job = f"kill{os.getpid()}-{time.time_ns()}"
    a, b = parse_host("a", "t"), parse_host("b", "t")
    procs = tagged_sleeps(tag(job, a), tag(job + "x", a), tag(job, b))
    try:
        result = run_payload(tmp_path, scripts.kill_payload(job, a, grace=1))
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["sent INT 1", "remain INT 0", "found=1 left=0 sessions=0 jobs="]
        assert procs[0].wait(timeout=10) == -signal.SIGINT
        assert procs[1].poll() is None
        assert procs[2].poll() is None
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_kill_payload_without_a_job_stops_every_job_on_that_host_only(tmp_path: Path) -> None:
    job = f"kill{os.getpid()}-{time.time_ns()}"
    a, ua = parse_host(f"h{os.getpid()}:2222", "t"), parse_host(f"u@h{os.getpid()}:2222", "t")
    procs = tagged_sleeps(tag(job, a), tag(job + "x", a), tag(job, ua))
    try:
        result = run_payload(tmp_path, scripts.kill_payload(None, a, grace=1))
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1].startswith("found=2 left=0 sessions=0")
        assert procs[0].wait(timeout=10) == procs[1].wait(timeout=10) == -signal.SIGINT
        assert procs[2].poll() is None
    finally:
        for p in procs:
            p.kill()
            p.wait()


STUBBORN = """
import signal, sys, time
for name in sys.argv[1:]:
    signal.signal(getattr(signal, name), signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_kill_payload_tells_each_signal_and_how_each_session_ended(tmp_path: Path) -> None:
    job = f"kill{os.getpid()}-{time.time_ns()}"
    a = parse_host("a", "t")
    env = {k: v for k, v in os.environ.items() if k != TAG_VAR}
    procs = []
    for rank, deaf in enumerate([[], ["SIGINT"], ["SIGINT", "SIGTERM"]]):
        marker = {TAG_VAR: tag(job, a), scripts.SESSION_VAR: f"{job}-rank-{rank}@a"}
        procs.append(subprocess.Popen([sys.executable, "-c", STUBBORN, *deaf], env={**env, **marker},
                                      stdout=subprocess.PIPE))
    hostile = {TAG_VAR: tag(job, a), scripts.SESSION_VAR: "* $(touch pwned) x"}
    procs.append(subprocess.Popen([sys.executable, "-c", STUBBORN], env={**env, **hostile}, stdout=subprocess.PIPE))
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        result = run_payload(tmp_path, scripts.kill_payload(job, a, grace=1))
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == "sent INT 4"
        assert "remain INT 2" in lines and "sent TERM 2" in lines and "remain TERM 1" in lines
        assert "sent KILL 1" in lines and "remain KILL 0" in lines
        ended = sorted(line for line in lines if line.startswith("ended "))
        assert ended == [f"ended {job}-rank-0@a INT", f"ended {job}-rank-1@a TERM", f"ended {job}-rank-2@a KILL"]
        assert lines[-1] == "found=4 left=0 sessions=0 jobs="
        assert not (tmp_path / "pwned").exists()
    finally:
        for p in procs:
            p.kill()
            p.wait()


# --- tmux -----------------------------------------------------------------------------------------------------


def tmux_commands(line: str) -> list[list[str]]:
    words = shlex.split(line)
    assert words[0] == "tmux"
    commands: list[list[str]] = [[]]
    for word in words[1:]:
        if word == ";":
            commands.append([])
        else:
            commands[-1].append(word)
    return commands


@pytest.mark.parametrize("mode", ["gpus", "torchrun"])
def test_new_sessions_creates_and_tags_a_few_sessions_in_one_call(mode: str) -> None:
    plan = two_host_plan(mode)
    for host in plan.hosts:
        sessions = plan.on(host)
        commands = tmux_commands(tmux.new_sessions(plan, sessions))
        created = [c for c in commands if c[0] == "new-session"]
        assert len(created) == len(sessions)
        for s, c in zip(sessions, created, strict=True):
            assert c[c.index("-s") + 1] == s.name
            assert "-d" in c
            assert c[c.index("-c") + 1] == plan.workdir
            assert c[-3:] == ["sh", f"$dir/{s.stem}.sh", "$start"]
            options = {c[3]: c[4] for c in commands if c[0] == "set-option" and c[2] == f"={s.name}:"}
            assert options["@fablaunch_job"] == JOB
            assert options["@fablaunch_mode"] == mode
            assert options["@fablaunch_host"] == host.spec
            assert options["@fablaunch_node"] == str(s.node)
            assert options["@fablaunch_rank"] == ("-" if s.rank is None else str(s.rank))
        # Each session is tagged right after it is created, before the next one starts.
        first_tag = next(i for i, c in enumerate(commands) if c[0] == "set-option")
        assert commands[first_tag - 1][0] == "new-session"


def test_list_command_filters_by_job() -> None:
    words = shlex.split(tmux.list_command(JOB))
    assert words[:2] == ["tmux", "list-sessions"]
    assert words[words.index("-f") + 1] == f"#{{==:#{{@fablaunch_job}},{JOB}}}"
    assert words[words.index("-F") + 1].split(tmux.FIELD_SEP) == [f"#{{{f}}}" for f in tmux.FIELDS]


def test_sh_expands_home_only_for_remote_paths(tmp_path: Path) -> None:
    words = [scripts.sh(RemotePath("~/a b/$x")), scripts.sh("~/a b"), scripts.sh("$HOME")]
    result = subprocess.run(["bash", "-c", "printf '%s\\n' " + " ".join(words)], env={"HOME": str(tmp_path)},
                            capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == [f"{tmp_path}/a b/$x", "~/a b", "$HOME"]
