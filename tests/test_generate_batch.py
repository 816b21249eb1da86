"""`pixart generate --prompts FILE`: one PNG per image, a manifest, seeds by global index, resume, and torchrun."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pixart
from pixart.cli import main

PROMPTS = ["a red circle on a white background", "the quick brown fox", "a small cactus with a happy face"]
# --no-binning: generate at 128x128 itself, not at the 512x512 bin resized down (4 times faster)
COMMON = ["--steps", "1", "--width", "128", "--height", "128", "--no-binning", "--dtype", "fp32", "--quiet"]
# What pixart.dist gives each of 2 torchrun ranks. oneDNN's 1x1 convolutions sum in an order that depends on the
# thread count, so a 1-process run is only bit-equal to a 2-process one at the same threads per process.
RANK_THREADS = max(1, len(os.sched_getaffinity(0)) // 2)


@contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(model: Path, prompts: Path, outdir: Path, *extra: str) -> None:
    code = main(["generate", "--model", str(model), "--prompts", str(prompts), "--outdir", str(outdir), *COMMON, *extra])
    assert code == 0


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")  # a blank line is no prompt
    return path


@pytest.fixture(scope="module")
def reference(pipeline_dir_512, prompts_file, tmp_path_factory) -> Path:
    """3 prompts x 2 images, seed 10, batches of 2, one process at a torchrun rank's threads."""
    outdir = tmp_path_factory.mktemp("reference")
    run(pipeline_dir_512, prompts_file, outdir, "--n", "2", "--seed", "10", "--batch-size", "2",
        "--threads", str(RANK_THREADS))
    return outdir


def test_prompts_file_writes_a_png_per_image_with_consecutive_seeds_and_a_manifest(reference, pipeline_dir_512):
    names = pngs(reference)
    assert names == ["00000-a-red-circle-on-a-white-background.png", "00001-a-red-circle-on-a-white-background.png",
                     "00002-the-quick-brown-fox.png", "00003-the-quick-brown-fox.png",
                     "00004-a-small-cactus-with-a-happy-face.png", "00005-a-small-cactus-with-a-happy-face.png"]
    lines = manifest(reference)
    assert [line["file"] for line in lines] == names and [line["index"] for line in lines] == list(range(6))
    assert [line["seed"] for line in lines] == list(range(10, 16))
    assert [line["prompt"] for line in lines] == [p for p in PROMPTS for _ in range(2)]
    for line in lines:
        chunk = json.loads(Image.open(reference / line["file"]).text["parameters"])
        assert chunk == {k: v for k, v in line.items() if k not in ("file", "index")}
        assert (chunk["steps"], chunk["guidance"], chunk["width"], chunk["height"]) == (1, 4.5, 128, 128)
        assert chunk["model"] == str(pipeline_dir_512)
    # image 3 is the library's own image of prompt 2 with seed 13, in a batch with image 2 (seed 12)
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    pipe.set_progress_bar_config(disable=True)
    with threads(RANK_THREADS):
        expected = pipe([PROMPTS[1]] * 2, num_inference_steps=1, width=128, height=128,
                        use_resolution_binning=False, generator=[torch.Generator().manual_seed(s) for s in (12, 13)]).images[1]
    assert np.array_equal(pixels(reference / names[3]), np.asarray(expected))


def test_batch_size_changes_no_name_seed_or_setting_and_pixels_only_by_float_rounding(pipeline_dir_512, prompts_file,
                                                                                    tmp_path):
    """Batched convolutions round differently from single ones (oneDNN), so pixels may move by one level, no more."""
    one, three = tmp_path / "b1", tmp_path / "b3"
    run(pipeline_dir_512, prompts_file, one, "-n", "2", "--batch-size", "1")
    run(pipeline_dir_512, prompts_file, three, "-n", "2", "--batch-size", "3")
    assert pngs(one) == pngs(three) and len(pngs(one)) == 6
    assert manifest(one) == manifest(three)
    assert [line["seed"] for line in manifest(one)] == list(range(6))  # the default base seed in batch mode is 0
    for name in pngs(one):
        assert Image.open(one / name).text == Image.open(three / name).text
        diff = np.abs(pixels(one / name) - pixels(three / name))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, name


