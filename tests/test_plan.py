"""Planning: ranks, the torchrun environment contract, per-session files and the torchrun command line."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fablaunch.errors import UsageError
from fablaunch.hostfile import Host, parse_host
from fablaunch.plan import JOBS_DIR, RANK_ENV, TAG_VAR, Plan, RemotePath, plan_gpus, plan_torchrun, reserved_env
from fablaunch.spec import JobSpec

JOB = "bert-1"
PYTHON = "/opt/venv/bin/python"
WORKDIR = "/data/proj"
ADDRESSES = {"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3", "d": "10.0.0.4", "e": "10.0.0.5"}


def hosts(*specs: str) -> list[Host]:
    return [parse_host(s, f"test:{i}") for i, s in enumerate(specs, start=1)]


def resolve(host: Host) -> str:
    """Like ssh_config: an alias resolves to an address that differs from it."""
    return ADDRESSES[host.name]


def no_resolve(host: Host) -> str:
    raise AssertionError(f"resolve must not be called (called for {host.spec})")


def job_spec(**kw) -> JobSpec:
    kw.setdefault("command", ["train.py", "--lr", "1e-3"])
    return JobSpec(**kw)


def gpus(*specs: str, spec: JobSpec | None = None, **kw) -> Plan:
    return plan_gpus(spec or job_spec(port=6123, env={"NCCL_DEBUG": "INFO"}), hosts(*specs), JOB, PYTHON, WORKDIR,
                     kw.pop("resolve", resolve))


def torchrun(*specs: str, spec: JobSpec | None = None, **kw) -> Plan:
    return plan_torchrun(spec or job_spec(port=6123), hosts(*specs), JOB, PYTHON, WORKDIR, kw.pop("resolve", resolve))


# --- per-GPU mode: the torchrun environment contract by hand -------------------------------------------------

INTERLEAVED = ("a", "b", "a", "c", "b", "a")


@pytest.fixture
def interleaved() -> Plan:
    return gpus(*INTERLEAVED)


def env_column(plan: Plan, key: str) -> list[str]:
    return [s.env_dict[key] for s in plan.sessions]


def test_one_session_per_gpus_line_in_line_order(interleaved: Plan) -> None:
    assert [s.host.spec for s in interleaved.sessions] == list(INTERLEAVED)
    assert [s.rank for s in interleaved.sessions] == [0, 1, 2, 3, 4, 5]


def test_rank_is_the_line_index(interleaved: Plan) -> None:
    assert env_column(interleaved, "RANK") == ["0", "1", "2", "3", "4", "5"]
    assert env_column(interleaved, "ROLE_RANK") == ["0", "1", "2", "3", "4", "5"]


def test_local_rank_counts_the_hosts_own_lines(interleaved: Plan) -> None:
    assert env_column(interleaved, "LOCAL_RANK") == ["0", "0", "1", "0", "1", "2"]
    assert [s.local_rank for s in interleaved.sessions] == [0, 0, 1, 0, 1, 2]


def test_local_world_size_is_the_hosts_line_count(interleaved: Plan) -> None:
    assert env_column(interleaved, "LOCAL_WORLD_SIZE") == ["3", "2", "3", "1", "2", "3"]


def test_node_rank_is_the_hosts_order_of_first_appearance(interleaved: Plan) -> None:
    assert env_column(interleaved, "NODE_RANK") == ["0", "1", "0", "2", "1", "0"]
    assert env_column(interleaved, "GROUP_RANK") == ["0", "1", "0", "2", "1", "0"]
    assert [s.node for s in interleaved.sessions] == [0, 1, 0, 2, 1, 0]
    assert [h.spec for h in interleaved.hosts] == ["a", "b", "c"]


def test_world_sizes(interleaved: Plan) -> None:
    assert set(env_column(interleaved, "WORLD_SIZE")) == {"6"}
    assert set(env_column(interleaved, "ROLE_WORLD_SIZE")) == {"6"}
    assert set(env_column(interleaved, "GROUP_WORLD_SIZE")) == {"3"}


def test_master_is_the_resolved_address_of_the_first_host_not_its_alias(interleaved: Plan) -> None:
    assert set(env_column(interleaved, "MASTER_ADDR")) == {"10.0.0.1"}
    assert interleaved.master_addr == "10.0.0.1"


def test_master_port_is_the_spec_port(interleaved: Plan) -> None:
    assert set(env_column(interleaved, "MASTER_PORT")) == {"6123"}
    assert interleaved.port == 6123


def test_master_addr_given_wins_and_nothing_is_resolved() -> None:
    plan = gpus("a", "b", spec=job_spec(master_addr="192.168.1.9"), resolve=no_resolve)
    assert set(env_column(plan, "MASTER_ADDR")) == {"192.168.1.9"}


def test_omp_threads_default_to_one_and_user_env_is_present(interleaved: Plan) -> None:
    for s in interleaved.sessions:
        assert s.env_dict["OMP_NUM_THREADS"] == "1"
        assert s.env_dict["PYTHONUNBUFFERED"] == "1"
        assert s.env_dict["NCCL_DEBUG"] == "INFO"


def test_user_env_can_set_omp_threads() -> None:
    plan = gpus("a", "a", spec=job_spec(env={"OMP_NUM_THREADS": "8", "PYTHONUNBUFFERED": "0"}))
    assert env_column(plan, "OMP_NUM_THREADS") == ["8", "8"]
    assert env_column(plan, "PYTHONUNBUFFERED") == ["0", "0"]


def test_user_env_cannot_override_the_rank_contract() -> None:
    with pytest.raises(UsageError, match="RANK is set by fablaunch for each rank"):
        gpus("a", "b", spec=job_spec(env={"RANK": "99"}))


def test_error_file_is_distinct_per_rank_and_names_host_and_rank() -> None:
    plan = gpus("a", "u@b:2222", "a", "u@b:2222")
    files = env_column(plan, "TORCHELASTIC_ERROR_FILE")
    assert len(set(files)) == len(files) == 4
    for s, f in zip(plan.sessions, files, strict=True):
        assert isinstance(f, str)
        assert s.host.label in f
        assert f"rank-{s.rank}" in f
        assert f == s.error_file


@pytest.mark.parametrize(("given", "planned"), [("/abs/w", "/abs/w"), ("~", "~/"), ("~/w", "~/w"), ("w", "~/w"),
                                                ("my proj/w", "~/my proj/w"), ("./w", "~/./w")])
def test_a_relative_workdir_is_under_the_remote_home_whatever_the_shell_starts_in(given: str, planned: str) -> None:
    """tmux, not ssh, decides where a session's shell starts: a relative workdir is spelt out as `~/...`."""
    for plan in (plan_gpus(JobSpec(command=["t.py"]), hosts("a"), JOB, "/py", given),
                 plan_torchrun(JobSpec(command=["t.py"]), hosts("a"), JOB, "/py", given)):
        assert plan.workdir == planned
        assert isinstance(plan.workdir, RemotePath) == (planned != "/abs/w")


