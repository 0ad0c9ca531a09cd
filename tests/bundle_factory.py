"""Small MONAI bundles assembled in tests: model-zoo layout, seeded weights, saved locally."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LABELS = {"0": "background", "1": "soft_tissue", "2": "adipose_tissue", "3": "bone", "4": "lung"}


def metadata(*, spatial: int = 2, version: str = "0.1.0", channels: int = 5) -> dict[str, Any]:
    shape: list[Any] = [32, 32] if spatial == 2 else [32, 32, 16]
    return {
        "name": "tiny test model",
        "version": version,
        "monai_version": "1.6.1",
        "pytorch_version": "2.13.0",
        "task": "test",
        "description": "a tiny network for tests",
        "authors": "tests",
        "copyright": "none",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "num_channels": 1,
                    "spatial_shape": shape,
                    "dtype": "float32",
                    "is_patch_data": spatial == 3,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": channels,
                    "spatial_shape": shape,
                    "dtype": "float32",
                    "is_patch_data": spatial == 3,
                    "channel_def": {k: v for k, v in LABELS.items() if int(k) < channels},
                }
            },
        },
    }


def inference(*, spatial: int = 2, channels: int = 5) -> dict[str, Any]:
    """A model-zoo style inference.json: network_def, preprocessing, inferer, postprocessing."""
    network = {
        "_target_": "monai.networks.nets.UNet",
        "spatial_dims": spatial,
        "in_channels": 1,
        "out_channels": channels,
        "channels": [4, 8],
        "strides": [2],
        "num_res_units": 0,
        "norm": "batch",
    }
    resize = [32, 32, -1] if spatial == 2 else [32, 32, 16]
    inferer: dict[str, Any] = {"_target_": "SimpleInferer"}
    if spatial == 3:
        inferer = {
            "_target_": "SlidingWindowInferer",
            "roi_size": [16, 16, 8],
            "sw_batch_size": 4,
            "overlap": 0.25,
        }
    return {
        "imports": ["$import torch"],
        "network_def": network,
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -1024.0,
                    "a_max": 1024.0,
                    "b_min": -1.0,
                    "b_max": 1.0,
                    "clip": True,
                },
                {"_target_": "Resized", "keys": "image", "spatial_size": resize, "mode": "area"},
            ],
        },
        "inferer": inferer,
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": True,
                },
            ],
        },
    }


def make_bundle(
    root: Path,
    *,
    spatial: int = 2,
    version: str = "0.1.0",
    seed: int = 0,
    weights: bool = True,
    channels: int = 5,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle folder under ``root`` and return it."""
    import torch
    from monai.bundle import ConfigParser

    root.mkdir(parents=True, exist_ok=True)
    (root / "configs").mkdir(exist_ok=True)
    (root / "docs").mkdir(exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    meta = metadata(spatial=spatial, version=version, channels=channels)
    cfg = config or inference(spatial=spatial, channels=channels)
    (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    (root / "configs" / "inference.json").write_text(json.dumps(cfg, indent=2))
    (root / "docs" / "README.md").write_text("# tiny\n")
    (root / "LICENSE").write_text("test\n")
    if weights:
        torch.manual_seed(seed)
        net = ConfigParser(dict(cfg)).get_parsed_content("network_def")
        torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


REGISTRY = """models:
  tiny:
    bundle: {bundle}
    applies_to: "Modality = 'CT' AND volume_ok"
    labels:
      soft_tissue: {{category: ["85756007", SCT, Tissue], type: ["87784001", SCT, Soft tissue]}}
      adipose_tissue: {{category: ["85756007", SCT, Tissue], type: ["55603005", SCT, Adipose]}}
      bone: {{category: ["85756007", SCT, Tissue], type: ["272673000", SCT, Bone]}}
      lung: {{category: ["123037004", SCT, Anatomical Structure], type: ["39607008", SCT, Lung]}}
"""


def write_registry(path: Path, bundle: Path) -> Path:
    """A model registry naming ``bundle`` "tiny", for CT volumes, with the default model's codes."""
    path.write_text(REGISTRY.format(bundle=bundle))
    return path


#: the model-zoo bundles as published (configs only), beside the checkout
ZOO = Path(__file__).resolve().parents[1].parent / "shared" / "bundles" / "model-zoo"


def zoo_bundle(
    name: str,
    root: Path,
    *,
    weights: str = "model.pt",
    network_overrides: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    seed: int = 0,
) -> Path:
    """Copy the shared model-zoo bundle ``name`` under ``root`` (never into the repository)
    and give it random weights built from its own ``network_def`` (the hubs are unreachable):
    ``network_overrides``/``drop`` change keys of network_def for building only (e.g. a
    keyword the installed MONAI no longer takes). Skips when ../shared is absent."""
    import shutil

    import pytest
    import torch
    from monai.bundle import ConfigParser

    src = ZOO / name
    if not src.is_dir():
        pytest.skip(f"../shared/bundles/model-zoo/{name} not found: model-zoo tests skipped")
    dst = root / name
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "configs" / "inference.json").read_text())
    network = dict(cfg["network_def"])
    for key in drop:
        network.pop(key, None)
    network.update(network_overrides or {})
    torch.manual_seed(seed)
    net = ConfigParser({"network_def": network}, globals=False).get_parsed_content("network_def")
    (dst / "models").mkdir(exist_ok=True)
    torch.save(net.state_dict(), dst / "models" / weights)
    return dst


