"""Open-source Kubeflow Pipelines v2 backend rules, replayed in Python for `van-tfx kfp-local`.

One module per Go package of kubeflow/pipelines `backend/src/v2` (master at commit 7b70c7b95f,
2026-08-21) whose behaviour it mirrors; every function names the Go function it follows:
`compiler` (compiler/, argocompiler/ and the API server's wrap), `metadata` (metadata/: how ML
Metadata stores and returns artifacts), `expression` (expression/: CEL conditions), `driver`
(driver/: a task's ExecutorInput), `launcher` (component/launcher_v2.go: running the command and
recording its outputs). `pipeline/kfp_local.py` walks a spec's DAG with them.
"""

from pipeline.kfp_spec import KubeflowError

LOGS_OUTPUT = "executor-logs"  # driver.provisionOutputs
LOGS_SCHEMA_TITLE = "system.Artifact"
METADATA_FILE = "output_metadata.json"  # launcher_v2: <task root>/output_metadata.json


class BackendRefusal(KubeflowError):
    """What the open-source backend refuses, with the backend's own message."""


class NotReplayed(KubeflowError):
    """A spec feature the backend runs but this replay does not; the message says which."""


class TaskFailed(KubeflowError):
    """A task's driver or executor failed; the run stops, as Argo's DAG does (failFast)."""

    def __init__(self, message: str, log_path: str | None = None):
        super().__init__(message)
        self.log_path = log_path  # the executor's log, when it got that far
