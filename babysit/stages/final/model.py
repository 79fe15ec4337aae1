"""The final's trained model for the people who use it: its card and the classifier.

The card is ``<run>/model.json`` beside the weights: what rebuilds the network (the spec,
classes, channels, input size), what turns an image into its input (the preprocessing),
and what the run measured (the chosen hyperparameters, the tested epoch, validation and
test accuracy, the dataset and the batch size it trained with, the versions).
:func:`load_model` rebuilds a :class:`Classifier` from the two files: the network with its
class names and its preprocessing, whose :meth:`Classifier.predict` takes image files, PIL
images or tensors. Cards written before the class names were stored still load (their
classes are named by their labels, ``"0"``, ``"1"``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from babysit.data.augment import Preprocess
from babysit.data.imagefolder import is_grey
from babysit.data.imagefolder import pixels as image_pixels
from babysit.errors import UsageError
from babysit.record.model_file import MODEL_INFO_FILE
from babysit.stages.context import Context

# 2: the card (classes, preprocessing, results, versions); 1 (no "card" key): the network only.
CARD_VERSION = 2


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def model_card(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    """``model.json``: how to rebuild the network and feed it, and what the run measured.

    ``results``: the final's numbers (``params``, ``best_epoch``, ``epochs_run``,
    ``val_accuracy``, ``test_accuracy``, ``test_loss``, ``batch_size``: the global batch
    the final trained with, never 0 for auto)."""
    data = ctx.data
    pre = data.pre
    classes = ctx.data_info.get("classes") or [str(i) for i in range(data.num_classes)]
    mean = pre.mean.flatten().tolist()
    std = pre.std.flatten().tolist()
    return {
        "card": CARD_VERSION,
        "run": ctx.spec.name,
        # Kept from the first format: what load_model needs to rebuild the network.
        "spec": ctx.spec.to_dict(),
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
        "input_size": pre.resize or data.image_size,
        "mean": mean,
        "std": std,
        "classes": list(classes),
        "preprocessing": {
            # An image file: decoded with PIL, converted to `mode`, squashed (bilinear) to
            # `image_size` square, as the run's images were; then, batched: pixels / 255,
            # resized to `resize` (bilinear; 0: not resized), minus `mean`, over `std`.
            "mode": "L" if data.in_channels == 1 else "RGB",
            "image_size": data.image_size,
            "resize": pre.resize,
            "mean": mean,
            "std": std,
        },
        "hyperparameters": {k: float(v) for k, v in results["params"].items()},
        "optimizer": ctx.spec.optimizer,
        "batch_size": int(results["batch_size"]),
        "best_epoch": int(results["best_epoch"]),
        "epochs_run": int(results["epochs_run"]),
        "val_accuracy": float(results["val_accuracy"]),
        "test_accuracy": float(results["test_accuracy"]),
        "test_loss": float(results["test_loss"]),
        "dataset": {
            "name": ctx.spec.dataset,
            "sizes": {split: data.size(split) for split in ("train", "val", "test")},
        },
        "versions": {p: _version(p) for p in ("babysit", "torch", "optuna")},
    }


# What predict takes: a file, a PIL image, or a tensor of one image (C, H, W) or a batch.
Image = Any


class Classifier(torch.nn.Module):
    """A finished run's network that knows its class names and its preprocessing.

    Called like the network (``model(x)``: normalised input, logits out); its
    ``state_dict`` is the network's, the one in ``model.pt``. :meth:`predict` and
    :meth:`probabilities` take images as a run's data: image files (any format the
    ``imagefolder`` loader reads), PIL images, or tensors of pixels (uint8 0..255, or
    floats in 0..1; (C, H, W) or (N, C, H, W)), resized to the run's size, batched, on the
    device the model is on.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        classes: list[str],
        pre: Preprocess,
        image_size: int,
        card: dict,
    ) -> None:
        super().__init__()
        self.net = net
        self.classes = list(classes)
        self.pre = pre
        self.image_size = image_size
        self.in_channels = int(pre.mean.shape[1])
        self.card = card

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.net.load_state_dict(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def pixels(self, images: Image | Sequence[Image]) -> torch.Tensor:
        """The images as the run's uint8 pixels: (N, C, S, S), S the run's image size."""
        each = [self._one(x) for x in _as_list(images)]
        if not each:
            raise UsageError("no images to classify")
        return torch.cat(each)

    def _one(self, image: Image) -> torch.Tensor:
        if isinstance(image, (str, Path)):
            return self._file(Path(image))
        if isinstance(image, torch.Tensor):
            return self._tensor(image)
        if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
            return self._pil(image, "a PIL image")
        raise UsageError(
            f"cannot classify a {type(image).__name__}: give image files, PIL images or "
            "tensors of pixels"
        )

    def _pil(self, img: Any, what: str) -> torch.Tensor:
        grey = is_grey(img.mode)
        if self.in_channels == 1 and not grey:
            raise UsageError(
                f"{what} is in colour ({img.mode}) but the model was trained on grey images "
                "(1 channel); convert it to greyscale first (PIL: image.convert('L'))"
            )
        if self.in_channels not in (1, 3):
            raise UsageError(
                f"the model takes {self.in_channels}-channel input, which no image file "
                "holds; give tensors of pixels"
            )
        arr = image_pixels(img, "L" if self.in_channels == 1 else "RGB", self.image_size)
        x = torch.from_numpy(np.ascontiguousarray(arr))
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
        return x.unsqueeze(0)

    def _file(self, path: Path) -> torch.Tensor:
        from PIL import Image as PILImage

        try:
            with PILImage.open(path) as img:
                img.load()
                return self._pil(img, f"image {path}")
        except UsageError:
            raise
        except Exception as err:  # noqa: BLE001 - missing, truncated, not an image
            raise UsageError(
                f"cannot read image {path} ({type(err).__name__}: {err}); give readable "
                "image files"
            ) from None

    def _tensor(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise UsageError(
                f"an image tensor of shape {tuple(x.shape)} does not fit the model: it takes "
                f"{self.in_channels}-channel images, (C, H, W) or (N, C, H, W) with "
                f"C = {self.in_channels}"
            )
        if x.dtype != torch.uint8:
            x = x.float().mul(255.0)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x.float(), size=(self.image_size, self.image_size), mode="bilinear")
        if x.dtype != torch.uint8:
            x = x.round().clamp_(0, 255).to(torch.uint8)
        return x.cpu()

    @torch.inference_mode()
    def probabilities(
        self, images: Image | Sequence[Image], batch_size: int = 256
    ) -> torch.Tensor:
        """Each class's probability for each image: (N, classes) on the CPU."""
        from babysit.training.step import autocast

        x = self.pixels(images)
        device = self.device
        pre = Preprocess(
            mean=self.pre.mean.to(device), std=self.pre.std.to(device), resize=self.pre.resize
        )
        was_training = self.training
        self.eval()
        out = []
        try:
            for start in range(0, x.shape[0], max(1, batch_size)):
                xb = pre(x[start : start + batch_size].to(device), train=False)
                with autocast(device):
                    logits = self.net(xb)
                out.append(torch.softmax(logits.float(), dim=1).cpu())
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, len(self.classes))

    def predict(self, images: Image | Sequence[Image], batch_size: int = 256) -> list[str]:
        """The class name of each image."""
        return [self.classes[int(i)] for i in self.probabilities(images, batch_size).argmax(1)]

    def top(
        self, images: Image | Sequence[Image], k: int = 1, batch_size: int = 256
    ) -> list[list[tuple[str, float]]]:
        """The ``k`` likeliest classes of each image, with their probabilities."""
        probs = self.probabilities(images, batch_size)
        values, index = probs.topk(min(k, len(self.classes)), dim=1)
        return [
            [(self.classes[int(i)], float(p)) for p, i in zip(ps, ix, strict=True)]
            for ps, ix in zip(values, index, strict=True)
        ]


