"""Inception-v1 (GoogLeNet) on ImageNet (paper, Section 4 and Appendices D.1–D.3, D.6).

The paper samples the loss kernel of a trained Inception-v1 over 10,000 ImageNet validation
images (downscaled to 256×256), with SGLD over the ImageNet training set (Table 1:
m = 256, C = 15, T = 500, b = 100, ε = 5·10⁻⁵, nβ = 20, γ = 4,000), and reads it against
the WordNet hierarchy. Everything the tutorial (``tutorials/03_inception_imagenet.ipynb``)
needs lives here:

- the data: :class:`ImageNetFolder`, an ImageNet-layout folder (``<root>/<wnid>/*.JPEG``,
  or ``<root>/train/<wnid>/…`` and ``<root>/val/<wnid>/…``), images resized (shorter side)
  and centre-cropped to ``image_size`` (the paper: 256), labelled with their ImageNet-1k
  class index (``imagenet_wnids().index(wnid)``, so they match a 1000-way model even when
  the folder holds a few classes only); :func:`load_probe` (the probe as uint8 tensors),
  :func:`training_loader` (SGLD minibatches); :func:`make_tiny_imagenet` writes a small
  generated folder with real wnids (two dogs, a cat, two vehicles, a fruit) whose images
  are synthetic but class-dependent in colour and texture, for runs without ImageNet;
- the model: :func:`load_googlenet` (torchvision's GoogLeNet, ``aux_logits=False``, from a
  local ``state_dict`` file, torchvision's weights enum, or untrained);
- the loss: :func:`imagenet_loss_fn` (per-sample cross-entropy; uint8 batches are
  ImageNet-normalised on the device) and :func:`imagenet_evaluate` (the SGLD minibatch loss,
  BatchNorm in eval mode, so SGLD's loss and the probe loss are the same function of w);
- the run: :data:`SCALES` (``ci``, ``cpu``, ``paper``), :func:`sample_kernel`,
  :func:`gamma_sweep`, :func:`analyse_kernel` and the whole pipeline
  :func:`run_imagenet_kernel` (also ``python -m losskernel_examples.imagenet``);
- two figures the plotting module does not have: :func:`plot_gamma_sweep` (Fig. 6B–D) and
  :func:`plot_colour_groups`.

Pretrained weights are never downloaded here unless torchvision's weights enum is passed
(e.g. in Colab: ``load_googlenet(torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1)``).
"""

from __future__ import annotations

import copy
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ._scale import SamplingScale

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PAPER_IMAGE_SIZE",
    "TINY_CLASSES",
    "SCALES",
    "ImageNetScale",
    "ImageNetFolder",
    "ImageNetKernelResult",
    "analyse_kernel",
    "calibrate_batchnorm",
    "for_untrained",
    "gamma_sweep",
    "get_scale",
    "imagenet_evaluate",
    "imagenet_loss_fn",
    "load_googlenet",
    "load_probe",
    "make_tiny_imagenet",
    "normalize_images",
    "plot_colour_groups",
    "plot_gamma_sweep",
    "plot_images",
    "probe_indices",
    "require_torchvision",
    "resolve_imagenet_dirs",
    "run_imagenet_kernel",
    "sample_kernel",
    "training_loader",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the paper's input size (Appendix D.1: "we downscale all images to 256x256")
PAPER_IMAGE_SIZE = 256
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
_WNID = re.compile(r"^n\d{8}$")

#: the generated folder's classes: (wnid, ImageNet-1k name), spread over the WordNet tree —
#: two dogs (a toy dog and a sporting dog, meeting at ``dog``), a cat (meets the dogs at
#: ``carnivore``), two wheeled vehicles (a car and a bicycle, meeting at ``wheeled_vehicle``)
#: and a fruit (meets everything else at ``whole``).
TINY_CLASSES: Tuple[Tuple[str, str], ...] = (
    ("n02085620", "Chihuahua"),
    ("n02099601", "golden retriever"),
    ("n02123045", "tabby cat"),
    ("n04285008", "sports car"),
    ("n03792782", "mountain bike"),
    ("n07747607", "orange"),
)


def require_torchvision():
    """``import torchvision``, or an ImportError that says how to install it."""
    try:
        import torchvision
    except ImportError as error:  # pragma: no cover - exercised only without torchvision
        raise ImportError(
            "the ImageNet task needs torchvision (GoogLeNet and image transforms): "
            "pip install torchvision  (a build matching your torch)"
        ) from error
    return torchvision


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def _imagenet_index() -> Dict[str, int]:
    from devinterp_losskernel.hierarchy import imagenet_wnids

    return {wnid: i for i, wnid in enumerate(imagenet_wnids())}


def resolve_imagenet_dirs(imagenet_dir: Union[str, Path]) -> Tuple[Path, Path]:
    """(training folder, probe folder) of an ImageNet-layout directory.

    ``<dir>/train/<wnid>/…`` and ``<dir>/val/<wnid>/…`` → (train, val): SGLD on the training
    images, the probe from the validation images, as in the paper. A folder holding the class
    folders itself → (dir, dir): the probe is drawn from the same images SGLD uses.
    """
    root = Path(imagenet_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"imagenet_dir {str(root)!r} does not exist or is not a folder")
    train, val = root / "train", root / "val"
    if train.is_dir() and val.is_dir():
        return train, val
    return root, root


