"""`fab sync`, `launch-* --sync` and doctor's code check (issue 11, item 3): code that arrives.

The fake hosts share this machine's filesystem, so syncing to this directory's own path is the
shared case (the shared `cluster`). For hosts with directories of their own, `homes` gives each
host its own HOME, and its shells start there (BASH_ENV cds into it, as sshd would into a real
home): a relative `--workdir proj` then names a different directory on every host, for rsync and
for a launch alike. node3 of `homes` has an rsync on its PATH that stalls while a flag file exists.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import fabric
import pytest

from fablaunch import sync
from fablaunch.hostfile import parse_host
from fablaunch.tasks import doctor
from tests.cluster import Cluster, port_open
from tests.conftest import FAB, REPO, SSH_PORT, Fab, alive, master_port, sessions, wait_until

DOWN = f"127.0.0.219:{SSH_PORT + 17}"  # nothing listens there


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three fake hosts on 127.0.0.201-203, each with its own home directory, where its shells start."""
    root = tmp_path_factory.mktemp("homes")
    (root / "cdhome.sh").write_text('cd "$HOME" || exit 1\n')
    stall = root / "bin"
    stall.mkdir()
    (stall / "rsync").write_text(f"#!/bin/sh\nwhile [ -e {root / 'stall'} ]; do sleep 0.2; done\n"
                                 f"exec {shutil.which('rsync')} \"$@\"\n")
    (stall / "rsync").chmod(0o755)
    host_env = {}
    for name in ("node1", "node2", "node3"):
        (root / "home" / name).mkdir(parents=True)
        host_env[name] = {"HOME": str(root / "home" / name), "BASH_ENV": str(root / "cdhome.sh")}
    host_env["node3"]["PATH"] = f"{stall}:{os.environ['PATH']}"
    assert not port_open(DOWN.split(":")[0], SSH_PORT + 17), "the address meant to be down answers"
    with Cluster(root / "c", 3, port=SSH_PORT + 17, base=201, env={"PATH": os.environ["PATH"]},
                 host_env=host_env) as c:
        yield c


