"""Which outputs of a model are findings and which are per-series measurements.

A *finding* is lesion-like: something a reviewer accepts or rejects (a lesion candidate, a
detected box, a classification's predicted class). A *measurement* describes the series as a
whole (the volume and mean HU of a tissue class of a body-composition model): it is shown as
the series' measurements panel, never as a worklist row.

A registry entry says which is which (``configs/models.yaml``)::

    outputs:
      findings: [lung_nodule]                 # labels (a candidate's or box's name covers
                                              # lung_nodule_1, lung_nodule_2, ...)
      measurements: [soft_tissue, adipose_tissue, bone, lung]

The rule (:func:`output_kind`), in order:

1. a detected box is a finding;
2. a classification row is a finding when it is the predicted class, else a class score
   (``class_score``: shown with the finding, never a row of its own);
3. a label ``outputs.measurements`` names is a measurement;
4. anything else is a finding: a label ``outputs.findings`` names, a candidate of the entry's
   ``candidates``, and also a label the entry does not mention (nothing is hidden by
   omission). An entry without ``outputs`` therefore lists every label as a finding, as before.

Nothing here imports a stage: the registry (:mod:`pipeline.infer.registry`) validates the
key, the review app applies the rule to findings rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["KINDS", "OutputKind", "OutputRoles", "output_kind", "registry_outputs"]

OutputKind = Literal["finding", "measurement", "class_score"]
#: Every kind :func:`output_kind` answers.
KINDS: tuple[str, ...] = ("finding", "measurement", "class_score")


@dataclass(frozen=True)
class OutputRoles:
    """A model's ``outputs`` (label names) and its candidates' names."""

    findings: frozenset[str] = field(default_factory=frozenset)
    measurements: frozenset[str] = field(default_factory=frozenset)
    candidates: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_entry(cls, body: Mapping[str, Any]) -> OutputRoles:
        """The roles of a registry entry's raw mapping (``outputs`` and ``candidates``)."""
        outputs = body.get("outputs") or {}
        if not isinstance(outputs, Mapping):
            outputs = {}
        return cls(
            findings=frozenset(str(x) for x in outputs.get("findings") or ()),
            measurements=frozenset(str(x) for x in outputs.get("measurements") or ()),
            candidates=frozenset(str(x) for x in (body.get("candidates") or {})),
        )


def output_kind(
    roles: OutputRoles,
    label: str,
    *,
    task: str | None = None,
    box: bool = False,
    predicted: bool | None = None,
) -> OutputKind:
    """What one findings row is: ``finding``, ``measurement`` or ``class_score`` (see the
    module's rule).

    Examples
    --------
    >>> roles = OutputRoles(measurements=frozenset({"lung", "bone"}),
    ...                     candidates=frozenset({"lung_nodule"}))
    >>> output_kind(roles, "lung"), output_kind(roles, "lung_nodule_3")
    ('measurement', 'finding')
    >>> output_kind(roles, "nodule_1", box=True)
    'finding'
    >>> output_kind(roles, "malignant", task="classification", predicted=False)
    'class_score'
    """
    if box:
        return "finding"
    if task == "classification":
        return "finding" if predicted else "class_score"
    if label in roles.measurements:
        return "measurement"
    return "finding"


def registry_outputs(path: Path | None, *, entry: str | None, model: str) -> OutputRoles:
    """The :class:`OutputRoles` of a model in the registry at ``path`` (default
    ``configs/models.yaml``): the entry named ``entry`` (as the findings recorded it) or,
    without one, the one entry whose bundle folder is named ``model``. A registry or model
    that is not there gives empty roles (every label a finding).

    Raises:
        ConfigError: the registry is not valid YAML.
    """
    from pipeline.codes import default_registry_path, registry_entry

    body = registry_entry(path or default_registry_path(), entry=entry, model=model)
    return OutputRoles.from_entry(body) if body is not None else OutputRoles()
