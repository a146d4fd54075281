"""Environment that arrives (issue 11): forwarded prefixes, the env file, the spec, --env and per-host values.

The unit tests pin each layer and the precedence between them; the real-cluster tests check what a rank
on a fake host actually sees, and that nothing of it travels in a command line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fablaunch import environment
from fablaunch.errors import UsageError
from fablaunch.spec import build_spec
from tests.conftest import Fab, live_pids, master_port, outputs, wait_until

# --- forwarding -----------------------------------------------------------------------------------------------


def test_variables_with_a_forwarded_prefix_are_carried_and_the_head_nodes_own_are_not() -> None:
    shell = {"NCCL_DEBUG": "INFO", "WANDB_API_KEY": "k", "HF_HOME": "/hf", "PYTHONPATH": "/src", "HOME": "/root",
             "CUDA_VISIBLE_DEVICES": "0", "PYTHONHOME": "/opt/py", "MY_VAR": "x", "TORCH_NCCL_BLOCKING_WAIT": "1"}
    assert environment.forwarded(shell, environment.DEFAULT_FORWARD) == {
        "HF_HOME": "/hf", "NCCL_DEBUG": "INFO", "PYTHONPATH": "/src", "TORCH_NCCL_BLOCKING_WAIT": "1",
        "WANDB_API_KEY": "k"}
    assert environment.forwarded(shell, ["MY_"]) == {"MY_VAR": "x"}
    assert environment.forwarded(shell, []) == {}
    assert environment.forwarded({"NCCL_X": "1", "RANK_X": "2"}, ["NCCL_", "RANK"], skip=frozenset({"RANK_X"})) == \
        {"NCCL_X": "1"}


@pytest.mark.parametrize("prefix", ["", "NC CL", "1NCCL", "NCCL=", "$X"])
def test_a_prefix_that_cannot_start_a_variable_name_is_refused(prefix: str) -> None:
    with pytest.raises(UsageError) as err:
        build_spec(None, ["t.py"], forward_env=[prefix])
    assert err.value.where == "--forward-env"


# --- the env file -------------------------------------------------------------------------------------------------


def test_an_env_file_is_key_value_lines_taken_literally(tmp_path: Path) -> None:
    path = tmp_path / "team.env"
    path.write_text("# the team's settings\n\nexport NCCL_IB_DISABLE=1\nWANDB_PROJECT='big run'\n"
                    'QUOTED="a \'b\'"\nRAW=$HOME/x\nEQUALS=a=b\n  SPACED = v  \nEMPTY=\n')
    assert environment.read_env_file(path) == {
        "NCCL_IB_DISABLE": "1", "WANDB_PROJECT": "big run", "QUOTED": "a 'b'", "RAW": "$HOME/x", "EQUALS": "a=b",
        "SPACED": "v", "EMPTY": ""}


@pytest.mark.parametrize(("text", "line", "message"), [
    ("A=1\njust words\n", 2, "is not KEY=VALUE"),
    ("A=1\n1BAD=2\n", 2, "not a valid environment variable name"),
    ("A=1\nB=2\nA=3\n", 3, "A is set twice"),
])
def test_a_bad_env_file_line_is_named_by_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = tmp_path / "bad.env"
    path.write_text(text)
    with pytest.raises(UsageError) as err:
        environment.read_env_file(path)
    assert err.value.where == f"{path}:{line}" and message in str(err.value)


def test_a_missing_binary_or_reserved_env_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="env file not found"):
        build_spec(None, ["t.py"], env_file=str(tmp_path / "nope.env"))
    (tmp_path / "bin.env").write_bytes(b"A=1\0\n")
    with pytest.raises(UsageError, match="NUL"):
        environment.read_env_file(tmp_path / "bin.env")
    (tmp_path / "rank.env").write_text("RANK=3\n")
    with pytest.raises(UsageError, match="RANK"):
        build_spec(None, ["t.py"], env_file=str(tmp_path / "rank.env"))


# --- precedence ---------------------------------------------------------------------------------------------------


def test_each_layer_wins_over_the_ones_before_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NCCL_DEBUG", "shell")
    monkeypatch.setenv("NCCL_ALGO", "shell")
    monkeypatch.setenv("WANDB_MODE", "shell")
    monkeypatch.setenv("TEAM_X", "shell")
    (tmp_path / ".fablaunch.env").write_text("NCCL_ALGO=file\nLAYER=file\nFROM_FILE=1\n")
    (tmp_path / "spec.yaml").write_text("env:\n  LAYER: spec\n  WANDB_MODE: spec\n"
                                        "host_env:\n  node2:\n    LAYER: node2\n")
    spec = build_spec(str(tmp_path / "spec.yaml"), ["t.py"], env={"LAYER": "flag"})
    assert spec.env["NCCL_DEBUG"] == "shell" and spec.env["NCCL_ALGO"] == "file"
    assert spec.env["WANDB_MODE"] == "spec" and spec.env["LAYER"] == "flag" and spec.env["FROM_FILE"] == "1"
    assert "TEAM_X" not in spec.env
    assert spec.env_sources["NCCL_DEBUG"] == environment.FORWARDED
    assert spec.env_sources["NCCL_ALGO"] == ".fablaunch.env" and spec.env_sources["LAYER"] == "--env"
    assert spec.host_env == {"node2": {"LAYER": "node2"}}

    more = build_spec(None, ["t.py"], forward_env=["TEAM_"])
    assert more.env["TEAM_X"] == "shell" and more.env["NCCL_DEBUG"] == "shell"
    none = build_spec(None, ["t.py"], no_forward_env=True)
    assert "NCCL_DEBUG" not in none.env and none.env["NCCL_ALGO"] == "file"  # the env file still counts
    (tmp_path / "only.yaml").write_text("forward_env: [TEAM_]\nenv_file: other.env\n")
    (tmp_path / "other.env").write_text("OTHER=1\n")
    only = build_spec(str(tmp_path / "only.yaml"), ["t.py"])
    assert only.env == {"TEAM_X": "shell", "OTHER": "1"}  # the spec's list replaces the defaults
    off = tmp_path / "off.yaml"
    off.write_text("forward_env: false\n")
    assert "NCCL_DEBUG" not in build_spec(str(off), ["t.py"]).env


@pytest.mark.parametrize(("text", "where"), [
    ("forward_env: NCCL_\n", "forward_env"),
    ("forward_env: [NCCL_, 'a b']\n", "forward_env"),
    ("host_env: [node1]\n", "host_env"),
    ("host_env:\n  node1: [A]\n", "host_env.node1"),
    ("host_env:\n  node1:\n    RANK: '1'\n", "host_env.node1.RANK"),
    ("host_env:\n  node1:\n    A: 1\n", "host_env.node1.A"),
])
def test_bad_environment_keys_in_a_spec_exit_2_naming_the_key(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as err:
        build_spec(str(path), ["t.py"])
    assert where in err.value.where


# --- on the cluster -----------------------------------------------------------------------------------------------




def test_a_rank_sees_every_layer_in_order_and_its_hosts_own_values(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2")
    fab.write(".fablaunch.env", "NCCL_ALGO=file", "LAYER=file", "TEAM=file")
    fab.write("spec.yaml", "env:", "  LAYER: spec", "  TEAM: spec", "host_env:", "  node2:",
              "    LAYER: node2", "    NCCL_SOCKET_IFNAME: lo")
    fab.env.update(NCCL_DEBUG="INFO", NCCL_ALGO="shell", WANDB_API_KEY="wandb-secret-42", MY_OWN="no",
                   CUDA_VISIBLE_DEVICES="7")
    result = fab("launch-gpus", "--job", job, "--spec", "spec.yaml", "--port", str(master_port()),
                 "--env", "TEAM=flag", "--", "envdump.py")
    assert result.returncode == 0, result.stdout + result.stderr
    first, second = outputs(fab.cwd, 2, name="env-{rank}.json")
    for seen in (first, second):
        assert seen["NCCL_DEBUG"] == "INFO" and seen["WANDB_API_KEY"] == "wandb-secret-42"  # forwarded
        assert seen["NCCL_ALGO"] == "file" and seen["TEAM"] == "flag"
        assert "MY_OWN" not in seen and "CUDA_VISIBLE_DEVICES" not in seen
    assert first["LAYER"] == "spec" and "NCCL_SOCKET_IFNAME" not in first
    assert second["LAYER"] == "node2" and second["NCCL_SOCKET_IFNAME"] == "lo"
    wait_until(lambda: not live_pids(job), 30)


def test_forwarded_values_never_travel_in_a_command_line_and_a_dry_run_lists_them(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1")
    fab.env.update(WANDB_API_KEY="wandb-secret-42", NCCL_DEBUG="INFO")
    dry = fab("launch-gpus", "--job", job, "--dry-run", "--", "sleeper.py")
    assert dry.returncode == 0 and "wandb-secret-42" not in dry.stdout, dry.stdout
    rows = [" ".join(line.split()) for line in dry.stdout.splitlines()]
    assert "WANDB_API_KEY ***** forwarded from this shell all" in rows
    assert "NCCL_DEBUG INFO forwarded from this shell all" in rows
    quiet = fab("launch-gpus", "--job", job, "--dry-run", "--json", "--no-forward-env", "--", "sleeper.py")
    assert not any(v["variable"] == "NCCL_DEBUG" for v in json.loads(quiet.stdout)["variables"])

    result = fab("launch-gpus", "--job", job, "--port", str(master_port()), "--", "sleeper.py")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: live_pids(job), 30)
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert b"wandb-secret-42" not in cmdline.read_bytes(), cmdline
        except OSError:
            continue
    stopped = fab("stop", "--job", job)
    assert stopped.returncode == 0, stopped.stderr
    assert os.environ.get("WANDB_API_KEY") != "wandb-secret-42"  # only the fab command's shell had it


# --- a host's own variables on its host-file line -----------------------------------------------------------------


def test_key_value_words_on_a_host_line_are_that_hosts_variables(tmp_path: Path) -> None:
    from fablaunch.hostfile import read_gpus, read_hosts

    hosts = tmp_path / "hosts"
    hosts.write_text("gpu[01-02] slots=8 NCCL_SOCKET_IFNAME=ens5\ngpu03 NCCL_SOCKET_IFNAME=eth1 NCCL_IB_HCA=mlx5\n")
    assert [(h.spec, h.slots, h.env) for h in read_hosts(hosts)] == [
        ("gpu01", 8, (("NCCL_SOCKET_IFNAME", "ens5"),)), ("gpu02", 8, (("NCCL_SOCKET_IFNAME", "ens5"),)),
        ("gpu03", None, (("NCCL_SOCKET_IFNAME", "eth1"), ("NCCL_IB_HCA", "mlx5")))]
    gpus = tmp_path / "gpus"
    gpus.write_text("n1 A=1\nn2\nn1 A=1\n")
    assert [h.env for h in read_gpus(gpus)] == [(("A", "1"),), (), (("A", "1"),)]


@pytest.mark.parametrize(("text", "message"), [
    ("n1 A=1\nn1 A=2\n", "other variables here than at"),
    ("n1 RANK=3\n", "RANK"),
    ("n1 A=1 A=2\n", "A is set twice"),
    ("n1 slots=2 slots=3\n", "slots= is given twice"),
    ("n1 1A=x\n", "not a valid environment variable name"),
])
def test_bad_host_line_variables_are_refused_naming_the_line(tmp_path: Path, text: str, message: str) -> None:
    from fablaunch.hostfile import read_gpus

    path = tmp_path / "gpus"
    path.write_text(text)
    with pytest.raises(UsageError) as err:
        read_gpus(path)
    assert err.value.where.startswith(f"{path}:") and message in str(err.value)


def test_a_host_lines_variables_win_over_the_specs_host_env_and_reach_the_rank(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1 NCCL_SOCKET_IFNAME=from-line", "node2")
    fab.write("spec.yaml", "host_env:", "  node1:", "    NCCL_SOCKET_IFNAME: from-spec", "    ONLY_SPEC: x")
    result = fab("launch-gpus", "--job", job, "--spec", "spec.yaml", "--port", str(master_port()), "--",
                 "envdump.py")
    assert result.returncode == 0, result.stdout + result.stderr
    first, second = outputs(fab.cwd, 2, name="env-{rank}.json")
    assert first["NCCL_SOCKET_IFNAME"] == "from-line" and first["ONLY_SPEC"] == "x"
    assert "NCCL_SOCKET_IFNAME" not in second
    wait_until(lambda: not live_pids(job), 30)
