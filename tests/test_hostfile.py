"""The `hosts` and `gpus` files and host flags: what they accept (ranges too), and how they name what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fablaunch.errors import UsageError
from fablaunch.hostfile import (
    MAX_HOSTS,
    MAX_SLOTS,
    Host,
    expand,
    gpus_from,
    hosts_from,
    parse_host,
    read_gpus,
    read_hosts,
)


def write(tmp_path: Path, text: str, name: str = "hosts") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- what is accepted -----------------------------------------------------------------------------


def test_blank_lines_and_comments_are_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, "# cluster A\n\n   \nnode1   # the first node\n\t\n#node9\nnode2#trailing\n")
    assert [h.spec for h in read_hosts(path)] == ["node1", "node2"]
    assert [h.spec for h in read_gpus(path)] == ["node1", "node2"]


def test_user_host_port_is_split_into_its_parts(tmp_path: Path) -> None:
    [host] = read_hosts(write(tmp_path, "alice@node1.example.com:2222\n"))
    assert host == Host(spec="alice@node1.example.com:2222", name="node1.example.com", user="alice", port=2222)


def test_host_without_user_or_port_has_neither() -> None:
    host = parse_host("node1", "here")
    assert (host.name, host.user, host.port, host.slots) == ("node1", None, None, None)


@pytest.mark.parametrize("alias", ["gpu-box", "node_7", "trainer.lab", "10.0.0.5", "A1"])
def test_ssh_config_aliases_are_accepted_as_written(tmp_path: Path, alias: str) -> None:
    [host] = read_gpus(write(tmp_path, f"{alias}\n", "gpus"))
    assert host.spec == host.name == alias


def test_slots_on_a_hosts_line_is_the_gpu_count(tmp_path: Path) -> None:
    hosts = read_hosts(write(tmp_path, "node1 slots=8\nbob@node2:22   slots=4  # comment\nnode3\n"))
    assert [(h.spec, h.slots) for h in hosts] == [("node1", 8), ("bob@node2:22", 4), ("node3", None)]
    assert (hosts[1].name, hosts[1].user, hosts[1].port) == ("node2", "bob", 22)


def test_gpus_file_keeps_repeated_non_adjacent_hosts_in_order(tmp_path: Path) -> None:
    path = write(tmp_path, "a\nb\n# gap\na\nc\n\nb\na\n", "gpus")
    assert [h.spec for h in read_gpus(path)] == ["a", "b", "a", "c", "b", "a"]


def test_is_local_for_localhost_and_loopback_without_a_port() -> None:
    assert parse_host("localhost", "x").is_local
    assert parse_host("127.0.0.1", "x").is_local
    assert parse_host("me@localhost", "x").is_local
    assert not parse_host("localhost:2222", "x").is_local
    assert not parse_host("127.0.0.1:22", "x").is_local
    assert not parse_host("node1", "x").is_local


@pytest.mark.parametrize("spec", ["node1:2222", "u@node1:22", "10.0.0.1:22", "node1", "[fe80::1]:22", "[::1]"])
def test_label_is_a_safe_path_component(spec: str) -> None:
    label = parse_host(spec, "x").label
    assert label
    assert not set(label) & set(":/[] ")


def test_bracketed_ipv6_host_with_port_is_parsed() -> None:
    host = parse_host("u@[fe80::1]:2222", "x")
    assert (host.user, host.name, host.port) == ("u", "[fe80::1]", 2222)
    assert parse_host("[::1]", "x").port is None


def test_hosts_that_differ_only_in_port_separator_have_distinct_labels() -> None:
    # Regression: ':' used to become '_', so these two hosts shared a job directory and process marker.
    assert parse_host("node1:2222", "x").label != parse_host("node1_2222", "x").label


_specs = st.builds(
    lambda user, name, port: f"{user + '@' if user else ''}{name}{':' + str(port) if port else ''}",
    st.one_of(st.none(), st.from_regex(r"[a-z_][a-z0-9_.-]{0,4}", fullmatch=True)),
    st.one_of(st.from_regex(r"[a-z0-9_][a-z0-9_.-]{0,6}", fullmatch=True),
              st.from_regex(r"\[[0-9a-f]{0,4}::[0-9a-f:]{0,6}\]", fullmatch=True)),
    st.one_of(st.none(), st.integers(1, 65535)),
)


@given(_specs, _specs)
def test_label_is_one_to_one(a: str, b: str) -> None:
    ha, hb = parse_host(a, "x"), parse_host(b, "x")
    assert (ha.label == hb.label) == (ha.spec == hb.spec)
    assert ":" not in ha.label
    assert "/" not in ha.label


# --- what is rejected, and where --------------------------------------------------------------------


def raises_at(where: str, *words: str, call) -> str:
    with pytest.raises(UsageError) as info:
        call()
    message = str(info.value)
    assert where in message
    for word in words:
        assert word in message
    return message


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    raises_at(str(path), "no such file", call=lambda: read_hosts(path))
    raises_at(str(path), "no such file", call=lambda: read_gpus(path))


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   # another\n\n"])
def test_empty_or_comment_only_file_is_an_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    raises_at(str(path), "no hosts listed", call=lambda: read_hosts(path))
    raises_at(str(path), "no hosts listed", call=lambda: read_gpus(path))


def test_whitespace_inside_a_host_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "# header\nnode1\nnode 2\n", "gpus")
    raises_at(f"{path}:3", "whitespace", call=lambda: read_gpus(path))


def test_extra_words_on_a_hosts_line_are_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "node1 slots=2 extra\n")
    raises_at(f"{path}:1", "whitespace", call=lambda: read_hosts(path))


@pytest.mark.parametrize("char", list(";|&$`'\"<>()"))
def test_each_shell_metacharacter_is_rejected_with_its_line(tmp_path: Path, char: str) -> None:
    path = write(tmp_path, f"ok1\nok2\nno{char}de\n", "gpus")
    message = raises_at(f"{path}:3", "metacharacter", call=lambda: read_gpus(path))
    assert char in message.split("metacharacter", 1)[1]
    with pytest.raises(UsageError):
        read_hosts(path)


def test_a_host_listed_twice_in_hosts_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "node1\n# x\nnode2\nnode1 slots=4\n")
    message = raises_at(f"{path}:4", "twice", call=lambda: read_hosts(path))
    assert f"{path}:1" in message


def test_a_host_listed_twice_in_gpus_is_fine(tmp_path: Path) -> None:
    assert len(read_gpus(write(tmp_path, "node1\nnode1\n", "gpus"))) == 2


@pytest.mark.parametrize("value", ["0", "-1", "x", "", "1.5", "\uff18", "\u0668", "1_0", "+8"])
def test_slots_must_be_a_positive_integer(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"node0\nnode1 slots={value}\n")
    raises_at(f"{path}:2", "slots", repr(value), call=lambda: read_hosts(path))


@pytest.mark.parametrize("value", ["1025", "99999999999999999999", "9" * 5000])
def test_slots_above_the_cap_are_rejected(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"node1 slots={value}\n")
    raises_at(f"{path}:1", f"slots must be at most {MAX_SLOTS}", value, call=lambda: read_hosts(path))


def test_slots_at_the_cap_are_accepted(tmp_path: Path) -> None:
    assert read_hosts(write(tmp_path, f"node1 slots={MAX_SLOTS}\n"))[0].slots == MAX_SLOTS


# Python's int() and str.isdigit() take these; ssh, tmux and torchrun do not.
NON_ASCII_DIGITS = ["\uff12\uff12\uff12\uff12", "\u0662\u0662", "2\uff12", "\U0001d7da\U0001d7da"]


@pytest.mark.parametrize("port", ["0", "70000", "65536", "abc", "", "-1", "+22", "2_2", "2" * 5000, *NON_ASCII_DIGITS])
def test_bad_port_is_rejected(tmp_path: Path, port: str) -> None:
    path = write(tmp_path, f"\nnode1:{port}\n", "gpus")
    raises_at(f"{path}:2", "port", call=lambda: read_gpus(path))


@pytest.mark.parametrize("port", ["1", "22", "65535"])
def test_port_range_edges_are_accepted(port: str) -> None:
    assert parse_host(f"node1:{port}", "x").port == int(port)


@pytest.mark.parametrize("text", ["-oProxyCommand=x", ".hidden", "bad user@host", "us/er@host", "a/b"])
def test_option_like_or_malformed_hosts_are_rejected(text: str) -> None:
    with pytest.raises(UsageError, match="where"):
        parse_host(text, "where")


@pytest.mark.parametrize(("text", "why"), [
    ("@node1", "nothing before '@'"),
    ("@node1:2222", "nothing before '@'"),
    ("@", "nothing before '@'"),
    ("user@", "no host name after '@'"),
])
def test_an_empty_user_or_host_around_at_is_refused_not_guessed(tmp_path: Path, text: str, why: str) -> None:
    path = write(tmp_path, f"node2\n{text}\n", "gpus")
    raises_at(f"{path}:2", why, repr(text), call=lambda: read_gpus(path))
    path = write(tmp_path, f"node2\n{text} slots=2\n")
    raises_at(f"{path}:2", why, call=lambda: read_hosts(path))


@given(st.lists(st.sampled_from(["a", "b", "u@c", "d:2200", "10.1.1.1"]), min_size=1, max_size=30))
def test_gpus_file_round_trips_any_order(specs: list[str]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "gpus"
        path.write_text("".join(f"{s}  # rank {i}\n\n" for i, s in enumerate(specs)), encoding="utf-8")
        assert [h.spec for h in read_gpus(path)] == specs


# --- ranges: one entry naming many hosts ------------------------------------------------------------


def specs(hosts: list[Host]) -> list[str]:
    return [h.spec for h in hosts]


def test_a_range_in_a_hosts_file_names_each_host_with_the_lines_slots(tmp_path: Path) -> None:
    hosts = read_hosts(write(tmp_path, "gpu[01-04,07] slots=8\nother\n"))
    assert [(h.spec, h.slots) for h in hosts] == [("gpu01", 8), ("gpu02", 8), ("gpu03", 8), ("gpu04", 8),
                                                   ("gpu07", 8), ("other", None)]


def test_user_and_port_apply_to_every_host_of_a_range(tmp_path: Path) -> None:
    hosts = read_hosts(write(tmp_path, "alice@gpu[1-3]:2222\n"))
    assert specs(hosts) == ["alice@gpu1:2222", "alice@gpu2:2222", "alice@gpu3:2222"]
    assert {(h.name, h.user, h.port) for h in hosts} == {(f"gpu{i}", "alice", 2222) for i in (1, 2, 3)}


def test_a_gpus_line_with_a_range_is_one_line_per_host_in_order(tmp_path: Path) -> None:
    # Two range lines interleave exactly as the six lines they stand for: rank r on node (r % 3) + 1.
    path = write(tmp_path, "node[1-3]\nnode[1-3]\n", "gpus")
    assert specs(read_gpus(path)) == ["node1", "node2", "node3", "node1", "node2", "node3"]


def test_slots_on_a_gpus_line_repeat_each_host_that_many_times_in_a_row(tmp_path: Path) -> None:
    path = write(tmp_path, "gpu[1-2] slots=2\nlast\n", "gpus")
    assert specs(read_gpus(path)) == ["gpu1", "gpu1", "gpu2", "gpu2", "last"]


def test_a_comma_list_keeps_the_order_written_and_ranges_expand_in_place(tmp_path: Path) -> None:
    path = write(tmp_path, "node3,gpu[1-2]:22,bob@node1\n", "gpus")
    assert specs(read_gpus(path)) == ["node3", "gpu1:22", "gpu2:22", "bob@node1"]


def test_several_ranges_in_one_name_vary_the_last_fastest() -> None:
    assert specs(expand("rack[1-2]-gpu[07-08]", "x")) == ["rack1-gpu07", "rack1-gpu08", "rack2-gpu07", "rack2-gpu08"]


def test_steps_and_zero_padding_are_clustershells() -> None:
    assert specs(expand("n[1-10/4]", "x")) == ["n1", "n5", "n9"]
    assert specs(expand("n[098-101]", "x")) == ["n098", "n099", "n100", "n101"]


def test_bracketed_addresses_are_still_addresses_not_ranges(tmp_path: Path) -> None:
    path = write(tmp_path, "[fe80::1]:22\n[::1]\n", "gpus")
    assert specs(read_gpus(path)) == ["[fe80::1]:22", "[::1]"]


def test_a_range_repeating_a_host_of_another_hosts_line_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "node[1-3]\n# more\nnode2 slots=4\n")
    message = raises_at(f"{path}:3", "'node2' is listed twice", call=lambda: read_hosts(path))
    assert f"{path}:1" in message


@pytest.mark.parametrize(("line", "words"), [
    ("node[1-3", ["brackets must pair up"]),
    ("node1-3]", ["brackets must pair up"]),
    ("node[3-1]", ["node[3-1]", "invalid"]),
    ("node[a-b]", ["[a-b] must hold numbers"]),
    ("node[]", ["[] must hold numbers"]),
    ("node[1-2-3]", ["must hold numbers"]),
    ("node[01-1]", ["padding"]),
    ("node[3,1]", ["must go up", "node3,node1"]),  # rank order must be what is written
    ("node[1,1]", ["must go up"]),
    ("node[1-3,2]", ["must go up"]),
    ("node[01-04,7]", ["pad them alike"]),  # ClusterShell would put node7 first
    ("-node[1-2]", ["'-node1' is not a valid host name", "from '-node[1-2]'"]),
    ("node[1-2]:99999", ["port", "from 'node[1-2]:99999'"]),
    ("node[1-2];id", ["shell metacharacter ;"]),
    ("@node[1-2]", ["nothing before '@'"]),
    ("node[1-2],,node3", ["empty entry"]),
    ("node[1-99999999]", ["99999999 hosts", f"at most {MAX_HOSTS}"]),
    ("node[1-9999999999999]", ["too large"]),
    ("@group", ["nothing before '@'"]),  # never a ClusterShell group read from /etc/clustershell
])
def test_a_bad_range_names_its_file_and_line(tmp_path: Path, line: str, words: list[str]) -> None:
    for name, reader in (("gpus", read_gpus), ("hosts", read_hosts)):
        path = write(tmp_path, f"node0\n{line}\n", name)
        raises_at(f"{path}:2", *words, call=lambda: reader(path))  # noqa: B023


def test_a_huge_range_is_refused_at_once_without_building_its_names(tmp_path: Path) -> None:
    import time

    path = write(tmp_path, "n[1-99999999]\n", "gpus")
    start = time.monotonic()
    raises_at(f"{path}:1", "99999999 hosts", call=lambda: read_gpus(path))
    assert time.monotonic() - start < 1  # NodeSet would take minutes and gigabytes to build them


def test_the_host_limit_counts_the_whole_file(tmp_path: Path) -> None:
    half = MAX_HOSTS // 2
    assert len(read_gpus(write(tmp_path, f"a[1-{half}]\nb[1-{half}]\n", "gpus"))) == MAX_HOSTS
    path = write(tmp_path, f"a[1-{half}]\nb[1-{half}]\nc\n", "gpus")
    raises_at(f"{path}:3", "too many hosts", call=lambda: read_gpus(path))
    path = write(tmp_path, f"a[1-{half}]\nb[1-{half // 2}] slots=4\n", "gpus")  # slots count too
    raises_at(f"{path}:2", f"at most {MAX_HOSTS}", call=lambda: read_gpus(path))


@given(st.lists(st.integers(0, 300), min_size=1, max_size=12, unique=True), st.integers(1, 4))
def test_a_range_reads_as_the_lines_it_stands_for(numbers: list[int], width: int) -> None:
    numbers.sort()
    written = ",".join(str(n).zfill(width) for n in numbers)
    names = [f"n{str(n).zfill(width)}.lab" for n in numbers]
    assert specs(expand(f"u@n[{written}].lab:2200", "x")) == [f"u@{name}:2200" for name in names]


# --- host flags: a file, or hosts inline --------------------------------------------------------------


def test_an_existing_file_is_read_as_a_file_even_if_its_name_looks_like_hosts(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "node7\n", "node[1-2]")
    assert specs(hosts_from("node[1-2]")) == ["node7"]


@pytest.mark.parametrize(("value", "expected"), [
    ("node[1-3]", [("node1", None), ("node2", None), ("node3", None)]),
    ("node1,bob@node2:22", [("node1", None), ("bob@node2:22", None)]),
    ("gpu[01-02] slots=8", [("gpu01", 8), ("gpu02", 8)]),
    ("localhost,", [("localhost", None)]),  # one host inline: a trailing comma
])
def test_hosts_inline_read_as_one_line_of_a_hosts_file(value: str, expected: list[tuple[str, int | None]],
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert [(h.spec, h.slots) for h in hosts_from(value)] == expected


def test_gpus_inline_is_one_gpu_per_host_or_slots_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert specs(gpus_from("node[1-2],node1")) == ["node1", "node2", "node1"]
    assert specs(gpus_from("node[1-2] slots=2")) == ["node1", "node1", "node2", "node2"]


@pytest.mark.parametrize("value", ["gpus.txt", "node1", "hosts-typo", "./cluster/gpus"])
def test_a_missing_file_never_becomes_a_host(value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for reader, flag in ((gpus_from, "--gpus"), (hosts_from, "--hosts")):
        with pytest.raises(UsageError) as info:
            reader(value)
        assert info.value.where == value and info.value.problem.startswith("no such file")
        assert f"{flag} 'node[1-3]'" in info.value.problem and f"{flag} node1," in info.value.problem


@pytest.mark.parametrize(("value", "words"), [
    ("node[1-3", ["brackets must pair up"]),
    ("node[1-2],node1", ["'node1' is listed twice"]),
    ("node[1-2] slots=0", ["slots must be a positive integer"]),
    ("node[1-2] extra", ["whitespace"]),
    (",", ["empty entry"]),
])
def test_a_bad_inline_value_names_the_flag(value: str, words: list[str], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as info:
        hosts_from(value)
    assert info.value.where == "--hosts"
    assert all(word in info.value.problem for word in words), info.value.problem
