"""Cityscapes data for semi-supervised training, official layout::

    ROOT/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    ROOT/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png

Label ids are mapped to the 19 train ids with cityscapesscripts' table (everything else,
including ids the table does not know, to 255). Images are resized bilinearly (with
antialiasing) and labels by nearest neighbour to half or full resolution. Training
examples get the paper's jitter: a random scale, a random crop (labels padded with 255),
a random horizontal flip. Unlabeled examples never open their label file.

Randomness is a pure function of ``(seed, step)``: :class:`StepSampler` yields, for each
training step, this rank's ``(index, sample_seed)`` pairs, and the dataset jitters with a
generator seeded by ``sample_seed``. Data order and jitter therefore do not depend on the
number of workers, and a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .labels import IGNORE_INDEX, id_to_train_id_lut

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
LAYOUT = "leftImg8bit/{split}/{city}/*_leftImg8bit.png and gtFine/{split}/{city}/*_gtFine_labelIds.png"


class DatasetError(RuntimeError):
    """A dataset file or folder is missing, mis-laid or unreadable (the message names it)."""


@dataclass(frozen=True)
class Sample:
    name: str          # "{city}_{seq}_{frame}"
    city: str
    image: str         # path
    label: Optional[str]


# ---------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------
def find_samples(root: str, split: str, *, labels: bool = True) -> List[Sample]:
    """List the images of ``split`` (sorted by name), with their label files when ``labels``.

    Raises :class:`DatasetError` naming the folder or file when the root or the split is
    missing, images lie outside city folders, or an image has no label file.
    """
    if not os.path.isdir(root):
        raise DatasetError(f"Cityscapes root not found: '{root}' (expected {LAYOUT}). "
                           "Generate a synthetic one with `python -m examples.semiseg.synthetic --out DIR`.")
    img_dir = os.path.join(root, "leftImg8bit", split)
    if not os.path.isdir(img_dir):
        hint = ""
        for cand in ("leftImg8bit_trainvaltest/leftImg8bit", "leftImg8bit_trainvaltest", split):
            if os.path.isdir(os.path.join(root, cand)):
                hint = f"; found '{os.path.join(root, cand)}' instead: point the root at the folder that holds leftImg8bit/ and gtFine/"
                break
        raise DatasetError(f"Cityscapes split folder not found: '{img_dir}' (expected {LAYOUT}){hint}")
    lab_dir = os.path.join(root, "gtFine", split)
    if labels and not os.path.isdir(lab_dir):
        raise DatasetError(f"Cityscapes label folder not found: '{lab_dir}' (expected {LAYOUT})")
    samples = []
    for city in sorted(os.listdir(img_dir)):
        city_dir = os.path.join(img_dir, city)
        if not os.path.isdir(city_dir):
            if city.endswith(".png"):
                raise DatasetError(f"mis-laid image '{city_dir}': images must lie in city folders, "
                                   f"{img_dir}/<city>/<name>{IMAGE_SUFFIX}")
            continue
        for fname in sorted(os.listdir(city_dir)):
            if not fname.endswith(IMAGE_SUFFIX):
                continue
            name = fname[: -len(IMAGE_SUFFIX)]
            label = None
            if labels:
                label = os.path.join(lab_dir, city, name + LABEL_SUFFIX)
                if not os.path.isfile(label):
                    raise DatasetError(f"label file missing for image '{os.path.join(city_dir, fname)}': "
                                       f"expected '{label}'")
            samples.append(Sample(name, city, os.path.join(city_dir, fname), label))
    if not samples:
        raise DatasetError(f"no images '*{IMAGE_SUFFIX}' found under '{img_dir}/<city>/' (expected {LAYOUT})")
    return samples


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------
def read_image(path: str) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB; :class:`DatasetError` naming the file when unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")).copy()
    except Exception as e:  # missing, truncated, not an image
        raise DatasetError(f"cannot read image '{path}': {e}") from e


_LUT = None


def read_label(path: str) -> np.ndarray:
    """``(H, W)`` uint8 train ids from a ``*_gtFine_labelIds.png``; unknown ids -> 255."""
    from PIL import Image

    global _LUT
    if _LUT is None:
        _LUT = id_to_train_id_lut()
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("RGB", "RGBA", "LA"):
                raise DatasetError(f"label file '{path}' has mode {mode}: expected a single-channel label-id "
                                   f"PNG ('*{LABEL_SUFFIX}', not the colour or train-id rendering)")
            ids = np.asarray(im).copy()
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"cannot read label file '{path}': {e}") from e
    if ids.ndim != 2:
        raise DatasetError(f"label file '{path}' is not a 2-D label map (shape {ids.shape})")
    if ids.dtype == np.uint8:
        return _LUT[ids]
    ids = ids.astype(np.int64)
    out = np.full(ids.shape, IGNORE_INDEX, dtype=np.uint8)
    ok = (ids >= 0) & (ids < 256)
    out[ok] = _LUT[ids[ok]]
    return out


def parse_resolution(resolution: Union[str, float]) -> float:
    """``"full"`` -> 1, ``"half"`` -> 0.5, or a number."""
    if isinstance(resolution, str):
        table = {"full": 1.0, "half": 0.5, "quarter": 0.25}
        if resolution in table:
            return table[resolution]
        resolution = float(resolution)
    if not (0 < resolution <= 4):
        raise ValueError(f"resolution must be 'full', 'half' or a scale in (0, 4], got {resolution!r}")
    return float(resolution)


def resize_pair(image: torch.Tensor, label: Optional[torch.Tensor], size: Tuple[int, int]):
    """Image ``(3, H, W)`` float bilinearly (antialiased when shrinking), label ``(H, W)``
    uint8 by nearest neighbour at pixel centres."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, label
    shrink = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=shrink)[0]
    if label is not None:
        label = F.interpolate(label[None, None], size=size, mode="nearest-exact")[0, 0]
    return image, label