def test_every_session_file_is_under_a_dir_with_the_job_and_host_label() -> None:
    plan = gpus("a", "u@b:2222", "a")
    for s in plan.sessions:
        assert isinstance(s.dir, RemotePath)
        assert s.dir.startswith(JOBS_DIR + "/")
        assert JOB in s.dir.split("/")
        assert s.host.label in s.dir.split("/")
        assert s.dir == plan.host_dir(s.host)
        for path in (s.script, s.log, s.exit_file, s.error_file):
            assert isinstance(path, RemotePath)
            assert path.startswith(s.dir + "/")
    assert len({s.dir for s in plan.sessions}) == 2
    assert len({p for s in plan.sessions for p in (s.script, s.log, s.exit_file, s.error_file)}) == 12


def test_session_names_are_job_rank_index(interleaved: Plan) -> None:
    assert [s.name for s in interleaved.sessions] == [f"{JOB}-rank-{i}" for i in range(6)]


def test_tag_and_fablaunch_vars_are_per_host(interleaved: Plan) -> None:
    for s in interleaved.sessions:
        assert s.env_dict["FABLAUNCH_JOB"] == JOB
        assert s.env_dict["FABLAUNCH_HOST"] == s.host.spec
        assert s.env_dict[TAG_VAR] == s.tag == f"{JOB}@{s.host.label}"
    assert len({s.tag for s in interleaved.sessions}) == 3


def test_plan_on_a_host_gives_its_sessions_in_rank_order(interleaved: Plan) -> None:
    a = interleaved.hosts[0]
    assert [s.rank for s in interleaved.on(a)] == [0, 2, 5]


def test_plan_records_the_job_inputs(interleaved: Plan) -> None:
    assert (interleaved.job, interleaved.mode, interleaved.workdir) == (JOB, "gpus", WORKDIR)
    assert interleaved.command == ("train.py", "--lr", "1e-3")


@pytest.mark.parametrize("planner", [gpus, torchrun])
def test_plan_carries_the_keys_the_user_marked_secret(planner) -> None:
    assert planner("a", spec=job_spec(secrets=["MY_DSN"])).secrets == frozenset({"MY_DSN"})
    assert planner("a").secrets == frozenset()


