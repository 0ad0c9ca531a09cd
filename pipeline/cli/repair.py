"""``pacsflow repair``: rebuild damaged table files from the restricted zone."""

from __future__ import annotations

import typer

from pipeline.cli._common import ConfigOpt, KeyFileOpt, LakeOpt, build_config, fail, guarded


def register(app: typer.Typer) -> None:
    """Add ``repair``."""

    @app.command("repair")
    def repair(
        lake: LakeOpt = None,
        key_file: KeyFileOpt = None,
        config: ConfigOpt = None,
    ) -> None:
        """Check every table file against its recorded checksum; rebuild the damaged ones.

        Where the restricted zone allows: `instances` rows are de-identified again from the
        archive, `series`, `studies` and `patients` rebuilt; what cannot be rebuilt (tensors,
        findings, reviews, restricted tables) is named with what to do. Exit 1 when anything
        is left damaged. Takes the lake's lock.

        Examples:

            pacsflow repair --lake /data/pacsflow/lake
        """
        cfg = build_config(config, lake=lake, workers=1)

        def body() -> None:
            from pipeline.cli._common import audit_log, lake_keys, open_lake_or_fail
            from pipeline.lake.lock import lake_lock
            from pipeline.lake.manifest import new_run_id
            from pipeline.run.repair import repair as run_repair

            keys = lake_keys(cfg, key_file)
            paths = open_lake_or_fail(cfg, keys)
            with lake_lock(paths, "repair"):
                report = run_repair(cfg, paths, key=keys.secret, run_id=new_run_id())
                if report.damaged:
                    audit_log(cfg, paths, keys).append(
                        "repair",
                        damaged=len(report.damaged),
                        unrepaired=len(report.unrepaired),
                    )
            for line in report.lines:
                typer.echo(line)
            if report.unrepaired:
                fail(
                    f"repair: {len(report.unrepaired)} damaged file(s) could not be rebuilt "
                    "(see above)"
                )

        guarded(body)
