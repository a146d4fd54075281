"""Selecting part of a host file: --include/--exclude (DeepSpeed's syntax), --num-nodes, --num-gpus.

First the pure rules (no SSH), then what a real `fab` launch on the fake cluster does with them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fabric import Config
from hypothesis import given
from hypothesis import strategies as st

from fablaunch.errors import UsageError
from fablaunch.hostfile import Host, expand
from fablaunch.launcher import make_plan
from fablaunch.plan import Plan
from fablaunch.selection import DEVICES_VAR, Selection, parse_filter, select, spans, world_of
from fablaunch.spec import JobSpec
from tests.conftest import JOBS, Fab, live_pids, master_port, outputs, sessions, wait_until
from tests.slurm_cluster import SlurmCluster
from tests.test_faults_input import Case, run_case
from tests.test_slurm import SlurmFab

# node1..node3, each twice, interleaved: rank r is on node (r % 3) + 1, local index r // 3.
INTERLEAVED = expand("node[1-3],node[1-3]", "test")


def lines(world_hosts: list[Host]) -> list[str]:
    return [h.spec for h in world_hosts]


def gpus(selection: Selection, hosts: list[Host] = INTERLEAVED) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    world = select("gpus", hosts, selection)
    return lines(world.hosts), world.devices


def nodes(text: str) -> list[Host]:
    """A hosts file's nodes: `node1 slots=4` entries separated by ';'."""
    found = []
    for entry in text.split(";"):
        name, _, slots = entry.strip().partition(" slots=")
        found += [Host(h.spec, h.name, h.user, h.port, int(slots) if slots else None) for h in expand(name, "t")]
    return found


def torchrun(selection: Selection, hosts: str, nproc: str | None = None) -> list[tuple[str, int | None]]:
    return [(h.spec, h.slots) for h in select("torchrun", nodes(hosts), selection, nproc).hosts]


def refused(flag: str, *words: str, call) -> str:
    with pytest.raises(UsageError) as info:
        call()
    assert info.value.where == flag, str(info.value)
    for word in words:
        assert word in info.value.problem, info.value.problem
    return info.value.problem


# --- the syntax ---------------------------------------------------------------------------------------------


def test_deepspeed_syntax_gives_hosts_and_their_gpu_indices() -> None:
    assert parse_filter("node1:0,1@node2", "--include") == {"node1": (0, 1), "node2": None}


def test_a_host_in_a_filter_may_be_a_range() -> None:
    assert parse_filter("gpu[01-03]:2@gpu07", "--exclude") == {"gpu01": (2,), "gpu02": (2,), "gpu03": (2,),
                                                               "gpu07": None}


def test_indices_are_kept_ascending_whatever_order_they_are_written_in() -> None:
    assert parse_filter("node1:3,0,2", "--include") == {"node1": (0, 2, 3)}


@pytest.mark.parametrize(("text", "words"), [
    ("", ["empty host name"]),
    ("node1@", ["empty host name"]),
    ("@node1", ["empty host name"]),
    ("node1:", ["GPU indices are numbers", "''"]),
    ("node1:a", ["'a'"]),
    ("node1:0,,1", ["''"]),
    ("node1:-1", ["'-1'"]),
    ("node1:1024", ["from 0 to 1023"]),
    ("node1:\uff11", ["GPU indices are numbers"]),  # a full-width digit: int() would take it
    ("node1:0,0", ["GPU 0 twice"]),
    ("node1@node1:1", ["node1 twice"]),
    ("node[1-2]@node2", ["node2 twice"]),
    ("node1,node2", ["separate hosts with '@'"]),
    ("node1:22:0", ["without user@ or :port"]),
    ("node[1-3", ["brackets must pair up"]),
    ("no;de1", ["shell metacharacter"]),
])
def test_a_bad_filter_is_refused_naming_the_flag(text: str, words: list[str]) -> None:
    refused("--exclude", *words, call=lambda: parse_filter(text, "--exclude"))


# --- per-GPU mode (a gpus file): GPU indices are a host's lines in order of appearance -------------------


