"""pipeline.infer.engine: batches packed across volumes give the per-volume answer; 3D bundles
go through their sliding-window inferer; results are deterministic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bundle_factory import make_bundle

from pipeline.errors import ModelError
from pipeline.infer.bundle import Bundle, load_bundle
from pipeline.infer.engine import Segmenter, augmentation_views, pick_device

MODELS = Path(__file__).resolve().parents[3] / "models"


@pytest.fixture(scope="module")
def bundle2d(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle(make_bundle(tmp_path_factory.mktemp("b") / "tiny2d"), models_dir=MODELS)


@pytest.fixture(scope="module")
def bundle3d(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    path = make_bundle(tmp_path_factory.mktemp("b") / "tiny3d", spatial=3)
    return load_bundle(path, models_dir=MODELS)


def _volumes(depths: list[int]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    out = []
    for i, d in enumerate(depths):
        arr = (rng.normal(0, 400, (d, 36, 44))).astype(np.int16)
        out.append((f"v{i}", arr, np.diag([0.9, 0.8, 3.0, 1.0])))
    return out


def _run(bundle: Bundle, vols: list, **kw: object) -> list[tuple[str, np.ndarray]]:
    seg = Segmenter(bundle, device="cpu", **kw)  # type: ignore[arg-type]
    return list(seg.segment((k, (lambda a=a, f=f: (a, f))) for k, a, f in vols))


def test_packing_across_volumes_does_not_change_results(bundle2d: Bundle) -> None:
    vols = _volumes([5, 1, 12, 3])
    alone = [_run(bundle2d, [v], batch_size=64)[0] for v in vols]
    for batch in (1, 4, 7, 64):
        packed = _run(bundle2d, vols, batch_size=batch, prefetch=3)
        assert [k for k, _ in packed] == [k for k, _, _ in vols]  # input order
        for (k1, a), (k2, b) in zip(packed, alone, strict=True):
            assert k1 == k2
            np.testing.assert_array_equal(a, b, err_msg=f"batch {batch}, {k1}")
            assert a.shape == next(v[1].shape for v in vols if v[0] == k1)


def test_deterministic_across_runs(bundle2d: Bundle, bundle3d: Bundle) -> None:
    vols = _volumes([6, 9])
    for bundle in (bundle2d, bundle3d):
        first, second = _run(bundle, vols), _run(bundle, vols)
        for (_, a), (_, b) in zip(first, second, strict=True):
            np.testing.assert_array_equal(a, b)


def test_3d_bundle_goes_through_its_sliding_window(bundle3d: Bundle) -> None:
    assert bundle3d.spatial_dims == 3
    ((key, labels),) = _run(bundle3d, _volumes([10]))
    assert key == "v0"
    assert labels.shape == (10, 36, 44)


def test_stats_account_for_the_time(bundle2d: Bundle) -> None:
    seg = Segmenter(bundle2d, device="cpu", batch_size=8)
    vols = _volumes([4, 4, 4])
    list(seg.segment((k, (lambda a=a, f=f: (a, f))) for k, a, f in vols))
    s = seg.stats
    assert (s.volumes, s.slices, s.voxels) == (3, 12, 3 * 4 * 36 * 44)
    assert s.batches == 2
    assert s.seconds_total >= s.seconds_compute + s.seconds_post
    assert 0 <= s.wait_fraction < 1


def test_loader_errors_propagate(bundle2d: Bundle) -> None:
    def broken() -> tuple[np.ndarray, np.ndarray]:
        raise OSError("gone")

    with pytest.raises(OSError, match="gone"):
        list(Segmenter(bundle2d, device="cpu").segment([("x", broken)]))


def test_a_2d_array_is_not_a_volume(bundle2d: Bundle) -> None:
    flat = np.zeros((8, 8), np.int16)
    with pytest.raises(ModelError, match="expected a 3D volume"):
        list(Segmenter(bundle2d, device="cpu").segment([("x", lambda: (flat, np.eye(4)))]))


def test_device_choice() -> None:
    import torch

    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        # a CPU build of torch says so (issue #20), a CUDA build without a device says that
        expected = "has no CUDA" if torch.version.cuda is None else "sees no CUDA device"
        with pytest.raises(ModelError, match=expected):
            pick_device("cuda")


@pytest.mark.gpu
def test_cuda_agrees_with_cpu(bundle2d: Bundle) -> None:
    """Where a GPU exists: the same labels on CUDA (fp32 and bf16 autocast) as on CPU, up to a
    small fraction of voxels at ties of the argmax."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    vols = _volumes([7, 5])
    cpu = _run(bundle2d, vols)
    for amp in ("off", "bf16"):
        gpu = list(
            Segmenter(bundle2d, device="cuda", amp=amp).segment(  # type: ignore[arg-type]
                (k, (lambda a=a, f=f: (a, f))) for k, a, f in vols
            )
        )
        for (_, a), (_, b) in zip(cpu, gpu, strict=True):
            agree = float((a == b).mean())
            assert agree >= (0.9999 if amp == "off" else 0.99), (amp, agree)
    bundle2d.network.to("cpu")


