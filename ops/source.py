"""The state of a git working tree: what a run records so that its code can be rebuilt.

``capture(path)`` reads, without changing anything in the repository:

- the commit of HEAD, the branch (``None`` on a detached HEAD), and the URL of the remote
  with any credentials removed;
- the patch of staged and unstaged changes against HEAD (``git diff --binary HEAD``, so
  changed binary files round-trip through ``git apply``);
- the untracked files that are not ignored: small text files are kept whole, large or
  binary ones are listed with their size and SHA-256;
- the tree hash.

The tree hash is the id of the git tree object that ``git add -A`` followed by ``git
write-tree`` makes of the working tree: git's own hash of the sorted (path, mode, blob id)
entries of every tracked and every untracked, not ignored file, as the files are on disk.
It is computed in a temporary index (``GIT_INDEX_FILE``, started from a copy of the real
one so unchanged files are not hashed again) and a temporary object directory
(``GIT_OBJECT_DIRECTORY``, the repository's own as an alternate), so neither the user's
index nor their object store changes. A clean tree's hash is the tree id of its commit,
which is also how "dirty" is defined: the tree hash differs from HEAD's tree.

Limitations: submodules and nested repositories count in the tree hash by the commit they
point at, and their own changes are not recorded; files changed by clean/smudge filters
(Git LFS) are hashed as git stores them; the tree hash depends on the repository's
settings that change what ``git add`` stores (``core.autocrlf``, ``core.fileMode``), so a
rebuild compares equal only under the same settings. Every untracked file that is not
ignored is read on every capture: keep large data sets ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ops.errors import OpsError

# Untracked text files up to this size are kept whole, up to this total per run; anything
# beyond is listed with its hash only, so a stray data file cannot fill the artifact store.
COPY_LIMIT = 1024 * 1024
COPY_BUDGET = 20 * 1024 * 1024

# git's own test for binary content: a NUL byte in the first 8000 bytes.
BINARY_PROBE = 8000

# Schemes whose user part is a credential (a token is often sent as the user name alone).
_SECRET_USER_SCHEMES = {"http", "https", "ftp", "ftps"}


class SourceUnavailable(OpsError):
    """No source state can be recorded here; the hint says how to fix that."""


@dataclasses.dataclass(frozen=True)
class UntrackedFile:
    """An untracked, not ignored file: kept whole (``copied``) or listed by its hash."""

    path: str
    mode: str
    size: int
    sha256: str
    copied: bool
    note: str = ""
    target: str | None = None  # where a symbolic link points; it is rebuilt from this

    @property
    def restorable(self) -> bool:
        return self.copied or self.target is not None

    def describe(self) -> str:
        what = self.note or "file"
        return f"{self.path} ({what}, {_size(self.size)}, sha256 {self.sha256[:12]})"


@dataclasses.dataclass(frozen=True)
class TreeEntry:
    mode: str
    oid: str
    path: str


@dataclasses.dataclass(frozen=True)
class SourceState:
    """Everything needed to rebuild a working tree, as read by ``capture``."""

    root: Path
    cwd: str | None  # the working directory, relative to root; None when outside
    commit: str
    branch: str | None
    remote: str | None
    head_tree: str
    tree_hash: str
    tree: list[TreeEntry]
    patch: bytes
    changed: list[str]
    untracked: list[UntrackedFile]

    @property
    def dirty(self) -> bool:
        return self.tree_hash != self.head_tree

    def summary(self) -> str:
        """Say how the tree differs from its commit, e.g. "2 changed, 1 untracked"."""
        if not self.dirty:
            return "clean"
        return f"{len(self.changed)} changed, {len(self.untracked)} untracked"

    def to_json(self) -> dict:
        """The record that ``reproduce`` reads back; paths are relative to the root."""
        return {
            "format": 1,
            "commit": self.commit,
            "branch": self.branch,
            "remote": self.remote,
            "dirty": self.dirty,
            "head_tree": self.head_tree,
            "tree_hash": self.tree_hash,
            "cwd": self.cwd,
            "changed": self.changed,
            "untracked": [dataclasses.asdict(entry) for entry in self.untracked],
        }


def git(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> bytes:
    """Run git in ``cwd`` and return its output; a failure raises OpsError with git's words."""
    proc = run_git(args, cwd, env)
    if proc.returncode != 0:
        said = proc.stderr.decode(errors="replace").strip()
        raise OpsError(f"git {args[0]} failed in {cwd}: {said}")
    return proc.stdout