def home(cluster: Cluster, name: str) -> Path:
    return cluster.root.parent / "home" / name


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git checkout as a training project is: tracked code, ignored outputs, nested .gitignore files."""
    root = tmp_path / "project"
    (root / "pkg" / "data").mkdir(parents=True)
    files = {
        "train.py": "print('v1')\n",
        "pkg/model.py": "LAYERS = 2\n",
        ".gitignore": "*.log\ncheckpoints/\n.tmux-local/\n!keep.log\n",
        "pkg/.gitignore": "data/\n",
        "pkg/data/shard-0.bin": "big data\n",
        "run.log": "a log\n",
        "keep.log": "git tracks this one\n",
        "checkpoints/step-1.pt": "weights\n",
        "notes.txt": "untracked, not ignored\n",
        ".fablaunch/records/old.json": "{}\n",
        ".fablaunch.env": "WANDB_API_KEY=not-for-the-hosts-disks\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "train.py", "pkg/model.py", ".gitignore", "pkg/.gitignore"], check=True)
    subprocess.run([*git, "add", "-f", "keep.log"], check=True)
    subprocess.run([*git, "commit", "-qm", "v1"], check=True)
    (root / "hosts").write_text("node1\nnode2\nnode3\n")
    return root


# Exactly what a host gets: git's files (tracked, or untracked and not ignored), never .git, .fablaunch/ or
# .fablaunch.env.
SHIPPED = {"train.py", "pkg/model.py", ".gitignore", "pkg/.gitignore", "keep.log", "notes.txt", "hosts"}


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


def sync_json(fab: Fab, *flags: str) -> tuple[subprocess.CompletedProcess[str], dict[str, dict]]:
    result = fab("sync", "--json", *flags)
    assert "Traceback" not in result.stderr, result.stderr
    return result, {row["host"]: row for row in json.loads(result.stdout)}


# --- hosts with directories of their own ---------------------------------------------------------------------


def test_the_code_arrives_on_every_host_as_git_sees_it_and_a_second_sync_copies_nothing(
        homes: Cluster, project: Path) -> None:
    fab = Fab(homes, project)
    result, rows = sync_json(fab, "--workdir", "my proj")  # a space: one word for ssh, rsync and the shell
    assert result.returncode == 0, result.stderr
    for name in homes.names:
        dest = home(homes, name) / "my proj"
        assert rows[name]["result"] == "synced" and rows[name]["dest"] == str(dest)
        assert tree(dest) == SHIPPED
        assert (dest / "train.py").read_text() == "print('v1')\n"
        assert rows[name]["files"] == len(SHIPPED)
    assert not list(project.glob(".fablaunch-sync-*")), "the marker is removed"

    again, rows = sync_json(fab, "--workdir", "my proj")
    assert again.returncode == 0 and {r["files"] for r in rows.values()} == {0}

    (project / "train.py").write_text("print('v2')\n")
    third, rows = sync_json(fab, "--workdir", "my proj", "--exclude", "notes.txt")
    assert third.returncode == 0 and {r["files"] for r in rows.values()} == {1}
    assert (home(homes, "node2") / "my proj" / "train.py").read_text() == "print('v2')\n"


def test_outside_git_every_gitignore_is_honoured_and_excludes_add_to_them(homes: Cluster, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    (plain / "sub").mkdir(parents=True)
    for name, text in {"a.py": "", ".gitignore": "*.log\n", "x.log": "", "sub/.gitignore": "secret\n",
                       "sub/secret": "", "sub/b.py": "", "sub/c.tmp": "", "hosts": "node1\n"}.items():
        (plain / name).write_text(text)
    result = Fab(homes, plain)("sync", "--workdir", "plain", "--exclude", "*.tmp")
    assert result.returncode == 0, result.stderr
    assert tree(home(homes, "node1") / "plain") == {"a.py", ".gitignore", "sub/.gitignore", "sub/b.py", "hosts"}
    assert "every .gitignore" in result.stdout  # the table says how files were picked


def test_hosts_that_share_a_directory_with_each_other_get_one_copy(homes: Cluster, project: Path,
                                                                     tmp_path: Path) -> None:
    """An absolute workdir is one directory for all the fake hosts, but not this project's: an NFS
    the cluster shares, launched from a laptop."""
    dest = tmp_path / "nfs" / "proj"
    result, rows = sync_json(Fab(homes, project), "--workdir", str(dest))
    assert result.returncode == 0, result.stderr
    assert rows["node1"]["result"] == "synced" and rows["node1"]["files"] == len(SHIPPED)
    for name in ("node2", "node3"):
        assert rows[name]["result"] == "shared" and "node1" in rows[name]["detail"]
    assert tree(dest) == SHIPPED, "no marker of any host is left behind"


def test_a_host_that_is_down_is_reported_and_the_others_get_the_code(homes: Cluster, project: Path) -> None:
    (project / "hosts").write_text(f"node1\n{DOWN}\n")
    result, rows = sync_json(Fab(homes, project), "--workdir", "down-case")
    assert result.returncode == 1
    assert rows[DOWN]["result"] == "failed" and "connection refused" in rows[DOWN]["detail"]
    assert rows["node1"]["result"] == "synced" and (home(homes, "node1") / "down-case" / "train.py").exists()
    assert f"sync failed on {DOWN}" in result.stderr


def test_a_stalled_copy_is_cut_at_its_deadline_and_the_others_finish(homes: Cluster, project: Path) -> None:
    (homes.root.parent / "stall").touch()
    try:
        start = time.monotonic()
        result = Fab(homes, project)("-T", "4", "sync", "--workdir", "stalled")
        took = time.monotonic() - start
    finally:
        (homes.root.parent / "stall").unlink()
    assert result.returncode == 1, result.stdout + result.stderr
    # Cut by the wall deadline or by rsync's own --timeout (the smaller of 60 s and the deadline): both 4 s.
    assert "node3  timed out" in result.stdout and "4s" in result.stdout
    assert (home(homes, "node1") / "stalled" / "train.py").exists()
    assert took < 20


def test_dry_run_lists_what_would_go_and_changes_nothing(homes: Cluster, project: Path) -> None:
    fab = Fab(homes, project)
    result, rows = sync_json(fab, "--workdir", "dry", "--dry-run")
    assert result.returncode == 0, result.stderr
    for name in homes.names:
        assert rows[name]["result"] == "would sync"
        assert sorted(rows[name]["would_copy"]) == sorted(SHIPPED)
        assert not (home(homes, name) / "dry").exists()
    shown = fab("sync", "--workdir", "dry", "--dry-run")
    assert "node1, node2, node3: would copy 7 files" in shown.stdout and "pkg/model.py" in shown.stdout
    assert "nothing was copied" in shown.stdout


def test_ctrl_c_during_the_copies_ends_every_rsync_and_leaves_no_marker(homes: Cluster, project: Path) -> None:
    (homes.root.parent / "stall").touch()
    try:
        proc = subprocess.Popen([FAB, "-r", str(REPO), "-S", str(homes.ssh_config), "sync", "--workdir", "cut"],
                                cwd=project, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        wait_until(lambda: rsyncs(proc.pid), timeout=30)
        time.sleep(1)  # node1 and node2 are done by now; node3's rsync waits for its host
        started = rsyncs(proc.pid)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        (homes.root.parent / "stall").unlink()
    assert proc.returncode == 130, out + err
    assert "interrupted" in err and "Traceback" not in err
    assert started and not [pid for pid in started if alive(pid)]
    assert not list(project.glob(".fablaunch-sync-*"))
    for name in homes.names:
        assert not list((home(homes, name) / "cut").glob(".fablaunch-sync-*"))


def rsyncs(pid: int) -> list[int]:
    """The local rsync processes (and their ssh) that the fab process `pid` started, in any process group."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in table.splitlines() if len(line.split(None, 2)) == 3]
    found, frontier = [], {pid}
    while frontier:
        kids = [(int(p), a) for p, pp, a in rows if int(pp) in frontier]
        found += [p for p, a in kids if a.startswith(("rsync", "ssh"))]
        frontier = {p for p, _ in kids}
    return found


