"""ops.tracking against a real MLflow server, logging from real git repositories."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_digits

from ops.errors import OpsError
from ops.source import COPY_LIMIT, redact_url
from ops.tracking import (
    SourceStateWarning,
    _MetricBuffer,
    check_artifact_location,
    current_run,
    flatten,
    tracked_run,
)
from tests.fixtures_mlflow import git

ROOT = Path(__file__).resolve().parent.parent


def read_artifact(run_id: str, path: str, tmp_path: Path) -> bytes:
    folder = tmp_path / f"download-{time.monotonic_ns()}"
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=path, dst_path=str(folder)
    )
    return Path(local).read_bytes()


def state_of(run_id: str, tmp_path: Path) -> dict:
    return json.loads(read_artifact(run_id, "source/state.json", tmp_path))


BLOCKED = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"fabric", "invoke", "boto3", "botocore", "paramiko"}:
            raise ImportError(f"{name} is not installed in a training environment")

sys.meta_path.insert(0, Block())
import ops.tracking, ops.reproduce
"""


def test_importing_the_helper_needs_neither_fabric_nor_boto3():
    done = subprocess.run([sys.executable, "-c", BLOCKED], cwd=ROOT, capture_output=True, text=True)

    assert done.returncode == 0, done.stderr


def test_a_clean_tree_is_recorded_with_its_commit_branch_and_tree_hash(
    tracking_uri, project, tmp_path
):
    with tracked_run(
        "clean", params={"model": {"C": 0.5}}, run_name="first", source_dir=project
    ) as run:
        run.log_metric("loss", 0.25, step=1)
    recorded = MlflowClient().get_run(run.run_id)
    tags = recorded.data.tags

    assert recorded.info.status == "FINISHED"
    assert recorded.info.run_name == "first"
    assert tags["ops.source.commit"] == git(project, "rev-parse", "HEAD")
    assert tags["mlflow.source.git.commit"] == tags["ops.source.commit"]
    assert tags["ops.source.branch"] == "main"
    assert tags["ops.source.dirty"] == "false"
    assert tags["ops.source.tree_hash"] == git(project, "rev-parse", "HEAD^{tree}")
    assert tags["ops.python"] == ".".join(map(str, sys.version_info[:3]))
    assert tags["ops.platform"] and tags["ops.command"]
    assert recorded.data.params == {"model.C": "0.5"}
    assert recorded.data.metrics == {"loss": 0.25}
    requirements = read_artifact(run.run_id, "environment/requirements.txt", tmp_path)
    assert f"mlflow=={mlflow.__version__}" in requirements.decode()


def test_a_dirty_tree_records_staged_and_unstaged_changes_in_one_patch(
    tracking_uri, project, tmp_path
):
    (project / "README.md").write_text("# project\nstaged line\n")
    git(project, "add", "README.md")
    (project / "src" / "train.py").write_text("print('unstaged change')\n")
    (project / "src" / "new.py").write_text("staged new file\n")
    git(project, "add", "src/new.py")

    with tracked_run("dirty", source_dir=project) as run:
        pass
    tags = MlflowClient().get_run(run.run_id).data.tags
    patch = read_artifact(run.run_id, "source/patch.diff", tmp_path).decode()

    assert tags["ops.source.dirty"] == "true"
    assert tags["ops.source.tree_hash"] != git(project, "rev-parse", "HEAD^{tree}")
    assert "+staged line" in patch
    assert "+print('unstaged change')" in patch
    assert "b/src/new.py" in patch
    assert state_of(run.run_id, tmp_path)["changed"] == ["README.md", "src/new.py", "src/train.py"]