class ImageNetFolder(Dataset):
    """Images in ImageNet layout, ``<root>/<wnid>/<image>``, labelled by ImageNet-1k class index.

    Each image is converted to RGB, resized so its shorter side is ``image_size`` and
    centre-cropped to ``image_size`` × ``image_size`` (the paper: 256). Items are
    ``(image, target)``: with ``normalize=True`` a float32 [3, S, S] tensor with ImageNet
    normalisation; with ``normalize=False`` the uint8 [3, S, S] pixels (4× smaller; normalise
    on the device with :func:`normalize_images`, as :func:`imagenet_loss_fn` does).

    The target is the class's index among the 1000 ImageNet-1k classes
    (:func:`~devinterp_losskernel.hierarchy.imagenet_wnids`), whatever subset of classes the
    folder holds, so it matches a 1000-way model's outputs.

    Attributes:
        root: the folder. samples: [(path, target)] sorted by wnid, then file name.
        targets: int64 array [N]. wnids: array [N] of each image's wnid.
        classes: the wnids present, sorted.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no class folders named by wnid (``n01440764``), a wnid that is not one
            of the 1000 ImageNet-1k classes, or a class folder without images.
    """

    def __init__(self, root: Union[str, Path], image_size: int = PAPER_IMAGE_SIZE, *,
                 normalize: bool = True, classes: Optional[Sequence[str]] = None):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"ImageNet folder {str(root)!r} does not exist or is not a folder")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size must be an int ≥ 16, got {image_size!r}")
        index = _imagenet_index()
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and _WNID.match(p.name))
        if classes is not None:
            missing = sorted(set(classes) - set(folders))
            if missing:
                raise ValueError(f"classes not found as folders of {str(root)!r}: {missing[:10]}")
            folders = sorted(set(classes))
        if not folders:
            present = sorted(p.name for p in root.iterdir())[:10]
            hint = (" (it has train/ and val/ folders: pass one of them, or use resolve_imagenet_dirs)"
                    if (root / "train").is_dir() else "")
            raise ValueError(
                f"{str(root)!r} has no class folders named by WordNet id (like 'n01440764/'); "
                f"found {present}{hint}"
            )
        unknown = [w for w in folders if w not in index]
        if unknown:
            raise ValueError(
                f"{str(root)!r}: folders {unknown[:10]} are not ImageNet-1k classes "
                "(devinterp_losskernel.hierarchy.imagenet_wnids() lists the 1000)"
            )
        samples: List[Tuple[str, int]] = []
        for wnid in folders:
            with os.scandir(root / wnid) as entries:
                files = sorted(e.name for e in entries
                               if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
            if not files:
                raise ValueError(f"class folder {str(root / wnid)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            samples.extend((str(root / wnid / name), index[wnid]) for name in files)
        self.root = root
        self.image_size = int(image_size)
        self.normalize = bool(normalize)
        self.classes = folders
        self.samples = samples
        self.targets = np.array([t for _, t in samples], dtype=np.int64)
        wnid_of = {index[w]: w for w in folders}
        self.wnids = np.array([wnid_of[t] for t in self.targets], dtype=object)
        self._transform = None

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"ImageNetFolder({str(self.root)!r}, {len(self)} images, {len(self.classes)} classes, "
                f"{self.image_size}×{self.image_size}, {'normalised float32' if self.normalize else 'uint8'})")

    def _pixels(self):
        if self._transform is None:
            tv = require_torchvision()
            from torchvision.transforms import InterpolationMode

            T = tv.transforms
            self._transform = T.Compose([
                T.Resize(self.image_size, interpolation=InterpolationMode.BILINEAR, antialias=True),
                T.CenterCrop(self.image_size),
                T.PILToTensor(),
            ])
        return self._transform

    def load(self, i: int) -> torch.Tensor:
        """Image ``i`` as uint8 [3, S, S]."""
        from PIL import Image

        path = self.samples[i][0]
        try:
            with Image.open(path) as image:
                return self._pixels()(image.convert("RGB"))
        except OSError as error:
            raise OSError(f"cannot read image {path!r}: {error}") from error

    def __getitem__(self, i: int):
        image = self.load(i)
        if self.normalize:
            image = normalize_images(image.unsqueeze(0))[0]
        return image, int(self.targets[i])


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of a batch [B, 3, H, W]: uint8 (0–255) or float in [0, 1]."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def probe_indices(num_images: int, num_probe: Optional[int], seed: int = 0) -> np.ndarray:
    """A random subset of ``num_probe`` image indices (all when None or ≥ num_images), sorted."""
    if num_probe is None or num_probe >= num_images:
        return np.arange(num_images)
    if isinstance(num_probe, bool) or not isinstance(num_probe, int) or num_probe < 2:
        raise ValueError(f"num_probe must be an int ≥ 2 or None, got {num_probe!r}")
    return np.sort(np.random.default_rng(seed).choice(num_images, size=num_probe, replace=False))


def _stack(rows):
    return torch.stack([r[0] for r in rows]), torch.tensor([r[1] for r in rows], dtype=torch.long)


def load_probe(folder: ImageNetFolder, indices: Sequence[int], *, num_workers: int = 0,
               batch_size: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """The probe images ``folder[indices]`` as (uint8 [n, 3, S, S], int64 targets [n]).

    uint8 keeps 10,000 images at 256×256 in 2 GB (float32: 8 GB); :func:`imagenet_loss_fn`
    normalises each batch on the device.
    """
    view = copy.copy(folder)
    view.normalize = False
    subset = torch.utils.data.Subset(view, [int(i) for i in indices])
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_stack)
    images, targets = zip(*loader)
    return torch.cat(images), torch.cat(targets)


class _InMemory(Dataset):
    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        self.images, self.targets = images, targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]

    def __getitems__(self, indices):  # one indexing per batch instead of a Python loop
        index = torch.as_tensor(indices)
        return [(self.images[index], self.targets[index])]


def _first(rows):
    return rows[0]