@given(st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), min_size=1, max_size=20))
def test_rank_contract_holds_for_any_gpus_file(names: list[str]) -> None:
    plan = gpus(*names)
    n = len(names)
    assert [s.rank for s in plan.sessions] == list(range(n))
    assert env_column(plan, "RANK") == [str(i) for i in range(n)]
    counts = Counter(names)
    for host in plan.hosts:
        mine = plan.on(host)
        assert [s.env_dict["LOCAL_RANK"] for s in mine] == [str(i) for i in range(counts[host.spec])]
        assert {s.env_dict["LOCAL_WORLD_SIZE"] for s in mine} == {str(counts[host.spec])}
    first_seen = list(dict.fromkeys(names))
    assert [s.node for s in plan.sessions] == [first_seen.index(x) for x in names]
    files = env_column(plan, "TORCHELASTIC_ERROR_FILE")
    assert len(set(files)) == n
    assert set(env_column(plan, "MASTER_ADDR")) == {ADDRESSES[names[0]]}
    assert set(env_column(plan, "WORLD_SIZE")) == {str(n)}


# --- what runs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["train.py", "--x"], ["-m", "pkg.train", "--x"]])
def test_gpus_python_command_runs_under_the_given_python(command: list[str]) -> None:
    plan = gpus("a", spec=job_spec(command=command))
    assert plan.sessions[0].argv == (PYTHON, *command)


@pytest.mark.parametrize("command", [["./run.sh", "--x"], ["bash", "-c", "echo hi"], ["train"]])
def test_gpus_other_command_runs_as_is(command: list[str]) -> None:
    plan = gpus("a", spec=job_spec(command=command))
    assert plan.sessions[0].argv == tuple(command)


# --- the first host and the master address ------------------------------------------------------------------


@pytest.mark.parametrize("first", ["localhost", "127.0.0.1"])
@pytest.mark.parametrize("planner", [gpus, torchrun])
def test_local_first_host_with_remote_hosts_needs_master_addr(planner, first: str) -> None:
    with pytest.raises(UsageError) as info:
        planner(first, "b")
    assert str(info.value).startswith("--master-addr:")
    assert first in str(info.value)


@pytest.mark.parametrize("planner", [gpus, torchrun])
def test_local_first_host_with_master_addr_given_uses_it(planner) -> None:
    plan = planner("localhost", "b", spec=job_spec(master_addr="10.9.9.9"), resolve=no_resolve)
    assert plan.master_addr == "10.9.9.9"


def test_all_local_hosts_need_no_master_addr() -> None:
    plan = gpus("localhost", "localhost", resolve=lambda h: h.name)
    assert set(env_column(plan, "MASTER_ADDR")) == {"localhost"}


def test_remote_first_host_with_local_hosts_after_it_is_fine() -> None:
    plan = gpus("a", "localhost", resolve=lambda h: ADDRESSES.get(h.name, h.name))
    assert plan.master_addr == "10.0.0.1"


# --- reserved variables ----------------------------------------------------------------------------------


OWNED = ["TORCHELASTIC_ERROR_FILE", "FABLAUNCH_TAG", "FABLAUNCH_JOB", "FABLAUNCH_HOST", "FABLAUNCH_ANYTHING",
         *RANK_ENV]


