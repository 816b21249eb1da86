"""The demo model's data generator and pixel classifier, and the shipped model itself (the 54-caption proof)."""
from __future__ import annotations

import numpy as np
import torch
import pytest
from PIL import Image, ImageFilter

from pixart import PixArtAlphaPipeline, demo
from pixart.cli import main
from pixart.demo import shapes
from pixart.weights.hub import resolve


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


def test_classifier_reads_a_square_by_its_corners_and_a_circle_by_their_absence():
    """A square with a corner bitten off (a quarter of its side each way, 6% of its area: the way the demo model
    fails a corner) is still a square; so is a rounded square; a circle with a blob at one corner is still a circle;
    a square with two corners gone is not called a square."""
    label = shapes.Label("white", "red", "square")
    square = np.asarray(shapes.render(label, 30, 30, 64)).copy()
    bitten = square.copy()
    bitten[30:46, 30:46] = 255
    assert shapes.classify(bitten) == label
    two_gone = bitten.copy()
    two_gone[78:94, 78:94] = 255
    assert shapes.classify(two_gone).shape == "circle"
    rounded = np.asarray(shapes.render(label, 30, 30, 64).filter(ImageFilter.GaussianBlur(4)))
    assert shapes.classify(rounded) == label
    circle = np.asarray(shapes.render(label._replace(shape="circle"), 30, 30, 64)).copy()
    circle[30:42, 30:42] = shapes.COLORS["red"]  # a corner filled in
    assert shapes.classify(circle).shape == "circle"



@pytest.fixture(scope="module")
def demo_pipe() -> PixArtAlphaPipeline:
    pipe = PixArtAlphaPipeline.from_pretrained("demo")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def classified(demo_pipe) -> tuple[list[shapes.Label], list[shapes.Label]]:
    """The 54 captions x 2 seeds from the shipped model (one pipeline call), read back by the classifier."""
    images, labels = shapes.generate_all(demo_pipe, seeds=(0, 1))
    return [shapes.classify(image) for image in images], labels


def fraction(got: list[shapes.Label], labels: list[shapes.Label], field: str | None = None) -> float:
    """The fraction of images classified as labelled: all three fields, or just `field`."""
    right = [(g == w) if field is None else getattr(g, field) == getattr(w, field) for g, w in zip(got, labels)]
    return sum(right) / len(right)


def test_demo_model_follows_the_background_and_colour_of_the_caption(classified):
    """Background and shape colour nearly always right (the shipped model: 108 and 106 of 108 images; the margin
    allows a few images to flip on another CPU's float rounding): the captions reach the transformer through T5."""
    got, labels = classified
    background, color = fraction(got, labels, "background"), fraction(got, labels, "color")
    assert background >= 0.95 and color >= 0.9, f"background {background:.1%}, colour {color:.1%} of 108 images"


def test_demo_model_draws_the_shape_kind_of_the_caption_and_triangles(classified):
    """Shape kind well above chance (1/3) and triangles drawn as triangles (the shipped model: 103 of 108 and 35 of
    36): a model that draws one shape for every caption fails here even if its colours are right."""
    got, labels = classified
    triangles = [g.shape == "triangle" for g, w in zip(got, labels) if w.shape == "triangle"]
    assert fraction(got, labels, "shape") >= 0.85, f"shape kind {fraction(got, labels, 'shape'):.1%}"
    assert sum(triangles) / len(triangles) >= 0.7, f"{sum(triangles)} of {len(triangles)} triangles"


def test_demo_model_draws_the_54_captions(classified):
    """Issue 4's proof: at least 90% of the images have the right background, shape colour and shape kind (the
    shipped model: 102 of 108, 94.4%; by the older fill-ratio shape rule, which calls a square with one bitten-off
    corner a circle, 93 of 108)."""
    got, labels = classified
    score = fraction(got, labels)
    wrong = [(w, g) for g, w in zip(got, labels) if g != w]
    assert score >= 0.9, f"classifier score {score:.1%} < 90%; first misses (expected, got): {wrong[:3]}"


