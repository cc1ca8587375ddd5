"""Gather what a deploy or a status check needs to know about a host.

This file runs on the host, not here: it is sent over SSH to the system
Python, run as root, and prints one JSON object. One round trip replaces a
dozen small commands, which keeps a deploy with nothing to do fast. It uses
the standard library alone, as the host has nothing else before a deploy.
"""

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys


def _sha256(path):
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except FileNotFoundError:
        return None


def _read(path):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _output(argv):
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(program):
    # "uv 0.13.9 (x86_64-unknown-linux-gnu)" -> "0.13.9"
    words = (_output([program, "--version"]) or "").split()
    return words[1] if len(words) > 1 else None


def _package_installed(name):
    status = _output(["dpkg-query", "--show", "--showformat=${Status}", name])
    return bool(status) and status.endswith(" installed")


def _user_exists(name):
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _releases(root, marker):
    found = {}
    if os.path.isdir(root):
        for entry in sorted(os.listdir(root)):
            if os.path.islink(os.path.join(root, entry)):
                continue
            spec = _read(os.path.join(root, entry, marker))
            if spec is not None:
                found[entry] = spec
    return found


def _link(path):
    # Where a symlink points; a plain file there is reported as itself.
    if os.path.islink(path):
        return os.readlink(path)
    return path if os.path.exists(path) else None


def _unit(name):
    shown = _output(
        [
            "systemctl",
            "show",
            name,
            "--property=ActiveState,SubState,UnitFileState,NRestarts,MainPID",
        ]
    )
    return dict(line.split("=", 1) for line in (shown or "").splitlines() if "=" in line)


def _disk(path):
    while not os.path.exists(path):
        path = os.path.dirname(path)
    usage = shutil.disk_usage(path)
    return {"path": path, "free": usage.free, "total": usage.total}


def main(request):
    current = request["current"]
    facts = {
        "packages": {name: _package_installed(name) for name in request["packages"]},
        "user": _user_exists(request["user"]),
        "files": {path: _sha256(path) for path in request["files"]},
        "releases": _releases(request["releases"], request["marker"]),
        "current": os.readlink(current) if os.path.islink(current) else None,
        "uv": _version(request["uv"]),
        "schema": _read(request["schema_marker"]),
        "unit": _unit(request["unit"]),
        "disk": _disk(request["data_dir"]),
        "proxy": _unit(request["proxy"]) if "proxy" in request else {},
        "links": {path: _link(path) for path in request.get("links", [])},
    }
    print(json.dumps(facts))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
