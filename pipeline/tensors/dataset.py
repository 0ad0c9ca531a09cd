"""Training access: a cohort selected by SQL or pandas, as a MONAI/PyTorch dataset.

::

    from pipeline.lake import LakePaths
    from pipeline.tensors.dataset import TensorDataset, cohort

    lake = LakePaths(Path("demo-out/lake"))
    df = cohort(lake, where="Modality = 'CT' AND SliceThickness <= 2.5")
    ds = TensorDataset(lake, df, transform=ScaleIntensityRanged("image", -1000, 1000, 0, 1))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)

:func:`cohort` returns the ``ok`` rows of the ``tensors`` table joined to ``series`` (one row
per stored volume, the latest de-identification version of each series), filtered by a DuckDB
``WHERE`` clause or by a whole SQL query over the views ``cohort``, ``tensors``, ``series``,
``studies``, ``patients`` and ``instances``; a pandas filter on the frame it returns works as
well (``df[df.SliceThickness <= 2.5]``).

:class:`TensorDataset` is a map-style dataset (``__len__``/``__getitem__``, what
:class:`torch.utils.data.DataLoader` takes; :func:`monai_dataset` wraps it in a
:class:`monai.data.Dataset` where a real ``torch.utils.data.Dataset`` subclass is needed).
Each item is a MONAI-style dict:

- ``image``: a :class:`monai.data.MetaTensor` of shape ``(1, slices, rows, columns)`` (the
  stored array with a channel axis, its stored dtype), whose ``affine`` maps the *array* index
  ``(k=slice, j=row, i=column)`` to patient mm in ``space`` (``meta["space"]``), RAS by default
  as MONAI assumes. The lake stores the affine of ``(i, j, k)`` to LPS; the conversion is
  ``diag(-1, -1, 1, 1) @ A_lps @ P`` with ``P`` the permutation ``(k, j, i) -> (i, j, k)``
  (``space="LPS"`` leaves out the sign flip). MONAI's spatial transforms (``Orientationd``,
  ``Spacingd``...) read and update it;
- ``series_uid``, ``tensor_key`` (strings), ``spacing`` (float64 tensor, mm, array order),
  and any ``columns`` asked for, copied from the cohort row (e.g. a label).

:class:`PlanarDataset` does the same for 2D tensors (``tensor_kind`` ``planar``/``cine``:
radiographs, mammograms, ultrasound, cine), channel first, with the pixel spacing as affine.

Nothing is opened in ``__init__`` (rows are kept as plain values), so the dataset pickles to
DataLoader workers. Importing this module does not import torch or MONAI.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.errors import LakeError
from pipeline.lake import LakePaths
from pipeline.lake.duck import arrow_table, connect
from pipeline.lake.queries import cohort_base, cohort_join, create_view, version_sql

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "COHORT_VIEWS",
    "ChecksumMismatch",
    "PlanarDataset",
    "TensorDataset",
    "cohort",
    "monai_affine",
    "monai_dataset",
    "pinned",
]

#: The research tables a cohort query can name, plus the view ``cohort`` (tensors x series).
COHORT_VIEWS = ("tensors", "series", "studies", "patients", "instances", "orders", "reports")

#: Columns of ``series`` joined to each tensors row in the ``cohort`` view.
_SERIES_COLUMNS = (
    "StudyInstanceUID",
    "patient_token",
    "Modality",
    "BodyPartExamined",
    "Manufacturer",
    "ManufacturerModelName",
    "SeriesNumber",
    "SeriesDate",
    "SliceThickness",
    "KVP",
    "MagneticFieldStrength",
    "n_instances",
    "PixelSpacing",
    "slice_spacing",
)

#: What an item needs of a cohort row.
_NEEDED = ("tensor_key", "SeriesInstanceUID", "path", "shape", "affine", "spacing", "checksum")

# array index (k, j, i) -> stored affine's voxel (i, j, k)
_KJI_TO_IJK = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class ChecksumMismatch(LakeError):
    """A stored tensor's bytes do not match the checksum its ``tensors`` row records."""


