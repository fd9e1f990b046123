"""What the Beam workers of StatisticsGen, Transform and Evaluator run in, stated in their Beam args.

TFX's BaseBeamExecutor takes Beam args that name no worker dependency (`--extra_packages`,
`--setup_file`, `--requirements_file`, `--sdk_container_image`, `--worker_harness_container_image`;
tfx/utils/dependency_utils.py) to mean the workers lack TFX: every Beam component then copies TFX's
install tree into a `tfx_ephemeral` sdist (7.2 s measured cold, under 1 s each on a warm page cache) and stages it, and nothing of our own code goes
with it. Where we know what the workers run, we say so instead:

- DirectRunner: the workers are the step's own Python (in-process, or its subprocesses), which has
  TFX and our code; the image name is never used, so any name spares the sdist.
- DataflowRunner, from a compiled pipeline: our image, which carries Beam's worker boot program for
  this purpose (Dockerfile), so Dataflow's workers have TFX, van_trainer and components.

Other runners (Flink, Spark via the portable runner) choose their worker environment with
`--environment_type`/`--environment_config`; we leave their args as the user wrote them.
"""

from __future__ import annotations

DEPENDENCY_OPTIONS = (
    "extra_packages",
    "setup_file",
    "requirements_file",
    "sdk_container_image",
    "worker_harness_container_image",
)
DIRECT_RUNNERS = frozenset({"DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner"})
DATAFLOW_RUNNERS = frozenset({"DataflowRunner"})


def runner_class_name(runner: str | None) -> str:
    """The runner class a `--runner` value selects, resolved as Beam's create_runner does."""
    from apache_beam.options.pipeline_options import StandardOptions

    if not runner:
        return StandardOptions.DEFAULT_RUNNER
    known = {path.rsplit(".", 1)[-1].lower(): path for path in StandardOptions.ALL_KNOWN_RUNNERS}
    path = known.get(runner.lower(), known.get(runner.lower() + "runner", runner))
    return path.rsplit(".", 1)[-1]


def with_worker_image(args: list[str], image: str, runners: frozenset[str]) -> list[str]:
    """`args` plus `--sdk_container_image=image` when one of `runners` runs them and no dependency is named."""
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions(flags=list(args)).get_all_options()
    if runner_class_name(options.get("runner")) not in runners:
        return list(args)
    if any(options.get(name) for name in DEPENDENCY_OPTIONS):
        return list(args)
    return [*args, f"--sdk_container_image={image}"]