# ---------------------------------------------------------------------------------------
# jitter
# ---------------------------------------------------------------------------------------
@dataclass
class Jitter:
    """The paper's training jitter: scale ``s`` (log-uniform in ``scale_range``), a random
    ``crop x crop`` window (images padded with ``pad_value``, labels with 255), horizontal flip."""

    crop: int = 448
    scale_range: Tuple[float, float] = (1 / 1.5, 1.5)
    flip: bool = True
    pad_value: float = 0.0

    def __call__(self, image: torch.Tensor, label: Optional[torch.Tensor], rng: np.random.Generator):
        lo, hi = self.scale_range
        s = math.exp(rng.uniform(math.log(lo), math.log(hi))) if hi > lo else lo
        H, W = image.shape[-2:]
        size = (max(1, round(H * s)), max(1, round(W * s)))
        image, label = resize_pair(image, label, size)
        c = self.crop
        ph, pw = max(0, c - size[0]), max(0, c - size[1])
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph), value=self.pad_value)
            if label is not None:
                label = F.pad(label, (0, pw, 0, ph), value=IGNORE_INDEX)
        H, W = image.shape[-2:]
        y0 = int(rng.integers(0, H - c + 1))
        x0 = int(rng.integers(0, W - c + 1))
        image = image[:, y0:y0 + c, x0:x0 + c]
        if label is not None:
            label = label[y0:y0 + c, x0:x0 + c]
        if self.flip and rng.random() < 0.5:
            image = image.flip(-1)
            if label is not None:
                label = label.flip(-1)
        return image.contiguous(), (label.contiguous() if label is not None else None)


# ---------------------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------------------
class CityscapesSegmentation(Dataset):
    """Cityscapes (official layout) at ``resolution``; items are ``(image, label)`` with
    ``image (3, H, W)`` float in ``[0, 1]`` and ``label (H, W)`` int64 train ids, or just
    ``image`` when ``labels=False`` (label files are then never opened).

    ``dataset[i]`` gives the unjittered example; ``dataset[(i, seed)]`` (what
    :class:`StepSampler` yields) applies ``jitter`` with a generator seeded by ``seed``.
    ``indices`` restricts the dataset to a subset; ``cache`` keeps decoded, resized
    examples in memory (small datasets).
    """

    def __init__(self, root: str, split: str = "train", *, resolution: Union[str, float] = "full",
                 labels: bool = True, jitter: Optional[Jitter] = None, indices: Optional[Sequence[int]] = None,
                 cache: bool = False, samples: Optional[List[Sample]] = None):
        self.root, self.split, self.labels = root, split, labels
        self.scale = parse_resolution(resolution)
        all_samples = samples if samples is not None else find_samples(root, split, labels=labels)
        self.samples = [all_samples[i] for i in indices] if indices is not None else list(all_samples)
        self.jitter = jitter
        self.cache = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def names(self) -> List[str]:
        return [s.name for s in self.samples]

    def load(self, i: int):
        """The example at ``resolution``, unjittered: ``(image float (3, H, W), label uint8 (H, W) | None)``."""
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        s = self.samples[i]
        img = read_image(s.image)
        lab = None
        if self.labels:
            lab = read_label(s.label)
            if lab.shape != img.shape[:2]:
                raise DatasetError(f"image/label size mismatch: '{s.image}' is {img.shape[1]}x{img.shape[0]} "
                                   f"but '{s.label}' is {lab.shape[1]}x{lab.shape[0]} (W x H)")
            lab = torch.from_numpy(lab)
        image = torch.from_numpy(img).permute(2, 0, 1).float().div_(255)
        if self.scale != 1.0:
            H, W = image.shape[-2:]
            image, lab = resize_pair(image, lab, (max(1, round(H * self.scale)), max(1, round(W * self.scale))))
        out = (image, lab)
        if self.cache is not None:
            self.cache[i] = out
        return out

    def __getitem__(self, item):
        if isinstance(item, (tuple, list)):
            i, seed = item
        else:
            i, seed = item, None
        image, lab = self.load(int(i))
        if seed is not None and self.jitter is not None:
            image, lab = self.jitter(image, lab, np.random.default_rng(int(seed)))
        if not self.labels:
            return image
        return image, lab.long()


