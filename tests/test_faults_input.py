"""Bad input through the real `fab` CLI (issue 8): exit code 2, the place named, no traceback, nothing launched.

Every case fails before any host is contacted, so each costs one `fab` start. Each names what it
feeds (a flag, a host file line, a spec key) and the words stderr must carry; the test then checks
that no tmux session of the job exists on any fake host and no process carries the job's marker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from fablaunch.hostfile import MAX_SLOTS
from fablaunch.spec import MAX_PARALLEL, MAX_TOTAL_BYTES, MAX_VALUE_BYTES
from fablaunch.tasks.flags import MAX_SECONDS
from tests.conftest import Fab, live_pids, master_port, sessions

GPUS = "node1\nnode2\nnode3\n"
HOSTS = "node1 slots=1\nnode2 slots=1\nnode3 slots=1\n"
# One argument of the `fab` command line may hold at most 131072 bytes (Linux's MAX_ARG_STRLEN), so
# values over fablaunch's own limit but under that one are the largest a flag can carry.
OVER_LIMIT = "x" * (MAX_VALUE_BYTES + 1000)


@dataclass
class Case:
    """One bad input: the `fab` arguments ({job} and {port} filled in), files to write, what stderr must say."""

    args: list[str]
    says: list[str]
    files: dict[str, str | bytes] = field(default_factory=dict)


def launch(task: str, *args: str, command: tuple[str, ...] = ("dump.py",)) -> list[str]:
    """A launch of the test's job with these flags and command."""
    return [task, "--job", "{job}", "--port", "{port}", *args, "--", *command]


def gpus(*args: str, command: tuple[str, ...] = ("dump.py",)) -> list[str]:
    return launch("launch-gpus", *args, command=command)


def torchrun(*args: str, command: tuple[str, ...] = ("dump.py",)) -> list[str]:
    return launch("launch-torchrun", *args, command=command)


def with_spec(text: str | bytes, *args: str) -> Case:
    """A per-GPU launch with this spec file; stderr must name the file."""
    return Case(gpus("--spec", "job.yaml", *args), ["job.yaml"], {"job.yaml": text})


def spec_case(text: str | bytes, *says: str) -> Case:
    case = with_spec(text)
    case.says += list(says)
    return case


