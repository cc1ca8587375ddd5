"""Rebuild the source tree that produced a run logged through ``ops.tracking``.

``reproduce(run_id)`` reads the run's ``source/`` artifacts, then:

1. checks out the recorded commit: a detached git worktree when ``repo_dir`` (by default
   the current directory) is in a repository that has the commit, else a fresh clone of
   the recorded remote;
2. applies the recorded patch of staged and unstaged changes;
3. restores the untracked files: copied text files from the run's artifacts, symbolic
   links from their recorded target, and files that were only listed (large or binary)
   from the local working tree when one there still has the recorded SHA-256;
4. compares the rebuilt tree hash (defined in ``ops.source``) with the recorded one and,
   when they differ, lists the paths that differ.

The result says where the tree is and how to run the run again. On failure nothing is
left behind: a worktree or clone made by the call is removed again.

Limitations: a file that was only listed and is no longer in the local tree, or not there
with the same content, cannot be restored, and the result names it; a fresh clone needs
the recorded commit to have been pushed, and uses the remote URL without the credentials
that were stripped from it, so git asks its credential helper as usual.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ops.errors import OpsError
from ops.source import (
    SourceUnavailable,
    TreeEntry,
    UntrackedFile,
    find_root,
    git,
    hash_tree,
    run_git,
    sha256_file,
)

# The result lists at most this many differing paths; the count says how many there are.
SHOWN_DIFFERENCES = 20


@dataclasses.dataclass
class Result:
    """What ``reproduce`` rebuilt, and whether it matches the run's record."""

    run_id: str
    dest: Path
    commit: str
    how: str  # "worktree" or "clone"
    patched: int
    restored: list[str]
    missing: list[UntrackedFile]
    recorded_hash: str
    rebuilt_hash: str
    differences: list[str]
    params: dict[str, str]
    command: str
    cwd: str | None

    @property
    def ok(self) -> bool:
        return self.recorded_hash == self.rebuilt_hash

    def __str__(self) -> str:
        made = f"{self.how} at {self.commit[:12]}"
        if self.patched:
            made += f", {_count(self.patched, 'changed file')} patched"
        if self.restored:
            made += f", {_count(len(self.restored), 'untracked file')} restored"
        if self.ok:
            verdict = f"tree hash {self.rebuilt_hash[:12]} matches the run"
        else:
            verdict = (
                f"tree hash {self.rebuilt_hash[:12]} differs from the recorded "
                f"{self.recorded_hash[:12]} in {_count(len(self.differences), 'path')}"
            )
        return f"Rebuilt run {self.run_id} in {self.dest} ({made}): {verdict}"

    def render(self) -> str:
        """The summary line, what differs, the parameters and the command to run again."""
        lines = [str(self)]
        # A file that could not be restored is named once, with what is known of it.
        unrestored = {entry.path for entry in self.missing}
        shown = [line for line in self.differences if line.split(maxsplit=1)[1] not in unrestored]
        lines += [f"  {line}" for line in shown[:SHOWN_DIFFERENCES]]
        if len(shown) > SHOWN_DIFFERENCES:
            lines.append(f"  ... and {len(shown) - SHOWN_DIFFERENCES} more")
        for entry in self.missing:
            lines.append(f"  not restored: {entry.describe()}, only listed when the run started")
        if self.params:
            values = " ".join(f"{key}={value}" for key, value in sorted(self.params.items()))
            lines.append(f"  parameters: {values}")
        where = self.dest / self.cwd if self.cwd else self.dest
        lines.append(f"  run it again: cd {shlex.quote(str(where))} && {self.command}")
        lines.append("  with the packages the run had: its artifact environment/requirements.txt")
        if self.how == "worktree":
            lines.append(
                f"  remove it with: git worktree remove --force {shlex.quote(str(self.dest))}"
            )
        return "\n".join(lines)


