"""The demo model's data generator and pixel classifier, and the shipped model itself (the 54-caption proof)."""
from __future__ import annotations

import numpy as np
from PIL import ImageFilter

from pixart.demo import shapes


def test_generator_is_deterministic_and_covers_every_label():
    first = [shapes.sample(i, seed=3) for i in range(60)]
    again = [shapes.sample(i, seed=3) for i in range(60)]
    other = shapes.sample(0, seed=4)[1]
    assert all(a[0] == b[0] and np.array_equal(np.asarray(a[1]), np.asarray(b[1])) for a, b in zip(first, again))
    assert not np.array_equal(np.asarray(first[0][1]), np.asarray(other))
    assert {label for label, _ in first} == set(shapes.labels()) and len(shapes.labels()) == 54
    assert shapes.caption(shapes.Label("gray", "cyan", "triangle")) == "a cyan triangle on a gray background"
    array = np.asarray(first[0][1])
    assert array.shape == (128, 128, 3) and array.dtype == np.uint8
    assert (array[0] == shapes.BACKGROUNDS[first[0][0].background]).all()  # the margin keeps the border plain


def test_dataset_folder_has_images_with_same_name_captions(tmp_path):
    shapes.write_dataset(tmp_path, 3, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000.png", "00000.txt", "00001.png", "00001.txt", "00002.png", "00002.txt"]
    assert (tmp_path / "00001.txt").read_text() == shapes.caption(shapes.sample(1)[0]) + "\n"


def test_classifier_reads_ground_truth_blurred_and_shifted_images():
    rng = np.random.default_rng(0)
    items = [shapes.sample(i, seed=1) for i in range(108)]
    labels = [label for label, _ in items]
    assert shapes.score([im for _, im in items], labels) == 1.0
    # what a VAE does to an image, overdone: blur, a colour shift of 12 levels and noise of 8
    degraded = [np.clip(np.asarray(im.filter(ImageFilter.GaussianBlur(2.5)), dtype=np.float64) + 12
                        + rng.normal(0, 8, (128, 128, 3)), 0, 255) for _, im in items]
    assert shapes.score(degraded, labels) == 1.0
    # it discriminates: neighbouring items differ in shape, so labels shifted by one all fail; a plain image has none
    assert shapes.score([im for _, im in items], labels[1:] + labels[:1]) == 0.0
    assert shapes.classify(np.full((128, 128, 3), 128, np.uint8)) == shapes.Label("gray", "none", "none")
    faint = np.full((128, 128, 3), 255, np.uint8)
    faint[40:60, 40:60] = 200  # off the background, yet nearer to it than to any shape colour
    assert shapes.classify(faint).shape == "none"

