"""What the review app's tests share: a small real lake with findings, and headless Chromium.

The lake is made the way a user's is, stage by stage (synthesize -> crawl -> deid -> tensors ->
infer with the tiny test model), into a lake bound to the given key. The browser is Debian's
system Chromium driven by its chromedriver (Selenium), nothing downloaded; a test without them
is skipped with the install command.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bundle_factory import make_bundle, write_registry

from pipeline.config import load_config
from pipeline.lake import LakePaths, read_table

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def build_review_lake(root: Path, key: bytes, *, seed: int) -> LakePaths:
    """A lake under ``root/lake`` of ``key`` with at least 8 findings (2 patients, 10 CT
    slices of 48x48 each series)."""
    from pipeline.connectors import FolderSource
    from pipeline.crawl import run as crawl_run
    from pipeline.deid.stage import run as deid_run
    from pipeline.infer import stage as infer_stage
    from pipeline.lake.identity import open_lake
    from pipeline.lake.keys import LakeKeys
    from pipeline.synth import synthesize
    from pipeline.tensors.stage import run as tensors_run

    synthesize(
        root / "archive", patients=2, seed=seed, ct_slices=10, rows=48, columns=48,
        include_bad=False,
    )  # fmt: skip
    write_registry(root / "models.yaml", make_bundle(root / "bundles" / "tiny"))
    cfg = load_config(
        overrides={
            "compute": {"partition_size": 8, "device": "cpu"},
            "infer": {
                "model": "tiny",
                "registry": str(root / "models.yaml"),
                "volumes_per_task": 2,
                "batch_size": 16,
            },
        },
        environ={},
    )
    paths = LakePaths(root / "lake")
    open_lake(paths, LakeKeys(key), create=True)
    crawl_run(cfg, paths, FolderSource(root / "archive"), run_id="c")
    deid_run(cfg, paths, key=key, run_id="d")
    tensors_run(cfg, paths, run_id="t")
    infer_stage.run(cfg, paths, run_id="i")
    assert read_table(paths, "findings").num_rows >= 8
    return paths


def add_big_ct(lake: LakePaths, like: dict[str, Any], shape: tuple[int, int, int]) -> str:
    """A CT of ``shape`` (int16 HU, as the tensors stage stores CT) and a mask of a sphere
    written into the research zone with their tensors and findings rows; the key."""
    import hashlib

    import numpy as np

    from pipeline.lake import write_partition

    n, r, c = shape
    k, j, i = np.ogrid[:n, :r, :c]
    body = ((j - r // 2) ** 2 + (i - c // 2) ** 2) < (0.45 * r) ** 2
    vol = np.broadcast_to(np.where(body, 40, -1000), shape).astype(np.int16)
    vol += ((k * 7 + j * 3 + i) % 23).astype(np.int16)  # texture, so slices differ
    ball = (k - n // 2) ** 2 + ((j - r // 2.5) ** 2 + (i - c // 1.7) ** 2) * 0.7**2 < 15**2
    vol[ball] = 60
    mask = ball.astype(np.uint8)
    tensor_key = f"{like['SeriesInstanceUID']}/big-ct-{n}x{r}x{c}"
    folder = lake.research / "tensors" / f"big{n}"
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "ct.npy", vol)
    (lake.research / "masks" / f"big{n}").mkdir(parents=True, exist_ok=True)
    np.save(lake.research / "masks" / f"big{n}" / "ct.npy", mask)
    checksum = "sha256:" + hashlib.sha256((folder / "ct.npy").read_bytes()).hexdigest()
    affine = [0.7, 0, 0, -180.0, 0, 0.7, 0, -180.0, 0, 0, 1.0, -150.0, 0, 0, 0, 1]
    write_partition(
        lake,
        "tensors",
        [
            {
                "tensor_key": tensor_key,
                "SeriesInstanceUID": like["SeriesInstanceUID"],
                "status": "ok",
                "path": f"tensors/big{n}/ct.npy",
                "shape": list(shape),
                "spacing": [1.0, 0.7, 0.7],
                "affine": affine,
                "dtype": "int16",
                "checksum": checksum,
                "rescaled": True,
            }
        ],
        part=f"big-ct-{n}",
    )
    key = f"{tensor_key}/{like['model']}@{like['model_version']}/nodule"
    write_partition(
        lake,
        "findings",
        [
            {
                "finding_key": key,
                "SeriesInstanceUID": like["SeriesInstanceUID"],
                "tensor_key": tensor_key,
                "tensor_checksum": checksum,
                "model": like["model"],
                "model_version": like["model_version"],
                "weights_sha256": like["weights_sha256"],
                "label": "nodule",
                "label_value": 1,
                "voxel_count": int(mask.sum()),
                "bbox": [
                    int(v) for a in (np.argwhere(ball).min(0), np.argwhere(ball).max(0)) for v in a
                ],
                "mask_path": f"masks/big{n}/ct.npy",
                "inferred_at": like["inferred_at"],
            }
        ],
        part=f"big-ct-{n}",
    )
    return key


@contextlib.contextmanager
def headless_chromium(
    *extra_args: str, console_log: bool = True, webgl: bool = False
) -> Iterator[Any]:
    """A Selenium driver of the system's headless Chromium (skips the test without it);
    ``webgl``: WebGL2 through SwiftShader (the CPU), for the in-page viewer (issue #23)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(
            f"no system Chromium ({', '.join(missing)} missing): "
            "apt-get install chromium chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    if console_log:
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    gl = ("--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        *(gl if webgl else ("--disable-gpu",)),
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        *extra_args,
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
