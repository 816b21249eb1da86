"""The demo model's synthetic data: one coloured shape on a plain background, and a pixel classifier for it."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw

SIZE = 128  # image side in pixels
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
          "magenta": (210, 50, 200), "cyan": (40, 200, 210)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
CAPTION = "a {color} {shape} on a {background} background"
SIDE_RANGE = (40, 90)  # shape side (bounding box) in pixels: still several latent pixels after the 8x VAE
MARGIN = 4  # pixels of background kept between the shape and the border
SUPERSAMPLE = 4  # drawn this much larger, then box-filtered down: anti-aliased edges


class Label(NamedTuple):
    background: str
    color: str
    shape: str


def labels() -> list[Label]:
    """The 54 (background, colour, shape) combinations, in a fixed order."""
    return [Label(b, c, s) for b, c, s in itertools.product(BACKGROUNDS, COLORS, SHAPES)]


def caption(label: Label) -> str:
    return CAPTION.format(color=label.color, shape=label.shape, background=label.background)


def render(label: Label, left: float, top: float, side: float) -> Image.Image:
    """The shape with its bounding box at (left, top), side × side pixels, on the background."""
    s = SUPERSAMPLE
    image = Image.new("RGB", (SIZE * s, SIZE * s), BACKGROUNDS[label.background])
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = left * s, top * s, (left + side) * s, (top + side) * s
    fill = COLORS[label.color]
    if label.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif label.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # isosceles, apex up, base and height equal to the side
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image.resize((SIZE, SIZE), Image.BOX)


def sample(index: int, seed: int = 0) -> tuple[Label, Image.Image]:
    """Item `index` of the dataset of `seed`: the labels cycle through all 54, position and size are random."""
    label = labels()[index % 54]
    rng = np.random.default_rng([seed, index])
    side = rng.uniform(*SIDE_RANGE)
    left, top = rng.uniform(MARGIN, SIZE - MARGIN - side, size=2)
    return label, render(label, float(left), float(top), float(side))


def write_dataset(folder: str | Path, count: int, seed: int = 0) -> Path:
    """`count` images as NNNNN.png with same-name .txt captions (the layout `pixart extract` reads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        label, image = sample(i, seed)
        image.save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(caption(label) + "\n")
    return folder


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.array([palette[n] for n in names], dtype=np.float64) - rgb, axis=1)
    return names[int(distances.argmin())]


def classify(image: Image.Image | np.ndarray) -> Label:
    """(background, colour, shape) read from the pixels; "none" for a colour and shape that are not there.

    Background: the nearest palette colour to the median border pixel. Shape colour: the nearest palette colour
    to the median of the pixels far from the background. The shape's mask holds the pixels closer to that colour
    than to the background (so a blurred edge splits at its middle). A triangle (apex up) has its centroid 2/3
    of the way down its bounding box. Otherwise the corners tell a square from a circle: a circle leaves the four
    corners of its box (the parts well outside the inscribed ellipse) empty, a square fills them; a shape that
    fills at least 3 of the 4 is a square (one bitten-off corner does not make a square a circle, and one filled
    corner does not make a circle a square).
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    if pixels.max() <= 1.0:  # float images in [0, 1]
        pixels = pixels * 255
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = _nearest(np.median(border, axis=0), BACKGROUNDS)
    bg = np.array(BACKGROUNDS[background], dtype=np.float64)
    distance = np.linalg.norm(pixels - bg, axis=-1)
    far = distance > 60  # every palette colour is > 110 away from every background
    if far.sum() < 50:  # fewer pixels than a 7-pixel square: no shape
        return Label(background, "none", "none")
    core = distance >= np.quantile(distance[far], 0.5)  # the inner half: blurred edges mix in the background
    color = _nearest(np.median(pixels[core], axis=0), COLORS)
    fg = np.array(COLORS[color], dtype=np.float64)
    mask = np.linalg.norm(pixels - fg, axis=-1) < np.linalg.norm(pixels - bg, axis=-1)
    if mask.sum() < 50:  # colour far from the background, but nearer it than to any shape colour
        return Label(background, color, "none")
    rows, cols = np.nonzero(mask)
    # bounds from quantiles, so a few stray pixels do not stretch the box
    top, bottom = np.quantile(rows, [0.002, 0.998])
    left, right = np.quantile(cols, [0.002, 0.998])
    centroid = (rows.mean() - top) / max(bottom - top, 1.0)  # 2/3 for an apex-up triangle, 1/2 for the others
    shape = "triangle" if centroid > 0.58 else "square" if filled_corners(mask, top, bottom, left, right) >= 3 \
        else "circle"
    return Label(background, color, shape)


def filled_corners(mask: np.ndarray, top: float, bottom: float, left: float, right: float) -> int:
    """How many of the 4 corners of the box [top, bottom] x [left, right] the mask fills more than half of; a corner
    is the box's quadrant minus the inscribed ellipse grown by sqrt(1.3) (its blurred edge stays out)."""
    top, bottom, left, right = (int(round(v)) for v in (top, bottom, left, right))
    box = mask[top:bottom + 1, left:right + 1]
    y = ((np.arange(box.shape[0]) + 0.5) / box.shape[0] * 2 - 1)[:, None]  # -1 .. 1 across the box
    x = ((np.arange(box.shape[1]) + 0.5) / box.shape[1] * 2 - 1)[None, :]
    outside = x**2 + y**2 > 1.3
    quadrants = [(y < 0) & (x < 0), (y < 0) & (x >= 0), (y >= 0) & (x < 0), (y >= 0) & (x >= 0)]
    corners = [outside & q for q in quadrants]
    return sum(int(c.any() and box[c].sum() > 0.5 * c.sum()) for c in corners)


def score(images: list, expected: list[Label]) -> float:
    """The fraction of images whose classified background, colour and shape all match."""
    return sum(classify(im) == label for im, label in zip(images, expected, strict=True)) / len(expected)


def generate_all(pipe, seeds: tuple[int, ...] = (0, 1), num_inference_steps: int = 14, guidance_scale: float = 4.5,
                 **call_kwargs) -> tuple[list[Image.Image], list[Label]]:
    """Every one of the 54 captions once per seed, in one pipeline call; the images and their labels."""
    captions = [caption(label) for label in labels()]
    generators = [torch.Generator().manual_seed(s) for _ in captions for s in seeds]  # a prompt's images are adjacent
    images = pipe(captions, num_images_per_prompt=len(seeds), generator=generators,
                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **call_kwargs).images
    return images, [label for label in labels() for _ in seeds]
