import importlib.util
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Run the Triton GN kernels in Triton's CPU interpreter, so they are tested without a GPU. Must be set
    # before gn_detection.triton_group_norm is imported (kernels are bound at import).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gn_detection  # noqa: E402
from gn_detection.config import load_config  # noqa: E402
from gn_detection.shapes import ShapesSplitSpec, generate_split  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
SHAPES_CONFIG = os.path.join(CONFIGS, "shapes", "mask_rcnn_R18_FPN_gn_scratch.yaml")

# A small, fast variant of the demo config: narrow FPN/heads, 128-pixel images, 2 images per iteration.
TINY_OVERRIDES = [
    "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.CONV_DIM", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 32, "MODEL.GN.NUM_GROUPS", 8,
    "INPUT.MIN_SIZE_TRAIN", (128,), "INPUT.MAX_SIZE_TRAIN", 128, "INPUT.MIN_SIZE_TEST", 128,
    "INPUT.MAX_SIZE_TEST", 128, "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0,
]


def make_cfg(config_file: str, *opts):
    """A gn_detection config from a file and KEY VALUE overrides, as tools/train_net.py builds it."""
    cfg = load_config(config_file, opts)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def backbone_features_and_gradients(model, images, autocast_dtype=None):
    """FPN features (the forward under autocast to ``autocast_dtype`` if given), and the gradients of a fixed
    linear function of them w.r.t. the backbone's parameters."""
    with torch.autocast(images.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        features = model.backbone(images)
    loss = sum((f.float() * torch.linspace(-1, 1, f.numel(), device=f.device).view_as(f)).sum()
               for f in features.values())
    params = dict(model.backbone.named_parameters())
    return features, dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


@pytest.fixture(scope="session")
def tiny_shapes_root(tmp_path_factory):
    """A small shapes dataset (128-pixel images) under ``<tmp>/shapes``, registered as tiny_shapes_*."""
    root = tmp_path_factory.mktemp("datasets")
    for split, count in (("train", 48), ("val", 12)):
        generate_split(str(root / "shapes"), ShapesSplitSpec(split, count, image_size=128, max_objects=3),
                       progress=False)
    gn_detection.register_shapes(str(root / "shapes"), prefix="tiny_shapes")
    return root


def load_tool(name):
    """tools/<name>.py as a module, for tests of its functions."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool", os.path.join(REPO, "tools", f"{name}.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def run_tool(args, env_extra, timeout=600):
    """Run a tools/ script as a user would, in a fresh process; returns the CompletedProcess."""
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
