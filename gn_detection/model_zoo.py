"""The published GN checkpoints, one name away.

``CATALOG`` lists Detectron's GN-pretrained ImageNet backbones, Detectron2's model-zoo GN models and
Detectron's (Caffe2) GN Mask R-CNN baselines, each with its URL, format, the config it belongs to and its
published COCO AP. A name works everywhere a weights path does:

    MODEL.WEIGHTS gn-zoo://Detectron2/mask_rcnn_R_50_FPN_3x_gn                       (YAML / command line)
    model = gn_detection.model_zoo.get("Detectron2/mask_rcnn_R_50_FPN_3x_gn")        (Python)
    python tools/model_zoo.py download Detectron2/mask_rcnn_R_50_FPN_3x_gn           (shell)

Files are downloaded once into the cache (see :mod:`gn_detection.download`), verified and then reused.
``.pkl`` checkpoints are Python pickles: loading one can run code, so load only files from sources you
trust; catalog files are checked against the MD5 prefix in their names or a recorded SHA-256.
"""
import difflib
import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager
from iopath.common.file_io import PathHandler
from torch import nn

from .checkpoint import load_weights
from .config import load_config
from .download import PUBLIC_HOST, Checksums, DownloadError, cache_segments, download

SCHEME = "gn-zoo://"
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DETECTRON = f"{PUBLIC_HOST}/detectron"
DETECTRON2 = f"{PUBLIC_HOST}/detectron2"
DETECTRON2_FORMAT = "Detectron2 .pkl"
DETECTRON_FORMAT = "Detectron (Caffe2) .pkl"  # Caffe2 blob names, converted by Detectron2's checkpointer
# Detectron's RoIAlign samples without the half-pixel offset; Detectron2 calls that "ROIAlign".
DETECTRON_INFERENCE = ("MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlign", "MODEL.ROI_MASK_HEAD.POOLER_TYPE", "ROIAlign")


@dataclass(frozen=True)
class ZooModel:
    """One published checkpoint. ``url`` is empty for results published without a file; ``opts`` are
    config overrides the weights need at inference; APs are COCO val (minival) as published."""

    name: str
    config: str  # relative to configs/
    file_format: str
    url: str = ""
    box_ap: Optional[float] = None
    mask_ap: Optional[float] = None
    note: str = ""
    sha256: str = ""
    opts: Tuple[object, ...] = ()  # KEY VALUE overrides, as on the command line

    @property
    def checksums(self) -> Checksums:
        """Digests the file must match: Detectron2 model-zoo names end in the first hex digits of the MD5."""
        # exactly 6: a run's own names (model_0089999.pkl, model_final_20240101.pkl) hold longer digit runs
        path = urllib.parse.urlparse(self.url).path  # a ?query or #fragment after the name leaves it as it is
        match = re.search(r"_([0-9a-f]{6})\.pkl$", path) if self.file_format == DETECTRON2_FORMAT else None
        return Checksums(md5_prefix=match[1] if match else "", sha256=self.sha256)


def _detectron_e2e(depth: int, schedule: str, run_id: int, run: str, box_ap: float, mask_ap: float) -> ZooModel:
    name = f"e2e_mask_rcnn_R-{depth}-FPN_{schedule}_gn"
    url = (f"{DETECTRON}/GN/{run_id}/04_2018_gn_baselines/{name}_{run}/output/train/"
           "coco_2014_train%3Acoco_2014_valminusminival/generalized_rcnn/model_final.pkl")
    config = f"mask_rcnn_R{depth}_FPN_gn{'_3x' if schedule == '3x' else ''}.yaml"
    return ZooModel(f"Detectron/{name}", config, DETECTRON_FORMAT, url, box_ap, mask_ap,
                    note="trained in Detectron; Detectron2 computes boxes and anchors slightly differently",
                    opts=DETECTRON_INFERENCE)


def _detectron2(name: str, run_id: int, file_name: str, config: str, box_ap: float, mask_ap: float) -> ZooModel:
    return ZooModel(f"Detectron2/{name}", config, DETECTRON2_FORMAT,
                    f"{DETECTRON2}/Misc/{name}/{run_id}/{file_name}", box_ap, mask_ap)


CATALOG: Dict[str, ZooModel] = {}