def training_loader(folder: ImageNetFolder, batch_size: int, *, num_workers: int = 0,
                    in_memory: Optional[bool] = None, pin_memory: bool = False) -> DataLoader:
    """Shuffled, full minibatches (m = ``batch_size``) of uint8 images for SGLD.

    devinterp's sampler draws its minibatches from this loader (reshuffled each pass).
    ``in_memory`` (default: when the folder has at most 5,000 images) decodes every image
    once; otherwise images are decoded per batch by ``num_workers`` processes (ImageNet's
    1.28M training images: use 8–16 workers to keep a GPU busy).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if batch_size > len(folder):
        raise ValueError(f"batch_size {batch_size} exceeds the {len(folder)} images of {folder.root}")
    if in_memory is None:
        in_memory = len(folder) <= 5000
    if in_memory:
        images, targets = load_probe(folder, range(len(folder)), num_workers=num_workers)
        return DataLoader(_InMemory(images, targets), batch_size=batch_size, shuffle=True,
                          drop_last=True, collate_fn=_first)
    view = copy.copy(folder)
    view.normalize = False
    return DataLoader(view, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers,
                      collate_fn=_stack, pin_memory=pin_memory, persistent_workers=num_workers > 0)


# ---------------------------------------------------------------------------------------------
# A generated ImageNet-layout folder
# ---------------------------------------------------------------------------------------------
# per class: base colour (RGB 0–1), texture kind, texture frequency, shape
_TINY_STYLE = {
    "n02085620": dict(colour=(0.80, 0.62, 0.42), texture="fur", freq=9.0, shape="blob"),      # Chihuahua: tan
    "n02099601": dict(colour=(0.85, 0.60, 0.22), texture="fur", freq=5.0, shape="blob"),      # golden retriever
    "n02123045": dict(colour=(0.55, 0.50, 0.45), texture="stripes", freq=6.0, shape="blob"),  # tabby: grey stripes
    "n04285008": dict(colour=(0.85, 0.10, 0.10), texture="smooth", freq=2.0, shape="car"),    # sports car: red
    "n03792782": dict(colour=(0.15, 0.30, 0.75), texture="smooth", freq=2.0, shape="wheels"), # mountain bike: blue
    "n07747607": dict(colour=(0.98, 0.55, 0.05), texture="dimples", freq=14.0, shape="disc"), # orange
}


def _tiny_image(style: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """One synthetic RGB image, uint8 [size, size, 3]: a class-coloured, class-textured object
    at a random place and scale on a random muted background, with pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    background = rng.uniform(0.45, 0.65) + rng.uniform(-0.05, 0.05, 3)     # greyish, slightly tinted
    cx, cy = rng.uniform(0.35, 0.65, 2)
    radius = rng.uniform(0.22, 0.34)
    angle = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    shape = style["shape"]
    if shape == "disc":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < radius ** 2
    elif shape == "blob":
        mask = (u / (radius * 1.3)) ** 2 + (v / (radius * 0.9)) ** 2 < 1
    elif shape == "car":
        body = (np.abs(xx - cx) < radius * 1.4) & (np.abs(yy - cy) < radius * 0.45)
        wheels = np.zeros_like(body)
        for dx in (-0.8, 0.8):
            wheels |= (xx - cx - dx * radius) ** 2 + (yy - cy - 0.45 * radius) ** 2 < (0.3 * radius) ** 2
        mask = body | wheels
    else:  # two thin rings joined by a bar: a bicycle
        mask = np.zeros_like(xx, dtype=bool)
        for dx in (-0.9, 0.9):
            r = np.sqrt((xx - cx - dx * radius) ** 2 + (yy - cy) ** 2)
            mask |= np.abs(r - 0.6 * radius) < 0.15 * radius + 0.01
        mask |= (np.abs(yy - cy + 0.2 * radius) < 0.05 * radius + 0.01) & (np.abs(xx - cx) < 0.9 * radius)
    phase = rng.uniform(0, 2 * np.pi)
    freq = style["freq"] * 2 * np.pi * rng.uniform(0.85, 1.15)
    kind = style["texture"]
    if kind == "stripes":
        texture = 0.5 + 0.5 * np.sign(np.sin(freq * u + phase))           # dark bands
        texture = 0.45 + 0.55 * texture
    elif kind == "fur":
        texture = 0.8 + 0.2 * np.sin(freq * u + 3 * np.sin(freq * v / 2) + phase)
    elif kind == "dimples":
        texture = 0.88 + 0.12 * np.sin(freq * xx + phase) * np.sin(freq * yy + phase)
    else:
        texture = 0.9 + 0.1 * (yy - cy) / max(radius, 1e-3)                 # a soft highlight
    colour = np.clip(np.array(style["colour"]) * rng.uniform(0.85, 1.15), 0, 1)
    image = np.where(mask[..., None], colour * texture[..., None], background)
    image = image + rng.normal(0, 0.04, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def make_tiny_imagenet(root: Union[str, Path], *, train_per_class: int = 8, val_per_class: int = 6,
                       image_size: int = 96, classes: Sequence[str] = tuple(w for w, _ in TINY_CLASSES),
                       seed: int = 0, overwrite: bool = False) -> Path:
    """Write a small generated ImageNet-layout folder and return its path.

    ``<root>/train/<wnid>/<wnid>_<i>.JPEG`` (``train_per_class`` each) and
    ``<root>/val/<wnid>/…`` (``val_per_class`` each), for the wnids of :data:`TINY_CLASSES`
    (real ImageNet-1k classes spread over the WordNet tree). The images are synthetic:
    a class-coloured, class-textured object (fur, stripes, smooth, dimpled; blob, car,
    wheels, disc) at a random place, scale and angle on a random greyish background with pixel noise,
    so the classes differ in colour and texture and no two images are alike. Deterministic in
    ``seed``. An existing folder is reused when it holds exactly these files, unless
    ``overwrite``.
    """
    from PIL import Image

    unknown = [w for w in classes if w not in _TINY_STYLE]
    if unknown:
        raise ValueError(f"classes must be among {sorted(_TINY_STYLE)}, got {unknown}")
    for name, value in (("train_per_class", train_per_class), ("val_per_class", val_per_class)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    root = Path(root).expanduser()
    marker = root / ".tiny_imagenet"
    signature = f"{sorted(classes)} {train_per_class} {val_per_class} {image_size} {seed}\n"
    if marker.is_file() and marker.read_text() == signature and not overwrite:
        return root
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(sorted(classes)):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob("*.JPEG"):
                old.unlink()
            rng = np.random.default_rng([seed, c, 0 if split == "train" else 1])
            for i in range(count):
                pixels = _tiny_image(_TINY_STYLE[wnid], image_size, rng)
                Image.fromarray(pixels).save(folder / f"{wnid}_{split}_{i}.JPEG", quality=92)
    marker.write_text(signature)
    return root


# ---------------------------------------------------------------------------------------------
# The model and its loss
# ---------------------------------------------------------------------------------------------
def _state_dict_from_file(path: Path) -> Dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot read weights file {str(path)!r} as a torch state_dict: {error}") from error
    if isinstance(state, nn.Module):  # pragma: no cover - weights_only refuses modules
        state = state.state_dict()
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {str(path)!r} does not hold a state_dict (name → tensor)")
    # DistributedDataParallel / torch.compile prefixes; the auxiliary classifiers are not used
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if not key.startswith(("aux1.", "aux2.")):
            out[key] = value
    return out


def load_googlenet(weights: Any = None, *, transform_input: Optional[bool] = None,
                   device: Union[str, torch.device] = "cpu", seed: int = 0) -> nn.Module:
    """Inception-v1: ``torchvision.models.googlenet(aux_logits=False)``, in eval mode.

    Args:
        weights: ``None`` → untrained (``weights=None, init_weights=True``, seeded with
            ``seed``); a path to a ``state_dict`` file (``torch.save(model.state_dict())``,
            torchvision's ``googlenet-1378be20.pth``, or a checkpoint dict with a
            ``"state_dict"``/``"model"`` entry; ``aux1``/``aux2`` and ``module.`` prefixes
            are dropped); or torchvision's ``GoogLeNet_Weights`` enum (or its name, e.g.
            ``"IMAGENET1K_V1"``), which torchvision downloads (in Colab).
        transform_input: torchvision's GoogLeNet option that re-scales ImageNet-normalised
            inputs to the ones its ported weights were trained on; default True with
            weights (torchvision's choice for its pretrained model; pass False for your own
            weights trained without it) and False untrained.
        device: where to put the model.

    Raises:
        FileNotFoundError: ``weights`` names a file that does not exist.
        ValueError: the file is not a GoogLeNet state_dict (missing / unexpected keys).
    """
    tv = require_torchvision()
    googlenet = tv.models.googlenet
    if isinstance(weights, str) and not Path(weights).expanduser().exists():
        try:  # a weights name such as "IMAGENET1K_V1" or "DEFAULT"
            weights = tv.models.GoogLeNet_Weights[weights]
        except KeyError:
            pass  # a path: reported as missing below
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = googlenet(weights=None, aux_logits=False, init_weights=True,
                              transform_input=bool(transform_input))
    elif isinstance(weights, (str, Path)):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"weights file {str(path)!r} does not exist. Pass a GoogLeNet state_dict saved with "
                "torch.save(model.state_dict(), path), None for untrained weights, or (with internet) "
                "torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1"
            )
        state = _state_dict_from_file(path)
        model = googlenet(weights=None, aux_logits=False, init_weights=False,
                          transform_input=True if transform_input is None else bool(transform_input))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"weights file {str(path)!r} is not a torchvision GoogLeNet state_dict: "
                f"{len(missing)} missing keys {list(missing)[:5]}, {len(unexpected)} unexpected keys "
                f"{list(unexpected)[:5]}"
            )
    else:
        if not isinstance(weights, tv.models.GoogLeNet_Weights):
            raise ValueError(f"weights must be None, a file path or a torchvision GoogLeNet_Weights, got {weights!r}")
        model = googlenet(weights=weights, aux_logits=False)
        if transform_input is not None:
            model.transform_input = bool(transform_input)
    return model.to(device).eval()


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, loader: DataLoader, num_batches: int = 8,
                        device: Union[str, torch.device, None] = None) -> nn.Module:
    """Set every BatchNorm's running statistics to their average over ``num_batches``
    batches of ``loader`` (cumulative average, weights unchanged); returns ``model`` in eval mode.

    For untrained weights: their running statistics (mean 0, variance 1) do not match the
    activations, and in eval mode the signal of an initialised GoogLeNet shrinks layer by layer
    until every image has the same loss ≈ log 1000 and the kernel is degenerate.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    try:
        for _, (images, _targets) in zip(range(num_batches), loader):
            model(normalize_images(images.to(device)))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return model


def imagenet_loss_fn(model: nn.Module, batch) -> torch.Tensor:
    """Per-sample cross-entropy [B] for ``(images, targets)``; uint8 images (0–255) are
    ImageNet-normalised here, on the model's device; float images are taken as normalised."""
    images, targets = batch[0], batch[1]
    if images.dtype == torch.uint8:
        images = normalize_images(images)
    logits = model(images)
    if not isinstance(logits, torch.Tensor):  # GoogLeNetOutputs with aux_logits=True
        logits = logits[0]
    return F.cross_entropy(logits.float(), targets, reduction="none")