def test_no_selection_is_the_file_as_it_is() -> None:
    assert gpus(Selection()) == (lines(INTERLEAVED), {})


def test_exclude_a_host_drops_all_its_lines_and_keeps_the_others_in_order() -> None:
    assert gpus(Selection(exclude="node2")) == (["node1", "node3", "node1", "node3"], {})


def test_exclude_a_gpu_index_drops_that_line_of_the_host_and_pins_the_rest() -> None:
    # node1's lines are its GPUs 0 and 1 (ranks 0 and 3); without GPU 0 its one rank must run on GPU 1.
    assert gpus(Selection(exclude="node1:0")) == (["node2", "node3", "node1", "node2", "node3"], {"node1": (1,)})


def test_include_keeps_only_the_named_hosts_and_gpus_in_file_order() -> None:
    assert gpus(Selection(include="node3@node1:1")) == (["node3", "node1", "node3"], {"node1": (1,)})


def test_gpus_a_host_keeps_from_its_first_are_not_pinned() -> None:
    assert gpus(Selection(include="node1:0@node2")) == (["node1", "node2", "node2"], {})


def test_num_nodes_takes_the_first_hosts_that_remain() -> None:
    assert gpus(Selection(exclude="node1", num_nodes=1)) == (["node2", "node2"], {})


def test_num_gpus_takes_the_first_lines_in_rank_order_even_interleaved() -> None:
    assert gpus(Selection(num_gpus=4)) == (["node1", "node2", "node3", "node1"], {})


def test_include_exclude_and_counts_apply_in_that_order() -> None:
    # include node1..node3 -> exclude node2 -> the first 2 hosts (node1, node3) -> their first 3 GPUs.
    selection = Selection(include="node[1-3]", exclude="node2", num_nodes=2, num_gpus=3)
    assert gpus(selection) == (["node1", "node3", "node1"], {})


def test_a_host_left_without_gpus_is_dropped() -> None:
    assert gpus(Selection(exclude="node2:0,1")) == (["node1", "node3", "node1", "node3"], {})


def test_hosts_are_named_without_user_or_port_and_a_name_selects_each_of_its_entries() -> None:
    hosts = expand("alice@node1,node1:2222,node2", "t")
    assert gpus(Selection(exclude="node1"), hosts) == (["node2"], {})


@pytest.mark.parametrize(("selection", "flag", "words"), [
    (Selection(exclude="node9"), "--exclude", ["'node9' is not one of the job's hosts (node1, node2, node3)"]),
    (Selection(include="node1:2"), "--include", ["node1 has no GPU 2 (it has 2: 0-1)"]),
    (Selection(exclude="node1:5"), "--exclude", ["node1 has no GPU 5"]),
    (Selection(num_nodes=4), "--num-nodes", ["asks for 4 hosts, but only 3 hosts remain in the host file"]),
    (Selection(exclude="node1", num_nodes=3), "--num-nodes", ["only 2 hosts remain after --exclude node1"]),
    (Selection(num_gpus=7), "--num-gpus", ["asks for 7 GPUs, but only 6 GPUs remain"]),
    (Selection(num_nodes=1, num_gpus=3), "--num-gpus", ["only 2 GPUs remain after --num-nodes 1"]),
    (Selection(num_nodes=0), "--num-nodes", ["at least 1"]),
    (Selection(num_gpus=-1), "--num-gpus", ["at least 1"]),
    (Selection(exclude="node[1-3]"), "--exclude node[1-3]", ["selects no host at all"]),
    (Selection(include="node1", exclude="node1"), "--include node1 --exclude node1", ["selects no host"]),
])
def test_a_selection_that_cannot_be_met_is_refused_naming_the_flag(selection: Selection, flag: str,
                                                                   words: list[str]) -> None:
    refused(flag, *words, call=lambda: gpus(selection))


_hosts = st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=16)