# --- launch --sync ------------------------------------------------------------------------------------------


WHERE = "import json, os\nopen(f'ran-{os.environ[\"RANK\"]}.json', 'w').write(json.dumps({'cwd': os.getcwd(), " \
        "'version': open('version.txt').read()}))\n"


def test_launch_with_sync_runs_the_code_it_copied_on_every_host(homes: Cluster, project: Path, job: str) -> None:
    (project / "where.py").write_text(WHERE)
    (project / "version.txt").write_text("fresh")
    (project / "gpus").write_text("node1\nnode2\nnode3\n")
    launched = Fab(homes, project)("launch-gpus", "--job", job, "--workdir", "launched", "--sync", "--json",
                                   "--port", str(master_port()), "--", "where.py")
    assert launched.returncode == 0, launched.stderr
    data = json.loads(launched.stdout)
    assert [r["result"] for r in data["sync"]] == ["synced"] * 3
    for rank, name in enumerate(homes.names):
        out = home(homes, name) / "launched" / f"ran-{rank}.json"
        wait_until(out.exists, timeout=30)
        assert json.loads(out.read_text()) == {"cwd": str(home(homes, name) / "launched"), "version": "fresh"}


def test_launch_with_sync_starts_nothing_when_a_host_cannot_get_the_code(homes: Cluster, project: Path,
                                                                          job: str) -> None:
    (project / "gpus").write_text(f"node1\n{DOWN}\n")
    result = Fab(homes, project)("launch-gpus", "--job", job, "--workdir", "refused", "--sync",
                                 "--port", str(master_port()), "--", "train.py")
    assert result.returncode == 1
    assert f"the code did not reach {DOWN}" in result.stderr and "nothing was launched" in result.stderr
    assert sessions(homes, job) == {name: [] for name in homes.names}
    assert not (project / ".fablaunch" / "records" / f"{job}.json").exists()


# --- the shared case: every fake host sees this machine's directories -----------------------------------------


def test_hosts_that_see_this_directory_are_skipped(fab: Fab, cluster: Cluster) -> None:
    fab.write("hosts", "node1", "node2", "node3")
    fab.write("model.py", "x = 1")
    before = {p: p.stat().st_mtime_ns for p in fab.cwd.rglob("*") if p.is_file()}
    result, rows = sync_json(fab)
    assert result.returncode == 0, result.stderr
    assert {r["result"] for r in rows.values()} == {"shared"}
    assert {r["dest"] for r in rows.values()} == {str(fab.cwd)}
    assert {p: p.stat().st_mtime_ns for p in fab.cwd.rglob("*") if p.is_file()} == before, "nothing touched"


