"""``pacsflow demo``: the whole pipeline on a generated archive, embedded defaults, no servers.

synth -> crawl -> deid -> verify -> tensors -> infer (the default model) -> writeback into
``<out>/results`` (a folder destination), then a check of the quarantine against the archive's
ground truth and a summary of where everything is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.cli._common import ConfigOpt, WorkersOpt, build_config, fail, guarded

#: The demo's embedded defaults, below any --config file and flags.
DEMO_DEFAULTS: dict[str, Any] = {
    "synth": {"patients": 3, "seed": 0, "ct_slices": 120, "rows": 512, "columns": 512},
    "compute": {"workers": 2, "device": "cpu"},
}


def _count(lake: Any, table: str, column: str | None = None, status: str | None = None) -> int:
    """Rows of a lake table (with ``column`` set, and ``status`` equal to a value)."""
    from pipeline.lake.duck import connect
    from pipeline.lake.queries import count_rows

    con = connect()
    try:
        q = count_rows(lake, table, column, status)
        row = con.execute(q.sql, q.params).fetchone()
        return int(row[0]) if row else 0
    finally:
        con.close()


def _expected_quarantine(ground_truth: dict[str, Any]) -> set[str]:
    """Archive-relative paths the crawl must quarantine: the broken objects, and the JSON."""
    return {str(b["path"]) for b in ground_truth.get("bad_objects", [])} | {"ground_truth.json"}


def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the archive and the lake.")] = Path(
        "demo-out"
    ),
    config: ConfigOpt = None,
    workers: WorkersOpt = None,
    patients: Annotated[
        int | None, typer.Option("--patients", min=1, help="Synthetic patients (default 3).")
    ] = None,
) -> None:
    """Run the whole pipeline on a generated archive (folder source, local Dask, CPU).

    Writes the archive, the lake, a throwaway key and the results under --out; a second run
    finds everything done.

    Examples:

        pacsflow demo --out demo-out
        pacsflow demo --out /tmp/demo --patients 5 --workers 2
    """
    extra: dict[str, Any] = {
        "lake": str(out / "lake"),
        "source": {"uri": str(out / "archive")},
        "writeback": {"dest": str(out / "results")},
    }
    if patients is not None:
        extra["synth"] = {"patients": patients}
    cfg = build_config(config, workers=workers, extra=extra, defaults=DEMO_DEFAULTS)

    def body() -> None:
        import time

        import pyarrow.compute as pc

        from pipeline.cli._common import progress_bar
        from pipeline.crawl import current_index
        from pipeline.lake import LakePaths, read_table
        from pipeline.synth import synthesize
        from pipeline.synth.lesions import match_lesions

        t0 = time.perf_counter()
        archive = out / "archive"
        gt_path = archive / "ground_truth.json"
        s = cfg.synth
        if gt_path.exists():
            typer.echo(f"synth: reusing the archive in {archive} (delete it to regenerate)")
        else:
            with progress_bar("synth", None) as advance:
                result = synthesize(
                    archive,
                    patients=s.patients,
                    seed=s.seed,
                    ct_slices=s.ct_slices,
                    rows=s.rows,
                    columns=s.columns,
                    include_mr=s.include_mr,
                    include_bad=s.include_bad,
                    workers=cfg.compute.workers,
                    progress=advance,
                )
            typer.echo(
                f"synth: {result.n_instances} instances in {result.n_series} series "
                f"(+{result.n_bad} bad objects), {result.bytes_written / 2**20:.0f} MiB "
                f"in {result.seconds:.1f} s"
            )
        from pipeline.cli._common import run_command
        from pipeline.lake.keys import LakeKeys, generate_key_file, load_key

        assert cfg.lake is not None
        # the demo's throwaway key, beside the lake (never in it: a copy of a lake must not
        # carry its key); real runs make theirs with `pacsflow keygen`
        key_path = out / "demo.key"
        if not key_path.exists():
            generate_key_file(key_path)
        keys = LakeKeys(load_key(key_path))
        summary = run_command(cfg, keys, "demo", create=cfg.run.crawl, what="demo run")
        leaks = summary.leaks

        assert cfg.lake is not None
        lake = LakePaths(cfg.lake, keys=keys)
        index = current_index(lake)
        quarantine = read_table(lake, "quarantine", columns=["location", "reason", "stage"])
        quarantine = quarantine.filter(pc.equal(quarantine.column("stage"), "crawl"))
        gt = json.loads(gt_path.read_text(encoding="utf-8"))
        expected = _expected_quarantine(gt)
        got = set(quarantine.column("location").to_pylist())
        n = lambda col: len(set(index.column(col).to_pylist()))  # noqa: E731
        typer.echo("")
        typer.echo(f"archive     {archive}  (ground truth: {gt_path.name})")
        typer.echo(f"lake        {lake.root}")
        typer.echo(f"  index       {lake.table('index')}")
        typer.echo(f"  quarantine  {lake.table('quarantine')}")
        typer.echo(f"  audit log   {lake.audit}")
        typer.echo(f"  runs        {lake.runs}")
        typer.echo(
            f"summary     {n('PatientID')} patients, {n('StudyInstanceUID')} studies, "
            f"{n('SeriesInstanceUID')} series, {index.num_rows} instances indexed, "
            f"{len(got)} quarantined"
        )
        if expected != got:
            missing = sorted(expected - got)
            extra_q = sorted(got - expected)
            fail(
                f"quarantine differs from the ground truth: missing {missing[:5]}, "
                f"unexpected {extra_q[:5]}"
            )
        typer.echo(
            f"check       every bad object of the ground truth is quarantined, nothing else "
            f"({len(expected)})"
        )
        typer.echo(f"key         {key_path}  (fingerprint {keys.fingerprint}; the lake's own)")
        typer.echo(
            f"research    {lake.research}  "
            f'(pacsflow sql --lake {lake.root} --key-file {key_path} "SELECT ...")'
        )
        typer.echo(f"  tensors     {lake.tensors}  ({_count(lake, 'tensors', 'checksum')} volumes)")
        typer.echo(f"  findings    {lake.table('findings')}  ({_count(lake, 'findings')} rows)")
        typer.echo(f"  masks       {lake.masks}")
        matches = match_lesions(lake, gt)
        typer.echo(
            f"  lesions     {sum(1 for m in matches if m.findings)} of {len(matches)} synthesised "
            "lung lesions found as lung_nodule findings"
        )
        results = Path(cfg.writeback.dest) if cfg.writeback.dest else None
        confirmed = _count(lake, "outbox", status="confirmed")
        typer.echo(f"written back {results}  ({confirmed} SEG/SR objects confirmed)")
        typer.echo(f"verify      leaks found = {leaks}")
        if leaks:  # the run already failed closed; kept as the last word
            fail("identifying values reached research/: failing closed")
        typer.echo(f"next        pacsflow status --lake {lake.root} --key-file {key_path}")
        typer.echo(f"done in {time.perf_counter() - t0:.1f} s")

    guarded(body)
