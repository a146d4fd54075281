"""Job specs: the YAML file, the flags that override it, and the names and values they may hold."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasks.errors import UsageError
from tasks.spec import DEFAULT_PARALLEL, DEFAULT_PORT, JobSpec, build_spec, check_job_name, default_job_name, parse_env

CMD = ["train.py", "--lr", "1e-3"]


def spec_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- the spec file ------------------------------------------------------------------------------------


def test_no_spec_and_no_flags_gives_the_defaults() -> None:
    spec = build_spec(None, CMD)
    assert spec == JobSpec(command=CMD)
    assert (spec.port, spec.parallel, spec.env, spec.hosts, spec.gpus) == (DEFAULT_PORT, DEFAULT_PARALLEL, {},
                                                                          "hosts", "gpus")


def test_spec_file_sets_every_option(tmp_path: Path) -> None:
    path = spec_file(tmp_path, """
name: bert
command: [train.py, --epochs, 3]
hosts: cluster/hosts
gpus: cluster/gpus
python: /opt/venv/bin/python
workdir: /data/proj
port: 6100
master_addr: 10.0.0.1
env: {NCCL_DEBUG: INFO, SEED: 7, FLAG: true}
parallel: 4
nproc_per_node: 8
max_restarts: 2
torchrun_args: [--monitor-interval, 1]
""")
    spec = build_spec(path, [])
    assert spec == JobSpec(
        command=["train.py", "--epochs", "3"], name="bert", hosts="cluster/hosts", gpus="cluster/gpus",
        python="/opt/venv/bin/python", workdir="/data/proj", port=6100, master_addr="10.0.0.1",
        env={"NCCL_DEBUG": "INFO", "SEED": "7", "FLAG": "true"}, parallel=4, nproc_per_node="8", max_restarts=2,
        torchrun_args=["--monitor-interval", "1"],
    )


def test_empty_spec_file_sets_nothing(tmp_path: Path) -> None:
    assert build_spec(spec_file(tmp_path, "# nothing yet\n"), CMD) == JobSpec(command=CMD)


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = spec_file(tmp_path, "command: [train.py]\nnproc_per_nodes: 4\n")
    with pytest.raises(UsageError) as info:
        build_spec(path, [])
    assert "'nproc_per_nodes'" in str(info.value)
    assert path in str(info.value)
    assert "unknown key" in str(info.value)


@pytest.mark.parametrize(("line", "key"), [
    ('port: "x"', "port"),
    ("env: [1]", "env"),
    ("command: 5", "command"),
    ("parallel: true", "parallel"),
    ("port: 5001.5", "port"),
    ("name: 12", "name"),
    ("torchrun_args: --foo", "torchrun_args"),
    ("max_restarts: yes", "max_restarts"),
])
def test_wrong_type_names_the_key(tmp_path: Path, line: str, key: str) -> None:
    path = spec_file(tmp_path, f"{line}\n")
    with pytest.raises(UsageError) as info:
        build_spec(path, CMD)
    assert f"key {key!r}" in str(info.value)
    assert "must be" in str(info.value)


@pytest.mark.parametrize("line", ["env: {A: null}", "env: {A: [1]}", "env: {A: {b: 1}}"])
def test_env_values_must_be_scalars(tmp_path: Path, line: str) -> None:
    with pytest.raises(UsageError, match=r"env\.A"):
        build_spec(spec_file(tmp_path, line + "\n"), CMD)


def test_command_list_items_must_be_scalars(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="'command'"):
        build_spec(spec_file(tmp_path, "command: [train.py, [nested]]\n"), [])


@pytest.mark.parametrize("text", ["- a list\n", "just a string\n"])
def test_spec_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(UsageError, match="mapping"):
        build_spec(spec_file(tmp_path, text), CMD)


def test_missing_spec_file_is_named(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.yaml")
    with pytest.raises(UsageError, match="no such spec file") as info:
        build_spec(path, CMD)
    assert path in str(info.value)


def test_invalid_yaml_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read spec"):
        build_spec(spec_file(tmp_path, "command: [unclosed\n"), [])


def test_command_string_is_split_like_a_shell(tmp_path: Path) -> None:
    path = spec_file(tmp_path, """command: "train.py --name 'my run' --tag \\"a b\\" x\\\\ y"\n""")
    assert build_spec(path, []).command == ["train.py", "--name", "my run", "--tag", "a b", "x y"]


def test_command_string_with_unbalanced_quote_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="command"):
        build_spec(spec_file(tmp_path, "command: \"train.py --name 'oops\"\n"), [])


# --- flags and the command line over the spec ------------------------------------------------------------


def test_flags_override_the_spec_and_none_keeps_it(tmp_path: Path) -> None:
    path = spec_file(tmp_path, "command: [train.py]\nport: 6100\nparallel: 4\nname: fromspec\npython: /spec/python\n")
    spec = build_spec(path, [], port=7000, name="fromflag", parallel=None, python=None, workdir=None)
    assert spec.port == 7000
    assert spec.name == "fromflag"
    assert spec.parallel == 4
    assert spec.python == "/spec/python"
    assert spec.workdir is None


def test_flag_env_merges_over_spec_env_per_key(tmp_path: Path) -> None:
    path = spec_file(tmp_path, "command: [train.py]\nenv: {A: spec-a, B: spec-b}\n")
    assert build_spec(path, [], env={"B": "flag-b", "C": "flag-c"}).env == {"A": "spec-a", "B": "flag-b",
                                                                            "C": "flag-c"}
    assert build_spec(path, [], env=None).env == {"A": "spec-a", "B": "spec-b"}


def test_command_after_double_dash_overrides_the_spec_command(tmp_path: Path) -> None:
    path = spec_file(tmp_path, "command: [old.py, --x]\n")
    assert build_spec(path, ["new.py", "--y"]).command == ["new.py", "--y"]
    assert build_spec(path, []).command == ["old.py", "--x"]


@pytest.mark.parametrize("yaml_text", [None, "port: 6000\n", "command: []\n", "command: ''\n"])
def test_no_command_anywhere_is_an_error_that_mentions_double_dash(tmp_path: Path, yaml_text: str | None) -> None:
    path = spec_file(tmp_path, yaml_text) if yaml_text is not None else None
    with pytest.raises(UsageError) as info:
        build_spec(path, [])
    assert "`--`" in str(info.value)


# --- --env ----------------------------------------------------------------------------------------------


def test_parse_env_keeps_equals_signs_and_any_characters_in_the_value() -> None:
    items = ["A=b=c", "EMPTY=", "WEIRD= $HOME 'q' \"d\" `x` ;\n\\ é 日本 🎉 ", "URL=postgres://u:p@h/db?x=1"]
    assert parse_env(items) == {
        "A": "b=c", "EMPTY": "", "WEIRD": " $HOME 'q' \"d\" `x` ;\n\\ é 日本 🎉 ", "URL": "postgres://u:p@h/db?x=1",
    }


@given(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True), st.text())
def test_parse_env_value_round_trips(key: str, value: str) -> None:
    assert parse_env([f"{key}={value}"]) == {key: value}


def test_parse_env_later_flag_wins() -> None:
    assert parse_env(["A=1", "A=2"]) == {"A": "2"}


def test_parse_env_without_equals_names_env_flag() -> None:
    with pytest.raises(UsageError) as info:
        parse_env(["GOOD=1", "NOEQUALS"])
    assert str(info.value).startswith("--env:")
    assert "NOEQUALS" in str(info.value)


@pytest.mark.parametrize("key", ["1ABC", "A-B", "A B", "", "A.B"])
def test_invalid_env_names_are_rejected(key: str) -> None:
    with pytest.raises(UsageError, match="--env"):
        build_spec(None, CMD, env={key: "v"})


# --- job names --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "a.b", "a:b", "a b", "-job", "", "x" * 65, "job\n", "job\t", "é",
    *[f"job{c}x" for c in ";|&$`'\"<>()\\*?[]{}!~^%,=/@#"],
])
def test_check_job_name_rejects(name: str) -> None:
    with pytest.raises(UsageError) as info:
        check_job_name(name, "--job")
    assert str(info.value).startswith("--job:")
    assert "not a valid job name" in str(info.value)


@pytest.mark.parametrize("name", ["a", "job", "Job_2-x", "_x", "0", "9lives", "a-", "x" * 64])
def test_check_job_name_accepts_letters_digits_underscore_dash(name: str) -> None:
    assert check_job_name(name, "--job") == name


def test_bad_job_name_in_spec_is_rejected_by_build_spec() -> None:
    with pytest.raises(UsageError, match="--job"):
        build_spec(None, CMD, name="my.job")


NOW = datetime(2026, 11, 24, 11, 30, 5)


def test_default_job_name_is_script_stem_and_timestamp() -> None:
    assert default_job_name(["scripts/train.py", "--lr", "1"], now=NOW) == "train-20261124-113005"


@pytest.mark.parametrize(("command", "stem"), [
    (["my model.v2.py"], "my_model_v2"),
    (["--weird.py"], "weird"),
    (["-m", "pkg.train"], "m"),
    (["日本.py"], "__"),
    ([""], "job"),
    ([], "job"),
    (["---.py"], "job"),
    (["$(rm -rf).py"], "__rm_-rf_"),
    (["a" * 100 + ".py"], "a" * 40),
])
def test_default_job_name_for_odd_scripts_is_still_valid(command: list[str], stem: str) -> None:
    name = default_job_name(command, now=NOW)
    assert name == f"{stem}-20261124-113005"
    assert check_job_name(name, "--job") == name


@given(st.text(), st.datetimes(min_value=datetime(1000, 1, 1), max_value=datetime(9999, 12, 31)))
def test_default_job_name_always_passes_check_job_name(script: str, now: datetime) -> None:
    name = default_job_name([script, "--x"], now=now)
    assert check_job_name(name, "--job") == name
    assert name.endswith(now.strftime("-%Y%m%d-%H%M%S"))


# --- numbers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", [0, -1, 65536, 70000])
def test_port_out_of_range_is_rejected(port: int) -> None:
    with pytest.raises(UsageError, match="--port"):
        build_spec(None, CMD, port=port)


def test_port_out_of_range_in_spec_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--port"):
        build_spec(spec_file(tmp_path, "port: 70000\n"), CMD)


@pytest.mark.parametrize("port", [1, 65535])
def test_port_edges_are_accepted(port: int) -> None:
    assert build_spec(None, CMD, port=port).port == port


@pytest.mark.parametrize("parallel", [0, -3])
def test_parallel_below_one_is_rejected(parallel: int) -> None:
    with pytest.raises(UsageError, match="--parallel"):
        build_spec(None, CMD, parallel=parallel)


def test_negative_max_restarts_is_rejected() -> None:
    with pytest.raises(UsageError, match="--max-restarts"):
        build_spec(None, CMD, max_restarts=-1)
    assert build_spec(None, CMD, max_restarts=0).max_restarts == 0


@pytest.mark.parametrize("nproc", ["0", "x", "-1", "", "1.5", "gpus"])
def test_bad_nproc_per_node_is_rejected(nproc: str) -> None:
    with pytest.raises(UsageError, match="--nproc-per-node"):
        build_spec(None, CMD, nproc_per_node=nproc)


@pytest.mark.parametrize("nproc", ["gpu", "cpu", "auto", "4", "1"])
def test_good_nproc_per_node_is_accepted(nproc: str) -> None:
    assert build_spec(None, CMD, nproc_per_node=nproc).nproc_per_node == nproc


def test_nproc_per_node_integer_in_spec_becomes_a_string(tmp_path: Path) -> None:
    assert build_spec(spec_file(tmp_path, "nproc_per_node: 4\n"), CMD).nproc_per_node == "4"
    with pytest.raises(UsageError, match="--nproc-per-node"):
        build_spec(spec_file(tmp_path, "nproc_per_node: 0\n"), CMD)


@pytest.mark.parametrize("addr", ["a b", "x;y", "$(id)", "", "a\nb"])
def test_bad_master_addr_is_rejected(addr: str) -> None:
    with pytest.raises(UsageError, match="--master-addr"):
        build_spec(None, CMD, master_addr=addr)


@pytest.mark.parametrize("addr", ["10.0.0.1", "node-1.lab", "fe80::1"])
def test_good_master_addr_is_accepted(addr: str) -> None:
    assert build_spec(None, CMD, master_addr=addr).master_addr == addr


def test_python_path_with_newline_is_rejected() -> None:
    with pytest.raises(UsageError, match="--python"):
        build_spec(None, CMD, python="/usr/bin/python\nrm -rf /")