@given(_hosts, st.data())
def test_excluding_gpus_keeps_exactly_the_other_lines_in_order(specs: list[str], data: st.DataObject) -> None:
    """A model of the rule: number each host's lines 0, 1, ... in order; keep the lines not named."""
    seen: dict[str, int] = {}
    numbered = []
    for s in specs:
        seen[s] = seen.get(s, -1) + 1
        numbered.append((s, seen[s]))
    dropped = data.draw(st.sets(st.sampled_from(numbered), min_size=1, max_size=len(numbered) - 1)
                        if len(numbered) > 1 else st.nothing())
    named = {h: sorted(i for n, i in dropped if n == h) for h, _ in dropped}
    text = "@".join(f"{h}:{','.join(map(str, idx))}" for h, idx in named.items())
    expected = [(s, i) for s, i in numbered if (s, i) not in dropped]
    world = select("gpus", [Host(s, s) for s in specs], Selection(exclude=text))
    assert lines(world.hosts) == [s for s, _ in expected]
    for host in {s for s, _ in expected}:
        kept = [i for s, i in expected if s == host]
        assert world.devices.get(host, tuple(range(len(kept)))) == tuple(kept)  # pinned unless its first K


@given(_hosts, st.data())
def test_num_gpus_is_a_prefix_of_the_file(specs: list[str], data: st.DataObject) -> None:
    hosts = [Host(s, s) for s in specs]
    count = data.draw(st.integers(1, len(specs)))
    world = select("gpus", hosts, Selection(num_gpus=count))
    assert lines(world.hosts) == specs[:count] and world.devices == {}


# --- torchrun mode (a hosts file): GPU indices are a node's slots -------------------------------------------


def test_gpu_indices_shrink_a_nodes_slots_and_pin_the_ones_left() -> None:
    world = select("torchrun", nodes("node[1-2] slots=4"), Selection(exclude="node1:1,2"))
    assert [(h.spec, h.slots) for h in world.hosts] == [("node1", 2), ("node2", 4)]
    assert world.devices == {"node1": (0, 3)}


def test_include_indices_work_without_slots_and_set_the_workers() -> None:
    assert torchrun(Selection(include="node3:0,1"), "node[1-2] slots=4;node3") == [("node3", 2)]


def test_exclude_indices_need_the_nodes_gpu_count() -> None:
    refused("--exclude", "node3 has no slots=N", call=lambda: torchrun(Selection(exclude="node3:1"), "node3"))


def test_num_gpus_fills_nodes_in_turn_the_last_taking_what_is_left() -> None:
    assert torchrun(Selection(num_gpus=6), "node[1-3] slots=4") == [("node1", 4), ("node2", 2)]


def test_num_gpus_needs_every_remaining_nodes_count() -> None:
    refused("--num-gpus", "node3 has no slots=N", call=lambda: torchrun(Selection(num_gpus=2), "node1 slots=2;node3"))
    assert torchrun(Selection(num_gpus=2, exclude="node3"), "node1 slots=2;node3") == [("node1", 2)]


def test_a_numeric_nproc_per_node_is_every_nodes_count() -> None:
    world = select("torchrun", nodes("node[1-2] slots=8"), Selection(num_gpus=3), "2")
    assert [(h.spec, h.slots) for h in world.hosts] == [("node1", 2), ("node2", 1)]
    assert world.nproc_per_node is None  # the slots now say it, host by host


def test_whole_hosts_can_be_selected_beside_an_nproc_word_but_gpus_cannot() -> None:
    world = select("torchrun", nodes("node[1-3]"), Selection(exclude="node2"), "gpu")
    assert lines(world.hosts) == ["node1", "node3"] and world.nproc_per_node == "gpu"
    refused("--include", "do not go with --nproc-per-node cpu",
            call=lambda: torchrun(Selection(include="node1:0"), "node1 slots=2", "cpu"))
    refused("--num-gpus", "--nproc-per-node auto",
            call=lambda: torchrun(Selection(num_gpus=1), "node1 slots=2", "auto"))


# --- the plan: ranks, MASTER_ADDR and CUDA_VISIBLE_DEVICES of what remains ----------------------------------