def cohort(
    lake: LakePaths,
    sql: str | None = None,
    where: str | None = None,
    *,
    preprocessing_hash: str | None = None,
    as_of: str | Mapping[str, int] | None = None,
) -> pd.DataFrame:
    """The stored volumes of a cohort, one row per volume, as a pandas DataFrame.

    Parameters
    ----------
    lake
        The lake.
    sql
        A whole DuckDB query over the views ``cohort`` (the default rows below), ``tensors``,
        ``series``, ``studies``, ``patients``, ``instances``, and ``orders`` and ``reports``
        (the EHR's context: filter by indication or by the report's coded findings). Its
        result must have a ``tensor_key`` or a ``SeriesInstanceUID`` column: it is joined to
        ``cohort`` on that column (so ``SELECT SeriesInstanceUID FROM series WHERE ...``
        selects every stored volume of those series), keeping the query's own columns and
        order.
    where
        A DuckDB ``WHERE`` clause on the ``cohort`` view (``"Modality = 'CT' AND
        SliceThickness <= 2.5"``). Not with ``sql``.
    preprocessing_hash
        Keep the volumes of this preprocessing only (a lake may hold several).
    as_of
        Read the tables as a run left them: a run id (or a unique prefix of one), or
        ``{table: version}``. The latest versions when None. Pinning a training run's cohort
        this way gives the same rows whatever ran since (until ``pacsflow vacuum`` removes a
        version no run manifest keeps).

    Returns
    -------
    pandas.DataFrame
        The ``tensors`` columns of the ``ok`` rows of the latest de-identification version of
        each series, with the ``series`` columns ``Modality``, ``BodyPartExamined``,
        ``SliceThickness``, ``StudyInstanceUID``, ``patient_token``... Empty (with these
        columns) when nothing matches.

    Raises
    ------
    ValueError
        Both ``sql`` and ``where`` given, or a query result without a key column.
    LakeError
        ``as_of`` names no run, or a run without recorded table versions.
    """
    if sql is not None and where is not None:
        raise ValueError("give sql or where, not both")
    versions = pinned(lake, as_of)
    con = connect()
    try:
        for view in COHORT_VIEWS:
            con.execute(create_view(view, COHORT_VIEWS, version_sql(lake, view, versions)))
        base = cohort_base(lake, _SERIES_COLUMNS, preprocessing_hash, versions)
        if base.params:  # views cannot take parameters: materialise the (small) cohort
            con.execute(f"CREATE TEMP TABLE cohort AS {base.sql}", base.params)
        else:
            con.execute(f"CREATE VIEW cohort AS {base.sql}")
        if sql is None:
            query = "SELECT * FROM cohort"
            if where is not None:
                query += f" WHERE ({where})"
            query += " ORDER BY SeriesInstanceUID, volume_index"
        else:
            body = sql.strip().rstrip(";")
            columns = list(con.sql(body).columns)
            key = next((k for k in ("tensor_key", "SeriesInstanceUID") if k in columns), None)
            if key is None:
                raise ValueError(
                    "the cohort query must return a tensor_key or SeriesInstanceUID column; "
                    f"it returns {', '.join(columns)}"
                )
            cohort_columns = list(con.sql("SELECT * FROM cohort").columns)
            query = cohort_join(body, key, columns, cohort_columns)
        return arrow_table(con, query).to_pandas()
    finally:
        con.close()


def pinned(lake: LakePaths, as_of: str | Mapping[str, int] | None) -> dict[str, int] | None:
    """The table versions ``as_of`` names: a run id (its manifest's ``table_versions``), a
    mapping as it is, or None (the latest)."""
    if as_of is None:
        return None
    if isinstance(as_of, str):
        from pipeline.lake.manifest import versions_of_run

        return versions_of_run(lake, as_of)[1]
    return {str(k): int(v) for k, v in as_of.items()}