def test_the_reserved_names_are_the_whole_torchrun_contract() -> None:
    assert set(RANK_ENV) == {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                             "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    plan = gpus("a", "b")
    assert set(RANK_ENV) <= set(plan.sessions[0].env_dict)  # every one of them is really set per rank


@pytest.mark.parametrize("key", OWNED)
@pytest.mark.parametrize("planner", [gpus, torchrun])
def test_reserved_variables_cannot_be_set_with_env(planner, key: str) -> None:
    with pytest.raises(UsageError) as info:
        planner("a", "b", spec=job_spec(env={key: "/tmp/shared.json"}))
    assert str(info.value).startswith("--env:")
    assert f"{key} is set by fablaunch" in str(info.value)


@pytest.mark.parametrize(("key", "flag"), [("MASTER_ADDR", "--master-addr"), ("MASTER_PORT", "--port")])
def test_refusing_master_addr_or_port_points_to_the_flag_that_sets_it(key: str, flag: str) -> None:
    assert f"use {flag}" in (reserved_env(key) or "")


@pytest.mark.parametrize("key", ["OMP_NUM_THREADS", "PYTHONUNBUFFERED", "NCCL_DEBUG", "RANKING", "MY_RANK"])
def test_defaults_and_look_alike_names_stay_the_users(key: str) -> None:
    assert reserved_env(key) is None
    assert gpus("a", spec=job_spec(env={key: "8"})).sessions[0].env_dict[key] == "8"


# --- per-node mode: torchrun ---------------------------------------------------------------------------------


def expected_torchrun(plan: Plan, node: int, nproc: str, middle: list[str], command: list[str]) -> tuple[str, ...]:
    s = plan.sessions[node]
    return (PYTHON, "-m", "torch.distributed.run", "--rdzv-id", JOB, "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "10.0.0.1:6123", "--nnodes", str(len(plan.hosts)), "--nproc-per-node", nproc,
            "--redirects", "3", "--log-dir", f"{s.dir}/node-{node}.torchrun", *middle, *command)


def test_torchrun_argv_is_exact_and_ends_with_the_user_command_verbatim() -> None:
    command = ["train.py", "--name", "a b", "--", "$HOME", "-x"]
    plan = torchrun("a", "b", "c", spec=job_spec(command=command, port=6123))
    assert len(plan.sessions) == 3
    for node in range(3):
        assert plan.sessions[node].argv == expected_torchrun(plan, node, "gpu", [], command)


def test_torchrun_nproc_per_node_spec_then_slots_then_gpu() -> None:
    hs = [parse_host("a", "t"), Host("b", "b", slots=4), parse_host("c", "t")]
    plan = plan_torchrun(job_spec(port=6123), hs, JOB, PYTHON, WORKDIR, resolve)

    def nproc(p: Plan) -> list[str]:
        return [s.argv[s.argv.index("--nproc-per-node") + 1] for s in p.sessions]

    assert nproc(plan) == ["gpu", "4", "gpu"]
    plan = plan_torchrun(job_spec(port=6123, nproc_per_node="2"), hs, JOB, PYTHON, WORKDIR, resolve)
    assert nproc(plan) == ["2", "2", "2"]


def test_torchrun_max_restarts_and_extra_args_pass_through_before_the_command() -> None:
    command = ["train.py", "--epochs", "3"]
    spec = job_spec(command=command, port=6123, max_restarts=3, torchrun_args=["--monitor-interval", "1"])
    plan = torchrun("a", "b", spec=spec)
    for node in range(2):
        assert plan.sessions[node].argv == expected_torchrun(
            plan, node, "gpu", ["--max-restarts", "3", "--monitor-interval", "1"], command)


def test_torchrun_max_restarts_zero_is_passed() -> None:
    plan = torchrun("a", spec=job_spec(max_restarts=0, port=6123))
    argv = plan.sessions[0].argv
    assert argv[argv.index("--max-restarts") + 1] == "0"


@pytest.mark.parametrize("command", [["./run.sh", "x"], ["bash", "-c", "echo $RANK"], ["train"]])
def test_torchrun_non_python_command_gets_no_python(command: list[str]) -> None:
    plan = torchrun("a", "b", spec=job_spec(command=command, port=6123))
    for node in range(2):
        assert plan.sessions[node].argv == expected_torchrun(plan, node, "gpu", ["--no-python"], command)


@pytest.mark.parametrize("command", [["train.py"], ["-m", "pkg.train"]])
def test_torchrun_python_command_does_not_get_no_python(command: list[str]) -> None:
    plan = torchrun("a", spec=job_spec(command=command, port=6123))
    assert "--no-python" not in plan.sessions[0].argv
    assert plan.sessions[0].argv[0] == PYTHON


def test_torchrun_sessions_are_one_per_node() -> None:
    plan = torchrun("a", "u@b:2222", "c")
    assert [s.name for s in plan.sessions] == [f"{JOB}-node-{k}" for k in range(3)]
    assert [s.node for s in plan.sessions] == [0, 1, 2]
    assert [s.rank for s in plan.sessions] == [None, None, None]
    assert [s.local_rank for s in plan.sessions] == [None, None, None]
    assert plan.mode == "torchrun"


def test_torchrun_env_has_the_defaults_and_a_distinct_error_file_per_node() -> None:
    plan = torchrun("a", "u@b:2222", "c", spec=job_spec(env={"NCCL_DEBUG": "WARN"}))
    files = env_column(plan, "TORCHELASTIC_ERROR_FILE")
    assert len(set(files)) == 3
    for s in plan.sessions:
        env = s.env_dict
        assert (env["OMP_NUM_THREADS"], env["NCCL_DEBUG"]) == ("1", "WARN")
        assert s.host.label in env["TORCHELASTIC_ERROR_FILE"]
        assert env[TAG_VAR] == f"{JOB}@{s.host.label}"
        assert "RANK" not in env  # torchrun sets the rank contract itself
        assert s.path(".torchrun").startswith(s.dir + "/")


def test_torchrun_ipv6_master_is_bracketed_in_the_endpoint() -> None:
    plan = torchrun("a", "b", spec=job_spec(master_addr="fe80::1", port=6123), resolve=no_resolve)
    argv = plan.sessions[0].argv
    assert argv[argv.index("--rdzv-endpoint") + 1] == "[fe80::1]:6123"