def imagenet_evaluate(model: nn.Module, batch) -> torch.Tensor:
    """The SGLD minibatch loss (mean cross-entropy), with the model in eval mode.

    devinterp runs its chains in train mode, in which GoogLeNet's BatchNorm layers would use
    the statistics of each minibatch of m images and overwrite their running statistics step
    by step, while the probe losses are taken in eval mode. Evaluating in eval mode makes the
    sampled loss and the probe loss one function of w (running statistics fixed at w*'s);
    gradients flow as usual. (Dropout before the classifier is off in eval mode as well.)
    """
    model.eval()
    return imagenet_loss_fn(model, batch).mean()


# ---------------------------------------------------------------------------------------------
# Scales
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ImageNetScale(SamplingScale):
    """Sizes and SGLD settings of one run of the pipeline (the paper's symbols in brackets).

    The SGLD fields are :class:`SamplingScale`'s (n, m, C, T, b, thinning, ε, nβ, γ);
    num_probe None takes all of the probe folder. image_size: S (paper 256). k: neighbours
    for lifts and top-k (paper 30). n_neighbors: UMAP's. colour_groups: colour groups (App.
    D.6). node_depth: depth of the WordNet node used for node lift. cka_snapshots: snapshots
    for the CKA convergence curve; snapshot_rows: samples they keep (None: all).
    gamma_sweep: γ values of the sweep (empty: none); sweep_*: its settings (None: the main
    run's). tiny_train/tiny_val: images per class of the generated folder when no ImageNet
    is given. num_workers: image-decoding processes.
    """

    image_size: int
    k: int = 30
    n_neighbors: int = 15
    colour_groups: int = 8
    node_depth: int = 7
    cka_snapshots: int = 10
    snapshot_rows: Optional[int] = None
    gamma_sweep: Tuple[float, ...] = ()
    sweep_num_probe: Optional[int] = None
    sweep_chains: Optional[int] = None
    sweep_draws: Optional[int] = None
    sweep_burnin: Optional[int] = None
    sweep_lr: Optional[float] = None
    tiny_train: int = 8
    tiny_val: int = 6
    num_workers: int = 0
    probe_batch_size: int = 256
    note: str = ""

    def sweep_kwargs(self, localization: float) -> Dict[str, Any]:
        return self.sampler_kwargs(
            num_chains=self.sweep_chains or self.num_chains, num_draws=self.sweep_draws or self.num_draws,
            num_burnin_steps=self.num_burnin_steps if self.sweep_burnin is None else self.sweep_burnin,
            lr=self.sweep_lr or self.lr, localization=float(localization))

    def scaled(self, **changes) -> "ImageNetScale":
        return replace(self, **changes)


# Table 1, Section 4 (preset "inception_imagenet") and Appendix D.3 ("inception_gamma_sweep").
_TABLE1 = dict(lr=5e-5, nbeta=20.0, localization=4000.0)