def test_fast_argmax_equals_the_bundles_own_postprocessing(bundle2d: Bundle) -> None:
    """The engine takes a plain AsDiscreted(argmax) itself, first (the test bundle: argmax,
    then the labels inverted) or last (the default model: the logits inverted, then argmax);
    the labels are those of the bundle's full postprocessing, ties included."""
    import torch
    from monai.data import MetaTensor

    default = load_bundle("ct_body_composition", models_dir=MODELS)
    for bundle, where in ((bundle2d, "first"), (default, "last")):
        seg = Segmenter(bundle, device="cpu")
        assert seg._fast_argmax == where
        arr, affine = _volumes([6])[0][1:]
        item = seg._prepare("k", lambda arr=arr, affine=affine: (arr, affine))
        logits = torch.randn(5, *item.image.shape[1:])
        logits[2] = logits[4]  # exact ties
        fast = seg._finish(item, logits.clone())
        pred = MetaTensor(logits.clone())
        pred.copy_meta_from(item.image)
        full = bundle.postprocessing({"pred": pred, "image": item.image})["pred"]  # type: ignore[misc]
        expected = np.asarray(full[0]).transpose(2, 1, 0).astype(np.uint8)
        np.testing.assert_array_equal(fast, expected, err_msg=where)
        assert fast.shape == arr.shape


def test_mirroring_makes_the_labels_follow_a_flip(bundle2d: Bundle, bundle3d: Bundle) -> None:
    """Test-time mirroring along x averages the network over the input and its x-flip, so a
    volume flipped left-right gets the flipped labels of the original (an untrained network on
    noise breaks that symmetry otherwise). The slices are the network's 32 x 32, so that no
    resampling (nearest neighbour is not symmetric under a flip) comes between."""
    rng = np.random.default_rng(5)
    array = rng.normal(0, 400, (6, 32, 32)).astype(np.int16)
    flipped = np.ascontiguousarray(array[:, :, ::-1])  # x = columns
    affine = np.diag([0.9, 0.8, 3.0, 1.0])
    vols = [("a", array, affine), ("b", flipped, affine)]
    plain = _run(bundle2d, vols)
    assert (plain[0][1][:, :, ::-1] != plain[1][1]).any(), "the test needs an asymmetric net"
    mirrored = _run(bundle2d, vols, mirror_axes=["x"])
    np.testing.assert_array_equal(mirrored[0][1][:, :, ::-1], mirrored[1][1])
    assert (mirrored[0][1] != plain[0][1]).any()  # the mirror changed something
    # a 3D bundle is mirrored through its sliding window (whose tiling need not be symmetric)
    ((_, labels3d),) = _run(bundle3d, vols[:1], mirror_axes=["x", "z"])
    assert labels3d.shape == array.shape
    assert (labels3d != _run(bundle3d, vols[:1])[0][1]).any()


def test_augmentation_views_and_their_checks(bundle2d: Bundle) -> None:
    assert augmentation_views((), False, 2) == [((), False)]
    assert augmentation_views(("x",), False, 2) == [((), False), ((2,), False)]
    flips = [(), (2,), (3,), (2, 3)]
    assert augmentation_views(("x", "y", "x"), False, 2) == [(f, False) for f in flips]
    assert augmentation_views(("x", "y"), True, 2) == [(f, t) for t in (False, True) for f in flips]
    assert len(augmentation_views(("x", "y", "z"), False, 3)) == 8
    with pytest.raises(ModelError, match="2D bundle can be mirrored along x, y"):
        Segmenter(bundle2d, device="cpu", mirror_axes=["z"])


def test_transposition_makes_the_labels_follow_a_transpose(bundle2d: Bundle) -> None:
    """With every flip and the transposition (the 8 symmetries of a square slice), a volume
    transposed in-plane, or rotated by 90 degrees, gets its labels transposed or rotated."""
    rng = np.random.default_rng(6)
    array = rng.normal(0, 400, (4, 32, 32)).astype(np.int16)
    affine = np.diag([0.9, 0.9, 3.0, 1.0])
    variants = [array, np.ascontiguousarray(array.transpose(0, 2, 1))]
    variants.append(np.ascontiguousarray(np.rot90(array, 1, axes=(1, 2))))
    vols = [(str(i), a, affine) for i, a in enumerate(variants)]
    plain = _run(bundle2d, vols)
    assert (plain[0][1].transpose(0, 2, 1) != plain[1][1]).any()
    (_, a), (_, t), (_, r) = _run(bundle2d, vols, mirror_axes=["x", "y"], transpose_xy=True)
    np.testing.assert_array_equal(a.transpose(0, 2, 1), t)
    np.testing.assert_array_equal(np.rot90(a, 1, axes=(1, 2)), r)


def test_a_volume_loader_gives_the_pair_loaders_answer(bundle2d: Bundle) -> None:
    """The stage hands the engine the one Volume type (issue #19); bare pairs still work."""
    from pipeline.dicom.volume import Volume

    vols = _volumes([4])
    ((key, arr, affine),) = vols
    volume = Volume(arr, affine, (3.0, 0.8, 0.9), (1, 0, 0, 0, 1, 0), (), (), False)
    seg = Segmenter(bundle2d, device="cpu")
    ((_, by_volume),) = list(seg.segment([(key, lambda: volume)]))
    ((_, by_pair),) = _run(bundle2d, vols)
    np.testing.assert_array_equal(by_volume, by_pair)
