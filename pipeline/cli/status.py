"""``pacsflow status``: a lake's state first (fast: no torch, no codecs); with ``--versions``
the library versions, pixel codecs and compute devices."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.cli._common import ConfigOpt, KeyFileOpt, LakeOpt, build_config, fail, guarded


def environment_report() -> dict[str, Any]:
    """Versions of the key libraries, pixel codecs and compute devices."""
    from pipeline._deps import codec_table, compute_devices, library_versions

    return {
        "versions": library_versions(),
        "codecs": [
            {
                "transfer_syntax": c.transfer_syntax,
                "name": c.name,
                "decode": list(c.decoders) or (["native"] if _native(c.transfer_syntax) else []),
                "encode": list(c.encoders) or (["native"] if _native(c.transfer_syntax) else []),
            }
            for c in codec_table()
        ],
        "devices": [
            {"name": d.name, "kind": d.kind, "detail": d.detail} for d in compute_devices()
        ],
    }


def _native(uid: str) -> bool:
    return uid in {
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.2",
    }


def lake_report(root: Path, keys: Any = None, witness: str | None = None) -> dict[str, Any]:
    """Counts per object state, quarantine by reason, the last run and the audit chain (its
    MACs checked when ``keys`` is given, its end against the ``witness``'s file)."""
    from pipeline.cli._common import EXIT_USAGE, fail
    from pipeline.lake import LakePaths, list_manifests, verify_chain
    from pipeline.lake.audit import Witness
    from pipeline.lake.delta import table_versions
    from pipeline.lake.identity import LakeIdentityError, open_lake
    from pipeline.lake.lock import lock_holder
    from pipeline.run import object_states

    lake = LakePaths(root)
    try:
        identity = open_lake(lake, keys)
    except LakeIdentityError as exc:
        fail(str(exc), EXIT_USAGE)
    states_table = object_states(lake)
    states = Counter(states_table.column("state").to_pylist())
    reasons = Counter(
        r
        for st, r in zip(
            states_table.column("state").to_pylist(),
            states_table.column("reason").to_pylist(),
            strict=True,
        )
        if st == "quarantined"
    )
    manifests = list_manifests(lake)
    kept_by = Witness(witness or "default")
    chain = verify_chain(lake, keys, witness=kept_by)
    audit_problem = chain.reason
    if chain.ok:
        macs = {r.get("seq"): r.get("mac") for r in _audit_records(lake)}
        for m in manifests:
            head = m.audit_head
            if head and macs.get(head["seq"]) != head.get("mac"):
                audit_problem = (
                    f"run {m.run_id} ended at audit record {head['seq']}, "
                    "which is missing or different (log truncated or replaced)"
                )
                break
    holder = lock_holder(lake)
    live = [m.run_id for m in manifests if m.status == "running"][-1:] if holder else []
    for m in manifests:  # a run whose process died, not yet marked by the next run
        if m.status == "running" and m.run_id not in live:
            m.status = "abandoned"
    by_status = Counter(m.status for m in manifests)
    last = manifests[-1] if manifests else None
    return {
        "lake": str(lake.root),
        "lake_id": identity.lake_id,
        "format": identity.format,
        "key_fingerprint": identity.key_fingerprint,
        "objects": {"seen": sum(states.values()), **dict(sorted(states.items()))},
        "quarantine_by_reason": dict(sorted(reasons.items())),
        "writeback": _writeback_status(lake),
        **_results_status(lake),
        "table_versions": table_versions(lake),
        "runs": len(manifests),
        "runs_by_status": dict(sorted(by_status.items())),
        "running_now": holder,
        "abandoned": [m.run_id for m in manifests if m.status == "abandoned"],
        "last_run": None
        if last is None
        else {
            "run_id": last.run_id,
            "command": last.command,
            "status": last.status,
            "started_at": last.started_at,
            "seconds": last.seconds,
            "table_versions": dict(last.table_versions),
            "stages": {
                k: {
                    "seen": v.seen,
                    "out": v.out,
                    "quarantined": v.quarantined,
                    "skipped": v.skipped,
                }
                for k, v in last.stages.items()
            },
        },
        "recent_runs": [_run_line(m) for m in manifests[-RECENT_RUNS:]][::-1],
        "audit": {
            "records": chain.records,
            "ok": chain.ok and not audit_problem,
            "problem": audit_problem or None,
            "torn": chain.torn,
            "macs_checked": chain.keyed,
            "witness": kept_by.spec if kept_by.path is None else f"{kept_by.spec}: {kept_by.path}",
            "witnessed": chain.witnessed,
        },
    }


#: How many of the latest runs ``status`` lists.
RECENT_RUNS = 5


def _run_line(m: Any) -> dict[str, Any]:
    """One run of ``status``'s recent runs: id, command, outcome, start, duration, error."""
    return {
        "run_id": m.run_id,
        "command": m.command,
        "status": m.status,
        "started_at": m.started_at,
        "seconds": m.seconds,
        "error": m.error,
    }


def _results_status(lake: Any) -> dict[str, Any]:
    """Findings per model and reviewer decisions (latest per finding), from the research
    tables (empty ones before the first rows)."""
    from pipeline.lake.duck import arrow_table, connect
    from pipeline.lake.queries import status_findings, status_reviews

    con = connect()
    try:
        q = status_findings(lake)
        models = arrow_table(con, q.sql, q.params).to_pylist()
        q = status_reviews(lake)
        latest = arrow_table(con, q.sql, q.params).to_pylist()
    finally:
        con.close()
    by_model = {r["model"]: {"rows": int(r["n"]), "volumes": int(r["volumes"])} for r in models}
    return {
        "findings": {"rows": sum(v["rows"] for v in by_model.values()), "by_model": by_model},
        "reviews": {
            "decisions": int(latest[0]["decisions"]) if latest else 0,
            "findings_reviewed": sum(int(r["n"]) for r in latest),
            "latest_decision": {r["decision"]: int(r["n"]) for r in latest},
        },
    }


def _writeback_status(lake: Any) -> dict[str, dict[str, int]]:
    """Per destination: SEG/SR objects by their latest delivery status (pending = not
    confirmed)."""
    from pipeline.lake.duck import arrow_table, connect
    from pipeline.lake.queries import writeback_status

    con = connect()
    try:
        q = writeback_status(lake)
        rows = arrow_table(con, q.sql, q.params).to_pylist()
    finally:
        con.close()
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        out.setdefault(r["dest"], {})[r["status"]] = int(r["n"])
    return out


def _audit_records(lake: Any) -> list[dict[str, Any]]:
    from pipeline.lake.audit import read_records

    return read_records(lake)


def _print_env(env: dict[str, Any]) -> None:
    typer.echo("versions:")
    width = max(len(n) for n in env["versions"]) + 2
    for name, version in env["versions"].items():
        typer.echo(f"  {name:<{width}}{version or '-'}")
    typer.echo("pixel codecs (transfer syntax UID, name: decode | encode):")
    uid_width = max((len(c["transfer_syntax"]) for c in env["codecs"]), default=0) + 2
    for c in env["codecs"]:
        dec = ", ".join(c["decode"]) or "NONE"
        enc = ", ".join(c["encode"]) or "-"
        typer.echo(f"  {c['transfer_syntax']:<{uid_width}}{c['name']}: {dec} | {enc}")
    typer.echo("compute devices:")
    for d in env["devices"]:
        typer.echo(f"  {d['name']:<8} {d['detail']}")
    if not any(d["kind"] == "cuda" for d in env["devices"]):
        typer.echo("  (no CUDA device: models run on the CPU)")


def _counts(mapping: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in mapping.items())


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {sec:02d} s"


def _print_lake(rep: dict[str, Any]) -> None:
    """The lake summary: what an operator reads first (one fact per line)."""
    echo = typer.echo
    echo(f"lake: {rep['lake']} (format {rep['format']}, id {rep['lake_id']})")
    echo(f"  key fingerprint: {rep['key_fingerprint']}")
    objs = dict(rep["objects"])
    seen = objs.pop("seen")
    echo(f"  objects: {seen} seen" + (f" ({_counts(objs)})" if objs else ""))
    if rep["quarantine_by_reason"]:
        echo(f"  quarantined by reason: {_counts(rep['quarantine_by_reason'])}")
    f = rep["findings"]
    per_model = "; ".join(
        f"{m}: {v['rows']} on {v['volumes']} volume(s)" for m, v in f["by_model"].items()
    )
    echo(f"  findings: {f['rows']}" + (f" ({per_model})" if per_model else ""))
    r = rep["reviews"]
    if r["decisions"]:
        echo(
            f"  reviews: {r['decisions']} decision(s) on {r['findings_reviewed']} finding(s), "
            f"latest per finding: {_counts(r['latest_decision'])}; "
            f"{max(f['rows'] - r['findings_reviewed'], 0)} finding(s) unreviewed"
        )
    else:
        echo(f"  reviews: none yet ({f['rows']} finding(s) unreviewed)")
    for dest, by_status in rep.get("writeback", {}).items():
        pending = {k: v for k, v in by_status.items() if k != "confirmed"}
        echo(
            f"  write-back to {dest}: {by_status.get('confirmed', 0)} confirmed, "
            f"{sum(pending.values())} pending" + (f" ({_counts(pending)})" if pending else "")
        )
    if rep["running_now"]:
        echo(f"  running now: {rep['running_now']}")
    if rep["recent_runs"]:
        echo(f"  runs: {rep['runs']} in all ({_counts(rep['runs_by_status'])}); latest first:")
        for run in rep["recent_runs"]:
            error = f"  {run['error']}" if run.get("error") else ""
            echo(
                f"    {run['run_id']}  {run['command']:<9} {run['status']:<10} "
                f"{_duration(run['seconds']):>12}{error}"
            )
    else:
        echo("  runs: none yet")
    if rep["abandoned"]:
        shown = ", ".join(rep["abandoned"][-5:])
        echo(
            f"  abandoned: {len(rep['abandoned'])} run(s) whose process died ({shown}); "
            "finished batches are kept, the next run resumes"
        )
    a = rep["audit"]
    if a["ok"]:
        verdict = "intact" + ("" if a["macs_checked"] else " (links only: MACs need the key)")
    elif a["torn"]:
        verdict = f"TORN (not tampering): {a['problem']}"
    else:
        verdict = f"BROKEN: {a['problem']}"
    echo(f"  audit log: {a['records']} records, chain {verdict}")
    kept = "end matches it" if a["witnessed"] else "not read back"
    echo(f"  audit witness: {a['witness']} ({kept})")
    if not rep.get("damaged_files"):
        echo(f"  table files: intact ({rep.get('files_checked')} checked)")
    if rep.get("table_versions"):
        echo(f"  research tables (Delta versions): {_counts(rep['table_versions'])}")


def status(
    lake: LakeOpt = None,
    key_file: KeyFileOpt = None,
    config: ConfigOpt = None,
    versions: Annotated[
        bool,
        typer.Option(
            "--versions",
            help="Also list library versions, pixel codecs and compute devices (imports torch: "
            "a few seconds).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON.")] = False,
    full_check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Hash every table file against the checksum recorded at its commit (without "
            "it: sizes and modification times only).",
        ),
    ] = False,
) -> None:
    """What a lake holds and how its runs went, in a second.

    Counts per object state, quarantine reasons, findings, review decisions, write-back,
    the last runs with their outcome and duration, the key fingerprint, the audit chain
    (MACs checked when the key is given) and the table files against their recorded
    sizes (--check: checksums). Exit 1 on a damaged file or a broken audit chain.
    Without a lake, or with --versions: library versions, pixel codecs, compute devices.

    Examples:

        pacsflow status --lake demo-out/lake --key-file demo-out/demo.key
        pacsflow status --versions
    """
    cfg = build_config(config, lake=lake)

    def body() -> None:
        report: dict[str, Any] = {}
        if cfg.lake is not None:
            from pipeline.cli._common import lake_keys

            keys = lake_keys(cfg, key_file, required=False)
            report["lake"] = lake_report(cfg.lake, keys, cfg.audit.witness)
            from dataclasses import asdict

            from pipeline.lake import LakePaths
            from pipeline.lake.integrity import check

            damaged = check(LakePaths(cfg.lake), full=full_check)
            report["lake"]["damaged_files"] = [asdict(d) for d in damaged]
            report["lake"]["files_checked"] = "checksums" if full_check else "sizes and times"
        if versions or cfg.lake is None:
            report["environment"] = environment_report()
        if as_json:
            typer.echo(json.dumps(report, indent=2))
        else:
            if "lake" in report:
                _print_lake(report["lake"])
            if "environment" in report:
                _print_env(report["environment"])
        if "lake" in report and report["lake"]["damaged_files"]:
            from pipeline.lake.integrity import Damage, damage_line

            damaged = [Damage(**d) for d in report["lake"]["damaged_files"]]
            if not as_json:
                for d in damaged:
                    typer.echo(f"  DAMAGED: {d.path} (table {d.table}): {d.why}")
            fail(damage_line(damaged))
        if "lake" in report and not report["lake"]["audit"]["ok"]:
            raise typer.Exit(1)

    guarded(body)
