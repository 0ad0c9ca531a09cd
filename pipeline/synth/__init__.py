"""Synthetic DICOM archives: realistic, deterministic, with ground truth.

:func:`synthesize` writes CT chest and MR brain studies of anatomical phantoms, with full
PHI-laden headers from made-up modalities, in a mix of lossless transfer syntaxes, plus a few
deliberately broken objects, and ``ground_truth.json`` beside them (UIDs, geometry, tissue and
lesion volumes, the bad objects). The demo, the tests and the benchmarks draw on it; ``pacsflow
synth OUT --patients N`` is its CLI.

Modules: :mod:`~pipeline.synth.core` (phantoms, geometry, headers; pure),
:mod:`~pipeline.synth.plan` (what the archive holds; pure), :mod:`~pipeline.synth.stage`
(writing, workers, ground truth) and :mod:`~pipeline.synth.names` (made-up PHI values).
"""

from pipeline.synth.stage import SynthResult, synthesize

__all__ = ["SynthResult", "synthesize"]