def run_git(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run git in ``cwd`` and return the finished process, whatever its exit status."""
    # LC_ALL=C keeps git's messages in English, because find_root reads them.
    full_env = {**os.environ, "LC_ALL": "C", **(env or {})}
    return subprocess.run(["git", *args], cwd=cwd, env=full_env, capture_output=True)


def find_root(path: Path) -> Path:
    """Return the top of the working tree holding ``path``, or say why there is none."""
    if shutil.which("git") is None:
        raise SourceUnavailable(
            "git is not installed",
            hint="install git (apt-get install git) in the environment that runs training",
        )
    proc = run_git(["rev-parse", "--show-toplevel"], path)
    said = proc.stderr.decode(errors="replace")
    if proc.returncode == 0:
        return Path(proc.stdout.decode().strip())
    if "dubious ownership" in said:
        found = re.search(r"repository at '(.+?)'", said)
        where = found.group(1) if found else str(path)
        raise SourceUnavailable(
            f"git refuses the repository at {where}: it belongs to another user "
            "(dubious ownership)",
            hint=f"trust it with: git config --global --add safe.directory {where}",
        )
    if "not a git repository" in said:
        raise SourceUnavailable(
            f"{path} is not inside a git repository",
            hint="run from a git checkout of the project (or pass source_dir=) so the run "
            "records the code that produced it",
        )
    last = said.strip().splitlines()[-1] if said.strip() else "no reason given"
    raise SourceUnavailable(
        f"git cannot read the repository at {path} ({last})",
        hint=f"run `git status` in {path} to see what git objects to",
    )


def capture(path: Path) -> SourceState:
    """Read the source state of the working tree holding ``path``."""
    path = Path(path).resolve()
    if path.is_file():
        path = path.parent
    root = find_root(path)
    head = run_git(["rev-parse", "--verify", "--quiet", "HEAD^{commit}"], root)
    if head.returncode != 0:
        raise SourceUnavailable(
            f"the repository at {root} has no commit yet",
            hint="commit the code once; a run records its changes against a commit",
        )
    try:
        tree_hash, tree = hash_tree(root)
        return SourceState(
            root=root,
            cwd=_relative(Path.cwd().resolve(), root),
            commit=head.stdout.decode().strip(),
            branch=_branch(root),
            remote=_remote(root),
            head_tree=git(["rev-parse", "HEAD^{tree}"], root).decode().strip(),
            tree_hash=tree_hash,
            tree=tree,
            patch=_patch(root),
            changed=_split(git(["diff", "--name-only", "--no-renames", "-z", "HEAD"], root)),
            untracked=_untracked(root),
        )
    except (OpsError, OSError) as error:
        # A repository git can open but not fully read still must not stop the training.
        raise SourceUnavailable(
            f"reading the source state of {root} failed: {error}",
            hint=f"run `git status` in {root} to see what git objects to",
        ) from error


def hash_tree(root: Path) -> tuple[str, list[TreeEntry]]:
    """Return the tree hash of the working tree at ``root`` and its entries."""
    with tempfile.TemporaryDirectory(prefix="ops-tree-") as scratch:
        index = Path(scratch) / "index"
        objects = Path(scratch) / "objects"
        objects.mkdir()
        env = {
            "GIT_INDEX_FILE": str(index),
            "GIT_OBJECT_DIRECTORY": str(objects),
            "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(_git_path(root, "objects")),
        }
        real_index = _git_path(root, "index")
        if real_index.exists():
            shutil.copyfile(real_index, index)
        else:
            git(["read-tree", "HEAD"], root, env)
        git(["-c", "advice.addEmbeddedRepo=false", "add", "--all"], root, env)
        tree_id = git(["write-tree"], root, env).decode().strip()
        listing = git(["ls-tree", "-r", "-z", "--full-tree", tree_id], root, env)
    entries = []
    for line in _split(listing):
        meta, _, entry_path = line.partition("\t")
        mode, _kind, oid = meta.split(" ")
        entries.append(TreeEntry(mode, oid, entry_path))
    return tree_id, entries


def redact_url(url: str) -> str:
    """Drop credentials from a remote URL: all of an http(s) user part, any password."""
    parts = urlsplit(url)
    if not parts.scheme or "@" not in parts.netloc:
        return url
    user, _, host = parts.netloc.rpartition("@")
    if parts.scheme.lower() in _SECRET_USER_SCHEMES:
        netloc = host
    else:
        netloc = f"{user.partition(':')[0]}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def _patch(root: Path) -> bytes:
    # Explicit prefixes and no external tools, whatever the user's diff settings are,
    # so that `git apply` reads the patch back on any machine.
    return git(
        [
            "diff",
            "HEAD",
            "--binary",
            "--no-color",
            "--no-ext-diff",
            "--no-textconv",
            "--no-renames",
            "--src-prefix=a/",
            "--dst-prefix=b/",
            "--",
        ],
        root,
    )


def _branch(root: Path) -> str | None:
    # A detached HEAD, as CI checks out, has no branch: that is normal, not an error.
    proc = run_git(["symbolic-ref", "--quiet", "--short", "HEAD"], root)
    return proc.stdout.decode().strip() if proc.returncode == 0 else None


def _remote(root: Path) -> str | None:
    """The URL of the branch's upstream remote, else origin, else the first one."""
    names = git(["remote"], root).decode().split()
    if not names:
        return None
    branch = _branch(root)
    upstream = run_git(["config", f"branch.{branch}.remote"], root) if branch else None
    name = upstream.stdout.decode().strip() if upstream and upstream.returncode == 0 else ""
    if name not in names:
        name = "origin" if "origin" in names else names[0]
    return redact_url(git(["remote", "get-url", name], root).decode().strip())


def _untracked(root: Path) -> list[UntrackedFile]:
    listing = git(["ls-files", "-z", "--others", "--exclude-standard"], root)
    found = []
    budget = COPY_BUDGET
    for relative in sorted(_split(listing)):
        # A trailing slash marks a nested repository; the tree hash counts its commit.
        if relative.endswith("/"):
            continue
        entry = _describe(root / relative, relative, budget)
        if entry.copied:
            budget -= entry.size
        found.append(entry)
    return found


def _describe(path: Path, relative: str, budget: int) -> UntrackedFile:
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        target = os.readlink(path)
        raw = os.fsencode(target)
        digest = hashlib.sha256(raw).hexdigest()
        return UntrackedFile(relative, "120000", len(raw), digest, False, "link", target)
    mode = "100755" if info.st_mode & stat.S_IXUSR else "100644"
    with open(path, "rb") as stream:
        binary = b"\0" in stream.read(BINARY_PROBE)
    digest = sha256_file(path)
    if binary:
        return UntrackedFile(relative, mode, info.st_size, digest, False, "binary")
    if info.st_size > COPY_LIMIT:
        return UntrackedFile(relative, mode, info.st_size, digest, False, "large text")
    if info.st_size > budget:
        return UntrackedFile(relative, mode, info.st_size, digest, False, "over copy budget")
    return UntrackedFile(relative, mode, info.st_size, digest, True, "text")


def _git_path(root: Path, name: str) -> Path:
    # A linked worktree has its own index but shares the object store: ask git where.
    return root / git(["rev-parse", "--git-path", name], root).decode().strip()


def _relative(path: Path, root: Path) -> str | None:
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return None


def _split(output: bytes) -> list[str]:
    return [item for item in os.fsdecode(output).split("\0") if item]


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"