def register(model: ZooModel) -> None:
    """Add a checkpoint to the catalog (e.g. one on an internal server); names must be new.

    Raises:
        TypeError, ValueError, FileNotFoundError: naming the entry and the field at fault.
    """
    if not isinstance(model, ZooModel):
        raise TypeError(f"model zoo: register() takes a model_zoo.ZooModel, not {type(model).__name__}")
    problem = _entry_problem(model)
    if problem:
        raise ValueError(f"model zoo entry {model.name!r}: {problem}")
    if model.name in CATALOG:
        raise ValueError(f"model zoo: the name {model.name!r} is already in the catalog")
    if not os.path.isfile(os.path.join(CONFIG_DIR, model.config)):
        raise FileNotFoundError(f"model zoo entry {model.name!r}: config {model.config!r} not found in {CONFIG_DIR}")
    try:  # as get_config will: the opts name keys of the config, with values of their types
        load_config(os.path.join(CONFIG_DIR, model.config), model.opts)
    except ValueError as e:
        raise ValueError(f"model zoo entry {model.name!r}: opts {model.opts!r} do not apply to its config: {e}") from e
    CATALOG[model.name] = model


def _entry_problem(model: ZooModel) -> Optional[str]:
    """What makes a catalog entry unusable, or None."""
    if not isinstance(model.name, str) or not model.name.strip() or model.name.startswith(SCHEME):
        return f"name must be a non-blank string without {SCHEME!r} (that prefix is how MODEL.WEIGHTS names it)"
    if not isinstance(model.config, str) or not model.config:
        return (f"config must be a config file's name under configs/, e.g. 'mask_rcnn_R50_FPN_gn.yaml', got "
                f"{model.config!r}")
    if model.file_format not in (DETECTRON2_FORMAT, DETECTRON_FORMAT):
        return f"file_format must be model_zoo.DETECTRON2_FORMAT or DETECTRON_FORMAT, got {model.file_format!r}"
    if not isinstance(model.url, str) or model.url and not _is_file_url(model.url):
        return (f"url must be an http(s) URL of a file (or empty for results published without a file), got "
                f"{model.url!r}")
    if model.url and ".." in cache_segments(model.url):
        return f"url must not hold '..' path segments (its file would be cached outside the cache), got {model.url!r}"
    if not isinstance(model.sha256, str) or (model.sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", model.sha256)):
        return ("sha256 must be the file's SHA-256 as 64 hex digits (or empty when not recorded), "
                f"got {model.sha256!r}")
    if (not isinstance(model.opts, (tuple, list)) or len(model.opts) % 2
            or not all(isinstance(key, str) for key in model.opts[::2])):
        return f"opts must be a tuple of KEY, VALUE items, e.g. ('MODEL.GN.NUM_GROUPS', 16), got {model.opts!r}"
    return None


def _is_file_url(url: str) -> bool:
    """Whether ``url`` is an http(s) URL (the scheme in any case, as URLs allow) with a host and a file path."""
    parsed = urllib.parse.urlparse(url)
    return parsed.scheme.lower() in ("http", "https") and bool(parsed.netloc) and parsed.path.strip("/") != ""


for _model in (
    ZooModel("ImageNetPretrained/R-50-GN", "mask_rcnn_R50_FPN_gn.yaml", DETECTRON_FORMAT,
             f"{DETECTRON}/ImageNetPretrained/47261647/R-50-GN.pkl", note="ImageNet backbone, G=32, 24.0% top-1 error"),
    ZooModel("ImageNetPretrained/R-101-GN", "mask_rcnn_R101_FPN_gn.yaml", DETECTRON_FORMAT,
             f"{DETECTRON}/ImageNetPretrained/47592356/R-101-GN.pkl", note="ImageNet backbone, G=32, 22.6% top-1 error"),
    _detectron2("mask_rcnn_R_50_FPN_3x_gn", 138602888, "model_final_dc5d9e.pkl", "mask_rcnn_R50_FPN_gn_3x.yaml",
                42.6, 38.6),
    _detectron2("scratch_mask_rcnn_R_50_FPN_3x_gn", 138602908, "model_final_01ca85.pkl",
                "scratch_mask_rcnn_R50_FPN_gn_3x.yaml", 39.9, 36.6),
    _detectron2("scratch_mask_rcnn_R_50_FPN_9x_gn", 183808979, "model_final_da7b4c.pkl",
                "scratch_mask_rcnn_R50_FPN_gn_9x.yaml", 43.7, 39.6),
    _detectron_e2e(50, "2x", 48616381, "0416.13_23_38.bTlTI97Q", 40.3, 35.7),
    _detectron_e2e(101, "2x", 48616724, "0416.13_26_34.GLnri4GR", 41.8, 36.8),
    _detectron_e2e(50, "3x", 48734751, "0417.09_54_59.nwCTtPVk", 40.8, 36.1),
    _detectron_e2e(101, "3x", 48734779, "0417.09_55_23.HMtcR8wg", 42.3, 37.2),
    ZooModel("Detectron/scratch_e2e_mask_rcnn_R-50-FPN_3x_gn", "scratch_mask_rcnn_R50_FPN_gn_3x.yaml",
             DETECTRON_FORMAT, box_ap=39.5, mask_ap=35.2, note="results only: published without a file"),
    ZooModel("Detectron/scratch_e2e_mask_rcnn_R-101-FPN_3x_gn", "scratch_mask_rcnn_R101_FPN_gn_3x.yaml",
             DETECTRON_FORMAT, box_ap=41.0, mask_ap=36.4, note="results only: published without a file"),
):
    register(_model)


def lookup(name: str) -> ZooModel:
    """The catalog entry called ``name`` (a ``gn-zoo://`` prefix is allowed)."""
    if not isinstance(name, str):
        raise TypeError(f"model zoo: a checkpoint name is a string such as {next(iter(CATALOG))!r}, not "
                        f"{name!r}; `python tools/model_zoo.py list` shows every name.")
    name = name[len(SCHEME):] if name.startswith(SCHEME) else name
    if name not in CATALOG:
        close = difflib.get_close_matches(name, list(CATALOG), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"{name!r} is not in the GN model zoo.{hint} "
                       "`python tools/model_zoo.py list` shows every name.")
    return CATALOG[name]


def downloadable(name: str) -> ZooModel:
    """The catalog entry called ``name``, checked to have a file: raises :class:`DownloadError` for one
    published as results only (and ``KeyError`` for an unknown name, as :func:`lookup`)."""
    model = lookup(name)
    if not model.url:
        raise DownloadError(f"{model.name} was published as results only ({model.box_ap} box / "
                            f"{model.mask_ap} mask AP), without a file to download.")
    return model


def fetch(name: str, progress: bool = True, again: bool = False) -> str:
    """The local path of a catalog checkpoint, downloaded and verified on first use; with ``again``, downloaded
    anew (a cached copy damaged since, say), the cached copy replaced only once the new one is whole and verified."""
    model = downloadable(name)
    return download(model.url, model.checksums, progress=progress, again=again)


def get_config(name: str, trained: bool = True) -> CfgNode:
    """The config a catalog checkpoint belongs to; with ``trained``, its MODEL.WEIGHTS point to it (for
    an ImageNet backbone: the config that fine-tunes from it). MODEL.DEVICE is cpu where no GPU is visible."""
    model = downloadable(name) if trained else lookup(name)  # results only: no file for MODEL.WEIGHTS to name
    cfg = load_config(os.path.join(CONFIG_DIR, model.config), model.opts)
    cfg.MODEL.WEIGHTS = SCHEME + model.name if trained else ""
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def get(name: str, trained: bool = True) -> nn.Module:
    """A model built from the checkpoint's config, in eval mode; with ``trained``, its weights loaded
    (the log says how many tensors the load placed, left missing and did not use).

    Raises:
        ValueError: for a checkpoint that leaves some of the model's tensors at random (an ImageNet backbone sets
            the backbone alone): it is for fine-tuning, from :func:`get_config` with tools/train_net.py.
    """
    cfg = get_config(name, trained)
    model = build_model(cfg)
    if trained:
        counts = load_weights(model, cfg.MODEL.WEIGHTS)
        if counts.unset_names:
            raise ValueError(f"{counts.unset_summary(name)}, so the model would predict at random: it is for "
                             "fine-tuning, e.g. tools/train_net.py with get_config(name)'s config")
    return model.eval()


def catalog() -> List[ZooModel]:
    """Every catalog entry, in catalog order."""
    return list(CATALOG.values())


class ZooPathHandler(PathHandler):
    """Resolves ``gn-zoo://NAME`` (in MODEL.WEIGHTS or any Detectron2 path) to the cached file."""

    def _get_supported_prefixes(self) -> List[str]:
        return [SCHEME]

    def _get_local_path(self, path: str, **kwargs) -> str:
        return fetch(path)

    def _open(self, path: str, mode: str = "r", **kwargs):
        return open(self._get_local_path(path), mode)


PathManager.register_handler(ZooPathHandler())