#: a network with the RetinaNet interface whose answer is known: the class-0 logit of anchor 0
#: at level 0 (stride 4, 4, 2) is ``20 * mean(input over the cell) - 10``; all else -10 and no
#: box regression, so a cell filled with 1.0 gives exactly its anchor 0 as a box
KNOWN_ANSWER_NET = """
import torch
from torch import nn
from torch.nn import functional as F


class CellNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.spatial_dims, self.num_classes, self.num_anchors = 3, 1, 3
        self.size_divisible = (16, 16, 8)
        self.cls_key, self.box_reg_key = "classification", "box_regression"
        self.gain = nn.Parameter(torch.tensor(20.0))

    def forward(self, images):
        cls, reg = [], []
        for level, stride in enumerate([(4, 4, 2), (8, 8, 4), (16, 16, 8)]):
            pooled = F.avg_pool3d(images[:, :1], stride, stride)
            logits = torch.full((images.shape[0], 3, *pooled.shape[2:]), -10.0)
            if level == 0:
                logits[:, 0] = self.gain * pooled[:, 0] - 10.0
            cls.append(logits)
            reg.append(torch.zeros(images.shape[0], 18, *pooled.shape[2:]))
        return {self.cls_key: cls, self.box_reg_key: reg}
"""


def detection_bundle(root: Path, *, known_answer: bool = False, seed: int = 0) -> Path:
    """The model zoo's lung_nodule_ct_detection under ``root`` with random weights built from
    its own config (or, ``known_answer``, with ``scripts/known_answer.py``'s CellNet as its
    network_def). Skips when ../shared is absent."""
    import shutil

    import pytest
    import torch
    from monai.bundle import ConfigParser

    from pipeline.infer.detect import provide_torchvision_parts

    src = ZOO / "lung_nodule_ct_detection"
    if not src.is_dir():
        pytest.skip("../shared/bundles/model-zoo/lung_nodule_ct_detection not found")
    dst = root / src.name
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "configs" / "inference.json").read_text())
    if known_answer:
        (dst / "scripts" / "known_answer.py").write_text(KNOWN_ANSWER_NET)
        cfg["network_def"] = {"_target_": "scripts.known_answer.CellNet"}
        (dst / "configs" / "inference.json").write_text(json.dumps(cfg, indent=4))
        from torch import nn

        state = {"gain": nn.Parameter(torch.tensor(20.0)).data}
    else:
        provide_torchvision_parts()
        torch.manual_seed(seed)
        net = ConfigParser(cfg).get_parsed_content("network_def")
        # the prior bias (score 0.01) is below the detector's own threshold (0.02): no box
        # at all; a zero bias scores every anchor about 0.5
        net.classification_head.cls_logits.bias.data.zero_()
        state = net.state_dict()
    (dst / "models").mkdir(exist_ok=True)
    torch.save(state, dst / "models" / "model.pt")
    return dst