SCALES: Dict[str, ImageNetScale] = {
    # The test suite, on 2 CPU cores in about a minute of sampling: 32×32 inputs (GoogLeNet's
    # global pooling takes any size ≥ 32; 256×256 costs ~60× more per image), the generated
    # folder (6 classes × 6 probe images), 2 chains × 30 draws, and a 3-point γ sweep.
    "ci": ImageNetScale(num_probe=None, image_size=32, batch_size=8, num_chains=2, num_draws=30,
                        num_burnin_steps=5, **_TABLE1, k=5, n_neighbors=8, colour_groups=4,
                        cka_snapshots=6, gamma_sweep=(1000.0, 4000.0, 16000.0), sweep_chains=2,
                        sweep_draws=12, sweep_burnin=5, tiny_train=4, tiny_val=6, probe_batch_size=64,
                        note="test suite: 32×32 inputs, 36 probe images, ≈ 1 min of sampling on 2 CPU cores"),
    # A CPU run of a few minutes (more images per class, 64×64 inputs, more draws).
    "cpu": ImageNetScale(num_probe=600, image_size=64, batch_size=16, num_chains=4, num_draws=60,
                         num_burnin_steps=20, **_TABLE1, k=10, n_neighbors=10, colour_groups=6,
                         cka_snapshots=8, gamma_sweep=(1000.0, 4000.0, 16000.0), sweep_chains=2,
                         sweep_draws=40, sweep_burnin=20, tiny_train=16, tiny_val=20, probe_batch_size=128,
                         note="CPU: 64×64 inputs, 120 generated probe images (or 600 ImageNet ones)"),
    # The paper: 10,000 validation images at 256×256, Table 1's Section 4 row; the γ sweep
    # with Table 1's D.3 row (C=5, T=1200, b=2000, ε=1e-4) on 2,000 of the probe images.
    "paper": ImageNetScale(num_probe=10_000, image_size=PAPER_IMAGE_SIZE, batch_size=256, num_chains=15,
                           num_draws=500, num_burnin_steps=100, **_TABLE1, k=30, n_neighbors=15,
                           colour_groups=16, cka_snapshots=15, snapshot_rows=2000,
                           gamma_sweep=(300.0, 1300.0, 4000.0), sweep_num_probe=2000, sweep_chains=5,
                           sweep_draws=1200, sweep_burnin=2000, sweep_lr=1e-4, tiny_train=64, tiny_val=50,
                           num_workers=12, probe_batch_size=500,
                           note="the paper's sizes (Table 1); a GPU (and ImageNet + pretrained weights)"),
}


#: How :func:`for_untrained` rescales the SGLD settings for untrained weights.
UNTRAINED_FACTOR = 250.0


def for_untrained(cfg: ImageNetScale, factor: float = UNTRAINED_FACTOR) -> ImageNetScale:
    """``cfg`` with γ (main run and sweep) multiplied by ``factor`` and ε divided by it, for
    an untrained GoogLeNet.

    torchvision initialises GoogLeNet's weights with σ = 0.01 (truncated normal). Table 1's
    γ = 4,000 spreads every weight by 1/√γ ≈ 0.016, more than its own size: with BatchNorm in
    eval mode the activations blow up and the first SGLD steps give NaN. γ × 250 = 10⁶
    spreads each weight by 0.001, a tenth of its size; ε / 250 = 2·10⁻⁷ keeps Table 1's
    εγ/2 = 0.1 (the fraction of the distance to w* that the localization pulls back per
    step), so the chains relax as fast as with Table 1's settings. Trained weights keep
    Table 1's values.
    """
    return cfg.scaled(lr=cfg.lr / factor, localization=cfg.localization * factor,
                      gamma_sweep=tuple(g * factor for g in cfg.gamma_sweep),
                      sweep_lr=None if cfg.sweep_lr is None else cfg.sweep_lr / factor)


def get_scale(scale: Union[str, ImageNetScale]) -> ImageNetScale:
    if isinstance(scale, ImageNetScale):
        return scale
    try:
        return SCALES[scale]
    except (KeyError, TypeError):
        raise ValueError(f"scale must be one of {sorted(SCALES)} or an ImageNetScale, got {scale!r}") from None


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------
def _snapshot_every(total_draws: int, snapshots: int) -> List[int]:
    """Draw counts for the CKA snapshots: evenly spaced, ≥ 2, ending at ``total_draws``."""
    counts = np.unique(np.linspace(total_draws / snapshots, total_draws, snapshots).round().astype(int))
    return [int(c) for c in counts if c >= 2]


def sample_kernel(model: nn.Module, loader: DataLoader, probe: Tuple[torch.Tensor, torch.Tensor],
                  cfg: ImageNetScale, *, device: Union[str, torch.device, None] = None, seed: int = 0,
                  snapshots: bool = True, sample_ids: Optional[Sequence] = None, verbose: bool = False,
                  checkpoint_dir: Union[str, Path, None] = None, probe_in_training_set: bool = False,
                  **sampler_changes):
    """The loss kernel of ``model`` on ``probe`` with ``cfg``'s SGLD settings (any of them
    overridden by ``sampler_changes``, e.g. ``localization=``), through
    :func:`~devinterp_losskernel.estimate_loss_kernel` with :func:`imagenet_loss_fn` and
    :func:`imagenet_evaluate`. ``probe_in_training_set``: whether the probe images are among
    the loader's (for the singular fluctuation; ImageNet's validation images are not). With
    ``snapshots``, ``kernel.metadata["cka_convergence"]``
    holds CKA(K̂_t, K̂) at ``cfg.cka_snapshots`` draw counts t (the last one all draws)."""
    from devinterp_losskernel.estimate import estimate_loss_kernel

    kwargs = cfg.sampler_kwargs(**sampler_changes)
    callback_kwargs = {}
    if snapshots:
        total = kwargs["num_chains"] * kwargs["num_draws"]
        callback_kwargs = dict(snapshot_every=_snapshot_every(total, cfg.cka_snapshots),
                               snapshot_rows=cfg.snapshot_rows)
    images, targets = probe
    with warnings.catch_warnings():
        # devinterp: "You are taking more draws than burn-in steps" / cycling the loader
        warnings.filterwarnings("ignore", message=r"You are taking more")
        return estimate_loss_kernel(
            model, loader, (images, targets), loss_fn=imagenet_loss_fn, evaluate=imagenet_evaluate,
            device=device, seed=seed, probe_batch_size=cfg.probe_batch_size, labels=targets,
            sample_ids=sample_ids, verbose=verbose, callback_kwargs=callback_kwargs,
            checkpoint_dir=checkpoint_dir, probe_train_mask=None if probe_in_training_set else False,
            **kwargs)


def gamma_sweep(model: nn.Module, loader: DataLoader, probe: Tuple[torch.Tensor, torch.Tensor],
                cfg: ImageNetScale, *, gammas: Optional[Sequence[float]] = None,
                device: Union[str, torch.device, None] = None, seed: int = 0,
                verbose: bool = False) -> Dict[float, Any]:
    """{γ: kernel} for each localization γ (paper, Appendix D.3 / Fig. 6), on the first
    ``cfg.sweep_num_probe`` probe images, with ``cfg``'s sweep settings. Every γ uses the
    same seed (the same minibatch order and noise), so differences come from γ."""
    gammas = tuple(cfg.gamma_sweep if gammas is None else gammas)
    if not gammas:
        raise ValueError("gammas must name at least one localization (cfg.gamma_sweep is empty)")
    images, targets = probe
    if cfg.sweep_num_probe is not None:
        images, targets = images[:cfg.sweep_num_probe], targets[:cfg.sweep_num_probe]
    return {float(g): sample_kernel(model, loader, (images, targets), cfg, device=device, seed=seed,
                                    snapshots=False, verbose=verbose, **cfg.sweep_kwargs(g))
            for g in gammas}


