"""``pacsflow models``: check a bundle, and approve (or revoke) the pinned code of one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.cli._common import EXIT_USAGE, ConfigOpt, build_config, fail, guarded


def _entry_and_path(cfg: Any, ref: str) -> tuple[Any, Path]:
    from pipeline.infer.bundle import _extract_zip, resolve_bundle_path
    from pipeline.infer.registry import default_models_dir, load_registry

    registry = load_registry(cfg.infer.registry)
    entry = registry.entry(ref)
    path = resolve_bundle_path(entry.bundle, cfg.infer.models_dir or default_models_dir())
    if path.is_file():
        if path.suffix != ".zip":
            fail(f"{path.name}: a bundle is a folder or a .zip", EXIT_USAGE)
        path = _extract_zip(path, path.parent / ".extracted")
    return entry, path


def register(app: typer.Typer) -> None:
    """Add ``models`` (``check``, ``trust``, ``revoke``)."""
    models = typer.Typer(
        help="Model bundles: check how one would run; approve or revoke its pinned code.\n\n"
        "Examples:\n\n"
        "    pacsflow models check ct_body_composition\n"
        "    pacsflow models trust lung_nodule_ct_detection",
        no_args_is_help=True,
    )
    app.add_typer(models, name="models")

    @models.command("check")
    def check(
        model: Annotated[str, typer.Argument(help="Registered model name, or a bundle path.")],
        config: ConfigOpt = None,
    ) -> None:
        """Load MODEL as `pacsflow infer` would (no volume read): mode, hashes, labels.

        Examples:

            pacsflow models check ../shared/bundles/model-zoo/spleen_ct_segmentation
        """

        def body() -> None:
            from pipeline.cli._common import EXIT_FAILED
            from pipeline.infer.bundle import BundleError
            from pipeline.infer.stage import load_entry_bundle

            cfg = build_config(config)
            entry, path = _entry_and_path(cfg, model)
            try:
                bundle, decision = load_entry_bundle(cfg, entry, path.parent / ".extracted")
            except BundleError as exc:
                fail(f"{entry.name}: {exc}", EXIT_FAILED)
            typer.echo(f"model:    {entry.name} ({bundle.ref})")
            typer.echo(f"bundle:   {bundle.path}")
            typer.echo(f"mode:     {decision.mode} ({decision.reason})")
            typer.echo(f"content:  {decision.digest}")
            typer.echo(f"weights:  {bundle.weights_sha256}")
            typer.echo(f"labels:   {len(bundle.labels)}")
            from pipeline.infer.stage import uncoded_labels

            codes = entry.label_codes(list(bundle.labels.values()), cfg.infer.registry)
            sources: dict[str, int] = {}
            for c in codes.values():
                sources[c.source] = sources.get(c.source, 0) + 1
            typer.echo("codes:    " + ", ".join(f"{n} {s}" for s, n in sorted(sources.items())))
            uncoded = uncoded_labels(entry, list(bundle.labels.values()), cfg.infer.registry)
            if uncoded:
                typer.echo(
                    f"no codes: {len(uncoded)} label(s) get a local 99PACSFLOW code: "
                    f"{', '.join(uncoded)}"
                )

        guarded(body)

    @models.command("trust")
    def trust(
        model: Annotated[str, typer.Argument(help="Registered model name, or a bundle path.")],
        config: ConfigOpt = None,
    ) -> None:
        """Approve the code of MODEL's bundle as it is now (its configs/ and scripts/).

        The bundle runs its config code only when its registry entry also pins this hash
        (`bundle_sha256:`); changing one byte of its configs or scripts withdraws it.

        Examples:

            pacsflow models trust lung_nodule_ct_detection
        """

        def body() -> None:
            from pipeline.infer.bundle_config import content_hash
            from pipeline.infer.trust import TrustStore

            cfg = build_config(config)
            entry, path = _entry_and_path(cfg, model)
            digest = content_hash(path)
            store = TrustStore(cfg.infer.trust_store)
            record = store.approve(digest, entry.name, path)
            typer.echo(
                f"approved {digest} ({entry.name}, by {record['approved_by']}) in {store.path}"
            )
            if entry.bundle_sha256 != digest:
                typer.echo(
                    f"the registry does not pin it yet: add `bundle_sha256: {digest}` to the "
                    f"entry of {entry.name!r}, or it keeps running in allow-list mode"
                )

        guarded(body)

    @models.command("revoke")
    def revoke(
        model: Annotated[str, typer.Argument(help="Registered model name, or a bundle path.")],
        config: ConfigOpt = None,
    ) -> None:
        """Withdraw the approval of MODEL's bundle as it is now.

        Examples:

            pacsflow models revoke lung_nodule_ct_detection
        """

        def body() -> None:
            from pipeline.infer.bundle_config import content_hash
            from pipeline.infer.trust import TrustStore

            cfg = build_config(config)
            entry, path = _entry_and_path(cfg, model)
            digest = content_hash(path)
            store = TrustStore(cfg.infer.trust_store)
            if store.revoke(digest):
                typer.echo(f"revoked {digest} ({entry.name})")
            else:
                typer.echo(f"{digest} ({entry.name}) was not approved")

        guarded(body)
