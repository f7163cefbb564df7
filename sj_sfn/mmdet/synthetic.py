"""A small COCO-format instance-segmentation data set of coloured shapes.

Each image has a plain background with mild noise and 1..``max_objects`` non-overlapping
filled shapes; the class is the shape (``rectangle``, ``ellipse``, ``triangle``), and each
class has its own hue (red, blue, green, jittered) so that a tiny detector learns the task
in a few hundred iterations. Every shape is drawn from the same polygon that is written as its COCO
segmentation, so boxes and masks are exact::

    bbox = [min x, min y, max x - min x, max y - min y]       area = ½·|Σ_i (x_i y_{i+1} - x_{i+1} y_i)|

Layout written under ``root``: ``<split>/NNNNN.png`` and ``annotations/<split>.json``.
Only numpy and Pillow are needed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

__all__ = ["CLASSES", "PALETTE", "ShapesDataset", "make_shapes_dataset", "metainfo"]

CLASSES = ("rectangle", "ellipse", "triangle")
PALETTE = [(220, 20, 60), (0, 128, 255), (0, 200, 0)]


def metainfo() -> dict:
    """The mmdet ``metainfo`` of the data set: ``dict(classes=..., palette=...)``."""
    return {"classes": CLASSES, "palette": PALETTE}


@dataclass
class ShapesDataset:
    """Paths of a generated data set."""

    root: str
    image_size: int
    splits: dict[str, int]

    def ann_file(self, split: str) -> str:
        """Absolute path of ``annotations/<split>.json``."""
        return os.path.join(self.root, "annotations", f"{split}.json")

    def img_dir(self, split: str) -> str:
        """Absolute path of the image folder of ``split``."""
        return os.path.join(self.root, split)


def _polygon(kind: str, cx: float, cy: float, w: float, h: float, angle: float) -> np.ndarray:
    if kind == "rectangle":
        pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]], dtype=np.float64) / 2
    elif kind == "ellipse":
        t = np.linspace(0, 2 * math.pi, 24, endpoint=False)
        pts = np.stack([w / 2 * np.cos(t), h / 2 * np.sin(t)], 1)
    elif kind == "triangle":
        pts = np.array([[0, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]], dtype=np.float64)
    else:  # pragma: no cover - internal
        raise ValueError(kind)
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return pts @ rot.T + np.array([cx, cy])


def _area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


def _overlaps(box: tuple[float, float, float, float], boxes: list[tuple[float, float, float, float]], gap: float) -> bool:
    x0, y0, x1, y1 = box
    return any(not (x1 + gap <= b[0] or b[2] + gap <= x0 or y1 + gap <= b[1] or b[3] + gap <= y0) for b in boxes)


def _image(rng: np.random.Generator, size: int, max_objects: int, min_frac: float, max_frac: float):
    from PIL import Image, ImageDraw

    bg = rng.integers(170, 256, size=3)
    arr = np.clip(bg[None, None, :] + rng.normal(0, 6, size=(size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    objects: list[tuple[int, np.ndarray]] = []
    boxes: list[tuple[float, float, float, float]] = []
    want = int(rng.integers(1, max_objects + 1))
    for _ in range(50 * want):
        if len(objects) == want:
            break
        label = int(rng.integers(len(CLASSES)))
        w, h = (rng.uniform(min_frac, max_frac, size=2) * size).tolist()
        angle = rng.uniform(-0.4, 0.4) if CLASSES[label] != "ellipse" else 0.0
        cx, cy = rng.uniform(0.5 * max(w, h), size - 0.5 * max(w, h), size=2).tolist()
        poly = np.clip(_polygon(CLASSES[label], cx, cy, w, h, angle), 0, size - 1)
        box = (poly[:, 0].min(), poly[:, 1].min(), poly[:, 0].max(), poly[:, 1].max())
        if box[2] - box[0] < 4 or box[3] - box[1] < 4 or _overlaps(box, boxes, 2.0):
            continue
        colour = tuple(int(v) for v in np.clip(np.array(PALETTE[label]) * rng.uniform(0.6, 1.0) + rng.normal(0, 12, 3), 0, 255))
        draw.polygon([tuple(p) for p in poly.tolist()], fill=colour)
        objects.append((label, poly))
        boxes.append(box)
    return img, objects


def make_shapes_dataset(
    root: str | os.PathLike,
    splits: dict[str, int] | None = None,
    image_size: int = 96,
    max_objects: int = 2,
    min_frac: float = 0.3,
    max_frac: float = 0.6,
    seed: int = 0,
) -> ShapesDataset:
    """Write a COCO-format shapes data set under ``root`` and return its paths.

    :param root: output folder (created)
    :param splits: images per split, default ``{"train": 48, "val": 16}``
    :param image_size: side of the square images in pixels (>= 32)
    :param max_objects: at most this many shapes per image (>= 1)
    :param min_frac: smallest shape side as a fraction of the image side
    :param max_frac: largest shape side as a fraction of the image side
    :param seed: random seed (the same seed writes the same data set)
    """
    splits = {"train": 48, "val": 16} if splits is None else dict(splits)
    if not splits or any((not isinstance(n, int)) or n < 1 for n in splits.values()):
        raise ValueError(f"splits must map split names to image counts >= 1, got {splits!r}")
    if not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"image_size must be an integer >= 32, got {image_size!r}")
    if not isinstance(max_objects, int) or max_objects < 1:
        raise ValueError(f"max_objects must be an integer >= 1, got {max_objects!r}")
    if not 0.0 < min_frac <= max_frac < 1.0:
        raise ValueError(f"need 0 < min_frac <= max_frac < 1, got {min_frac}, {max_frac}")
    root = os.path.abspath(os.fspath(root))
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)]
    for split, count in splits.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            img, objects = _image(rng, image_size, max_objects, min_frac, max_frac)
            name = f"{i:05d}.png"
            img.save(os.path.join(root, split, name))
            image_id = i + 1
            images.append({"id": image_id, "file_name": name, "width": image_size, "height": image_size})
            for label, poly in objects:
                x0, y0 = poly.min(0)
                x1, y1 = poly.max(0)
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
                    "area": round(_area(poly), 2),
                    "segmentation": [[round(float(v), 2) for v in poly.reshape(-1)]],
                    "iscrowd": 0,
                })
        with open(os.path.join(root, "annotations", f"{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return ShapesDataset(root=root, image_size=image_size, splits=splits)
