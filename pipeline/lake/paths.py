"""Where everything lives in a lake. Two zones that never mix: ``restricted/`` and ``research/``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.enums import Zone

if TYPE_CHECKING:
    from pipeline.lake.crypto import FileCipher, Sealer
    from pipeline.lake.keys import LakeKeys

__all__ = ["RESEARCH_TABLES", "RESTRICTED_TABLES", "LakePaths"]

#: Parquet datasets of the identified zone, under ``restricted/<name>/``.
RESTRICTED_TABLES: tuple[str, ...] = (
    "index",
    "quarantine",
    "units",
    "vault",
    "outbox",
    "fhir_outbox",
)
#: Parquet datasets of the de-identified zone, under ``research/tables/<name>/``.
RESEARCH_TABLES: tuple[str, ...] = (
    "patients",
    "studies",
    "series",
    "instances",
    "tensors",
    "findings",
    "reviews",
    "queues",
    "corrections",
    "orders",
    "reports",
)


@dataclass(frozen=True)
class LakePaths:
    """The folders of one lake, rooted at :attr:`root`.

    Examples
    --------
    >>> LakePaths(Path("/data/lake")).table("series")
    PosixPath('/data/lake/research/tables/series')
    >>> LakePaths(Path("/data/lake")).table("index")
    PosixPath('/data/lake/restricted/index')
    """

    root: Path
    #: The lake's keys, when the caller opened it with them (stages that seal or open the
    #: restricted zone's identifying values use them; they travel to Dask workers with it).
    keys: LakeKeys | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def with_keys(self, keys: LakeKeys | None) -> LakePaths:
        """The same lake, carrying ``keys``."""
        return replace(self, keys=keys)

    @property
    def encrypted_at_rest(self) -> bool:
        """True when the lake's marker says its restricted zone is sealed."""
        from pipeline.lake.identity import read_marker

        identity = read_marker(self)
        return identity is not None and identity.encrypted_at_rest

    def _needs_keys(self) -> LakeKeys:
        if self.keys is None:
            from pipeline.errors import LakeError

            raise LakeError(
                f"{self.root} is encrypted at rest: this step needs the lake's key (a bug when "
                "a command that took --key-file says it)"
            )
        return self.keys

    def sealer(self) -> Sealer | None:
        """The sealer of the restricted zone's identifying columns, or None when the lake is
        not encrypted at rest.

        Raises
        ------
        LakeError
            An encrypted lake opened without its keys.
        """
        if not self.encrypted_at_rest:
            return None
        from pipeline.lake.crypto import Sealer

        return Sealer(self._needs_keys().column_key)

    def file_cipher(self) -> FileCipher | None:
        """The cipher of the restricted zone's files, or None when not encrypted at rest."""
        if not self.encrypted_at_rest:
            return None
        from pipeline.lake.crypto import FileCipher

        return FileCipher(self._needs_keys().file_key)

    def opener(self, table: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """A function that opens the sealed values of a row of restricted table ``table``
        read through SQL (the identity when the lake is not encrypted at rest). Take it once
        per query, not per row: it reads the marker and keys the cipher."""
        sealer = self.sealer()
        if sealer is None:
            return lambda row: row
        return lambda row: sealer.open_row(table, row)

    @property
    def restricted(self) -> Path:
        """The identified zone: index, quarantine, audit log, outbox, key material."""
        return self.root / Zone.RESTRICTED.value

    @property
    def research(self) -> Path:
        """The de-identified zone that data scientists get."""
        return self.root / Zone.RESEARCH.value

    @property
    def audit(self) -> Path:
        """The append-only, hash-chained audit log folder."""
        return self.restricted / "audit"

    @property
    def tensors(self) -> Path:
        """One volume file per usable series."""
        return self.research / "tensors"

    @property
    def masks(self) -> Path:
        """Model output masks in tensor geometry."""
        return self.research / "masks"

    @property
    def runs(self) -> Path:
        """One JSON manifest per run."""
        return self.root / "runs"

    @property
    def lock(self) -> Path:
        """The lock file that keeps two runs off one lake."""
        return self.root / ".pacsflow.lock"

    def table(self, name: str) -> Path:
        """The dataset folder of table ``name`` in its zone.

        Raises
        ------
        KeyError
            For a name that is not a lake table.
        """
        if name in RESTRICTED_TABLES:
            return self.restricted / name
        if name in RESEARCH_TABLES:
            return self.research / "tables" / name
        known = ", ".join(RESTRICTED_TABLES + RESEARCH_TABLES)
        raise KeyError(f"no table {name!r} in the lake; tables: {known}")

    def zone_of(self, path: Path) -> Zone | None:
        """Which zone a path lies in, or None when outside both."""
        resolved = path.resolve()
        for zone, base in ((Zone.RESTRICTED, self.restricted), (Zone.RESEARCH, self.research)):
            if resolved.is_relative_to(base.resolve()):
                return zone
        return None

    def create(self) -> LakePaths:
        """Create the folder skeleton (idempotent); the restricted zone is made owner-only."""
        for path in (self.restricted, self.audit, self.research / "tables", self.runs):
            path.mkdir(parents=True, exist_ok=True)
        self.restricted.chmod(0o700)
        return self
