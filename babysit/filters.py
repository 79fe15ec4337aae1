"""What the first conv layer learnt, drawn: a grid of its filters, stored as a PNG artifact
of the final trial (cs231n, "visualizing the first-layer weights")."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from babysit.storage import Storage


def first_layer_filters_png(model: nn.Module, path: str | Path) -> Path:
    """The first conv's filters as a grid of tiles, each scaled to its own range (RGB for
    3 input channels, grey otherwise): smooth, varied filters mean a trained first layer,
    noise means it barely learnt (cs231n, "visualizing the first-layer weights")."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError("the model has no Conv2d layer to draw")
    w = conv.weight.detach().float().cpu()
    if w.shape[1] != 3:
        w = w.mean(dim=1, keepdim=True)
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    hi = w.amax(dim=(1, 2, 3), keepdim=True)
    w = (w - lo) / (hi - lo).clamp_min(1e-12)
    n, c, kh, kw = w.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    # One mosaic, tiles one pixel apart on white, drawn by a single imshow: a subplot per
    # filter costs seconds for AlexNet's 64-96 filters.
    mosaic = torch.ones(c, rows * (kh + 1) + 1, cols * (kw + 1) + 1)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = 1 + r * (kh + 1), 1 + q * (kw + 1)
        mosaic[:, top:top + kh, left:left + kw] = w[i]
    image = mosaic.permute(1, 2, 0).numpy()
    fig, ax = plt.subplots(figsize=(6, 6))
    if c == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.axis("off")
    ax.set_title(f"first-layer filters: {n} x {tuple(conv.weight.shape[1:])}", fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def upload_filters(storage: Storage, trial: Any, model: nn.Module) -> str | None:
    """The first-layer filters as a PNG artifact of ``trial`` (user attr
    "filters_artifact"); None for a model without a conv layer."""
    import optuna

    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = first_layer_filters_png(model, os.path.join(tmp, "first_layer_filters.png"))
        artifact_id = optuna.artifacts.upload_artifact(
            artifact_store=storage.artifacts, file_path=str(path), study_or_trial=trial,
            mimetype="image/png")
    trial.set_user_attr("filters_artifact", artifact_id)
    return artifact_id