def test_resume_skips_existing_images_and_fills_in_the_missing_ones_bit_identically(reference, pipeline_dir_512,
                                                                                   prompts_file, tmp_path, capsys):
    outdir = tmp_path / "resumed"
    shutil.copytree(reference, outdir)
    (outdir / "manifest.jsonl").unlink()
    missing = [pngs(outdir)[1], pngs(outdir)[4]]  # one from each of two batches: those batches run again
    for name in missing:
        (outdir / name).unlink()
    kept = {name: (os.stat(outdir / name).st_ino, os.stat(outdir / name).st_mtime_ns) for name in pngs(outdir)}
    capsys.readouterr()
    run(pipeline_dir_512, prompts_file, outdir, "-n", "2", "--seed", "10", "--batch-size", "2",
        "--threads", str(RANK_THREADS))
    assert "generated 2 image(s) (4 already there" in capsys.readouterr().err
    assert {n: (os.stat(outdir / n).st_ino, os.stat(outdir / n).st_mtime_ns) for n in kept} == kept
    for name in pngs(reference):
        assert (outdir / name).read_bytes() == (reference / name).read_bytes(), name
    assert (outdir / "manifest.jsonl").read_bytes() == (reference / "manifest.jsonl").read_bytes()


def test_resume_refuses_images_made_with_other_settings(pipeline_dir_512, prompts_file, tmp_path, capsys):
    outdir = tmp_path / "out"
    run(pipeline_dir_512, prompts_file, outdir, "--sampler", "euler karras")
    first = {name: (outdir / name).read_bytes() for name in pngs(outdir)}
    manifest_before = (outdir / "manifest.jsonl").read_bytes()
    (outdir / pngs(outdir)[2]).unlink()  # an interrupted run, resumed with another sampler
    capsys.readouterr()
    code = main(["generate", "--model", str(pipeline_dir_512), "--prompts", str(prompts_file), "--outdir", str(outdir),
                 *COMMON, "--sampler", "ddim"])
    assert code == 2
    err = capsys.readouterr().err
    assert "was made with other settings (sampler: 'Euler Karras' there, 'DDIM' now)" in err, err
    assert "use another --outdir" in err
    assert len(pngs(outdir)) == 2 and all((outdir / n).read_bytes() == first[n] for n in pngs(outdir))
    assert (outdir / "manifest.jsonl").read_bytes() == manifest_before  # not rewritten with the new settings
    (outdir / pngs(outdir)[0]).write_bytes(b"not a png")
    assert main(["generate", "--model", str(pipeline_dir_512), "--prompts", str(prompts_file), "--outdir",
                 str(outdir), *COMMON, "--sampler", "euler karras"]) == 2
    assert "is in the way: it holds no settings of pixart generate" in capsys.readouterr().err


