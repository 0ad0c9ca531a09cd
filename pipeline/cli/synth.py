"""``pacsflow synth``: write a realistic synthetic archive with ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli._common import guarded, progress_bar


def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the archive into.")],
    patients: Annotated[int, typer.Option("--patients", "-n", min=1, help="Patients.")] = 3,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Random seed (deterministic).")] = 0,
    slices: Annotated[int, typer.Option("--slices", min=8, help="Slices per CT series.")] = 120,
    size: Annotated[int, typer.Option("--size", min=8, help="CT rows and columns.")] = 512,
    small: Annotated[
        bool,
        typer.Option("--small", help="Tiny images, full headers, many instances (benchmarks)."),
    ] = False,
    no_mr: Annotated[bool, typer.Option("--no-mr", help="CT only.")] = False,
    no_bad: Annotated[
        bool, typer.Option("--no-bad", help="No deliberately broken objects.")
    ] = False,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Writer processes.")] = 1,
    burned_in: Annotated[
        int,
        typer.Option(
            "--burned-in",
            min=0,
            help="Also write this many ultrasound-like and secondary-capture-like objects "
            "with names, IDs and dates burned into the pixels, under OUT/burned_in (the "
            "objects of bench/burned_in.py --count N --seed SEED).",
        ),
    ] = 0,
    burned_in_truth: Annotated[
        Path | None,
        typer.Option(
            "--burned-in-truth",
            help="Where the burned-in text boxes go (JSON; never inside OUT). Default: "
            "OUT's sibling OUT-burned-in-truth.json.",
        ),
    ] = None,
) -> None:
    """Write a synthetic archive: CT/MR series with PHI-laden headers, ground truth beside it.

    Examples:

        pacsflow synth /tmp/archive --patients 3
        pacsflow synth /tmp/big --patients 500 --small --workers 2
    """
    truth = burned_in_truth or out.parent / f"{out.name}-burned-in-truth.json"
    if burned_in and truth.resolve().is_relative_to(out.resolve()):
        raise typer.BadParameter(
            f"{truth} is inside the archive {out}: the text boxes would be crawled with it",
            param_hint="--burned-in-truth",
        )

    def body() -> None:
        from pipeline.synth import synthesize

        with progress_bar("synth", None) as advance:
            result = synthesize(
                out,
                patients=patients,
                seed=seed,
                ct_slices=slices,
                rows=size,
                columns=size,
                small=small,
                include_mr=not no_mr,
                include_bad=not no_bad,
                workers=workers,
                progress=advance,
            )
        typer.echo(
            f"synth: {result.n_patients} patients, {result.n_studies} studies, "
            f"{result.n_series} series, {result.n_instances} instances "
            f"(+{result.n_bad} bad objects), {result.bytes_written / 2**20:.1f} MiB "
            f"in {result.seconds:.1f} s -> {out} (ground truth: {result.ground_truth})"
        )
        if burned_in:
            from pipeline.synth.burned_in import write_burned_in

            paths = write_burned_in(out / "burned_in", truth, burned_in, seed)
            typer.echo(
                f"synth: {len(paths)} objects with burned-in text -> {out / 'burned_in'} "
                f"(text boxes: {truth})"
            )

    guarded(body)
