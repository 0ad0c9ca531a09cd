"""Multi-sequence inputs: a study's series stacked as a bundle's input channels.

A model such as brats_mri_segmentation takes four MR sequences of one study as the channels of
one image (its metadata: ``T1c``, ``T1``, ``T2``, ``FLAIR``). The registry entry says which
series feeds which channel (``inputs:``, :class:`pipeline.infer.registry.InputChannel`): each
channel's ``where`` runs over the research ``series`` table joined with the sequence attributes
of its instances (:func:`pipeline.lake.queries.infer_channel_series`). Per study:

- each channel must be matched by exactly one stored volume; a study where a channel matches
  none ("FLAIR: no series matches") or several ("T2: 2 volumes match (ambiguous)") is
  *refused*, with that reason, and nothing of it runs;
- the channels are resampled (trilinear, zero outside) onto the grid of the first channel's
  volume, the **reference**: its tensor is the one the findings and the mask belong to, so
  write-back puts the SEG on the reference series' frames;
- a study whose reference tensor has findings of this model identity is done (incremental).

:func:`stacked_loader` gives the engine ``(channels, slices, rows, cols)`` and the reference's
LPS affine, which :class:`pipeline.infer.engine.Segmenter` feeds as a ``C``-channel MetaTensor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.dicom.volume import Volume
from pipeline.errors import ConfigError
from pipeline.lake import LakePaths
from pipeline.lake.duck import arrow_table
from pipeline.lake.queries import infer_channel_series, infer_done_tensors

logger = logging.getLogger(__name__)

__all__ = ["InputGroups", "check_channels", "match_inputs", "resample_onto", "stacked_loader"]


@dataclass
class InputGroups:
    """What the registry's channel rules made of the studies."""

    #: per study to run: the reference channel's tensors row, with ``channels`` (every
    #: channel's row, in the bundle's order) and ``channel_names``
    todo: list[dict[str, Any]] = field(default_factory=list)
    #: study pseudonym -> why it was refused (a channel missing or ambiguous)
    refused: dict[str, str] = field(default_factory=dict)
    #: studies whose reference tensor already has this model's findings
    done: int = 0


def check_channels(names: Sequence[str], metadata: Mapping[str, Any], model: str) -> None:
    """The registry's channel names must be the bundle's input channels, in its order.

    Raises:
        ConfigError: a different number of channels, or other names, than the bundle's
            ``network_data_format.inputs`` says.
    """
    inputs = metadata["network_data_format"]["inputs"]
    spec = inputs.get("image") or next(iter(inputs.values()))
    n = int(spec.get("num_channels") or 1)
    channel_def = {int(k): str(v) for k, v in (spec.get("channel_def") or {}).items()}
    wanted = [channel_def[c] for c in range(n)] if len(channel_def) == n else None
    if len(names) != n or (wanted is not None and list(names) != wanted):
        raise ConfigError(
            f"model {model!r}: inputs name {', '.join(names) or 'no channel'}, the bundle takes "
            f"{n} channel(s)" + (f": {', '.join(wanted)}, in this order" if wanted else "")
        )


def match_inputs(
    con: Any,
    lake: LakePaths,
    *,
    applies_to: str,
    channels: Sequence[tuple[str, str]],
    preprocessing_hash: str,
    model: str,
    version: str,
    weights_sha256: str,
) -> InputGroups:
    """Match each study's stored volumes to the ``channels`` (name, where), in order.

    Raises:
        ConfigError: a ``where`` that is not one filter expression, or does not run over the
            series table.
    """
    per_channel: list[dict[str, list[dict[str, Any]]]] = []
    studies: set[str] = set()
    for name, where in channels:
        q = infer_channel_series(lake, applies_to=applies_to, channel=name, where=where)
        try:
            rows = arrow_table(con, q.sql, {"h": preprocessing_hash}).to_pylist()
        except Exception as exc:
            if type(exc).__module__.startswith("duckdb"):
                raise ConfigError(
                    f"model {model!r}: input {name!r}: {where!r} does not run over the series "
                    f"table ({str(exc).splitlines()[0]})"
                ) from None
            raise
        by_study: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            # the study stays in the row: a cohort key of the findings (issue #24)
            by_study.setdefault(row["StudyInstanceUID"], []).append(row)
        per_channel.append(by_study)
        studies.update(by_study)
    q = infer_done_tensors(lake)
    done_keys = {
        r["tensor_key"]
        for r in arrow_table(
            con, q.sql, {"m": model, "v": version, "w": weights_sha256}
        ).to_pylist()
    }
    out = InputGroups()
    names = [name for name, _ in channels]
    for study in sorted(studies):
        problems = []
        picked: list[dict[str, Any]] = []
        for name, by_study in zip(names, per_channel, strict=True):
            found = by_study.get(study, [])
            if not found:
                problems.append(f"{name}: no series matches")
            elif len(found) > 1:
                problems.append(f"{name}: {len(found)} volumes match (ambiguous)")
            else:
                picked.append(found[0])
        if not problems and len({r["tensor_key"] for r in picked}) != len(picked):
            problems.append("one volume matches several channels")
        if problems:
            out.refused[study] = "; ".join(problems)
            logger.warning("study %s refused for %s: %s", study, model, out.refused[study])
            continue
        reference = picked[0]
        if reference["tensor_key"] in done_keys:
            out.done += 1
            continue
        out.todo.append({**reference, "channels": picked, "channel_names": names})
    return out


def resample_onto(
    array: npt.NDArray[Any],
    affine: npt.NDArray[np.float64],
    ref_shape: tuple[int, ...],
    ref_affine: npt.NDArray[np.float64],
) -> npt.NDArray[np.float32]:
    """``array`` (slices, rows, cols) with LPS ``affine`` resampled (trilinear, zero outside)
    onto the grid ``ref_shape`` / ``ref_affine``; the same grid is returned as float32."""
    from scipy.ndimage import affine_transform

    same = array.shape == tuple(ref_shape) and np.allclose(affine, ref_affine, atol=1e-4)
    if same:
        return np.asarray(array, dtype=np.float32)
    # affines map (i=col, j=row, k=slice); arrays are indexed (k, j, i)
    flip = np.eye(4)[[2, 1, 0, 3]]
    matrix = flip @ np.linalg.inv(affine) @ ref_affine @ flip
    return affine_transform(
        np.asarray(array, dtype=np.float32),
        matrix,
        output_shape=tuple(ref_shape),
        order=1,
        mode="constant",
        cval=0.0,
    ).astype(np.float32, copy=False)


def stacked_loader(
    lake: LakePaths, row: Mapping[str, Any], keep: Callable[[Volume], None]
) -> Callable[[], tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]]:
    """A loader of the group ``row`` (:attr:`InputGroups.todo`): the channels stacked
    ``(C, slices, rows, cols)`` on the reference's grid, and its affine. ``keep`` receives the
    reference :class:`Volume` (for the measurements)."""

    def load() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
        planes = []
        reference: Volume | None = None
        for channel in row["channels"]:
            array = np.load(lake.research / channel["path"], allow_pickle=False)
            volume = Volume.from_tensor_row(channel, array)
            if reference is None:
                reference = volume
                keep(volume)
            planes.append(
                resample_onto(volume.array, volume.affine, reference.array.shape, reference.affine)
            )
        assert reference is not None
        return np.stack(planes), reference.affine

    return load