def _as_list(images: Image | Sequence[Image]) -> list[Image]:
    if isinstance(images, (str, Path, torch.Tensor)) or hasattr(images, "convert"):
        return [images]
    if isinstance(images, Iterable):
        return list(images)
    return [images]


def read_card(path: Path) -> dict[str, Any]:
    """``model.json`` beside a ``model.pt``: a card of either format."""
    info_path = path.with_name(MODEL_INFO_FILE)
    if not path.is_file():
        raise UsageError(f"no model file at {path}")
    if not info_path.is_file():
        raise UsageError(
            f"{info_path} is missing: it says which network {path.name} holds; "
            "load the run with babysit.load_run(NAME).model() instead"
        )
    try:
        return json.loads(info_path.read_text())
    except ValueError as err:
        raise UsageError(f"{info_path} is not the JSON a run writes ({err})") from None


def load_model(path: str | Path, map_location: torch.device | str = "cpu") -> Classifier:
    """The network a finished final trained, from its ``model.pt`` file: built as the run
    built it (``model.json`` beside the file says how), its weights loaded, in eval mode,
    with its class names and preprocessing (:class:`Classifier`).

    ``model = babysit.load_model("babysit.db.artifacts/digits/model.pt")``;
    ``model.predict(["7.png"])``. The file alone is a plain state_dict:
    ``torch.load(path, weights_only=True)``."""
    from babysit.spec import Spec
    from babysit.training.models import build_model
    from babysit.training.step import channels_last_pays

    path = Path(path)
    card = read_card(path)
    spec = Spec.from_dict(card["spec"])
    channels, size = int(card["in_channels"]), int(card["input_size"])
    net = build_model(spec.model, int(card["num_classes"]), channels, size)
    net.load_state_dict(torch.load(path, map_location=map_location, weights_only=True))
    device = torch.device(map_location)
    net = net.to(device)
    if channels_last_pays(device, spec.model.name):
        net = net.to(memory_format=torch.channels_last)  # as the run trained and tested it
    pre_card = card.get("preprocessing") or {}
    pre = Preprocess(
        mean=torch.tensor(card["mean"], dtype=torch.float32).view(1, channels, 1, 1),
        std=torch.tensor(card["std"], dtype=torch.float32).view(1, channels, 1, 1),
        resize=int(pre_card.get("resize") or 0),
    )
    # A card of the first format: images decoded straight to the network's input size.
    image_size = int(pre_card.get("image_size") or size)
    classes = card.get("classes") or [str(i) for i in range(int(card["num_classes"]))]
    return Classifier(net, classes, pre, image_size, card).eval()
