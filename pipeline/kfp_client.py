"""Kubeflow Pipelines requests: submit one run, schedule retraining, list and disable schedules.

Everything goes through `kfp.Client` (kfp 2.5). Each request can be printed instead of sent
(`describe_request`), an unreachable host fails within the timeout with one line, and kfp's and
urllib3's exceptions become one-line `KubeflowError`s naming the host.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import urllib.parse
from pathlib import Path
from typing import Any

from pipeline.kfp_spec import KubeflowError
from van_tfx.config import Config

CRON_FIELD = re.compile(r"^[0-9A-Za-z*?/,\-#LW]+$")
CRON_FIELD_NAMES = ("second", "minute", "hour", "day-of-month", "month", "day-of-week")


def submit_request(
    config: Config,
    package: str | Path,
    *,
    run_name: str | None = None,
    experiment: str | None = None,
    namespace: str | None = None,
    enable_caching: bool | None = None,
) -> list[dict[str, Any]]:
    """The kfp.Client call that creates one run from a compiled package."""
    kf = config.kubeflow
    return [
        {
            "method": "create_run_from_pipeline_package",
            "kwargs": {
                "pipeline_file": str(package),
                "arguments": {},
                "run_name": run_name,
                "experiment_name": experiment or kf.experiment,
                "namespace": namespace,
                "pipeline_root": kf.pipeline_root,
                "enable_caching": enable_caching,
                "service_account": kf.service_account or None,
            },
        }
    ]


def validate_cron(expression: str) -> str:
    """Check a KFP cron expression: 6 fields, seconds first (e.g. `0 0 3 * * *` = 03:00 daily)."""
    fields = expression.split()
    if len(fields) != 6:
        hint = f"; did you mean '0 {expression.strip()}'?" if len(fields) == 5 else ""
        raise KubeflowError(
            f"--cron {expression!r} has {len(fields)} fields; KFP needs 6 "
            f"({' '.join(CRON_FIELD_NAMES)}), e.g. '0 0 3 * * *' for 03:00 daily{hint}"
        )
    for name, field in zip(CRON_FIELD_NAMES, fields, strict=True):
        if not CRON_FIELD.match(field):
            raise KubeflowError(f"--cron {expression!r}: {name} field {field!r} is not valid cron")
    return " ".join(fields)


def schedule_request(
    config: Config,
    package: str | Path,
    *,
    cron: str | None = None,
    interval_seconds: int | None = None,
    job_name: str | None = None,
    experiment: str | None = None,
    namespace: str | None = None,
    enable_caching: bool | None = None,
) -> list[dict[str, Any]]:
    """The kfp.Client calls that create a recurring run (experiment first, for its id)."""
    if (cron is None) == (interval_seconds is None):
        raise KubeflowError("give exactly one of --cron or --interval")
    if interval_seconds is not None and interval_seconds < 1:
        raise KubeflowError(
            f"--interval must be a positive number of seconds, got {interval_seconds}"
        )
    kf = config.kubeflow
    experiment = experiment or kf.experiment
    trigger = (
        {"cron_expression": validate_cron(cron)}
        if cron is not None
        else {"interval_second": int(interval_seconds)}
    )
    return [
        {"method": "create_experiment", "kwargs": {"name": experiment, "namespace": namespace}},
        {
            "method": "create_recurring_run",
            "kwargs": {
                "experiment_id": f"<experiment_id of {experiment}>",
                "job_name": job_name or f"{config.pipeline_name}-retrain",
                **trigger,
                # One run at a time, and no backfill of nights the schedule was paused or the
                # cluster was down: a missed night's data is picked up by the next run anyway.
                "max_concurrency": 1,
                "no_catchup": True,
                "pipeline_package_path": str(package),
                "params": {},
                "pipeline_root": kf.pipeline_root,
                "enable_caching": enable_caching,
                "service_account": kf.service_account or None,
            },
        },
    ]


def describe_request(host: str | None, calls: list[dict[str, Any]]) -> str:
    """The JSON a dry run prints: where it would go and each call with its arguments."""
    return json.dumps({"host": host, "calls": calls}, indent=2)


def check_reachable(host: str, timeout: float) -> None:
    """Open (and close) a TCP connection to the KFP host, so a dead host fails in `timeout` s."""
    parsed = urllib.parse.urlparse(host if "://" in host else f"https://{host}")
    if not parsed.hostname:
        raise KubeflowError(f"--host {host!r} is not a URL like http://HOST:PORT")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise KubeflowError(f"cannot reach Kubeflow Pipelines at {host}: {reason}") from None


@contextlib.contextmanager
def socket_timeout(seconds: float):
    """Bound every blocking socket operation (kfp's HTTP client has no timeout of its own)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


@contextlib.contextmanager
def connected_client(host: str, *, namespace: str | None, timeout: float):
    """A kfp.Client for `host`, reachable within `timeout` s, whose errors are one line."""
    check_reachable(host, timeout)
    with socket_timeout(timeout), _kfp_errors(host):
        import kfp

        yield kfp.Client(host=host, namespace=namespace or "kubeflow")


def send(
    host: str, calls: list[dict[str, Any]], *, namespace: str | None, timeout: float
) -> list[Any]:
    """Make the calls with kfp.Client; an experiment id from create_experiment feeds later calls."""
    results: list[Any] = []
    with connected_client(host, namespace=namespace, timeout=timeout) as client:
        experiment_id = None
        for call in calls:
            kwargs = dict(call["kwargs"])
            if call["method"] == "create_recurring_run":
                kwargs["experiment_id"] = experiment_id
            result = getattr(client, call["method"])(**kwargs)
            if call["method"] == "create_experiment":
                experiment_id = result.experiment_id
            results.append(result)
    return results


@contextlib.contextmanager
def _kfp_errors(host: str):
    """Turn kfp/urllib3 exceptions into one-line KubeflowErrors naming the host."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as exc:
        body = " ".join(str(exc.body or "").split())[:300]
        raise KubeflowError(
            f"Kubeflow Pipelines at {host} refused the request: {exc.status} {exc.reason} {body}"
        ) from None
    except (urllib3.exceptions.HTTPError, OSError, TimeoutError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise KubeflowError(f"cannot reach Kubeflow Pipelines at {host}: {reason}") from None


def list_schedules(host: str, *, namespace: str | None, timeout: float) -> list[dict[str, Any]]:
    """The recurring runs on the host, as plain dicts (id, name, status, trigger)."""
    with connected_client(host, namespace=namespace, timeout=timeout) as client:
        response = client.list_recurring_runs(page_size=100, namespace=namespace)
    return [_schedule_summary(run) for run in response.recurring_runs or []]


def _schedule_summary(run) -> dict[str, Any]:
    trigger = run.trigger
    cron = getattr(getattr(trigger, "cron_schedule", None), "cron", None)
    interval = getattr(getattr(trigger, "periodic_schedule", None), "interval_second", None)
    return {
        "id": run.recurring_run_id,
        "name": run.display_name,
        "status": run.status,
        "cron": cron,
        "interval_second": interval,
        "max_concurrency": run.max_concurrency,
        "no_catchup": run.no_catchup,
    }


def disable_schedule(host: str, job_id: str, *, namespace: str | None, timeout: float) -> None:
    """Disable one recurring run (it stays listed and can be re-enabled in the KFP UI)."""
    with connected_client(host, namespace=namespace, timeout=timeout) as client:
        client.disable_recurring_run(recurring_run_id=job_id)