# ---------------------------------------------------------------------------------------------
# Analyses
# ---------------------------------------------------------------------------------------------
def _mean_offdiagonal(matrix: np.ndarray, mask: np.ndarray) -> float:
    mask = mask.copy()
    np.fill_diagonal(mask, False)
    return float(matrix[mask].mean()) if mask.any() else float("nan")


def analyse_kernel(kernel, wnids: Sequence[str], images: torch.Tensor, hierarchy, cfg: ImageNetScale, *,
                   sweep: Optional[Dict[float, Any]] = None, umap: bool = True, seed: int = 0) -> Dict[str, Any]:
    """The paper's ImageNet analyses of one kernel (and of a γ sweep), as plain results.

    Returns a dict: ``embedding`` (UMAP of 1 − R̂ without same-label edges, Fig. 1A; None
    if ``umap`` is False), ``lift`` (taxonomic lift, Fig. 5), ``colour_groups`` and
    ``colour_lift`` (App. D.6), ``node_lift`` (WordNet node at ``cfg.node_depth``),
    ``by_tree_distance`` (mean R̂ per WordNet distance, Fig. 6C), ``cka_convergence``
    (Fig. 6A), ``top`` / ``bottom`` ((indices, values) of each sample's most / least
    correlated images, Fig. 4), ``mean_R`` (within class, within family = same node at
    ``cfg.node_depth``, different family), and with ``sweep``: ``sweep_cka`` (pairwise CKA,
    Fig. 6B) and ``sweep_lifts`` (colour and node lift per γ, Fig. 6D).
    """
    from devinterp_losskernel.analysis import (
        attribute_lift,
        color_groups,
        compare_kernels,
        correlation_by_tree_distance,
        taxonomic_lift,
        top_correlated,
        umap_embedding,
    )

    labels = np.asarray(wnids, dtype=object)
    n = len(labels)
    largest_class = int(np.unique(labels, return_counts=True)[1].max())
    k = min(cfg.k, n - largest_class)
    groups = color_groups(images, min(cfg.colour_groups, n), channels_last=False)
    nodes = hierarchy.ancestors_at_depth(labels, cfg.node_depth)
    out: Dict[str, Any] = {"k": k, "colour_groups": groups, "nodes": nodes}
    out["lift"] = taxonomic_lift(kernel, labels, hierarchy, k=k)
    out["colour_lift"] = attribute_lift(kernel, groups, k=k, labels=labels)
    out["node_lift"] = attribute_lift(kernel, nodes, k=k, labels=labels)
    out["by_tree_distance"] = correlation_by_tree_distance(kernel, labels, hierarchy)
    out["cka_convergence"] = kernel.metadata.get("cka_convergence")
    out["top"] = top_correlated(kernel, None, min(5, n - 1))
    out["bottom"] = top_correlated(kernel, None, min(5, n - 1), lowest=True)
    R = kernel.correlation.double().cpu().numpy()
    same_class = labels[:, None] == labels[None, :]
    same_node = nodes[:, None] == nodes[None, :]
    out["mean_R"] = {"same class": _mean_offdiagonal(R, same_class),
                     "same node, other class": _mean_offdiagonal(R, same_node & ~same_class),
                     "other node": _mean_offdiagonal(R, ~same_node)}
    out["embedding"] = None
    if umap:
        neighbours = min(cfg.n_neighbors, n - largest_class)
        threads = torch.get_num_threads()
        try:
            out["embedding"] = umap_embedding(kernel, labels=labels, exclude_same_label_edges=True,
                                              n_neighbors=neighbours, random_state=seed)
        finally:
            # umap-learn's numba (OpenMP threading layer) resets the OpenMP thread count that
            # torch shares: measured 0.13 s → 4.5 s per GoogLeNet probe pass afterwards on a
            # loaded 2-core machine, until torch's own setting is restored
            torch.set_num_threads(threads)
    if sweep:
        out["sweep_cka"] = compare_kernels({f"γ={g:g}": kern for g, kern in sweep.items()})
        rows = []
        for g, kern in sweep.items():
            m = kern.num_samples
            sub_labels, sub_groups, sub_nodes = labels[:m], groups[:m], nodes[:m]
            sub_k = min(k, m - int(np.unique(sub_labels, return_counts=True)[1].max()))
            rows.append({"gamma": g,
                         "colour_lift": attribute_lift(kern, sub_groups, k=sub_k, labels=sub_labels).mean_lift,
                         "node_lift": attribute_lift(kern, sub_nodes, k=sub_k, labels=sub_labels).mean_lift,
                         "mean_probe_loss": float(kern.mean.mean()),
                         "init_probe_loss": float(kern.init_loss.mean())})
        import pandas as pd

        out["sweep_lifts"] = pd.DataFrame(rows).set_index("gamma")
        out["sweep_by_tree_distance"] = {g: correlation_by_tree_distance(kern, labels[:kern.num_samples], hierarchy)
                                         for g, kern in sweep.items()}
    return out