def test_demo_name_is_the_shipped_folder_offline_with_scaled_bins(demo_pipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve("demo") == demo.MODEL and resolve("demo", "vae") == demo.MODEL / "vae"
    size = sum(p.stat().st_size for p in demo.MODEL.rglob("*") if p.is_file())
    assert size <= 30e6, f"the demo model takes {size / 1e6:.1f} MB"
    assert demo_pipe.default_size == 128
    # 100x200 snaps to the 1024 table's 1:2 bin (704x1408) scaled to 128 px (88x176) and rounded to multiples of
    # 16 px (the VAE's 8 x the patch of 2): 96x176; the image is then resized and cropped back
    latents = demo_pipe("a red circle", height=100, width=200, num_inference_steps=1, output_type="latent").images
    assert latents.shape[-2:] == (96 // 8, 176 // 8)
    image = demo_pipe("a red circle", height=100, width=200, num_inference_steps=1).images[0]
    assert image.size == (200, 100)


def test_pixart_generate_with_the_demo_model(tmp_path):
    out = tmp_path / "circle.png"
    assert main(["generate", "a red circle on a white background", "--model", "demo", "-o", str(out), "--seed", "0",
                 "--steps", "14", "--quiet"]) == 0
    image = Image.open(out)
    assert image.size == (128, 128)
    assert shapes.classify(image)[:2] == ("white", "red")


def test_diffusers_draws_the_same_images_from_the_demo_folder(demo_pipe):
    """The shipped folder in diffusers' own PixArtAlphaPipeline: the same tokens for the 54 captions (its
    tokenizer.json, which transformers reads instead of converting the BPE spiece.model to a Unigram model that splits
    "black") and the same images within 2e-3 (the pipeline parity bound of tests/test_pipeline.py)."""
    import diffusers

    theirs = diffusers.PixArtAlphaPipeline.from_pretrained(str(demo.MODEL))
    theirs.set_progress_bar_config(disable=True)
    captions = [shapes.caption(label) for label in shapes.labels()]
    ours_ids = demo_pipe.tokenizer(captions, padding="max_length", max_length=120, return_tensors="pt").input_ids
    their_ids = theirs.tokenizer(captions, padding="max_length", max_length=120, return_tensors="pt").input_ids
    assert ours_ids.tolist() == their_ids.tolist()
    prompts = ["a red square on a black background", "a cyan triangle on a gray background"]
    kwargs = dict(num_inference_steps=14, output_type="np")
    ours = demo_pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs).images
    expected = theirs(prompts, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                      use_resolution_binning=False, **kwargs).images  # diffusers has no bins for 128 px
    assert np.abs(ours - expected).max() < 2e-3


def test_fast_cache_stays_closer_to_the_full_images_than_as_few_plain_steps(demo_pipe):
    """cache="fast" runs the blocks at 15 of 20 steps (the other 5 reuse the last residual). On the trained demo
    model it must stay closer to the 20-step images than simply sampling 15 steps: 54 captions, seed 0, PSNR pooled
    over all images; measured 34.7 dB against 27.6 dB (over both seeds, bench/speed.py: 34.6 dB), where TeaCache's
    own rule (threshold 0.1, one reuse in a row), which skips 5 middle steps instead, gives 26.0 dB. Bounds: at
    least 31 dB, and 2 dB better than 15 plain steps."""
    def images(steps: int, **kwargs) -> np.ndarray:
        return np.asarray(shapes.generate_all(demo_pipe, seeds=(0,), num_inference_steps=steps, output_type="np",
                                              **kwargs)[0], dtype=np.float64)

    def psnr(a: np.ndarray, b: np.ndarray) -> float:
        return float(10 * np.log10(1 / np.mean((a - b) ** 2)))

    ran = []
    blocks = demo_pipe.transformer.run_blocks
    demo_pipe.transformer.run_blocks = lambda *args: (ran.append(1), blocks(*args))[1]
    try:
        cached = images(20, cache="fast")
    finally:
        del demo_pipe.transformer.run_blocks
    assert len(ran) == 15
    full = images(20)
    cached_db, plain_db = psnr(cached, full), psnr(images(15), full)
    assert cached_db >= 31 and cached_db >= plain_db + 2, (cached_db, plain_db)