def test_untracked_text_files_are_copied_and_binary_or_large_ones_listed(
    tracking_uri, project, tmp_path
):
    (project / "notes.txt").write_text("a note\n")
    (project / "data.bin").write_bytes(b"\0\1\2" * 100)
    (project / "big.csv").write_text("x\n" * (COPY_LIMIT // 2 + 1))
    (project / "outputs").mkdir()
    (project / "outputs" / "ignored.txt").write_text("ignored by .gitignore\n")

    with tracked_run("untracked", source_dir=project) as run:
        pass
    listed = {entry["path"]: entry for entry in state_of(run.run_id, tmp_path)["untracked"]}

    assert sorted(listed) == ["big.csv", "data.bin", "notes.txt"]
    assert listed["notes.txt"]["copied"]
    assert read_artifact(run.run_id, "source/untracked/notes.txt", tmp_path) == b"a note\n"
    assert not listed["data.bin"]["copied"] and listed["data.bin"]["note"] == "binary"
    assert listed["data.bin"]["size"] == 300
    assert listed["data.bin"]["sha256"] == hashlib.sha256(b"\0\1\2" * 100).hexdigest()
    assert not listed["big.csv"]["copied"] and listed["big.csv"]["note"] == "large text"


def test_a_detached_head_is_recorded_without_a_branch(tracking_uri, project):
    git(project, "checkout", "--quiet", "--detach", "HEAD")

    with tracked_run("detached", source_dir=project) as run:
        pass
    tags = MlflowClient().get_run(run.run_id).data.tags

    assert tags["ops.source.commit"] == git(project, "rev-parse", "HEAD")
    assert "ops.source.branch" not in tags
    assert "mlflow.source.git.branch" not in tags


def test_a_token_in_the_remote_url_is_never_recorded(tracking_uri, project, tmp_path):
    git(project, "remote", "add", "origin", "https://alice:ghp_s3cret@git.example.com/t/p.git")

    with tracked_run("remote", source_dir=project) as run:
        pass
    tags = MlflowClient().get_run(run.run_id).data.tags
    state = read_artifact(run.run_id, "source/state.json", tmp_path).decode()

    assert tags["ops.source.remote"] == "https://git.example.com/t/p.git"
    assert tags["mlflow.source.git.repoURL"] == "https://git.example.com/t/p.git"
    assert not [key for key, value in tags.items() if "s3cret" in value]
    assert "s3cret" not in state


@pytest.mark.parametrize(
    ("url", "recorded"),
    [
        ("https://ghp_token@github.com/team/p.git", "https://github.com/team/p.git"),
        ("https://user:token@host:8443/p.git", "https://host:8443/p.git"),
        ("ssh://git:secret@host/p.git", "ssh://git@host/p.git"),
        ("git@github.com:team/p.git", "git@github.com:team/p.git"),
        ("/srv/git/p.git", "/srv/git/p.git"),
    ],
)
def test_redact_url_keeps_the_address_and_drops_the_secret(url, recorded):
    assert redact_url(url) == recorded


def test_a_run_outside_a_repository_still_logs_and_says_why(tracking_uri, tmp_path):
    outside = tmp_path / "not-a-repo"
    outside.mkdir()

    with (
        pytest.warns(SourceStateWarning, match="not inside a git repository.*to fix"),
        tracked_run("no-repo", source_dir=outside) as run,
    ):
        run.log_metric("loss", 1.0)
    recorded = MlflowClient().get_run(run.run_id)

    assert recorded.info.status == "FINISHED"
    assert "not inside a git repository" in recorded.data.tags["ops.source.missing"]
    assert "ops.source.commit" not in recorded.data.tags
    assert "mlflow.source.git.commit" not in recorded.data.tags
    assert recorded.data.metrics == {"loss": 1.0}


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the repository away needs root")
def test_a_repository_git_refuses_is_logged_with_the_fix_in_the_warning(tracking_uri, project):
    for folder, _dirs, files in os.walk(project):
        for name in [".", *files]:
            os.lchown(os.path.join(folder, name), 4242, 4242)

    with (
        pytest.warns(SourceStateWarning, match="safe.directory"),
        tracked_run("dubious", source_dir=project) as run,
    ):
        pass

    assert "dubious ownership" in MlflowClient().get_run(run.run_id).data.tags["ops.source.missing"]


def test_require_clean_refuses_a_dirty_tree_and_starts_no_run(tracking_uri, project):
    (project / "README.md").write_text("changed\n")
    (project / "scratch.py").write_text("untracked\n")

    with (
        pytest.raises(OpsError, match=r"uncommitted changes \(1 changed, 1 untracked\)"),
        tracked_run("strict-dirty", require_clean=True, source_dir=project),
    ):
        pytest.fail("the block must not run")

    assert MlflowClient().get_experiment_by_name("strict-dirty") is None


def test_require_clean_refuses_to_start_outside_a_repository(tracking_uri, tmp_path):
    with (
        pytest.raises(OpsError, match="not inside a git repository"),
        tracked_run("strict-no-repo", require_clean=True, source_dir=tmp_path),
    ):
        pytest.fail("the block must not run")


def test_require_clean_accepts_a_clean_tree(tracking_uri, project):
    with tracked_run("strict-clean", require_clean=True, source_dir=project) as run:
        pass

    assert MlflowClient().get_run(run.run_id).info.status == "FINISHED"


def test_a_raising_block_marks_the_run_failed_and_keeps_its_traceback(
    tracking_uri, project, tmp_path
):
    with (
        pytest.raises(ZeroDivisionError),
        tracked_run("raises", source_dir=project, flush_every=60) as run,
    ):
        run.log_metric("loss", 3.0)
        1 / 0  # noqa: B018 - the block fails here on purpose
    recorded = MlflowClient().get_run(run.run_id)
    trace = read_artifact(run.run_id, "error/traceback.txt", tmp_path).decode()

    assert recorded.info.status == "FAILED"
    assert "ZeroDivisionError" in trace
    assert recorded.data.metrics == {"loss": 3.0}


def test_ctrl_c_marks_the_run_killed(tracking_uri, project):
    with pytest.raises(KeyboardInterrupt), tracked_run("interrupted", source_dir=project) as run:
        raise KeyboardInterrupt

    assert MlflowClient().get_run(run.run_id).info.status == "KILLED"
    assert mlflow.active_run() is None


def test_the_decorator_form_logs_one_run_per_call(tracking_uri, project):
    @tracked_run("decorated", params={"epochs": 2}, source_dir=project)
    def train(rate):
        current_run().log_metric("rate", rate)
        return mlflow.active_run().info.run_id

    first, second = train(0.1), train(0.2)
    client = MlflowClient()

    assert first != second
    assert client.get_run(first).data.metrics == {"rate": 0.1}
    assert client.get_run(second).data.params == {"epochs": "2"}


def test_metrics_are_sent_while_the_block_runs_at_least_every_flush_interval(tracking_uri, project):
    client = MlflowClient()
    with tracked_run("periodic", source_dir=project, flush_every=0.2) as run:
        run.log_metric("loss", 0.5, step=0)
        deadline = time.monotonic() + 10
        while not client.get_run(run.run_id).data.metrics and time.monotonic() < deadline:
            time.sleep(0.1)

        assert client.get_run(run.run_id).data.metrics == {"loss": 0.5}


def test_metrics_beyond_one_batch_all_arrive_in_order(tracking_uri, project):
    with tracked_run("many", source_dir=project, flush_every=60) as run:
        for step in range(2500):
            run.log_metric("loss", 1 / (step + 1), step=step)
    history = MlflowClient().get_metric_history(run.run_id, "loss")

    assert [point.step for point in sorted(history, key=lambda p: p.step)] == list(range(2500))


class CountingClient:
    """Stands in for MlflowClient and records every batch it is asked to send."""

    def __init__(self):
        self.batches = []

    def log_batch(self, run_id, metrics=(), synchronous=None):
        self.batches.append(len(metrics))


def test_the_buffer_sends_a_thousand_points_per_request():
    client = CountingClient()
    buffer = _MetricBuffer(client, "run", every=60)
    buffer.add([mlflow.entities.Metric("m", float(i), 0, i) for i in range(2345)])
    buffer.flush()

    assert client.batches == [1000, 1000, 345]


def test_nested_params_are_flattened_with_dotted_keys():
    assert flatten({"model": {"C": 0.5, "kernel": {"name": "rbf"}}, "seed": 1}) == {
        "model.C": "0.5",
        "model.kernel.name": "rbf",
        "seed": "1",
    }


def test_a_local_artifact_location_on_a_remote_server_is_refused(tracking_uri, project, tmp_path):
    MlflowClient().create_experiment("local-artifacts", artifact_location=str(tmp_path / "a"))

    with (
        pytest.raises(OpsError, match="is a local path, but the runs go to the server"),
        tracked_run("local-artifacts", source_dir=project),
    ):
        pytest.fail("the block must not run")

    assert not (tmp_path / "a").exists()


def test_an_s3_artifact_location_without_credentials_is_refused(tracking_uri, project):
    MlflowClient().create_experiment("s3-artifacts", artifact_location="s3://bucket/artifacts")

    with (
        pytest.raises(OpsError, match="has no AWS credentials"),
        tracked_run("s3-artifacts", source_dir=project),
    ):
        pytest.fail("the block must not run")


class Unauthorized(http.server.BaseHTTPRequestHandler):
    """Answers every request as a server with basic auth answers one with no login."""

    def do_GET(self):
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
        self.end_headers()
        self.wfile.write(b"You are not authenticated.")

    def log_message(self, *args):
        pass


def test_a_refused_login_names_the_variables_to_set(git_home, project, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_port}")
    try:
        with (
            pytest.raises(OpsError, match="refused the login") as refused,
            tracked_run("needs-login", source_dir=project),
        ):
            pytest.fail("the block must not run")
    finally:
        server.shutdown()

    assert "MLFLOW_TRACKING_USERNAME" in refused.value.hint


def test_proxied_and_local_store_artifact_locations_are_accepted():
    check_artifact_location("mlflow-artifacts:/3", "https://mlflow.example.com")
    check_artifact_location("/srv/mlruns/3", "sqlite:///mlflow.db")


def test_the_example_trains_and_logs_a_model(tracking_uri, monkeypatch):
    # Run in this process: a second Python would spend most of the test importing MLflow.
    spec = importlib.util.spec_from_file_location("example_train", ROOT / "examples" / "train.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.chdir(ROOT)

    run_id = example.main(["--epochs", "3", "--experiment", "example"])
    recorded = MlflowClient().get_run(run_id)
    model = mlflow.sklearn.load_model(f"runs:/{run_id}/model")
    features, labels = load_digits(return_X_y=True)

    assert recorded.info.status == "FINISHED"
    assert recorded.data.params["epochs"] == "3"
    assert len(MlflowClient().get_metric_history(run_id, "val_accuracy")) == 3
    assert (model.predict(features[:100]) == labels[:100]).mean() > 0.8
