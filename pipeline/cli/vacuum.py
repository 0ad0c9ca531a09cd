"""``pacsflow vacuum``: remove research table files that no kept version needs."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.cli._common import ConfigOpt, KeyFileOpt, LakeOpt, build_config, fail, guarded

#: Delta Lake's default: a week, so a reader that started before a commit can finish.
DEFAULT_RETENTION_HOURS = 168


def _keep(values: list[str]) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for value in values:
        table, sep, version = value.partition("=")
        if not sep or not version.isdigit():
            fail(f"--keep takes TABLE=VERSION (e.g. series=12), not {value!r}", 2)
        out.setdefault(table, set()).add(int(version))
    return out


def register(app: typer.Typer) -> None:
    """Add ``vacuum``."""

    @app.command("vacuum")
    def vacuum(
        lake: LakeOpt = None,
        key_file: KeyFileOpt = None,
        config: ConfigOpt = None,
        retention_hours: Annotated[
            int,
            typer.Option(
                "--retention-hours",
                min=0,
                help="Keep files removed from a table (or never committed) less than this "
                "long ago.",
            ),
        ] = DEFAULT_RETENTION_HOURS,
        keep: Annotated[
            list[str] | None,
            typer.Option(
                "--keep",
                metavar="TABLE=VERSION",
                help="Also keep this version readable (repeatable).",
            ),
        ] = None,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="List what would go; remove nothing.")
        ] = False,
    ) -> None:
        """Remove research-table data files that no kept version needs.

        Kept: the latest version, every version a run manifest under runs/ records (readable
        with `pacsflow sql --as-of RUN`), and each `--keep TABLE=VERSION`. Takes the lake's
        lock.

        Examples:

            pacsflow vacuum --lake /data/pacsflow/lake --dry-run
            pacsflow vacuum --lake /data/pacsflow/lake --keep findings=3
        """
        cfg = build_config(config, lake=lake)
        extra = _keep(keep or [])

        def body() -> None:
            from pipeline.cli._common import audit_log, lake_keys, open_lake_or_fail
            from pipeline.lake import delta
            from pipeline.lake.lock import lake_lock
            from pipeline.lake.manifest import pinned_versions

            keys = lake_keys(cfg, key_file)
            paths = open_lake_or_fail(cfg, keys)
            with lake_lock(paths, "vacuum"):
                pins = pinned_versions(paths)
                for table, versions in extra.items():
                    pins.setdefault(table, set()).update(versions)
                removed = delta.vacuum(
                    paths, retention_hours=retention_hours, keep=pins, dry_run=dry_run
                )
                total = sum(len(v) for v in removed.values())
                if not dry_run:
                    audit_log(cfg, paths, keys).append(
                        "vacuum",
                        retention_hours=retention_hours,
                        files=total,
                    )
            verb = "would remove" if dry_run else "removed"
            detail = ", ".join(f"{k} {len(v)}" for k, v in sorted(removed.items()) if v)
            pinned = sum(len(v) for v in pins.values())
            typer.echo(
                f"vacuum: {verb} {total} file(s){' (' + detail + ')' if detail else ''}; "
                f"{pinned} pinned version(s) kept readable"
            )

        guarded(body)
