"""One runner for every stage: ``pacsflow run``/``demo`` and each single-stage command.

- :mod:`pipeline.run.stages`: the :class:`Stage` protocol (name, the zone and tables it reads
  and writes, ``run(ctx) -> StageOutcome``) and the six stages of the pipeline, in order;
- :mod:`pipeline.run.runner`: :func:`run_stages` opens the lake and takes its lock, marks the
  manifests of dead runs ``abandoned``, records the run (manifest, audit), builds the one
  :class:`StageContext` (config, lake, key, Dask client, recorder, progress) and runs the
  stages: totals, reconciliation, cancellation on SIGINT/SIGTERM.
"""

from pipeline.run.runner import RunFailed, RunSummary, run_stages
from pipeline.run.stages import (
    PIPELINE,
    Stage,
    StageContext,
    StageOutcome,
    enabled_stages,
    object_states,
    stage_named,
)

__all__ = [
    "PIPELINE",
    "RunFailed",
    "RunSummary",
    "Stage",
    "StageContext",
    "StageOutcome",
    "enabled_stages",
    "object_states",
    "run_stages",
    "stage_named",
]
