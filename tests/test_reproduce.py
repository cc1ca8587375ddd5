"""reproduce rebuilds the tree a run recorded, against a real MLflow server and real git."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ops.errors import OpsError
from ops.reproduce import reproduce
from ops.source import hash_tree
from ops.tracking import SourceStateWarning, tracked_run
from tests.fixtures_mlflow import git


def log_run(project: Path, **options) -> str:
    with tracked_run("reproduce", params={"lr": 0.1}, source_dir=project, **options) as run:
        pass
    return run.run_id


def rebuild(run_id: str, project: Path, tmp_path: Path):
    return reproduce(run_id, tmp_path / "rebuilt", repo_dir=project)


def test_reproduce_rebuilds_a_clean_tree_with_the_same_hash(tracking_uri, project, tmp_path):
    run_id = log_run(project)

    result = rebuild(run_id, project, tmp_path)

    assert result.ok, result.render()
    assert result.how == "worktree"
    assert result.rebuilt_hash == git(project, "rev-parse", "HEAD^{tree}")
    assert (result.dest / "src" / "train.py").read_text() == "print('training')\n"
    assert "parameters: lr=0.1" in result.render()
    # The interpreter is named plainly: the one the run used may not exist here.
    assert f"run it again: cd {result.dest} && python " in result.render()


def test_reproduce_rebuilds_a_dirty_tree_with_the_same_hash(tracking_uri, project, tmp_path):
    (project / "README.md").write_text("# project\nstaged\n")
    git(project, "add", "README.md")
    (project / "README.md").write_text("# project\nstaged\nthen unstaged\n")
    (project / "src" / "train.py").unlink()
    (project / "weights.bin").write_bytes(bytes(range(255, -1, -1)) * 4)
    (project / "run.sh").write_text("#!/bin/sh\necho run\n")
    (project / "run.sh").chmod(0o755)
    git(project, "add", "run.sh")
    recorded_hash, _ = hash_tree(project)
    run_id = log_run(project)

    result = rebuild(run_id, project, tmp_path)

    assert result.ok, result.render()
    assert result.recorded_hash == recorded_hash
    assert (result.dest / "README.md").read_text() == "# project\nstaged\nthen unstaged\n"
    assert not (result.dest / "src" / "train.py").exists()
    assert (result.dest / "weights.bin").read_bytes() == bytes(range(255, -1, -1)) * 4
    assert os.access(result.dest / "run.sh", os.X_OK)


def test_reproduce_restores_untracked_text_and_binary_files(tracking_uri, project, tmp_path):
    (project / "notes.txt").write_text("a note\n")
    (project / "tool.py").write_text("print('tool')\n")
    (project / "tool.py").chmod(0o755)
    (project / "data.bin").write_bytes(b"\0binary\0" * 64)
    (project / "link").symlink_to("notes.txt")
    (project / "debug.log").write_text("ignored, so neither recorded nor rebuilt\n")
    run_id = log_run(project)

    result = rebuild(run_id, project, tmp_path)

    assert result.ok, result.render()
    assert sorted(result.restored) == ["data.bin", "link", "notes.txt", "tool.py"]
    assert (result.dest / "notes.txt").read_text() == "a note\n"
    assert (result.dest / "data.bin").read_bytes() == b"\0binary\0" * 64
    assert os.readlink(result.dest / "link") == "notes.txt"
    assert not (result.dest / "debug.log").exists()


def test_reproduce_lists_what_differs_when_a_listed_file_is_gone(tracking_uri, project, tmp_path):
    (project / "data.bin").write_bytes(b"\0binary\0" * 64)
    run_id = log_run(project)
    (project / "data.bin").unlink()

    result = rebuild(run_id, project, tmp_path)

    assert not result.ok
    assert result.differences == ["missing  data.bin"]
    assert "not restored: data.bin (binary, 512 B, sha256" in result.render()


def test_reproduce_rebuilds_a_run_from_a_detached_head(tracking_uri, project, tmp_path):
    (project / "README.md").write_text("second\n")
    git(project, "commit", "--quiet", "-am", "Second")
    git(project, "checkout", "--quiet", "--detach", "HEAD~1")
    (project / "README.md").write_text("changed on a detached head\n")
    run_id = log_run(project)
    git(project, "checkout", "--quiet", "--force", "main")

    result = rebuild(run_id, project, tmp_path)

    assert result.ok, result.render()
    assert result.commit == git(project, "rev-parse", "HEAD~1")
    assert (result.dest / "README.md").read_text() == "changed on a detached head\n"


def test_reproduce_rebuilds_a_run_whose_remote_url_carried_a_token(tracking_uri, project, tmp_path):
    git(project, "remote", "add", "origin", "https://bob:token@git.example.com/team/p.git")
    (project / "README.md").write_text("changed\n")
    run_id = log_run(project)

    result = rebuild(run_id, project, tmp_path)

    assert result.ok, result.render()
    assert result.how == "worktree"


def test_reproduce_clones_the_recorded_remote_when_run_outside_the_repository(
    tracking_uri, project, tmp_path
):
    remote = tmp_path / "remote.git"
    git(tmp_path, "clone", "--quiet", "--bare", str(project), str(remote))
    git(project, "remote", "add", "origin", str(remote))
    (project / "README.md").write_text("changed, not committed\n")
    (project / "notes.txt").write_text("untracked\n")
    run_id = log_run(project)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    result = reproduce(run_id, tmp_path / "rebuilt", repo_dir=elsewhere)

    assert result.ok, result.render()
    assert result.how == "clone"
    assert (result.dest / "notes.txt").read_text() == "untracked\n"


def test_reproduce_names_a_commit_that_was_never_pushed(tracking_uri, project, tmp_path):
    remote = tmp_path / "remote.git"
    git(tmp_path, "clone", "--quiet", "--bare", str(project), str(remote))
    git(project, "remote", "add", "origin", str(remote))
    git(project, "commit", "--quiet", "--allow-empty", "-m", "Not pushed")
    run_id = log_run(project)

    with pytest.raises(OpsError, match=r"is not in .*remote.git") as refused:
        reproduce(run_id, tmp_path / "rebuilt", repo_dir=tmp_path)

    assert "push the commit" in refused.value.hint
    assert not (tmp_path / "rebuilt").exists()


def test_reproduce_rebuilds_the_tree_of_a_run_whose_block_raised(tracking_uri, project, tmp_path):
    (project / "src" / "train.py").write_text("raise RuntimeError('diverged')\n")
    with pytest.raises(RuntimeError), tracked_run("reproduce", source_dir=project) as run:
        raise RuntimeError("diverged")

    result = rebuild(run.run_id, project, tmp_path)

    assert result.ok, result.render()


def test_reproduce_rebuilds_a_run_that_required_a_clean_tree(tracking_uri, project, tmp_path):
    run_id = log_run(project, require_clean=True)

    assert rebuild(run_id, project, tmp_path).ok


def test_reproduce_refuses_a_run_that_recorded_no_source(tracking_uri, tmp_path):
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    with pytest.warns(SourceStateWarning):
        run_id = log_run(outside)

    with pytest.raises(OpsError, match=r"recorded no source state: .*not inside a git repository"):
        reproduce(run_id, tmp_path / "rebuilt", repo_dir=outside)


def test_reproduce_refuses_a_destination_that_is_not_empty(tracking_uri, project, tmp_path):
    run_id = log_run(project)
    (tmp_path / "rebuilt").mkdir()
    (tmp_path / "rebuilt" / "keep.txt").write_text("mine\n")

    with pytest.raises(OpsError, match="is not an empty directory"):
        rebuild(run_id, project, tmp_path)

    assert (tmp_path / "rebuilt" / "keep.txt").read_text() == "mine\n"


def test_reproduce_refuses_an_unknown_run(tracking_uri, tmp_path):
    with pytest.raises(OpsError, match="there is no run 0123456789abcdef0123456789abcdef"):
        reproduce("0123456789abcdef0123456789abcdef", tmp_path / "rebuilt")


def test_reproduce_puts_the_worktree_next_to_the_repository_by_default(
    tracking_uri, project, tmp_path
):
    run_id = log_run(project)

    result = reproduce(run_id, repo_dir=project)

    assert result.dest == tmp_path / f"project-{run_id[:12]}"
    assert result.ok