def test_launch_with_sync_on_a_shared_directory_copies_nothing_and_launches(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2")
    result = fab("launch-gpus", "--job", job, "--sync", "--port", str(master_port()), "--", "sleeper.py")
    assert result.returncode == 0, result.stderr
    assert "node2  shared" in result.stdout and f"Launched {job}" in result.stdout


# --- doctor: is the code on each host the same as here? ----------------------------------------------------------


def test_doctor_says_whether_each_hosts_code_matches_this_directory(homes: Cluster, project: Path) -> None:
    fab = Fab(homes, project)
    assert fab("sync", "--workdir", "checked").returncode == 0
    (home(homes, "node2") / "checked" / "pkg" / "model.py").write_text("LAYERS = 3\n")
    (home(homes, "node3") / "checked" / "train.py").unlink()
    (project / "notes.txt").write_text("untracked files do not count")
    result = fab("doctor", "--workdir", "checked", "--json", "--port", str(master_port()), timeout=300)
    code = {item["host"]: item["code"] for item in json.loads(result.stdout)}
    assert code["node1"]["status"] == "ok"
    assert code["node2"]["status"] == "warn" and code["node2"]["value"] == 1
    assert "pkg/model.py" in code["node2"]["message"]
    assert code["node3"]["status"] == "warn" and "train.py" in code["node3"]["message"]
    shown = fab("doctor", "--workdir", "checked", "--port", str(master_port()), timeout=300)
    assert "WARN node2 code: 1 of 5 tracked files in ~/checked differ" in " ".join(shown.stdout.split())


def test_doctor_skips_the_code_check_outside_git(fab: Fab) -> None:
    fab.write("hosts", "node1")
    result = fab("doctor", "--json", "--port", str(master_port()), timeout=300)
    code = json.loads(result.stdout)[0]["code"]
    assert code == {"status": "skip", "value": None, "message": "not a git checkout here: skipped"}


# --- input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "flag"), [
    (["--exclude", ""], "--exclude"),
    (["--exclude", "a\nb"], "--exclude"),
    (["--parallel", "0"], "--parallel"),
    (["--workdir", " "], "--workdir"),
    (["--hosts", "missing-file"], "missing-file"),
])
def test_bad_input_exits_2_naming_the_flag_and_touches_nothing(fab: Fab, flags: list[str], flag: str) -> None:
    fab.write("hosts", "node1")
    result = fab("sync", *flags)
    assert result.returncode == 2 and f"fablaunch: {flag}" in result.stderr, result.stderr
    assert not list(fab.cwd.glob(".fablaunch-sync-*"))


def test_sync_and_slurm_together_are_refused(fab: Fab) -> None:
    result = fab("launch-gpus", "--slurm", "--sync", "--dry-run", "--", "train.py")
    assert result.returncode == 2 and "fablaunch: --sync:" in result.stderr


def test_every_flag_has_help_that_reads_whole_at_80_columns() -> None:
    for name in ("sync", "launch-gpus", "launch-torchrun"):
        out = subprocess.run([FAB, "-r", str(REPO), "--help", name], capture_output=True, text=True,
                             env={**os.environ, "COLUMNS": "80"}).stdout
        options = out.split("Options:", 1)[1].splitlines()
        for line in options:
            if line.strip().startswith("-"):  # a flag's line: the flag, then its help on the same line
                assert len(line.strip().split("  ", 1)) == 2 or options[options.index(line) + 1].startswith(" " * 10), \
                    line
        assert (name != "sync") or all(f"--{f}" in out for f in ("exclude", "dry-run", "workdir", "json"))


# --- pure parts: command lines, file lists, parsing -------------------------------------------------------------


def test_rsync_runs_over_ssh_with_fabs_ssh_config_key_port_and_connect_deadline(tmp_path: Path) -> None:
    config_file = tmp_path / "my ssh config"
    config_file.write_text("Host slow\n    ConnectTimeout 7\n    StrictHostKeyChecking yes\n")
    config = fabric.Config(runtime_ssh_path=str(config_file))
    config.connect_kwargs.key_filename = ["/keys/a key"]
    argv = sync.ssh_argv(config, parse_host("alice@slow:2200", "x"))
    assert argv == ["ssh", "-F", str(config_file), "-i", "/keys/a key", "-p", "2200", "-o", "ConnectTimeout=7",
                    "-o", "BatchMode=yes"]  # ssh_config's own StrictHostKeyChecking is left to it
    config.connect_kwargs.timeout = 2.5  # fab -t
    assert "ConnectTimeout=3" in sync.ssh_argv(config, parse_host("other", "x"))
    assert "StrictHostKeyChecking=accept-new" in sync.ssh_argv(config, parse_host("other", "x"))
    rsync = sync.rsync_argv("/src", sync.destination(parse_host("alice@slow:2200", "x"), "/dst dir"), ssh=argv,
                            files_from=None)
    assert rsync[rsync.index("-e") + 1] == f"ssh -F '{config_file}' -i '/keys/a key' -p 2200 -o ConnectTimeout=7 " \
                                          "-o BatchMode=yes"
    assert rsync[-2:] == ["/src/", "alice@slow:/dst dir/"]