SPEC_BIG_ENV = "env:\n" + "".join(f"  V{i}: '{'x' * (MAX_VALUE_BYTES - 100)}'\n"
                                  for i in range(MAX_TOTAL_BYTES // MAX_VALUE_BYTES + 1))

CASES = {
    # 1. spec files that are not text
    "spec-binary": spec_case(b"\x00\xff\xfe\x01\x02binary", "not a text YAML file"),
    "spec-png": spec_case(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "not a text YAML file"),
    "spec-latin1": spec_case("name: caf\u00e9\n".encode("latin-1"), "not a text YAML file"),
    # 2. seconds: finite, at most a week
    **{f"grace-{v}": Case(["stop", "--job", "{job}", "--gpus", "gpus", "--grace", v], ["--grace:"])
       for v in ("nan", "inf", "-inf", "1e300", str(MAX_SECONDS + 1), "\uff11\uff10", "-1")},
    **{f"top-stall-{v}": Case(["top", "--once", "--job", "{job}", "--gpus", "gpus", "--stall", v], ["--stall:"])
       for v in ("nan", "inf", "1e300")},
    "top-interval-inf": Case(["top", "--once", "--gpus", "gpus", "--interval", "inf"], ["--interval:"]),
    "timeout-nan": Case(["wait", "--job", "{job}", "--gpus", "gpus", "--timeout", "nan"], ["--timeout:"]),
    "timeout-huge": Case(["wait", "--job", "{job}", "--gpus", "gpus", "--timeout", "1" * 400], ["--timeout:"]),
    # 3. --parallel: 0 is not "the default", and there is a ceiling
    **{f"status-parallel-{v}": Case(["status", "--job", "{job}", "--gpus", "gpus", "--parallel", v],
                                    ["--parallel:"]) for v in ("0", "-1", str(MAX_PARALLEL + 1), "9" * 30)},
    "status-parallel-zero-says-at-least-1": Case(["status", "--job", "{job}", "--gpus", "gpus", "--parallel", "0"],
                                                 ["--parallel: must be at least 1"]),
    "stop-parallel-0": Case(["stop", "--job", "{job}", "--gpus", "gpus", "--parallel", "0"], ["--parallel:"]),
    "launch-parallel-0": Case(gpus("--parallel", "0"), ["--parallel:"]),
    "torchrun-parallel-huge": Case(torchrun("--parallel", str(MAX_PARALLEL + 1)), ["--parallel:"]),
    "doctor-parallel-0": Case(["doctor", "--gpus", "gpus", "--parallel", "0"], ["--parallel:"]),
    # 4. a blank program to run
    "command-empty": Case(gpus(command=("",)), ["command:", "blank"]),
    "command-empty-then-args": Case(gpus(command=("", "train.py")), ["command:", "blank"]),
    "command-only-blanks": Case(torchrun(command=(" ", "", "\t")), ["command:", "blank"]),
    "spec-command-empty-first": Case(launch("launch-gpus", "--spec", "job.yaml", command=()), ["command:", "blank"],
                                     {"job.yaml": 'command: ["", dump.py]\n'}),
    # 5. an empty user or host around '@'
    "gpus-empty-user": Case(gpus("--gpus", "gpus"), ["gpus:2:", "nothing before '@'"], {"gpus": "node1\n@node2\n"}),
    "gpus-empty-host": Case(gpus("--gpus", "gpus"), ["gpus:1:", "no host name after '@'"], {"gpus": "root@\n"}),
    "hosts-empty-user": Case(torchrun("--hosts", "hosts"), ["hosts:3:", "nothing before '@'"],
                             {"hosts": "node1\nnode2\n@node3 slots=1\n"}),
    "status-hosts-empty-user": Case(["status", "--job", "{job}", "--hosts", "hosts"], ["hosts:1:"],
                                    {"hosts": "@node1\n"}),
    # 6. numbers in ASCII digits only, slots capped
    "gpus-fullwidth-port": Case(gpus("--gpus", "gpus"), ["gpus:1:", "port"],
                                {"gpus": "node1:\uff12\uff12\uff12\uff12\n"}),
    "hosts-fullwidth-slots": Case(torchrun("--hosts", "hosts"), ["hosts:1:", "slots"],
                                  {"hosts": "node1 slots=\uff18\n"}),
    "hosts-huge-slots": Case(torchrun("--hosts", "hosts"), ["hosts:1:", f"at most {MAX_SLOTS}"],
                             {"hosts": "node1 slots=99999999999999999999\n"}),
    "port-fullwidth": Case(["launch-gpus", "--job", "{job}", "--port", "\uff15\uff10\uff10\uff11", "--", "dump.py"],
                           ["--port:", "0-9"]),
    "port-padded": Case(["launch-gpus", "--job", "{job}", "--port", " 5001 ", "--", "dump.py"], ["--port:"]),
    "port-underscore": Case(["launch-gpus", "--job", "{job}", "--port", "5_001", "--", "dump.py"], ["--port:"]),
    "doctor-port-fullwidth": Case(["doctor", "--gpus", "gpus", "--port", "\uff15"], ["--port:"]),
    "nproc-fullwidth": Case(torchrun("--nproc-per-node", "\uff18"), ["--nproc-per-node:"]),
    "max-restarts-fullwidth": Case(torchrun("--max-restarts", "\uff11"), ["--max-restarts:"]),
    "logs-tail-fullwidth": Case(["logs", "--job", "{job}", "--gpus", "gpus", "--tail", "\uff11\uff12"], ["--tail:"]),
    "logs-rank-padded": Case(["logs", "--job", "{job}", "--gpus", "gpus", "--rank", " 1 "], ["--rank:"]),
    "spec-port-octal": spec_case("port: 05001\n", "key 'port'", "decimal"),
    # 7. the torchrun environment contract is fablaunch's
    **{f"env-{key}": Case(gpus("--env", f"{key}=7"), [f"--env: {key} is set by fablaunch"])
       for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                   "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "FABLAUNCH_TAG", "TORCHELASTIC_ERROR_FILE")},
    "env-master-port": Case(gpus("--env", "MASTER_PORT=1"), ["--env: MASTER_PORT", "use --port"]),
    "env-master-addr": Case(torchrun("--env", "MASTER_ADDR=10.0.0.9"), ["--env: MASTER_ADDR", "use --master-addr"]),
    "spec-env-world-size": spec_case("env: {WORLD_SIZE: '1'}\n", "key 'env.WORLD_SIZE'", "set by fablaunch"),
    # 8. YAML's silent rewrites of env values and keys
    "spec-env-1.10": spec_case("env:\n  LR: 1.10\n", "key 'env.LR'", 'write "1.10" in quotes'),
    "spec-env-octal": spec_case("env:\n  N: 010\n", "key 'env.N'", "the number 8", 'write "010" in quotes'),
    "spec-env-sexagesimal": spec_case("env:\n  AT: 12:30\n", "key 'env.AT'", "750", 'write "12:30" in quotes'),
    "spec-env-on": spec_case("env:\n  FLAG: on\n", "key 'env.FLAG'", 'write "on" in quotes'),
    "spec-env-yes": spec_case("env:\n  FLAG: yes\n", "key 'env.FLAG'", 'write "yes" in quotes'),
    "spec-env-key-ON": spec_case("env:\n  ON: x\n", "key 'env.ON'", 'write "ON" in quotes'),
    "spec-env-key-NO": spec_case("env:\n  NO: x\n", "key 'env.NO'", 'write "NO" in quotes'),
    # 9. a key given twice
    "spec-duplicate-key": spec_case("port: 6000\nname: x\nport: 6001\n", "key 'port'", "lines 1 and 3"),
    "spec-duplicate-env-key": spec_case("env:\n  A: x\n  A: y\n", "key 'env.A'", "lines 2 and 3"),
    # 10. values exec cannot pass
    "env-value-over-limit": Case(gpus("--env", f"BIG={OVER_LIMIT}"), ["--env:", str(MAX_VALUE_BYTES)]),
    "spec-env-value-200kb": spec_case(f"env: {{BIG: '{'x' * 200_000}'}}\n", "key 'env.BIG'", str(MAX_VALUE_BYTES)),
    "command-arg-over-limit": Case(gpus(command=("dump.py", OVER_LIMIT)), ["command:", str(MAX_VALUE_BYTES)]),
    "env-and-command-total": Case(gpus("--spec", "job.yaml"), ["command and --env:", str(MAX_TOTAL_BYTES)],
                                  {"job.yaml": SPEC_BIG_ENV}),
    # 11. NUL bytes, which no argument, variable or path can hold
    "spec-nul-env": spec_case('env: {V: "a\\0b"}\n', "key 'env.V'", "NUL"),
    "spec-nul-command": Case(launch("launch-gpus", "--spec", "job.yaml", command=()), ["command:", "NUL"],
                             {"job.yaml": 'command: [dump.py, "a\\0b"]\n'}),
    "spec-nul-workdir": Case(gpus("--spec", "job.yaml"), ["--workdir:", "NUL"], {"job.yaml": 'workdir: "/tmp\\0x"\n'}),
    "spec-nul-python": Case(gpus("--spec", "job.yaml"), ["--python:", "NUL"], {"job.yaml": 'python: "/py\\0"\n'}),
    # blank job names and bad secret names
    "job-empty": Case(["launch-gpus", "--job", "", "--", "dump.py"], ["--job:", "not a valid job name"]),
    "job-blank": Case(["launch-torchrun", "--job", "  ", "--", "dump.py"], ["--job:", "not a valid job name"]),
    **{f"{task}-job-{label}": Case([task, "--job", name, "--gpus", "gpus", *more], ["--job:", "not a valid job name"])
       for label, name in (("empty", ""), ("blank", " "))
       for task, *more in (["status"], ["stop"], ["wait"], ["logs"], ["errors"], ["dump"], ["top", "--once"],
                           ["doctor"])},
    "dump-rank-fullwidth": Case(["dump", "--job", "{job}", "--gpus", "gpus", "--rank", "\uff11"], ["--rank:"]),
    "secret-bad-name": Case(gpus("--secret", "NOT-A-NAME"), ["--secret:"]),
    "spec-secrets-not-a-list": spec_case("secrets: HF_TOKEN\n", "key 'secrets'", "must be a list"),
}


def run_case(fab: Fab, job: str, case: Case) -> tuple[int, str, str]:
    fab.write("gpus", *GPUS.splitlines())
    fab.write("hosts", *HOSTS.splitlines())
    for name, content in case.files.items():
        path = fab.cwd / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
    port = str(master_port())
    args = [a.replace("{job}", job).replace("{port}", port) for a in case.args]
    result = fab(*args, timeout=60)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_exits_2_naming_the_place_and_launches_nothing(fab: Fab, job: str, case: Case) -> None:
    code, stdout, stderr = run_case(fab, job, case)
    assert code == 2, f"exit {code}\nstdout: {stdout[-2000:]}\nstderr: {stderr[-2000:]}"
    assert stderr.startswith("fablaunch: "), stderr[-2000:]
    for words in case.says:
        assert words in stderr, f"{words!r} not in stderr: {stderr[-2000:]}"
    assert "Traceback" not in stdout + stderr
    # Nothing of any job, not only of this one: `--job ''` must not launch under a default name either.
    assert not any(sessions(fab.cluster, "").values())
    assert not live_pids(job)
    assert not (fab.cwd / ".fablaunch" / "records").exists()  # no launch record either


@pytest.mark.parametrize("name", ["../escaped", " "])
def test_a_bad_job_name_given_to_stop_writes_no_file(fab: Fab, job: str, name: str) -> None:
    code, _, stderr = run_case(fab, job, Case(["stop", "--job", name, "--gpus", "gpus"], ["--job:"]))
    assert code == 2 and "--job:" in stderr
    assert not (fab.cwd / ".fablaunch").exists()  # `../escaped` would put a lock file outside the lock directory