def plan(tmp_path: Path, mode: str, text: str, **options: object) -> Plan:
    path = tmp_path / mode
    path.write_text(text)
    spec = JobSpec(command=["train.py"], **{mode if mode == "gpus" else "hosts": str(path)}, **options)  # type: ignore[arg-type]
    return make_plan(Config(overrides={"load_ssh_configs": False}), "gpus" if mode == "gpus" else "torchrun", spec,
                     "sel")


def contract(p: Plan) -> list[tuple[str, ...]]:
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR")
    return [(s.host.spec, *(s.env_dict[k] for k in keys), s.env_dict.get(DEVICES_VAR, "-")) for s in p.sessions]


def test_excluding_the_first_host_renumbers_ranks_and_moves_master_addr(tmp_path: Path) -> None:
    p = plan(tmp_path, "gpus", "node[1-3]\nnode[1-3]\n", exclude="node1@node2:0")
    # Left: node3 (GPU 0), node2 (GPU 1), node3 (GPU 1): ranks 0..2, node3 first, so node3 is the master.
    assert contract(p) == [
        ("node3", "0", "0", "3", "2", "0", "node3", "-"),
        ("node2", "1", "0", "3", "1", "1", "node3", "1"),
        ("node3", "2", "1", "3", "2", "0", "node3", "-"),
    ]


def test_torchrun_plan_runs_the_selected_workers_on_the_selected_gpus(tmp_path: Path) -> None:
    p = plan(tmp_path, "hosts", "node[1-3] slots=4\n", exclude="node1", include=None, num_gpus=6)
    assert [(s.host.spec, s.argv[s.argv.index("--nnodes") + 1], s.argv[s.argv.index("--nproc-per-node") + 1])
            for s in p.sessions] == [("node2", "2", "4"), ("node3", "2", "2")]
    assert p.master_addr == "node2" and "node2:5001" in p.sessions[1].argv
    p = plan(tmp_path, "hosts", "node[1-2] slots=4\n", exclude="node2@node1:0")
    assert [(s.host.spec, s.env_dict[DEVICES_VAR]) for s in p.sessions] == [("node1", "1,2,3")]


def test_a_users_cuda_visible_devices_is_refused_beside_pinned_gpus(tmp_path: Path) -> None:
    refused("spec", "CUDA_VISIBLE_DEVICES is set", "give one or the other",
            call=lambda: plan(tmp_path, "gpus", "node[1-2]\nnode1\n", exclude="node1:0",
                              env={DEVICES_VAR: "4,5"}, env_sources={DEVICES_VAR: "spec"}))
    # Where nothing needs pinning the user's value stands.
    p = plan(tmp_path, "gpus", "node[1-2]\nnode1\n", exclude="node2", env={DEVICES_VAR: "4,5"})
    assert {s.env_dict[DEVICES_VAR] for s in p.sessions} == {"4,5"}


def test_world_of_a_plan_says_hosts_ranks_gpus_and_world_size(tmp_path: Path) -> None:
    world = world_of(plan(tmp_path, "gpus", "node[1-2]\nnode[1-2]\nnode1\n", exclude="node1:1"))
    assert world == {"world_size": 4, "master_addr": "node1", "hosts": [
        {"host": "node1", "node": 0, "ranks": [0, 3], "gpus": "0,2"},  # lines 1 and 5; line 3 (GPU 1) is out
        {"host": "node2", "node": 1, "ranks": [1, 2], "gpus": "0-1"}]}
    world = world_of(plan(tmp_path, "hosts", "node1 slots=2\nnode2\n", exclude="node1:0"))
    assert world["world_size"] is None  # node2 decides its own (`gpu`)
    assert world["hosts"] == [{"host": "node1", "node": 0, "workers": "1", "gpus": "1"},
                              {"host": "node2", "node": 1, "workers": "gpu", "gpus": "all"}]


@pytest.mark.parametrize(("numbers", "text"), [([0], "0"), ([0, 1, 2, 5], "0-2,5"), ([1, 3], "1,3"), ([], "")])
def test_spans_are_compact(numbers: list[int], text: str) -> None:
    assert spans(numbers) == text