def test_rsync_never_ships_git_or_job_records_and_deletes_nothing() -> None:
    argv = sync.rsync_argv("/src", "/dst", ssh=None, files_from="/tmp/list", excludes=["*.ckpt"], io_timeout=9)
    assert "-e" not in argv and "--timeout=9" in argv
    assert {"--exclude=.git", "--exclude=/.fablaunch/", "--exclude=.fablaunch-sync-*", "--exclude=*.ckpt"} <= set(argv)
    assert "--files-from=/tmp/list" in argv and "--from0" in argv and "--filter=:- .gitignore" not in argv
    assert not [a for a in argv if a.startswith("--delete")]
    plain = sync.rsync_argv("/src", "/dst", ssh=None, files_from=None, dry_run=True)
    assert "--filter=:- .gitignore" in plain and "--recursive" in plain and "--dry-run" in plain


def test_an_ssh_word_holding_both_quotes_is_refused() -> None:
    with pytest.raises(sync.UsageError):
        sync.rsync_argv("/s", "h:/d", ssh=["ssh", "-F", "it's \"odd\""], files_from=None)


def test_hosts_that_see_one_anothers_markers_are_grouped_under_the_first() -> None:
    assert sync.groups({0: {0, 2}, 1: {1}, 2: {0, 2}, 3: {3, 4}, 4: {3, 4}}) == {0: 0, 1: 1, 2: 0, 3: 3, 4: 3}


def test_rsync_output_is_read_for_counts_listings_and_reasons() -> None:
    lines = ["Number of regular files transferred: 1,234", "Total transferred file size: 5.678.901 bytes",
             ">f+++++++++ a b.py", "cd+++++++++ pkg/", ".f..t...... same.py", "cL+++++++++ link -> a b.py"]
    assert sync.parse_stats(lines) == (1234, 5678901)
    assert sync.listed(lines) == ["a b.py", "link -> a b.py"]
    run = sync._Run(12, [], "bash: line 1: rsync: command not found\nrsync: connection unexpectedly closed (0 bytes)"
                            "\nrsync error: error in rsync protocol data stream (code 12)\n", False, 1.0)
    assert sync.failure(run, 600, 60) == ("failed", "bash: line 1: rsync: command not found")
    assert sync.failure(sync._Run(30, [], "", False, 1.0), 600, 60)[0] == "timed out"
    assert sync.failure(sync._Run(-9, [], "", True, 1.0), 600, 60) == ("timed out", "timed out after 600s")


def test_a_host_without_rsync_says_so(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("mkdir", "tail"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or tool)
    payload = sync.probe_payload(str(tmp_path / "dest"), ".fablaunch-sync-x", 0, dry_run=False)
    out = subprocess.run(["/bin/bash", "-c", payload], env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
                         capture_output=True, text=True, cwd=tmp_path).stdout
    assert f"dest={tmp_path / 'dest'}" in out and "rsync=no" in out and not (tmp_path / "dest").exists()


def test_code_hashes_are_checked_on_the_host_by_sha256sum_odd_names_included(tmp_path: Path) -> None:
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    names = ["plain.py", "with space.py", "back\\slash.py", "new\nline.py", "é.py"]
    for name in names:
        (here / name).write_text(name)
    subprocess.run(["git", "-C", str(here), "init", "-q"], check=True)
    subprocess.run(["git", "-C", str(here), "add", "."], check=True)
    manifest = sync.code_manifest(here)
    assert manifest is not None and manifest.count(b"\n") == len(names)  # a name's own line break is escaped
    shutil.copytree(here, there)

    def judge() -> doctor.Check:
        out = subprocess.run(["bash", "-c", sync.verify_payload(str(there), manifest)], capture_output=True,
                             text=True).stdout
        return doctor.code_check({**doctor.parse_fields(out), "workdir": "ok"}, manifest, "there")

    assert judge().status == "ok"
    (there / "new\nline.py").write_text("changed")
    (there / "plain.py").unlink()
    check = judge()
    assert check.status == "warn" and check.value == 2 and check.text == "differs (2 files)"


def test_git_files_are_what_git_would_add_less_what_is_never_copied(project: Path) -> None:
    (project / "train.py").rename(project / "moved.py")  # a tracked file deleted here: not listed
    files = {f.decode() for f in sync.git_files(project) or []}
    assert files == (SHIPPED - {"train.py"}) | {"moved.py"}
    assert sync.git_files(project / "checkpoints") is not None  # inside the checkout, ignored or not
