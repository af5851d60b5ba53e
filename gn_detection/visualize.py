"""Pictures of a run: predictions beside ground truth on dataset images, and the training loss curve."""
import json
import os
from typing import List

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog  # noqa: E402
from detectron2.data import detection_utils  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

from .atomic_write import replaced_atomically  # noqa: E402

MIN_PICTURE_SIDE = 480  # pixels; smaller images are drawn enlarged


def draw_predictions(
    model: torch.nn.Module, cfg, dataset_name: str, out_dir: str, num_images: int, score_thresh: float
) -> List[str]:
    """Run ``model`` on the first ``num_images`` images of ``dataset_name`` and save, for each, a PNG
    with the ground truth (left) beside the predictions scoring at least ``score_thresh`` (right).
    Returns the written paths."""
    metadata = MetadataCatalog.get(dataset_name)
    mapper = DatasetMapper(cfg, is_train=False)  # the test-time resize and format that evaluation uses
    os.makedirs(out_dir, exist_ok=True)
    paths, was_training = [], model.training
    model.eval()
    try:
        for record in DatasetCatalog.get(dataset_name)[:num_images]:
            with torch.no_grad():
                output = model([mapper(record)])[0]
            rgb = detection_utils.read_image(record["file_name"], format="RGB")
            instances = output["instances"].to("cpu")
            instances = instances[instances.scores >= score_thresh]
            scale = max(1.0, MIN_PICTURE_SIDE / max(rgb.shape[:2]))  # small images: labels stay legible
            truth = Visualizer(rgb, metadata, scale=scale).draw_dataset_dict(record).get_image()
            predicted = Visualizer(rgb, metadata, scale=scale).draw_instance_predictions(instances).get_image()
            path = os.path.join(out_dir, f"{os.path.splitext(os.path.basename(record['file_name']))[0]}.png")
            plt.imsave(path, np.concatenate([truth, predicted], axis=1))
            paths.append(path)
    finally:
        model.train(was_training)
    return paths


def plot_loss_curve(metrics_file: str, out_png: str) -> str:
    """Plot every ``*loss*`` series in Detectron2's ``metrics.json`` against the iteration."""
    with open(metrics_file) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "total_loss" in r]
    if not rows:
        raise ValueError(f"{metrics_file} holds no training losses to plot")
    fig, ax = plt.subplots(figsize=(8, 5))
    for key in sorted({k for r in rows for k in r if "loss" in k}):
        points = [(r["iteration"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points), label=key, linewidth=2.5 if key == "total_loss" else 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (median over the logging window)")
    ax.set_yscale("log")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(metrics_file))))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_png)


def save_figure(fig, out_png: str) -> str:
    """Save ``fig`` as a PNG whole or not at all (an older picture stays if saving fails), and close it."""
    try:
        with replaced_atomically(out_png) as partial:
            fig.savefig(partial, dpi=100, format="png")
    finally:
        plt.close(fig)
    return out_png