# --- on the fake cluster: real `fab` command lines ----------------------------------------------------------




def test_a_gpus_file_of_ranges_runs_the_ranks_its_lines_stand_for(fab: Fab, job: str) -> None:
    fab.write("gpus", "node[1-3]", "node[1-3]")
    result = fab("launch-gpus", "--job", job, "--port", str(master_port()), "--", "dump.py")
    assert result.returncode == 0, result.stderr
    ranks = outputs(fab.cwd, 6)
    assert [(ranks[r]["env"]["FABLAUNCH_HOST"], ranks[r]["env"]["LOCAL_RANK"]) for r in range(6)] == [
        ("node1", "0"), ("node2", "0"), ("node3", "0"), ("node1", "1"), ("node2", "1"), ("node3", "1")]
    assert "World after" not in result.stdout  # no selection, nothing to show


def test_exclude_a_host_and_a_gpu_prints_the_world_and_starts_only_it(fab: Fab, job: str) -> None:
    fab.write("gpus", "node[1-3]", "node[1-3]")
    result = fab("launch-gpus", "--job", job, "--port", str(master_port()), "--exclude", "node1@node2:0", "--",
                 "dump.py")
    assert result.returncode == 0, result.stderr
    shown = result.stdout.split("Launched", 1)[0]  # said before the launch's results
    assert "World after --exclude node1@node2:0: WORLD_SIZE 3 on 2 hosts, MASTER_ADDR 127.0.0.13" in shown
    rows = [line.split() for line in shown.splitlines()[2:4]]
    assert rows == [["node3", "0", "0,2", "0-1"], ["node2", "1", "1", "1"]]  # host, node, ranks, gpus
    ranks = outputs(fab.cwd, 3)
    env = {r: ranks[r]["env"] for r in range(3)}
    assert [(e["FABLAUNCH_HOST"], e["LOCAL_RANK"], e.get(DEVICES_VAR)) for e in env.values()] == [
        ("node3", "0", None), ("node2", "0", "1"), ("node3", "1", None)]
    assert {(e["WORLD_SIZE"], e["MASTER_ADDR"]) for e in env.values()} == {("3", "127.0.0.13")}
    assert not sessions(fab.cluster, job)["node1"] and not (JOBS / job / "node1").exists()
    record = json.loads((fab.cwd / ".fablaunch" / "records" / f"{job}.json").read_text())
    assert record["hosts"] == ["node3", "node2"]


def test_include_and_num_gpus_from_inline_hosts_as_json(fab: Fab, job: str) -> None:
    result = fab("launch-gpus", "--job", job, "--port", str(master_port()), "--gpus", "node[1-3] slots=2",
                 "--include", "node[2-3]", "--num-gpus", "3", "--json", "--", "dump.py")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # nothing but JSON on stdout
    assert data["selection"] == {"include": "node[2-3]", "num_gpus": 3}
    assert data["world"] == {"world_size": 3, "master_addr": "127.0.0.12", "hosts": [
        {"host": "node2", "node": 0, "ranks": [0, 1], "gpus": "0-1"},
        {"host": "node3", "node": 1, "ranks": [2], "gpus": "0"}]}
    ranks = outputs(fab.cwd, 3)
    assert [ranks[r]["env"]["FABLAUNCH_HOST"] for r in range(3)] == ["node2", "node2", "node3"]


def test_a_dry_run_shows_the_selected_world_and_touches_nothing(fab: Fab, job: str) -> None:
    fab.write("hosts", "node[1-3] slots=2")
    result = fab("launch-torchrun", "--job", job, "--dry-run", "--num-nodes", "2", "--exclude", "node1:0", "--",
                 "train.py")
    assert result.returncode == 0, result.stderr
    assert "World after --exclude node1:0 --num-nodes 2: WORLD_SIZE 3 on 2 hosts" in result.stdout
    assert "--nnodes 2 --nproc-per-node 1" in result.stdout and f"export {DEVICES_VAR}=1" in result.stdout
    dry = fab("launch-torchrun", "--job", job, "--dry-run", "--json", "--num-nodes", "2", "--", "train.py")
    assert json.loads(dry.stdout)["world"]["world_size"] == 4
    assert not any(sessions(fab.cluster, job).values()) and not (fab.cwd / ".fablaunch").exists()


