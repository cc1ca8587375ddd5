"""Log MLflow runs that carry the exact source state that produced them.

    from ops.tracking import tracked_run

    with tracked_run("churn", params={"model": {"C": 0.5}}) as run:
        for epoch in range(10):
            run.log_metric("loss", train_one_epoch(), step=epoch)
        mlflow.sklearn.log_model(model, name="model")

The run goes to ``MLFLOW_TRACKING_URI``, logging in with ``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD`` when the server asks. Inside the block the run is MLflow's
active run, so ``mlflow.log_*`` calls land in it too; metrics logged through the handle are
buffered and sent in batches of up to 1000, at least every ``flush_every`` seconds and
when the block ends, however it ends.

What a run records (``invoke reproduce RUN_ID`` reads it back, see ``ops.reproduce``):

| tag | value |
| --- | --- |
| ``ops.source.commit`` | the commit of HEAD (also ``mlflow.source.git.commit``) |
| ``ops.source.branch`` | the branch; absent on a detached HEAD |
| ``ops.source.remote`` | the remote's URL, credentials removed |
| ``ops.source.dirty`` | ``true`` when the tree differs from the commit |
| ``ops.source.tree_hash`` | the tree hash defined in ``ops.source`` |
| ``ops.source.missing`` | instead of the above: why no source state was recorded |
| ``ops.command``, ``ops.python``, ``ops.platform`` | how and where the run was started |

| artifact | content |
| --- | --- |
| ``source/state.json`` | the tags above, the untracked files, the command line |
| ``source/tree.json`` | every (mode, blob id, path) of the tree, to list what differs |
| ``source/patch.diff`` | staged and unstaged changes against HEAD, binary-safe |
| ``source/untracked/...`` | small untracked text files, whole |
| ``environment/requirements.txt`` | every installed distribution, ``name==version`` |
| ``error/traceback.txt`` | where the block stopped, when it raised or was interrupted |

Limitations: a process killed by a signal other than Ctrl-C (SIGTERM, SIGKILL, out of
memory) leaves its run RUNNING, with the metrics of the last few seconds unsent; the
artifact location check knows local paths, S3 and MLflow's proxied artifacts, and lets
other schemes through unchecked; ``environment/requirements.txt`` lists what is installed,
which for editable installs says nothing of their code; the command line is recorded as
given, so a secret passed as an argument is recorded too (pass secrets in the environment).
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.git_context import GitRunContext
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from ops.errors import OpsError
from ops.source import SourceState, SourceUnavailable, capture, redact_url

# MLflow takes at most 1000 metrics and 100 params in one request.
METRICS_PER_REQUEST = 1000
PARAMS_PER_REQUEST = 100
# Tag values longer than this are cut; the full text is in source/state.json.
TAG_LIMIT = 5000

_active: list[TrackedRun] = []


class SourceStateWarning(UserWarning):
    """A run is logged without its source state; the message says how to fix that."""


class TrackedRun:
    """The handle that ``tracked_run`` gives the block: log through it."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str, flush_every: float):
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.source: SourceState | None = None
        self._metrics = _MetricBuffer(client, run_id, flush_every)

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        """Queue one metric point; it is sent with the next batch."""
        self._metrics.add([_metric(key, value, step)])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._metrics.add([_metric(key, value, step) for key, value in metrics.items()])

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters now; nested mappings become dotted keys (``model.C``)."""
        items = [Param(key, value) for key, value in flatten(params).items()]
        for start in range(0, len(items), PARAMS_PER_REQUEST):
            self.client.log_batch(self.run_id, params=items[start : start + PARAMS_PER_REQUEST])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def flush(self) -> None:
        """Send every queued metric now."""
        self._metrics.flush()


# Lower case because it is used like a function, as contextlib's helpers are.
class tracked_run:
    """Start an MLflow run that records its source state; a context manager or decorator.

    Args:
        experiment: the experiment's name; it is created when missing.
        params: logged at the start; nested mappings become dotted keys.
        tags: extra tags for the run.
        run_name: the run's name; MLflow makes one up when it is None.
        require_clean: refuse to start unless the source state can be recorded and the
            working tree equals its commit.
        source_dir: where to look for the git repository; by default the directory of
            the running script, else the current directory.
        flush_every: the longest time, in seconds, that a logged metric waits to be sent.
    """

    def __init__(
        self,
        experiment: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        run_name: str | None = None,
        require_clean: bool = False,
        *,
        source_dir: str | Path | None = None,
        flush_every: float = 2.0,
    ):
        self._options = {
            "experiment": experiment,
            "params": params,
            "tags": tags,
            "run_name": run_name,
            "require_clean": require_clean,
            "source_dir": source_dir,
            "flush_every": flush_every,
        }
        self._run: TrackedRun | None = None

    def __call__(self, func: Callable) -> Callable:
        """Decorator form: every call of ``func`` is one run."""

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            with tracked_run(**self._options):
                return func(*args, **kwargs)

        return wrapper

    def __enter__(self) -> TrackedRun:
        if self._run is not None:
            raise RuntimeError("this tracked_run is already running; make a new one")
        self._run = _start(**self._options)
        _active.append(self._run)
        return self._run

    def __exit__(self, kind, error, trace) -> bool:
        run, self._run = self._run, None
        _active.remove(run)
        _finish(run, error)
        return False


def current_run() -> TrackedRun:
    """The innermost run started by ``tracked_run``, e.g. inside a decorated function."""
    if not _active:
        raise RuntimeError("no tracked_run is active")
    return _active[-1]


def log_metric(key: str, value: float, step: int | None = None) -> None:
    """Queue a metric point in the current tracked run."""
    current_run().log_metric(key, value, step)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    current_run().log_metrics(metrics, step)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Turn ``{"model": {"C": 0.5}}`` into ``{"model.C": "0.5"}``."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def check_artifact_location(location: str, tracking_uri: str) -> None:
    """Refuse an artifact location that this client would write to the wrong place.

    A local path is fine with a local store, but with a remote server it is a path on the
    server's disk that the client would create on its own. An ``s3://`` location makes the
    client write to S3 itself, which needs credentials it may not have. MLflow's proxied
    locations (``mlflow-artifacts:``) need neither.
    """
    server = redact_url(tracking_uri)
    scheme = urlsplit(location).scheme.lower()
    remote = urlsplit(tracking_uri).scheme.lower() in ("http", "https")
    # One letter is a Windows drive (C:\...), a local path too.
    if remote and (scheme in ("", "file") or len(scheme) == 1):
        raise OpsError(
            f"the experiment's artifact location {location} is a local path, but the runs "
            f"go to the server {server}: artifacts would be written on this machine, not "
            "where the server and your teammates can read them",
            hint="have the server proxy artifacts (mlflow server --artifacts-destination "
            "...) and log to an experiment created since; an experiment keeps the "
            "artifact location it was created with",
        )
    if scheme == "s3":
        _check_s3_credentials(location)


def _check_s3_credentials(location: str) -> None:
    hint = (
        "have the server proxy artifacts (mlflow server --artifacts-destination s3://...) "
        "so that clients need no AWS credentials, and log to an experiment created since"
    )
    try:
        import boto3  # Optional: a training environment usually has no boto3.
    except ImportError:
        raise OpsError(
            f"the experiment stores artifacts directly in {location}, which needs boto3 "
            "and AWS credentials on this machine; boto3 is not installed",
            hint=hint,
        ) from None
    if boto3.Session().get_credentials() is None:
        raise OpsError(
            f"the experiment stores artifacts directly in {location}, and this machine "
            "has no AWS credentials to write there",
            hint=hint,
        )


def _start(
    experiment: str,
    params: Mapping[str, Any] | None,
    tags: Mapping[str, Any] | None,
    run_name: str | None,
    require_clean: bool,
    source_dir: str | Path | None,
    flush_every: float,
) -> TrackedRun:
    client = MlflowClient()
    tracking_uri = mlflow.get_tracking_uri()
    if not os.environ.get("MLFLOW_TRACKING_URI") and urlsplit(tracking_uri).scheme not in (
        "http",
        "https",
    ):
        warnings.warn(
            f"MLFLOW_TRACKING_URI is not set: this run goes to {tracking_uri} on this machine "
            "only; set it to the team's server to share the run",
            stacklevel=3,
        )

    # Read the source first: a refusal must not leave an empty run behind.
    source, missing = _read_source(source_dir, require_clean)

    found = _experiment(client, experiment, tracking_uri)
    check_artifact_location(found.artifact_location, tracking_uri)
    context = _context()
    all_tags = {
        **{key: str(value) for key, value in (tags or {}).items()},
        **_source_tags(source, missing),
        "ops.command": _cut(context["command"]),
        "ops.python": context["python"],
        "ops.platform": context["platform"],
    }
    parent = mlflow.active_run()
    if parent is not None:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent.info.run_id
    # MLflow's own git tags describe the main script's repository, which need not be the
    # one recorded here: ours replace them.
    resolved = resolve_tags(all_tags, ignore=[GitRunContext])
    created = client.create_run(found.experiment_id, tags=resolved, run_name=run_name)
    run = TrackedRun(client, created.info.run_id, found.experiment_id, flush_every)
    run.source = source

    try:
        if params:
            run.log_params(params)
        _upload_record(client, run.run_id, source, missing, context)
        mlflow.start_run(run_id=run.run_id, nested=parent is not None)
    except BaseException as error:
        client.set_terminated(run.run_id, _status(error))
        raise
    run._metrics.start()
    return run


def _read_source(
    source_dir: str | Path | None, require_clean: bool
) -> tuple[SourceState | None, SourceUnavailable | None]:
    where = Path(source_dir) if source_dir is not None else _default_source_dir()
    try:
        source = capture(where)
    except SourceUnavailable as missing:
        if require_clean:
            raise
        warnings.warn(
            f"no source state recorded: {missing.message}; to fix: {missing.hint}",
            SourceStateWarning,
            stacklevel=4,
        )
        return None, missing
    if require_clean and source.dirty:
        raise OpsError(
            f"refusing to start: the working tree at {source.root} has uncommitted changes "
            f"({source.summary()}), and require_clean=True",
            hint="commit or stash them (untracked files too, or ignore them), then run again",
        )
    return source, None


def _default_source_dir() -> Path:
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is not None and script.is_file():
        return script.resolve().parent
    return Path.cwd()


def _experiment(client: MlflowClient, name: str, tracking_uri: str):
    try:
        found = client.get_experiment_by_name(name)
    except MlflowException as error:
        # The first request is where a missing or wrong login shows; say which variables.
        if error.error_code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            raise
        raise OpsError(
            f"the server {redact_url(tracking_uri)} refused the login "
            f"({error.error_code.lower().replace('_', ' ')})",
            hint="set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your account "
            "on the server, and check that it may use this experiment",
        ) from None
    if found is None:
        try:
            client.create_experiment(name)
        except MlflowException as error:
            # A teammate may have created it in between; anything else is a real failure.
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        found = client.get_experiment_by_name(name)
    if found.lifecycle_stage == "deleted":
        raise OpsError(
            f"the experiment {name!r} is deleted, so no run can be logged to it",
            hint=f"restore it (mlflow experiments restore --experiment-id "
            f"{found.experiment_id}) or choose another name",
        )
    return found


def _context() -> dict[str, Any]:
    argv = list(getattr(sys, "orig_argv", sys.argv))
    return {
        "argv": argv,
        "command": shlex.join(argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _source_tags(source: SourceState | None, missing: SourceUnavailable | None) -> dict:
    if source is None:
        return {"ops.source.missing": _cut(missing.message)}
    tags = {
        "ops.source.commit": source.commit,
        "ops.source.dirty": "true" if source.dirty else "false",
        "ops.source.tree_hash": source.tree_hash,
        "mlflow.source.git.commit": source.commit,
    }
    if source.branch:
        tags["ops.source.branch"] = source.branch
        tags["mlflow.source.git.branch"] = source.branch
    if source.remote:
        tags["ops.source.remote"] = source.remote
        tags["mlflow.source.git.repoURL"] = source.remote
    return tags


def _upload_record(
    client: MlflowClient,
    run_id: str,
    source: SourceState | None,
    missing: SourceUnavailable | None,
    context: dict[str, Any],
) -> None:
    """Write the record to a scratch directory and upload it in one call."""
    with tempfile.TemporaryDirectory(prefix="ops-record-") as scratch:
        folder = Path(scratch)
        state = {"missing": missing.message} if source is None else source.to_json()
        state.update(context)
        if source is not None:
            _write(folder / "source" / "tree.json", json.dumps([list(e) for e in _rows(source)]))
            if source.patch:
                _write(folder / "source" / "patch.diff", source.patch)
            for entry in source.untracked:
                if entry.copied:
                    _write(
                        folder / "source" / "untracked" / entry.path,
                        (source.root / entry.path).read_bytes(),
                    )
        _write(folder / "source" / "state.json", json.dumps(state, indent=2))
        _write(folder / "environment" / "requirements.txt", "\n".join(_packages()) + "\n")
        client.log_artifacts(run_id, scratch)


def _rows(source: SourceState) -> Iterable[tuple[str, str, str]]:
    return ((entry.mode, entry.oid, entry.path) for entry in source.tree)


def _write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)


def _packages() -> list[str]:
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(name.lower().replace("_", "-"), f"{name}=={dist.version}")
    return sorted(found.values(), key=str.lower)


def _finish(run: TrackedRun, error: BaseException | None) -> None:
    """Send what is queued, keep the traceback, and end the run with the right status."""
    status = _status(error)
    try:
        run._metrics.close()
    except Exception as failure:
        if error is not None:
            warnings.warn(f"metrics of run {run.run_id} were not all sent: {failure}", stacklevel=3)
        else:
            _end(run, "FAILED", failure)
            raise
    try:
        _end(run, status, error)
    except Exception as failure:
        # Never hide the block's own exception behind a failure to report it.
        if error is None:
            raise
        warnings.warn(f"run {run.run_id} could not be marked {status}: {failure}", stacklevel=3)


def _status(error: BaseException | None) -> str:
    if error is None:
        return "FINISHED"
    if isinstance(error, SystemExit):
        return "FINISHED" if error.code in (None, 0) else "FAILED"
    if isinstance(error, Exception):
        return "FAILED"
    return "KILLED"  # KeyboardInterrupt, and anything else that is not an error


def _end(run: TrackedRun, status: str, error: BaseException | None) -> None:
    if error is not None and status != "FINISHED":
        text = "".join(traceback.format_exception(error))
        run.client.log_text(run.run_id, text, "error/traceback.txt")
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run.run_id:
        mlflow.end_run(status)
    else:
        run.client.set_terminated(run.run_id, status)


def _metric(key: str, value: float, step: int | None) -> Metric:
    # Checked here, in the caller's thread, so that one bad point fails where it is
    # logged instead of failing a whole batch later.
    if not isinstance(key, str) or not key:
        raise ValueError(f"a metric name must be a non-empty string, not {key!r}")
    return Metric(key, float(value), int(time.time() * 1000), int(step or 0))


def _cut(text: str) -> str:
    return text if len(text) <= TAG_LIMIT else text[: TAG_LIMIT - 3] + "..."


class _MetricBuffer:
    """Queue metric points and send them in batches from a background thread."""

    def __init__(self, client: MlflowClient, run_id: str, every: float):
        self._client = client
        self._run_id = run_id
        self._every = every
        self._pending: list[Metric] = []
        self._queue_lock = threading.Lock()
        # One batch in flight at a time keeps the points of one key in order.
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ops-tracking", daemon=True)
        self._warned = False

    def start(self) -> None:
        self._thread.start()

    def add(self, metrics: list[Metric]) -> None:
        if self._stop.is_set():
            raise RuntimeError(f"run {self._run_id} has ended; log inside the tracked_run block")
        with self._queue_lock:
            self._pending.extend(metrics)
            full = len(self._pending) >= METRICS_PER_REQUEST
        if full:
            self._wake.set()

    def flush(self) -> None:
        with self._send_lock:
            while True:
                with self._queue_lock:
                    batch = self._pending[:METRICS_PER_REQUEST]
                    del self._pending[:METRICS_PER_REQUEST]
                if not batch:
                    return
                try:
                    self._client.log_batch(self._run_id, metrics=batch, synchronous=True)
                except BaseException:
                    with self._queue_lock:
                        self._pending[:0] = batch
                    raise

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        self.flush()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._every)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.flush()
            except Exception as failure:
                # The points stay queued for the next try; the final flush reports for good.
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"sending metrics failed, will retry: {failure}", stacklevel=1)
