"""Job specs: the YAML file, the flags that override it, and the names and values they may hold."""

from __future__ import annotations

import os
import re
from dataclasses import fields
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fablaunch.environment import DEFAULT_FORWARD
from fablaunch.errors import UsageError
from fablaunch.hostfile import MAX_SLOTS
from fablaunch.spec import (
    _KINDS,
    DEFAULT_PARALLEL,
    DEFAULT_PORT,
    MAX_PARALLEL,
    MAX_TOTAL_BYTES,
    MAX_VALUE_BYTES,
    JobSpec,
    build_spec,
    check_job_name,
    default_job_name,
    parse_env,
    read_spec,
)

CMD = ["train.py", "--lr", "1e-3"]


@pytest.fixture(autouse=True)
def no_forwarded_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests pin what a spec and flags give; the shell's NCCL_*, PYTHON* ... would add to every env."""
    for key in list(os.environ):
        if key.startswith(DEFAULT_FORWARD):
            monkeypatch.delenv(key)


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
job: bert
command: [train.py, --epochs, 3]
hosts: cluster/hosts
gpus: cluster/gpus
python: /opt/venv/bin/python
workdir: /data/proj
port: 6100
master_addr: 10.0.0.1
env: {NCCL_DEBUG: INFO, SEED: "7", FLAG: "true"}
parallel: 4
nproc_per_node: 8
max_restarts: 2
torchrun_args: [--monitor-interval, 1]
secrets: [MY_DSN]
""")
    spec = build_spec(path, [])
    assert spec == JobSpec(
        command=["train.py", "--epochs", "3"], name="bert", hosts="cluster/hosts", gpus="cluster/gpus",
        python="/opt/venv/bin/python", workdir="/data/proj", port=6100, master_addr="10.0.0.1",
        env={"NCCL_DEBUG": "INFO", "SEED": "7", "FLAG": "true"}, parallel=4, nproc_per_node="8", max_restarts=2,
        torchrun_args=["--monitor-interval", "1"], secrets=["MY_DSN"],
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
    ("job: 12", "job"),
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
    path = spec_file(tmp_path, "command: [train.py]\nport: 6100\nparallel: 4\njob: fromspec\npython: /spec/python\n")
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


# --- files that are not text ---------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"\x00\xff\xfe\x01binary",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",  # a PNG's first bytes
    "name: caf\u00e9\n".encode("latin-1"),  # text, but not UTF-8
    b"\xff\xfe" + "name: x\n".encode("utf-16-le"),
])
def test_a_binary_or_non_utf8_spec_file_is_refused_by_name(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(data)
    with pytest.raises(UsageError) as info:
        build_spec(str(path), CMD)
    assert info.value.where == str(path)
    assert "not a text YAML file" in info.value.problem


def test_a_directory_given_as_spec_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read spec") as info:
        build_spec(str(tmp_path), CMD)
    assert info.value.where == str(tmp_path)


# --- what YAML would silently rewrite ----------------------------------------------------------------------


@pytest.mark.parametrize(("written", "reading"), [
    ("1.10", "the number 1.1"),
    ("010", "the number 8"),  # YAML 1.1 octal
    ("0x1F", "the number 31"),
    ("12:30", "the number 750"),  # YAML 1.1 sexagesimal
    ("1_000", "the number 1000"),
    ("7", "a number"),
    ("on", "true (a boolean)"),
    ("yes", "true (a boolean)"),
    ("Off", "false (a boolean)"),
    ("true", "true (a boolean)"),
    ("null", "null"),
    ("~", "null"),
    (".inf", "the number inf"),
    ("2024-01-02", "2024-01-02 (a date)"),
])
def test_env_values_yaml_would_rewrite_are_refused_with_a_hint_to_quote_them(tmp_path: Path, written: str,
                                                                             reading: str) -> None:
    path = spec_file(tmp_path, f"command: [train.py]\nenv:\n  NCCL_DEBUG: INFO\n  V: {written}\n")
    with pytest.raises(UsageError) as info:
        read_spec(path)
    assert info.value.where == f"{path}: key 'env.V'"
    assert f"YAML reads {written} as {reading}" in info.value.problem
    assert f'write "{written}" in quotes' in info.value.problem


def test_an_env_key_without_a_value_is_refused_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match='write "" for an empty string') as info:
        read_spec(spec_file(tmp_path, "env:\n  EMPTY:\n"))
    assert "key 'env.EMPTY'" in info.value.where


@pytest.mark.parametrize("written", ["1.10", "010", "12:30", "on", "7", "", "null", "~"])
def test_quoted_env_values_are_kept_exactly_as_written(tmp_path: Path, written: str) -> None:
    for quoted in (f'"{written}"', f"'{written}'"):
        assert read_spec(spec_file(tmp_path, f"env: {{V: {quoted}}}\n"))["env"] == {"V": written}


def test_plain_string_env_values_need_no_quotes(tmp_path: Path) -> None:
    text = "env:\n  A: INFO\n  B: /data/x y\n  C: 0,1\n  D: 1e3\n  E: v1.10\n  F: |\n    two\n    lines\n"
    assert read_spec(spec_file(tmp_path, text))["env"] == {"A": "INFO", "B": "/data/x y", "C": "0,1", "D": "1e3",
                                                           "E": "v1.10", "F": "two\nlines\n"}


@pytest.mark.parametrize(("key", "reading"), [("ON", "true (a boolean)"), ("NO", "false (a boolean)"),
                                              ("1", "a number"), ("null", "null")])
def test_env_keys_yaml_reads_as_something_else_are_refused_by_name(tmp_path: Path, key: str, reading: str) -> None:
    with pytest.raises(UsageError) as info:
        read_spec(spec_file(tmp_path, f"env:\n  OK: x\n  {key}: x\n"))
    assert info.value.where == f"{tmp_path / 'job.yaml'}: key 'env.{key}'"
    assert f"YAML reads {key} as {reading}" in info.value.problem
    assert f'write "{key}" in quotes' in info.value.problem


def test_a_quoted_env_key_that_yaml_would_rewrite_is_kept(tmp_path: Path) -> None:
    assert read_spec(spec_file(tmp_path, 'env: {"ON": x, "NO": "y"}\n'))["env"] == {"ON": "x", "NO": "y"}


def test_command_and_torchrun_args_items_are_taken_exactly_as_written(tmp_path: Path) -> None:
    words = ["--lr", "1.10", "--n", "010", "--at", "12:30", "--flag", "on", "--home", "~", "--hex", "0x1F"]
    path = spec_file(tmp_path, f"command: [train.py, {', '.join(words)}]\ntorchrun_args: [--x, 1.10, 'q d']\n")
    data = read_spec(path)
    assert data["command"] == ["train.py", *words]
    assert data["torchrun_args"] == ["--x", "1.10", "q d"]


@pytest.mark.parametrize(("line", "key", "reading"), [
    ("port: 0x1389", "port", "5001"),
    ("port: 05001", "port", "2561"),  # octal
    ("port: 1_0000", "port", "10000"),
    ("parallel: 1:30", "parallel", "90"),  # sexagesimal
    ("max_restarts: 0b11", "max_restarts", "3"),
])
def test_integer_options_must_be_plain_decimal(tmp_path: Path, line: str, key: str, reading: str) -> None:
    with pytest.raises(UsageError) as info:
        read_spec(spec_file(tmp_path, line + "\n"))
    assert info.value.where.endswith(f"key {key!r}")
    assert "plain decimal number" in info.value.problem and reading in info.value.problem


def test_an_integer_too_long_for_python_is_a_usage_error_not_a_traceback(tmp_path: Path) -> None:
    path = spec_file(tmp_path, f"port: {'9' * 5000}\n")
    with pytest.raises(UsageError, match="cannot read spec") as info:
        read_spec(path)
    assert info.value.where == path


def test_nproc_per_node_in_a_non_decimal_form_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--nproc-per-node: '0x8'"):
        build_spec(spec_file(tmp_path, "nproc_per_node: 0x8\n"), CMD)


# --- keys given twice --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "key", "lines"), [
    ("command: [a.py]\nport: 6000\njob: x\nport: 6001\n", "port", (2, 4)),
    ("job: a\ncommand: [a.py]\njob: b\n", "job", (1, 3)),
    ("env:\n  A: x\n  B: y\n  A: z\n", "env.A", (2, 4)),
    ("env: {A: x, 'A': y}\n", "env.A", (1, 1)),
    ("env:\n  A: x\nenv:\n  B: y\n", "env", (1, 3)),
])
def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path: Path, text: str, key: str,
                                                        lines: tuple[int, int]) -> None:
    path = spec_file(tmp_path, text)
    with pytest.raises(UsageError) as info:
        read_spec(path)
    assert info.value.where == f"{path}: key {key!r}"
    assert f"given twice, on lines {lines[0]} and {lines[1]}" in info.value.problem


def test_a_merged_key_may_be_overridden_as_yaml_says(tmp_path: Path) -> None:
    path = spec_file(tmp_path, 'env: {<<: {A: "1", B: "2"}, B: "3"}\n')
    assert read_spec(path)["env"] == {"A": "1", "B": "3"}


# --- what no process can be given --------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "where"), [
    ('env: {V: "a\\0b"}', "key 'env.V'"),
    ('command: [train.py, "a\\0b"]', "command"),
    ('torchrun_args: ["--x\\0"]', "torchrun_args"),
    ('workdir: "/data\\0x"', "--workdir"),
    ('python: "/py\\0"', "--python"),
    ('gpus: "gpus\\0"', "--gpus"),
])
def test_a_nul_byte_anywhere_is_refused_not_dropped(tmp_path: Path, line: str, where: str) -> None:
    with pytest.raises(UsageError, match="NUL byte") as info:
        build_spec(spec_file(tmp_path, line + "\n"), CMD if "command" not in line else [])
    assert where in info.value.where


def test_a_nul_byte_in_an_env_flag_value_is_refused() -> None:
    with pytest.raises(UsageError, match="NUL byte") as info:
        build_spec(None, CMD, env={"V": "a\0b"})
    assert info.value.where == "--env"


BIG = "x" * MAX_VALUE_BYTES


def test_an_env_value_over_the_limit_is_refused_naming_the_variable_and_the_limit(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        build_spec(None, CMD, env={"BIG": BIG})
    assert info.value.where == "--env"
    assert "BIG=VALUE" in info.value.problem and str(MAX_VALUE_BYTES) in info.value.problem
    path = spec_file(tmp_path, f"env: {{BIG: '{BIG}'}}\n")
    with pytest.raises(UsageError, match=str(MAX_VALUE_BYTES)) as info:
        build_spec(path, CMD)
    assert info.value.where == f"{path}: key 'env.BIG'"


def test_an_env_value_up_to_the_limit_is_accepted() -> None:
    value = "x" * (MAX_VALUE_BYTES - len("BIG="))
    assert build_spec(None, CMD, env={"BIG": value}).env["BIG"] == value


def test_the_limit_counts_bytes_not_characters() -> None:
    with pytest.raises(UsageError, match="--env"):
        build_spec(None, CMD, env={"BIG": "\u00e9" * (MAX_VALUE_BYTES // 2)})  # 2 bytes each in UTF-8


def test_a_command_argument_over_the_limit_is_refused() -> None:
    with pytest.raises(UsageError, match=f"argument 2 is {MAX_VALUE_BYTES + 1} bytes") as info:
        build_spec(None, ["train.py", BIG + "x"])
    assert info.value.where == "command"


def test_command_and_environment_together_over_the_limit_are_refused() -> None:
    env = {f"V{i}": "x" * (MAX_VALUE_BYTES - 10) for i in range(MAX_TOTAL_BYTES // MAX_VALUE_BYTES + 1)}
    with pytest.raises(UsageError, match=str(MAX_TOTAL_BYTES)) as info:
        build_spec(None, CMD, env=env)
    assert "--env" in info.value.where and "command" in info.value.where


# --- the command -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[""], ["", "train.py"], [" "], ["\t", "x"], ["  ", ""]])
def test_a_blank_first_word_is_refused(command: list[str]) -> None:
    with pytest.raises(UsageError, match="blank") as info:
        build_spec(None, command)
    assert info.value.where == "command"


def test_a_blank_first_word_in_the_spec_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="blank"):
        build_spec(spec_file(tmp_path, 'command: ["", train.py]\n'), [])


def test_empty_later_arguments_are_kept() -> None:
    assert build_spec(None, ["train.py", "", " "]).command == ["train.py", "", " "]


# --- env the user may not set, secrets ---------------------------------------------------------------------


@pytest.mark.parametrize("key", ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "FABLAUNCH_TAG",
                                 "TORCHELASTIC_ERROR_FILE"])
def test_a_variable_fablaunch_sets_is_refused_naming_where_it_came_from(tmp_path: Path, key: str) -> None:
    with pytest.raises(UsageError, match=f"{key} is set by fablaunch") as info:
        build_spec(None, CMD, env={key: "7"})
    assert info.value.where == "--env"
    path = spec_file(tmp_path, f"env: {{{key}: '7'}}\n")
    with pytest.raises(UsageError, match=f"{key} is set by fablaunch") as info:
        build_spec(path, CMD)
    assert info.value.where == f"{path}: key 'env.{key}'"


def test_omp_threads_and_unbuffered_output_are_defaults_the_user_may_set() -> None:
    env = {"OMP_NUM_THREADS": "8", "PYTHONUNBUFFERED": "0"}
    assert build_spec(None, CMD, env=env).env == env


def test_secrets_from_the_spec_and_flags_are_merged_once_each(tmp_path: Path) -> None:
    path = spec_file(tmp_path, "secrets: [A, B]\n")
    assert build_spec(path, CMD, secrets=["B", "C"]).secrets == ["A", "B", "C"]
    assert build_spec(None, CMD).secrets == []


@pytest.mark.parametrize(("text", "flags", "where"), [
    ("secrets: [1X]\n", [], "key 'secrets'"),
    ("secrets: A\n", [], "key 'secrets'"),
    ("", ["BAD-NAME"], "--secret"),
])
def test_a_secret_must_name_an_environment_variable(tmp_path: Path, text: str, flags: list[str], where: str) -> None:
    with pytest.raises(UsageError) as info:
        build_spec(spec_file(tmp_path, text), CMD, secrets=flags)
    assert where in info.value.where


# --- blank job names, bounds on numbers --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", " ", "   ", "\t", "\n"])
def test_a_blank_job_name_is_a_usage_error_not_no_name(name: str) -> None:
    with pytest.raises(UsageError, match="not a valid job name"):
        check_job_name(name, "--job")
    with pytest.raises(UsageError, match="--job"):
        build_spec(None, CMD, name=name)


def test_parallel_is_capped(tmp_path: Path) -> None:
    assert build_spec(None, CMD, parallel=MAX_PARALLEL).parallel == MAX_PARALLEL
    with pytest.raises(UsageError, match=f"--parallel: must be from 1 to {MAX_PARALLEL}"):
        build_spec(spec_file(tmp_path, f"parallel: {MAX_PARALLEL + 1}\n"), CMD)


@pytest.mark.parametrize("nproc", ["\uff18", "\u0664", "1_0", " 4", str(MAX_SLOTS + 1), "9" * 20, "9" * 5000])
def test_nproc_per_node_is_ascii_digits_up_to_the_slots_cap(nproc: str) -> None:
    with pytest.raises(UsageError, match="--nproc-per-node"):
        build_spec(None, CMD, nproc_per_node=nproc)


# --- the job name's key: `job`, and `name` deprecated ------------------------------------------------------


def test_job_key_names_the_job_without_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = spec_file(tmp_path, "job: bert\ncommand: [train.py]\n")
    warnings: list[str] = []
    assert read_spec(path, warn=warnings.append) == {"name": "bert", "command": ["train.py"]}
    assert warnings == []
    assert build_spec(path, []).name == "bert"
    assert capsys.readouterr().err == ""


def test_deprecated_name_key_still_names_the_job_with_one_warning(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = spec_file(tmp_path, "name: bert\ncommand: [train.py]\n")
    warnings: list[str] = []
    assert read_spec(path, warn=warnings.append) == {"name": "bert", "command": ["train.py"]}
    assert warnings == [f"fablaunch: {path}: key 'name' is deprecated, write 'job'"]
    assert build_spec(path, []).name == "bert"
    assert build_spec(path, []).name == "bert"  # read twice (fab doctor does): warned once
    assert capsys.readouterr().err.splitlines() == [f"fablaunch: {path}: key 'name' is deprecated, write 'job'"]


def test_the_job_flag_overrides_a_deprecated_name_key(tmp_path: Path) -> None:
    path = spec_file(tmp_path, "name: fromspec\ncommand: [train.py]\n")
    assert build_spec(path, [], name="fromflag").name == "fromflag"


def test_a_bad_name_under_the_deprecated_key_is_still_checked(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a valid job name"):
        build_spec(spec_file(tmp_path, "name: my.job\n"), CMD)
    with pytest.raises(UsageError, match="not a valid job name"):
        build_spec(spec_file(tmp_path, "job: my.job\n"), CMD)


@pytest.mark.parametrize(("text", "lines"), [
    ("name: a\ncommand: [train.py]\njob: b\n", (1, 3)),
    ("job: b\nname: a\n", (2, 1)),
])
def test_name_and_job_both_given_is_refused_naming_both_lines(tmp_path: Path, text: str,
                                                              lines: tuple[int, int]) -> None:
    path = spec_file(tmp_path, text)
    warnings: list[str] = []
    with pytest.raises(UsageError) as info:
        read_spec(path, warn=warnings.append)
    assert info.value.where == f"{path}: key 'job'"
    assert f"given twice, as 'name' on line {lines[0]} and as 'job' on line {lines[1]}" in info.value.problem
    assert "keep only 'job'" in info.value.problem
    assert warnings == []


def test_name_merged_in_beside_job_is_refused_too(tmp_path: Path) -> None:
    path = spec_file(tmp_path, "<<: {name: a}\njob: b\n")
    with pytest.raises(UsageError, match="given twice, as 'name' on line 1 and as 'job' on line 2"):
        read_spec(path, warn=lambda _: None)


def test_unknown_key_lists_job_not_the_deprecated_name(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        read_spec(spec_file(tmp_path, "jobname: x\n"))
    known = info.value.problem.split("known keys: ")[1]
    assert "job" in known.split(", ") and "name" not in known.split(", ")


# --- the README's "Job spec" section -----------------------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_spec_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n### Job spec\n")
    end = re.compile(r"^#{1,3} ", re.M).search(text, start + len("\n### Job spec\n"))
    return text[start:end.start() if end else len(text)]


def test_the_readme_documents_every_spec_key() -> None:
    section = readme_spec_section()
    table_keys = re.findall(r"^\| `(\w+)` \|", section, re.M)
    assert sorted(table_keys) == sorted(_KINDS)
    assert "`name:`" in section and "deprecated" in section


def test_the_readme_example_spec_is_complete_and_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    match = re.search(r"```yaml\n(.*?)```", readme_spec_section(), re.S)
    assert match, "no ```yaml block in the README's Job spec section"
    path = spec_file(tmp_path, match.group(1))
    warnings: list[str] = []
    data = read_spec(path, warn=warnings.append)
    assert warnings == []
    # every option, `job:` as `name` (port_given and env_sources are not: they record where values came from)
    assert sorted(data) == sorted(f.name for f in fields(JobSpec) if f.name not in ("port_given", "env_sources"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "team.env").write_text("TEAM=1\n")  # the example's env_file
    spec = build_spec(path, [])
    assert spec.name == "bert-large"
    assert spec.env["LR_SCALE"] == "1.10" and spec.env["DETERMINISTIC"] == "on"
    assert build_spec(path, [], port=6200, env={"NCCL_DEBUG": "WARN"}).env["NCCL_DEBUG"] == "WARN"


def test_a_slurm_section_is_read_as_written_and_an_unknown_key_is_refused(tmp_path: Path) -> None:
    path = spec_file(tmp_path, "command: [train.py]\nslurm:\n  nodes: 2\n  time: 4:00:00\n"
                               "  sbatch_args: [--qos=high]\n")
    assert build_spec(path, []).slurm == {"nodes": 2, "time": "4:00:00", "sbatch_args": ["--qos=high"]}
    bad = spec_file(tmp_path, "command: [train.py]\nslurm:\n  node: 2\n")
    with pytest.raises(UsageError, match=r"slurm.node'.*unknown key"):
        build_spec(bad, [])
    bad = spec_file(tmp_path, "command: [train.py]\nslurm:\n  nodes: 0x2\n")
    with pytest.raises(UsageError, match="plain decimal"):
        build_spec(bad, [])