def test_torchrun_without_the_first_host_and_a_gpu_meets_at_the_next_host(fab: Fab, job: str) -> None:
    fab.write("hosts", "node[1-3] slots=2")
    result = fab("launch-torchrun", "--job", job, "--port", str(master_port()), "--exclude", "node1@node3:0",
                 "--", "dump.py")
    assert result.returncode == 0, result.stderr
    assert sessions(fab.cluster, job) == {"node1": [], "node2": [f"{job}-node-0"], "node3": [f"{job}-node-1"]}
    ranks = outputs(fab.cwd, 3, timeout=240)
    by_host = sorted((r["env"]["FABLAUNCH_HOST"], r["env"]["LOCAL_RANK"], r["env"].get(DEVICES_VAR))
                     for r in ranks)
    assert by_host == [("node2", "0", None), ("node2", "1", None), ("node3", "0", "1")]
    assert {r["env"]["WORLD_SIZE"] for r in ranks} == {"3"}
    script = (JOBS / job / "node3" / "node-1.sh").read_text()  # the rendezvous is on node2, the first one left
    assert "--rdzv-endpoint 127.0.0.12:" in script and "--nnodes 2 --nproc-per-node 1 " in script


def test_status_and_stop_take_hosts_inline(fab: Fab, job: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    fab.write("gpus", "node[2-3]")
    assert fab("launch-gpus", "--job", job, "--port", str(master_port()), "--", "sleeper.py").returncode == 0
    wait_until(lambda: len(live_pids(job)) >= 2, 20)
    elsewhere = tmp_path_factory.mktemp("elsewhere")  # no launch records there: only the flag names hosts
    status = fab("status", "--job", job, "--gpus", "node[1-3]", "--json", cwd=elsewhere)
    assert status.returncode == 0, status.stderr
    assert sorted(s["host"] for s in json.loads(status.stdout)) == ["node2", "node3"]
    typo = fab("stop", "--job", job, "--hosts", "nodes", cwd=elsewhere)
    assert typo.returncode == 2 and "nodes: no such file" in typo.stderr and "--hosts 'node[1-3]'" in typo.stderr
    assert len(live_pids(job)) >= 2  # nothing was stopped on a guess
    stopped = fab("stop", "--job", job, "--hosts", "node3,node2", "--grace", "1", cwd=elsewhere)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not live_pids(job)


# Bad selections exit 2 naming the flag (or FILE:LINE) and launch nothing; same checks as test_faults_input.
BAD = {
    "gpus-file-bad-range": Case(["launch-gpus", "--job", "{job}", "--gpus", "g", "--", "dump.py"],
                                ["g:2:", "'node[3-1]' is not a valid host range"], {"g": "node1\nnode[3-1]\n"}),
    "hosts-file-huge-range": Case(["launch-torchrun", "--job", "{job}", "--hosts", "h", "--", "dump.py"],
                                  ["h:1:", "99999999 hosts"], {"h": "node[1-99999999] slots=1\n"}),
    "gpus-flag-bad-range": Case(["launch-gpus", "--job", "{job}", "--gpus", "node[1-", "--", "dump.py"],
                                ["--gpus:", "brackets must pair up"]),
    "hosts-flag-typo": Case(["launch-torchrun", "--job", "{job}", "--hosts", "hostz", "--", "dump.py"],
                            ["hostz: no such file", "--hosts node1,"]),
    "exclude-unknown-host": Case(["launch-gpus", "--job", "{job}", "--exclude", "node9", "--", "dump.py"],
                                 ["--exclude:", "'node9' is not one of the job's hosts"]),
    "include-gpu-out-of-range": Case(["launch-gpus", "--job", "{job}", "--include", "node1:1", "--", "dump.py"],
                                     ["--include:", "node1 has no GPU 1"]),
    "num-nodes-too-many": Case(["launch-gpus", "--job", "{job}", "--num-nodes", "4", "--", "dump.py"],
                               ["--num-nodes:", "only 3 hosts remain"]),
    "num-gpus-zero": Case(["launch-torchrun", "--job", "{job}", "--num-gpus", "0", "--", "dump.py"],
                          ["--num-gpus:", "at least 1"]),
    "num-gpus-fullwidth": Case(["launch-gpus", "--job", "{job}", "--num-gpus", "\uff12", "--", "dump.py"],
                               ["--num-gpus:"]),
    "exclude-everything": Case(["launch-gpus", "--job", "{job}", "--exclude", "node[1-3]", "--", "dump.py"],
                               ["selects no host at all"]),
    "include-with-slurm": Case(["launch-gpus", "--slurm", "--job", "{job}", "--include", "node1", "--", "dump.py"],
                               ["--include:", "--nodelist"]),
    "exclude-gpus-with-slurm": Case(["launch-gpus", "--slurm", "--job", "{job}", "--exclude", "node1:0", "--",
                                     "dump.py"], ["--exclude:", "GPU indices are for launches over ssh"]),
    "spec-selection-with-slurm": Case(["launch-gpus", "--slurm", "--spec", "s.yaml", "--job", "{job}", "--",
                                       "dump.py"], ["spec keys exclude", "slurm:"], {"s.yaml": "exclude: node1\n"}),
    "spec-num-nodes-not-int": Case(["launch-gpus", "--spec", "s.yaml", "--job", "{job}", "--", "dump.py"],
                                   ["s.yaml: key 'num_nodes'", "integer"], {"s.yaml": "num_nodes: two\n"}),
    "cuda-visible-devices-and-gpu-indices": Case(
        ["launch-gpus", "--job", "{job}", "--gpus", "node1,node1", "--exclude", "node1:0", "--env",
         f"{DEVICES_VAR}=3", "--", "dump.py"], ["--env:", "give one or the other"]),
}


@pytest.mark.parametrize("case", list(BAD.values()), ids=list(BAD))
def test_a_bad_selection_exits_2_naming_it_and_launches_nothing(fab: Fab, job: str, case: Case) -> None:
    code, stdout, stderr = run_case(fab, job, case)
    assert code == 2, f"exit {code}\nstdout: {stdout[-2000:]}\nstderr: {stderr[-2000:]}"
    assert stderr.startswith("fablaunch: ") and "Traceback" not in stdout + stderr, stderr
    for words in case.says:
        assert words in stderr, f"{words!r} not in stderr: {stderr[-2000:]}"
    assert not any(sessions(fab.cluster, "").values()) and not live_pids(job)
    assert not (fab.cwd / ".fablaunch" / "records").exists()


def test_spec_keys_select_like_the_flags_and_flags_override_them(fab: Fab, job: str) -> None:
    fab.write("gpus", "node[1-3]")
    fab.write("job.yaml", f"job: {job}", "command: [train.py]", "exclude: node1", "num_gpus: 1")
    from_spec = json.loads(fab("launch-gpus", "--spec", "job.yaml", "--dry-run", "--json").stdout)
    assert from_spec["selection"] == {"exclude": "node1", "num_gpus": 1}
    assert [h["host"] for h in from_spec["world"]["hosts"]] == ["node2"]
    flags = json.loads(fab("launch-gpus", "--spec", "job.yaml", "--dry-run", "--json", "--exclude", "node2",
                           "--num-gpus", "2").stdout)
    assert [h["host"] for h in flags["world"]["hosts"]] == ["node1", "node3"]


def test_with_slurm_exclude_is_slurms_node_list(slurm: SlurmCluster, tmp_path: Path) -> None:
    sfab = SlurmFab(slurm, tmp_path)
    result = sfab("launch-gpus", "--slurm", "--job", "sel-slurm", "--nodes", "2", "--exclude", "node3",
                  "--dry-run", "--", "train.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "#SBATCH --exclude=node3" in result.stdout and "World after" not in result.stdout
    assert not sfab.files("sel-slurm").exists()