def monai_affine(stored_affine: Sequence[float] | Any, space: Literal["RAS", "LPS"] = "RAS") -> Any:
    """The 4x4 affine of the array index ``(k, j, i)`` in ``space``, from a ``tensors.affine``.

    ``tensors.affine`` maps ``(i=column, j=row, k=slice)`` to LPS mm; a stored array is indexed
    ``[k, j, i]``, and MONAI reads a tensor's affine over its spatial axes in order.
    """
    affine = np.asarray(stored_affine, dtype=np.float64).reshape(4, 4) @ _KJI_TO_IJK
    return _LPS_TO_RAS @ affine if space == "RAS" else affine


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _plain(value: Any) -> Any:
    """A cohort value as a plain Python/NumPy value (pandas gives arrays for list columns)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class TensorDataset:
    """A map-style dataset of the stored volumes of a cohort (see the module docstring).

    Parameters
    ----------
    lake
        The lake the cohort was selected from.
    cohort_df
        Rows of :func:`cohort` (after any pandas filtering), one item per row.
    transform
        A callable on the item dict (a MONAI dict transform or ``Compose`` of them).
    preprocessing_hash
        Keep the rows of this preprocessing only. Without it, a cohort holding more than one
        preprocessing is refused (the same series would come twice, differently prepared).
    verify_checksum
        Hash each file's bytes and compare with ``tensors.checksum`` before use; a mismatch
        raises :class:`ChecksumMismatch`.
    mmap
        Map the file copy-on-write instead of reading it (not with ``verify_checksum``, which
        reads the bytes anyway).
    space
        ``"RAS"`` (MONAI's default) or ``"LPS"`` (DICOM's) for the image's affine.
    columns
        Cohort columns to copy into each item (scalars: labels, ``Modality``...).
    """

    def __init__(
        self,
        lake: LakePaths,
        cohort_df: pd.DataFrame,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        preprocessing_hash: str | None = None,
        *,
        verify_checksum: bool = False,
        mmap: bool = False,
        space: Literal["RAS", "LPS"] = "RAS",
        columns: Sequence[str] = (),
    ) -> None:
        if space not in ("RAS", "LPS"):
            raise ValueError(f"space must be RAS or LPS, not {space!r}")
        missing = [c for c in (*self._needed, *columns) if c not in cohort_df.columns]
        if missing:
            raise ValueError(f"the cohort lacks column(s) {', '.join(missing)}: use cohort()")
        df = cohort_df
        if "tensor_kind" in df.columns and df["tensor_kind"].isin(self._refused_kinds).any():
            raise ValueError(self._refused_message)
        if "status" in df.columns and (df["status"] != "ok").any():
            raise ValueError("the cohort holds rows whose status is not ok (no stored volume)")
        if preprocessing_hash is not None:
            df = df[df["preprocessing_hash"] == preprocessing_hash]
        elif "preprocessing_hash" in df.columns and df["preprocessing_hash"].nunique() > 1:
            raise ValueError(
                "the cohort mixes preprocessings ("
                + ", ".join(sorted(df["preprocessing_hash"].unique()))
                + "): pass preprocessing_hash="
            )
        self.research = Path(lake.research)
        self.rows: list[dict[str, Any]] = [
            {c: _plain(row[c]) for c in (*self._needed, *columns)}
            for row in df.to_dict(orient="records")
        ]
        self.transform = transform
        self.verify_checksum = verify_checksum
        self.mmap = mmap
        self.space: Literal["RAS", "LPS"] = space
        self.columns = tuple(columns)

    #: what an item needs of a cohort row
    _needed: tuple[str, ...] = _NEEDED
    #: tensor kinds this dataset does not take, and what to use instead
    _refused_kinds: tuple[str, ...] = ("planar", "cine")
    _refused_message = (
        "the cohort holds 2D tensors (tensor_kind planar/cine): use PlanarDataset, or select "
        "with tensor_kind = 'volume' OR tensor_kind IS NULL"
    )

    def __len__(self) -> int:
        return len(self.rows)

    def load_array(self, index: int) -> np.ndarray[Any, Any]:
        """The stored volume of item ``index`` as NumPy (checksum verified when asked)."""
        row = self.rows[index]
        path = self.research / row["path"]
        if self.verify_checksum:
            data = path.read_bytes()
            if _sha256(data) != row["checksum"]:
                raise ChecksumMismatch(
                    f"{row['path']}: sha256 of the file differs from tensors.checksum "
                    f"(tensor {row['tensor_key']})"
                )
            array: np.ndarray[Any, Any] = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            array = np.load(path, mmap_mode="c" if self.mmap else None, allow_pickle=False)
        if list(array.shape) != list(row["shape"]):
            raise LakeError(f"{row['path']}: shape {array.shape} != tensors.shape {row['shape']}")
        return array

    def item(self, index: int) -> dict[str, Any]:
        """Item ``index`` before the transform."""
        import torch
        from monai.data import MetaTensor
        from monai.utils import MetaKeys

        row = self.rows[index]
        array = self.load_array(index)
        image = MetaTensor(
            torch.from_numpy(np.ascontiguousarray(array)[None]),
            affine=torch.as_tensor(monai_affine(row["affine"], self.space), dtype=torch.float64),
            meta={
                MetaKeys.SPACE: self.space,
                MetaKeys.ORIGINAL_CHANNEL_DIM: "no_channel",
                "filename_or_obj": str(self.research / row["path"]),
                "tensor_key": row["tensor_key"],
            },
        )
        out: dict[str, Any] = {
            "image": image,
            "series_uid": row["SeriesInstanceUID"],
            "tensor_key": row["tensor_key"],
            "spacing": torch.tensor(row["spacing"], dtype=torch.float64),
        }
        for column in self.columns:
            out[column] = row[column]
        return out

    def __getitem__(self, index: int) -> Any:
        data = self.item(index)
        return self.transform(data) if self.transform is not None else data


class PlanarDataset(TensorDataset):
    """A map-style dataset of the 2D tensors of a cohort: radiographs, mammograms, ultrasound
    images (``tensor_kind`` planar) and cine loops (``cine``), as the volumes' dataset does.

    Each item is a dict like :class:`TensorDataset`'s with ``image`` a
    :class:`monai.data.MetaTensor`, channel first: ``(samples, rows, columns)`` for an image,
    ``(samples, frames, rows, columns)`` for a cine (samples 1, or 3 for RGB). There is no
    patient frame: its ``affine`` is the pixel spacing, ``diag(row, column[, 1])`` over
    ``(rows, columns)`` (``(frames, rows, columns)`` for a cine, the frame axis unscaled),
    1 mm where the object gives no spacing (``meta["spacing_known"]`` False). ``kind`` and
    the ``columns`` asked for (``ViewPosition``, ``PresentationIntentType``, ``FrameTime``...)
    are copied from the row. Parameters are :class:`TensorDataset`'s but ``space``.
    """

    _needed = (
        "tensor_key",
        "SeriesInstanceUID",
        "path",
        "shape",
        "spacing",
        "checksum",
        "tensor_kind",
    )
    _refused_kinds = ("volume",)
    _refused_message = (
        "the cohort holds volumes: use TensorDataset, or select with tensor_kind IN "
        "('planar', 'cine')"
    )

    def __init__(
        self,
        lake: LakePaths,
        cohort_df: pd.DataFrame,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        preprocessing_hash: str | None = None,
        *,
        verify_checksum: bool = False,
        mmap: bool = False,
        columns: Sequence[str] = (),
    ) -> None:
        if "tensor_kind" in cohort_df.columns and cohort_df["tensor_kind"].isna().any():
            raise ValueError(self._refused_message)
        super().__init__(
            lake,
            cohort_df,
            transform,
            preprocessing_hash,
            verify_checksum=verify_checksum,
            mmap=mmap,
            columns=columns,
        )

    def item(self, index: int) -> dict[str, Any]:
        """Item ``index`` before the transform."""
        import torch
        from monai.data import MetaTensor
        from monai.utils import MetaKeys

        row = self.rows[index]
        array = np.ascontiguousarray(self.load_array(index))
        cine = row["tensor_kind"] == "cine"
        spatial = 3 if cine else 2
        channels = array.ndim > spatial  # colour: samples last, as stored
        image = np.moveaxis(array, -1, 0) if channels else array[None]
        known = row["spacing"] is not None
        row_sp, col_sp = (float(s) for s in row["spacing"]) if known else (1.0, 1.0)
        affine = np.diag([1.0, row_sp, col_sp, 1.0] if cine else [row_sp, col_sp, 1.0, 1.0])
        tensor = MetaTensor(
            torch.from_numpy(np.ascontiguousarray(image)),
            affine=torch.as_tensor(affine, dtype=torch.float64),
            meta={
                MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if channels else "no_channel",
                "filename_or_obj": str(self.research / row["path"]),
                "tensor_key": row["tensor_key"],
                "spacing_known": known,
            },
        )
        out: dict[str, Any] = {
            "image": tensor,
            "series_uid": row["SeriesInstanceUID"],
            "tensor_key": row["tensor_key"],
            "kind": row["tensor_kind"],
            "spacing": torch.tensor([row_sp, col_sp], dtype=torch.float64),
        }
        for column in self.columns:
            out[column] = row[column]
        return out


def monai_dataset(
    lake: LakePaths,
    cohort_df: pd.DataFrame | None = None,
    transform: Callable[[dict[str, Any]], Any] | None = None,
    *,
    where: str | None = None,
    as_of: str | Mapping[str, int] | None = None,
    **kwargs: Any,
) -> Any:
    """A :class:`monai.data.Dataset` of the cohort's items (a ``torch.utils.data.Dataset``).

    ``kwargs`` go to :class:`TensorDataset`; ``transform`` is MONAI's (applied by the
    returned dataset, so MONAI's ``CacheDataset``-style wrappers can be swapped in). Without
    ``cohort_df`` the cohort is ``cohort(lake, where=where, as_of=as_of)``: the volumes as the
    run ``as_of`` left the tables (pinned versions), or the latest.
    """
    from monai.data import Dataset

    if cohort_df is None:
        cohort_df = cohort(lake, where=where, as_of=as_of)
    elif where is not None or as_of is not None:
        raise ValueError("give cohort_df, or where/as_of to select one, not both")
    inner = TensorDataset(lake, cohort_df, **kwargs)
    return Dataset(data=_Items(inner), transform=transform)


class _Items(Sequence[Mapping[str, Any]]):
    """The items of a :class:`TensorDataset`, loaded on access (MONAI's ``data`` sequence)."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self.dataset.item(i) for i in range(*index.indices(len(self)))]
        return self.dataset.item(index)