def test_jsonl_lines_choose_their_sampler(pipeline_dir_512, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle", "sampler": "DDIM"}\n'
                       'a red circle\n'
                       '{"prompt": "a red circle", "sampler": "euler karras"}\n')
    run(pipeline_dir_512, prompts, tmp_path / "out", "--seed", "3", "--steps", "3", "--batch-size", "3")
    names = pngs(tmp_path / "out")
    assert [line.get("sampler") for line in manifest(tmp_path / "out")] == ["DDIM", None, "Euler Karras"]
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    pipe.set_progress_bar_config(disable=True)
    model_scheduler = pipe.scheduler
    for i, changes in enumerate([{"class_name": "DDIMScheduler", "use_karras_sigmas": False}, {},
                                 {"class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}]):
        pipe.scheduler = model_scheduler.replace(**changes)
        want = pipe("a red circle", num_inference_steps=3, width=128, height=128, use_resolution_binning=False,
                    generator=[torch.Generator().manual_seed(3 + i)]).images[0]
        assert np.array_equal(pixels(tmp_path / "out" / names[i]), np.asarray(want).astype(int)), names[i]


def test_jsonl_lines_carry_their_own_settings_and_seeds(pipeline_dir_512, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("a red circle\n"
                       '{"prompt": "a cat", "negative_prompt": "blurry", "seed": 100, "n": 2, "steps": 2, '
                       '"guidance": 1.0, "width": 256, "height": 128}\n'
                       '{"prompt": "the quick brown fox", "guidance": 3}\n')
    run(pipeline_dir_512, prompts, tmp_path / "out", "--seed", "7")
    lines = manifest(tmp_path / "out")
    assert [(line["prompt"], line["seed"]) for line in lines] == [
        ("a red circle", 7), ("a cat", 100), ("a cat", 101), ("the quick brown fox", 10)]
    cat = lines[1]
    assert (cat["negative_prompt"], cat["steps"], cat["guidance"], cat["width"], cat["height"]) == (
        "blurry", 2, 1.0, 256, 128)
    assert Image.open(tmp_path / "out" / cat["file"]).size == (256, 128)
    assert (lines[0]["steps"], lines[0]["negative_prompt"], lines[3]["guidance"]) == (1, "", 3.0)


@pytest.mark.parametrize("content, message", [
    ("", "has no prompts"),
    ("a cat\n{\"prompt\": \"x\", \"sead\": 1}\n", "line 2: unknown key(s) sead"),
    ("a cat\n\n{\"prompt\": \"x\"\n", "line 3: not valid JSON"),
    ("{\"steps\": 2}\n", "line 1: needs a non-empty \"prompt\""),
    ("{\"prompt\": \"x\", \"n\": 0}\n", "line 1: n must be at least 1"),
    ("{\"prompt\": \"x\", \"seed\": \"1\"}\n", "line 1: seed must be an integer, got '1'"),
    ("a cat\n{\"prompt\": \"x\", \"guidance\": NaN}\n", "line 2: guidance must be a finite number, got nan"),
    ("a cat\n{\"prompt\": \"x\", \"sampler\": \"Heun\"}\n", "line 2: unknown scheduler 'Heun': choose one of"),
    ("{\"prompt\": \"x\", \"seed\": 9223372036854775807, \"n\": 2}\n",
     "image 1 would get seed 9223372036854775808, outside 0 to 2**63 - 1 (the image i of a run gets the first seed + i): "
     "change its line's \"seed\""),
])
def test_bad_prompts_file_is_a_clear_error_naming_the_line(tmp_path, capsys, content, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(content)
    code = main(["generate", "--model", "m", "--prompts", str(prompts), "--outdir", str(tmp_path / "out")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--prompts", "{tmp}/nope.txt", "--outdir", "{tmp}/out"], "prompts file {tmp}/nope.txt does not exist"),
    (["--prompts", "{tmp}/p.txt"], "--prompts needs --outdir"),
    (["--prompts", "{tmp}/p.txt", "--outdir", "{tmp}/p.txt/out"], "cannot create --outdir {tmp}/p.txt/out"),
    (["a cat", "--prompts", "{tmp}/p.txt", "--outdir", "{tmp}/out"], "not both"),
    ([], "give either a prompt or --prompts FILE"),
    (["a cat", "--outdir", "{tmp}/out"], "--outdir goes with --prompts"),
    (["--prompts", "{tmp}/p.txt", "--outdir", "{tmp}/out", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["a cat", "--seed", "99999999999999999999", "-o", "{tmp}/a.png"],
     "image 0 would get seed 99999999999999999999, outside 0 to 2**63 - 1"),
    (["a cat", "--seed", "-5", "-o", "{tmp}/a.png"], "change --seed (or -1 for a random one)"),
    (["a cat", "--guidance", "nan", "-o", "{tmp}/a.png"], "--guidance must be a finite number"),
    (["--prompts", "{tmp}/p.txt", "--outdir", "{tmp}/out", "--seed", "-1"], "--seed -1 (random) goes with one prompt"),
])
def test_bad_arguments_are_clear_errors(tmp_path, capsys, args, message):
    (tmp_path / "p.txt").write_text("a cat\n")
    code = main(["generate", "--model", "m", *[a.format(tmp=tmp_path) for a in args]])
    assert code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_two_torchrun_processes_write_the_same_files_as_one(reference, pipeline_dir_512, prompts_file, tmp_path):
    """Rank r takes batches r, r+2, ...; every PNG and the manifest are byte-identical to the 1-process run."""
    torchrun = Path(sys.executable).parent / "torchrun"
    outdir = tmp_path / "two"
    # `-n`, not `--n`: torchrun's own parser takes `--n` for an ambiguous abbreviation of its options
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "pixart", "generate", "--model",
         str(pipeline_dir_512), "--prompts", str(prompts_file), "--outdir", str(outdir), *COMMON,
         "-n", "2", "--seed", "10", "--batch-size", "2"],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generated 6 image(s)" in result.stderr and "x 2 processes" in result.stderr
    assert result.stderr.count("generated 6 image(s)") == 1  # the summary comes from rank 0 only
    assert pngs(outdir) == pngs(reference)
    for name in [*pngs(reference), "manifest.jsonl"]:
        assert (outdir / name).read_bytes() == (reference / name).read_bytes(), name