# ---------------------------------------------------------------------------------------
# labeled subsets
# ---------------------------------------------------------------------------------------
def parse_fraction(fraction: Union[str, float]) -> float:
    f = float(Fraction(fraction)) if isinstance(fraction, str) else float(fraction)
    if not (0 < f <= 1):
        raise ValueError(f"labeled fraction must be in (0, 1], got {fraction!r}")
    return f


def _split_name(entry: str) -> str:
    """A CPS-style split-file entry (``aachen_000000_000019``, a file name, or a path,
    optionally followed by a label path) -> the image name."""
    token = entry.split()[0]
    base = os.path.basename(token)
    for suffix in (IMAGE_SUFFIX, LABEL_SUFFIX, "_gtFine_labelTrainIds.png", ".png", ".jpg"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def labeled_indices(names: Sequence[str], *, fraction: Union[str, float] = 1.0, seed: int = 0,
                    split_file: Optional[str] = None) -> List[int]:
    """Indices of the labeled subset: the names listed in ``split_file`` (one per line), or
    the first ``round(fraction * N)`` of a permutation seeded by ``seed`` (the paper's
    protocol), sorted."""
    n = len(names)
    if split_file:
        if not os.path.isfile(split_file):
            raise DatasetError(f"split file not found: '{split_file}'")
        where = {name: i for i, name in enumerate(names)}
        out = []
        with open(split_file) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                name = _split_name(line.strip())
                if name not in where:
                    raise DatasetError(f"split file '{split_file}' line {lineno}: image '{name}' is not in the dataset")
                out.append(where[name])
        if not out:
            raise DatasetError(f"split file '{split_file}' lists no images")
        return sorted(set(out))
    f = parse_fraction(fraction)
    k = max(1, min(n, round(f * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return sorted(perm[:k].tolist())


# ---------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------
def mix_seed(*keys: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0] >> 1)


class StepSampler(Sampler):
    """Batches for steps ``start_step .. num_steps - 1``: each yields this rank's
    ``batch_size`` pairs ``(index, sample_seed)``. Global position ``p = step * B * world +
    k`` reads index ``perm_e[p mod N]`` of epoch ``e = p // N`` (a permutation seeded by
    ``(seed, stream, e)``); every pair is a pure function of ``(seed, stream, step, k)``."""

    def __init__(self, num_items: int, batch_size: int, num_steps: int, *, start_step: int = 0, seed: int = 0,
                 stream: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if num_items < 1:
            raise ValueError("StepSampler: empty dataset")
        self.n, self.b, self.steps, self.start = num_items, batch_size, num_steps, start_step
        self.seed, self.stream, self.rank, self.world, self.shuffle = seed, stream, rank, world_size, shuffle
        self._perms = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            if self.shuffle:
                g = torch.Generator().manual_seed(mix_seed(self.seed, self.stream, epoch))
                self._perms[epoch] = torch.randperm(self.n, generator=g)
            else:
                self._perms[epoch] = torch.arange(self.n)
        return self._perms[epoch]

    def batch(self, step: int) -> List[Tuple[int, int]]:
        gb = self.b * self.world
        out = []
        for k in range(self.rank * self.b, (self.rank + 1) * self.b):
            p = step * gb + k
            out.append((int(self._perm(p // self.n)[p % self.n]), mix_seed(self.seed, self.stream, step, k)))
        return out

    def __iter__(self):
        for step in range(self.start, self.steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


class ShardSampler(Sampler):
    """Evaluation: rank ``r`` of ``w`` reads indices ``r, r + w, ...`` (no padding, so
    summed confusion matrices count every image once)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(dataset: Dataset, batch_sampler: Optional[Sampler] = None, *, sampler: Optional[Sampler] = None,
                batch_size: int = 1, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    # the loader's own generator: creating an iterator must not consume the global RNG
    # (randomness here comes from StepSampler's seeds; a resumed run restores the global one)
    kw = dict(num_workers=num_workers, pin_memory=pin_memory, generator=torch.Generator().manual_seed(0))
    if num_workers > 0:
        kw.update(persistent_workers=False, prefetch_factor=2)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kw)
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, shuffle=False, **kw)