# ---------------------------------------------------------------------------------------------
# Figures the plotting module does not have
# ---------------------------------------------------------------------------------------------
def plot_gamma_sweep(sweep_cka, sweep_lifts, by_tree_distance: Optional[Dict[float, Any]] = None, *,
                     title: Optional[str] = None, path=None):
    """The γ sweep (paper, Fig. 6B–D): CKA between the kernels at different γ (B), mean R̂
    against WordNet distance per γ (C), colour lift and WordNet-node lift against γ (D)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    panels = 3 if by_tree_distance else 2
    fig = Figure(figsize=(5.0 * panels, 4.2))
    axes = fig.subplots(1, panels)
    values = sweep_cka.to_numpy()
    image = axes[0].imshow(values, vmin=min(0.0, float(values.min())), vmax=1.0, cmap="viridis")
    names = list(sweep_cka.index)
    axes[0].set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    axes[0].set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            axes[0].text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                         color="w" if values[i, j] < 0.6 else "k")
    fig.colorbar(image, ax=axes[0], shrink=0.8, label="CKA")
    axes[0].set_title("B: CKA between kernels")
    if by_tree_distance:
        colour = colormaps["viridis"]
        for i, (g, table) in enumerate(by_tree_distance.items()):
            axes[1].plot(table.index, table["mean"], marker="o", markersize=3,
                         color=colour(i / max(1, len(by_tree_distance) - 1)), label=f"γ={g:g}")
        axes[1].set_xlabel("WordNet distance between labels")
        axes[1].set_ylabel("mean R(x, x')")
        axes[1].legend(fontsize=7)
        axes[1].set_title("C: correlation against WordNet distance")
    ax = axes[-1]
    gammas = np.asarray(sweep_lifts.index, dtype=float)
    ax.plot(gammas, sweep_lifts["colour_lift"], marker="o", label="colour lift")
    ax.plot(gammas, sweep_lifts["node_lift"], marker="s", label="WordNet-node lift")
    ax.axhline(1.0, color="k", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    ax.set_xticks(gammas, [f"{g:g}" for g in gammas])
    ax.minorticks_off()
    ax.set_xlabel("localization γ")
    ax.set_ylabel("lift (neighbour match / base rate)")
    ax.legend(fontsize=8)
    ax.set_title("D: lift against γ")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_images(images: torch.Tensor, labels: Optional[Sequence[str]] = None, *, columns: int = 6,
                title: Optional[str] = None, path=None):
    """A grid of uint8 images [n, 3, H, W] with optional captions."""
    from matplotlib.figure import Figure

    pictures = images.permute(0, 2, 3, 1).cpu().numpy()
    rows = -(-len(pictures) // columns)
    fig = Figure(figsize=(1.5 * columns, 1.6 * rows + (0.4 if title else 0)))
    axes = np.asarray(fig.subplots(rows, columns, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i < len(pictures):
            ax.imshow(pictures[i])
            if labels is not None:
                ax.set_title(str(labels[i]), fontsize=7)
    if title:
        fig.suptitle(title)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_colour_groups(images: torch.Tensor, groups: np.ndarray, *, per_group: int = 6, path=None):
    """A few images of each colour group (App. D.6), one row per group."""
    from matplotlib.figure import Figure

    pictures = images.permute(0, 2, 3, 1).cpu().numpy()
    values = np.unique(groups)
    fig = Figure(figsize=(1.2 * per_group, 1.2 * len(values)))
    axes = np.asarray(fig.subplots(len(values), per_group, squeeze=False))
    for row, g in enumerate(values):
        members = np.flatnonzero(groups == g)[:per_group]
        for col in range(per_group):
            ax = axes[row, col]
            ax.set_axis_off()
            if col < len(members):
                ax.imshow(pictures[members[col]])
        axes[row, 0].set_title(f"group {g} ({int((groups == g).sum())})", fontsize=7, loc="left")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


# ---------------------------------------------------------------------------------------------
# The whole pipeline
# ---------------------------------------------------------------------------------------------
@dataclass
class ImageNetKernelResult:
    """What :func:`run_imagenet_kernel` returns: the kernel, the probe (uint8 images,
    ImageNet class indices, wnids, file paths), the hierarchy, the analyses
    (:func:`analyse_kernel`), the γ-sweep kernels and key numbers."""

    kernel: Any
    images: torch.Tensor
    targets: torch.Tensor
    wnids: np.ndarray
    paths: List[str]
    hierarchy: Any
    analyses: Dict[str, Any]
    sweep: Dict[float, Any] = field(default_factory=dict)
    numbers: Dict[str, Any] = field(default_factory=dict)


def _spd_check(matrix: np.ndarray, max_n: int = 4000) -> Optional[float]:
    """Smallest eigenvalue of a symmetric matrix over its largest magnitude (None above
    ``max_n`` samples: an eigendecomposition of 10,000² takes minutes on a CPU)."""
    if matrix.shape[0] > max_n:
        return None
    eig = np.linalg.eigvalsh((matrix + matrix.T) / 2)
    return float(eig.min() / max(abs(eig).max(), 1e-300))


def run_imagenet_kernel(
    imagenet_dir: Union[str, Path, None] = None,
    weights: Any = None,
    scale: Union[str, ImageNetScale] = "cpu",
    *,
    device: Union[str, torch.device, None] = None,
    seed: int = 0,
    work_dir: Union[str, Path] = "imagenet_kernel",
    figures: bool = True,
    sweep: bool = True,
    verbose: bool = True,
    checkpoint_dir: Union[str, Path, None] = None,
) -> ImageNetKernelResult:
    """The tutorial as a script: probe set → loss kernel → the paper's ImageNet analyses.

    Args:
        imagenet_dir: an ImageNet-layout folder (``train/`` and ``val/`` with wnid folders, or
            the wnid folders themselves; see :func:`resolve_imagenet_dirs`); None → a generated
            folder (:func:`make_tiny_imagenet`) under ``work_dir``.
        weights: :func:`load_googlenet`'s ``weights`` (None: untrained, BatchNorm statistics
            recalibrated on the training images, see :func:`calibrate_batchnorm`, and the SGLD
            settings rescaled by :func:`for_untrained`).
        scale: ``"ci"``, ``"cpu"`` (default) or ``"paper"`` (:data:`SCALES`) or an ImageNetScale.
        device: default ``"cuda"`` when available.
        work_dir: figures (PNG), ``kernel.pt`` and ``numbers.json`` go here.
        sweep: run the γ sweep of ``cfg.gamma_sweep`` (Fig. 6B–D).
        checkpoint_dir: resume a killed main run (see ``estimate_loss_kernel``).

    Returns:
        :class:`ImageNetKernelResult`; ``numbers`` holds the sizes, wall times, the lift
        table's peak, colour / node lift, mean R̂ by relation, the final CKA and the sweep.
    """
    import json

    from devinterp_losskernel.hierarchy import wordnet_imagenet

    require_torchvision()
    cfg = get_scale(scale)
    if weights is None:
        cfg = for_untrained(cfg)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    timings: Dict[str, float] = {}
    started = time.perf_counter()
    if imagenet_dir is None:
        imagenet_dir = make_tiny_imagenet(work_dir / "tiny_imagenet", train_per_class=cfg.tiny_train,
                                          val_per_class=cfg.tiny_val, seed=seed)
    train_dir, probe_dir = resolve_imagenet_dirs(imagenet_dir)
    probe_folder = ImageNetFolder(probe_dir, cfg.image_size, normalize=False)
    train_folder = probe_folder if train_dir == probe_dir else ImageNetFolder(train_dir, cfg.image_size,
                                                                              normalize=False)
    index = probe_indices(len(probe_folder), cfg.num_probe, seed)
    images, targets = load_probe(probe_folder, index, num_workers=cfg.num_workers)
    wnids = probe_folder.wnids[index]
    loader = training_loader(train_folder, cfg.batch_size, num_workers=cfg.num_workers,
                             pin_memory=device.type == "cuda")
    hierarchy = wordnet_imagenet(sorted(set(wnids)))
    model = load_googlenet(weights, device=device, seed=seed)
    if weights is None:
        calibrate_batchnorm(model, loader, device=device)
    timings["data_and_model"] = time.perf_counter() - started

    t = time.perf_counter()
    kernel = sample_kernel(model, loader, (images.to(device), targets.to(device)), cfg, device=device,
                           seed=seed, sample_ids=[probe_folder.samples[i][0] for i in index],
                           verbose=verbose, checkpoint_dir=checkpoint_dir,
                           probe_in_training_set=train_dir == probe_dir)
    timings["sampling"] = time.perf_counter() - t
    sweep_kernels: Dict[float, Any] = {}
    if sweep and cfg.gamma_sweep:
        t = time.perf_counter()
        sweep_kernels = gamma_sweep(model, loader, (images.to(device), targets.to(device)), cfg,
                                    device=device, seed=seed, verbose=verbose)
        timings["gamma_sweep"] = time.perf_counter() - t
    t = time.perf_counter()
    analyses = analyse_kernel(kernel, wnids, images, hierarchy, cfg, sweep=sweep_kernels, seed=seed)
    timings["analyses"] = time.perf_counter() - t

    lift = analyses["lift"]
    curve = analyses["cka_convergence"] or []
    R = kernel.correlation.double().cpu().numpy()
    numbers = {
        "scale": asdict(cfg),
        "device": str(device),
        "imagenet_dir": str(imagenet_dir),
        "weights": None if weights is None else str(weights),
        "num_probe": int(kernel.num_samples),
        "num_classes": int(len(set(wnids))),
        "num_train": int(len(train_folder)),
        "num_draws": int(kernel.num_draws),
        "probe_loss/at_w_star": float(kernel.init_loss.mean()),
        "probe_loss/mean_over_draws": float(kernel.mean.mean()),
        "llc/mean": kernel.metadata.get("llc/mean"),
        "min_eigenvalue_ratio/R": _spd_check(R),
        "mean_R": analyses["mean_R"],
        "taxonomic_lift/max": float(np.nanmax(lift.to_numpy())),
        "colour_lift": analyses["colour_lift"].mean_lift,
        "node_lift": analyses["node_lift"].mean_lift,
        "cka_convergence": [(int(d), float(c)) for d, c in curve],
        "seconds": timings,
    }
    if sweep_kernels:
        numbers["gamma_sweep"] = analyses["sweep_lifts"].reset_index().to_dict(orient="records")
        numbers["gamma_sweep_cka"] = analyses["sweep_cka"].round(4).to_dict()
    numbers["seconds"]["total"] = time.perf_counter() - started
    kernel.save(work_dir / "kernel.pt")
    (work_dir / "numbers.json").write_text(json.dumps(numbers, indent=2, default=str))
    if figures:
        _save_figures(kernel, analyses, images, wnids, hierarchy, probe_folder, work_dir)
    return ImageNetKernelResult(kernel=kernel, images=images, targets=targets, wnids=wnids,
                                paths=[probe_folder.samples[i][0] for i in index], hierarchy=hierarchy,
                                analyses=analyses, sweep=sweep_kernels, numbers=numbers)


def _short_names(wnids: Sequence[str]) -> np.ndarray:
    from devinterp_losskernel.hierarchy import imagenet_class_names, imagenet_wnids

    name = dict(zip(imagenet_wnids(), imagenet_class_names()))
    return np.array([name.get(w, w) for w in wnids], dtype=object)


def _save_figures(kernel, analyses, images, wnids, hierarchy, folder, work_dir: Path) -> None:
    from devinterp_losskernel.plotting import (
        plot_attribute_transition,
        plot_cka_convergence,
        plot_embedding,
        plot_hierarchy_sorted_matrix,
        plot_lift_curves,
        plot_top_k_grid,
    )

    names = _short_names(wnids)
    if analyses.get("embedding") is not None:
        plot_embedding(analyses["embedding"], labels=wnids, hierarchy=hierarchy,
                       path=work_dir / "umap_wordnet.png")
    plot_hierarchy_sorted_matrix(kernel, wnids, hierarchy, path=work_dir / "hierarchy_sorted.png")
    queries = np.linspace(0, len(wnids) - 1, min(6, len(wnids))).round().astype(int)
    top_idx, top_val = analyses["top"]
    plot_top_k_grid(images, queries, top_idx[queries], top_val[queries], labels=names,
                    title="most correlated", path=work_dir / "top_correlated.png")
    low_idx, low_val = analyses["bottom"]
    plot_top_k_grid(images, queries, low_idx[queries], low_val[queries], labels=names,
                    title="least correlated", path=work_dir / "bottom_correlated.png")
    plot_lift_curves(analyses["lift"], path=work_dir / "taxonomic_lift.png")
    if analyses.get("cka_convergence"):
        plot_cka_convergence(analyses["cka_convergence"], path=work_dir / "cka_convergence.png")
    plot_attribute_transition(analyses["colour_lift"], path=work_dir / "colour_transition.png")
    if "sweep_cka" in analyses:
        plot_gamma_sweep(analyses["sweep_cka"], analyses["sweep_lifts"], analyses.get("sweep_by_tree_distance"),
                         path=work_dir / "gamma_sweep.png")


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m losskernel_examples.imagenet [--imagenet-dir D] [--weights W] --scale S``"""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m losskernel_examples.imagenet")
    parser.add_argument("--imagenet-dir", default=None, help="ImageNet layout (train/, val/); default: generated")
    parser.add_argument("--weights", default=None, help="GoogLeNet state_dict file (default: untrained)")
    parser.add_argument("--scale", default="cpu", choices=sorted(SCALES))
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="imagenet_kernel", help="folder for figures, kernel.pt, numbers.json")
    parser.add_argument("--no-sweep", action="store_true", help="skip the γ sweep")
    parser.add_argument("--resume-dir", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_imagenet_kernel(args.imagenet_dir, args.weights, args.scale, device=args.device, seed=args.seed,
                                 work_dir=args.out, sweep=not args.no_sweep, checkpoint_dir=args.resume_dir)
    print(json.dumps(result.numbers, indent=2, default=str))


if __name__ == "__main__":
    main()