def reproduce(
    run_id: str,
    dest: Path | None = None,
    tracking_uri: str | None = None,
    *,
    repo_dir: Path | None = None,
) -> Result:
    """Rebuild the source tree of ``run_id`` in ``dest`` and check it against the record.

    Args:
        run_id: the run, as MLflow names it.
        dest: an absent or empty directory; by default next to the repository (for a
            worktree) or in the current directory (for a clone), named after the run.
        tracking_uri: the server; by default ``MLFLOW_TRACKING_URI``.
        repo_dir: where to look for a local repository holding the commit; by default
            the current directory.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    run = _get_run(client, run_id)
    with tempfile.TemporaryDirectory(prefix="ops-reproduce-") as scratch:
        record = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="source", dst_path=scratch, tracking_uri=tracking_uri
            )
        )
        state = json.loads((record / "state.json").read_text(encoding="utf-8"))
        local = _local_repository(Path(repo_dir or Path.cwd()), state["commit"])
        target = Path(dest) if dest is not None else _default_dest(local, state, run_id)
        target = target.resolve()
        _check_empty(target)
        how = _checkout(local, state, target)
        try:
            result = _rebuild(run, record, state, local, target, how)
        except BaseException:
            _remove(local, target, how)
            raise
    return result


def _get_run(client: MlflowClient, run_id: str):
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise OpsError(
                f"there is no run {run_id} on {client.tracking_uri}",
                hint="check the run id, and that MLFLOW_TRACKING_URI names the team's server",
            ) from None
        raise
    tags = run.data.tags
    if "ops.source.missing" in tags:
        raise OpsError(
            f"run {run_id} recorded no source state: {tags['ops.source.missing']}",
            hint="there is no code to rebuild; log runs from a git checkout to make them "
            "reproducible",
        )
    if "ops.source.tree_hash" not in tags:
        raise OpsError(
            f"run {run_id} was not logged through ops.tracking, so it has no source state",
            hint="log runs with ops.tracking.tracked_run to make them reproducible",
        )
    return run


def _local_repository(repo_dir: Path, commit: str) -> Path | None:
    """The top of the local repository when it has the commit, else None."""
    try:
        root = find_root(repo_dir)
    except SourceUnavailable:
        return None
    return root if _has_commit(root, commit) else None


def _has_commit(root: Path, commit: str) -> bool:
    return run_git(["cat-file", "-e", f"{commit}^{{commit}}"], root).returncode == 0


def _fetch(root: Path, commit: str) -> bool:
    return run_git(["fetch", "--quiet", "origin", commit], root).returncode == 0


def _default_dest(local: Path | None, state: dict, run_id: str) -> Path:
    # A worktree inside the repository would show up there as a nested repository and
    # change the next run's tree hash, so it goes next to it.
    if local is not None:
        return local.parent / f"{local.name}-{run_id[:12]}"
    return Path.cwd() / f"reproduce-{run_id[:12]}"


def _check_empty(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise OpsError(
            f"{target} already exists and is not an empty directory",
            hint="pass --dest with a new directory, or remove that one "
            "(git worktree remove, if it is an earlier rebuild)",
        )


def _checkout(local: Path | None, state: dict, target: Path) -> str:
    commit = state["commit"]
    if local is not None:
        git(["worktree", "add", "--detach", str(target), commit], local)
        return "worktree"
    remote = state.get("remote")
    if not remote:
        raise OpsError(
            f"commit {commit} is not in a repository here, and the run recorded no remote "
            "to clone it from",
            hint="run reproduce inside a clone of the project that has the commit",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    git(["clone", "--quiet", "--no-checkout", remote, str(target)], target.parent)
    try:
        # A commit on no branch of the remote may still be fetched by its id, which most
        # hosts allow for commits that are reachable from something they keep.
        if not _has_commit(target, commit) and not _fetch(target, commit):
            raise OpsError(
                f"commit {commit} is not in {remote}",
                hint="push the commit the run was started from, or run reproduce "
                "inside the repository where it was made",
            )
        git(["checkout", "--quiet", "--detach", commit], target)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return "clone"


def _rebuild(run, record: Path, state: dict, local, target: Path, how: str) -> Result:
    patch = record / "patch.diff"
    if patch.exists():
        git(["apply", "--binary", "--whitespace=nowarn", str(patch)], target)

    restored, missing = [], []
    for entry in (UntrackedFile(**item) for item in state["untracked"]):
        if _restore(entry, record, local, target):
            restored.append(entry.path)
        else:
            missing.append(entry)

    rebuilt_hash, rebuilt = hash_tree(target)
    differences = []
    if rebuilt_hash != state["tree_hash"]:
        recorded = json.loads((record / "tree.json").read_text(encoding="utf-8"))
        differences = _differences([TreeEntry(*row) for row in recorded], rebuilt)
    return Result(
        run_id=run.info.run_id,
        dest=target,
        commit=state["commit"],
        how=how,
        patched=len(state.get("changed", [])),
        restored=restored,
        missing=missing,
        recorded_hash=state["tree_hash"],
        rebuilt_hash=rebuilt_hash,
        differences=differences,
        params=dict(run.data.params),
        command=_command(state),
        cwd=state.get("cwd"),
    )


def _command(state: dict) -> str:
    """The recorded command line, its interpreter named ``python``.

    The interpreter the run named (often a virtualenv inside the old tree)
    need not exist beside the rebuilt one.
    """
    argv = state.get("argv")
    if not argv:
        return state.get("command", "")
    if Path(argv[0]).name.startswith("python"):
        argv = ["python", *argv[1:]]
    return shlex.join(argv)


def _restore(entry: UntrackedFile, record: Path, local: Path | None, target: Path) -> bool:
    """Put one untracked file back; False when there is nothing to take it from."""
    path = _inside(target, entry.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if entry.target is not None:
        os.symlink(entry.target, path)
        return True
    if entry.copied:
        source = _inside(record / "untracked", entry.path)
    elif local is not None:
        source = local / entry.path
    else:
        return False
    if not source.is_file() or source.is_symlink() or sha256_file(source) != entry.sha256:
        return False
    shutil.copyfile(source, path)
    path.chmod(0o755 if entry.mode == "100755" else 0o644)
    return True


def _inside(base: Path, relative: str) -> Path:
    # The record names paths; one that climbs out of the tree is refused, not followed.
    path = (base / relative).resolve()
    if not path.is_relative_to(base.resolve()):
        raise OpsError(f"the run's record names a path outside the tree: {relative}")
    return base / relative


def _differences(recorded: list[TreeEntry], rebuilt: list[TreeEntry]) -> list[str]:
    before = {entry.path: entry for entry in recorded}
    after = {entry.path: entry for entry in rebuilt}
    lines = []
    for path in sorted(before.keys() | after.keys()):
        old, new = before.get(path), after.get(path)
        if new is None:
            lines.append(f"missing  {path}")
        elif old is None:
            lines.append(f"extra    {path}")
        elif old.oid != new.oid:
            lines.append(f"content  {path}")
        elif old.mode != new.mode:
            lines.append(f"mode     {path} ({old.mode} recorded, {new.mode} rebuilt)")
    return lines


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _remove(local: Path | None, target: Path, how: str) -> None:
    if how == "worktree" and local is not None:
        run_git(["worktree", "remove", "--force", str(target)], local)
    shutil.rmtree(target, ignore_errors=True)
