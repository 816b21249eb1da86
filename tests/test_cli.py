"""`pixart generate` end to end on a tiny saved folder, and its error messages."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import pixart
from pixart.cli import main


def test_generate_writes_png_with_settings_equal_to_the_library(pipeline_dir_512, tmp_path, capsys):
    out = tmp_path / "img.png"
    code = main(["generate", "a red circle on a white background", "--model", str(pipeline_dir_512), "-o", str(out),
                 "--seed", "7", "--steps", "2", "--width", "256", "--height", "256", "--dtype", "fp32", "--quiet"])
    assert code == 0, capsys.readouterr().err
    image = Image.open(out)
    settings = json.loads(image.text["parameters"])
    assert settings["seed"] == 7 and settings["steps"] == 2 and settings["prompt"].startswith("a red circle")
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a red circle on a white background", num_inference_steps=2, width=256, height=256,
                    generator=[torch.Generator().manual_seed(7)]).images[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))


def test_generate_several_images_gets_consecutive_seeds(pipeline_dir_512, tmp_path):
    out = tmp_path / "many.png"
    assert main(["generate", "artistic", "--model", str(pipeline_dir_512), "-o", str(out), "-n", "2", "--seed", "3",
                 "--steps", "1", "--width", "128", "--height", "128", "--dtype", "fp32", "--quiet"]) == 0
    seeds = [json.loads(Image.open(tmp_path / f"many-{i}.png").text["parameters"])["seed"] for i in range(2)]
    assert seeds == [3, 4]


def test_seed_minus_one_draws_a_random_seed_as_the_server_does(pipeline_dir_512, tmp_path, monkeypatch):
    monkeypatch.setattr("random.randrange", lambda n: 12345)  # what the CLI draws; -1 itself would reach torch
    out = tmp_path / "random.png"
    assert main(["generate", "artistic", "--model", str(pipeline_dir_512), "-o", str(out), "--seed", "-1",
                 "--steps", "1", "--width", "128", "--height", "128", "--dtype", "fp32", "--quiet"]) == 0
    assert json.loads(Image.open(out).text["parameters"])["seed"] == 12345


def test_generate_with_an_original_pth_transformer(pipeline_dir_512, tmp_path):
    """--transformer swaps in a single-file checkpoint (here the folder's own weights, re-saved as .safetensors)."""
    from safetensors.torch import load_file, save_file

    single = tmp_path / "transformer.safetensors"
    save_file(load_file(pipeline_dir_512 / "transformer" / "diffusion_pytorch_model.safetensors"), single)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    common = ["--seed", "1", "--steps", "1", "--width", "128", "--height", "128", "--dtype", "fp32", "--quiet"]
    assert main(["generate", "artistic", "--model", str(pipeline_dir_512), "-o", str(a), *common]) == 0
    assert main(["generate", "artistic", "--model", str(pipeline_dir_512), "-o", str(b), "--transformer", str(single),
                 *common]) == 0
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    code = main(["generate", "x", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "x.png")])
    assert code == 2
    assert "neither a local folder nor a Hub id" in capsys.readouterr().err


def test_bad_size_without_binning_is_a_clear_error(pipeline_dir_512, tmp_path, capsys):
    code = main(["generate", "x", "--model", str(pipeline_dir_512), "-o", str(tmp_path / "x.png"), "--no-binning",
                 "--width", "100", "--height", "128", "--quiet", "--dtype", "fp32"])
    assert code == 2
    assert "multiples of 16" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_output_folder_must_exist(pipeline_dir_512, tmp_path, capsys):
    code = main(["generate", "x", "--model", str(pipeline_dir_512), "-o", str(tmp_path / "no" / "x.png")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_unknown_flag_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "x", "--model", "m", "--stepz", "3"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --stepz" in capsys.readouterr().err


def test_speed_options_reach_the_pipeline_and_are_recorded(pipeline_dir_512, tmp_path):
    out = tmp_path / "fast.png"
    assert main(["generate", "artistic", "--model", str(pipeline_dir_512), "-o", str(out), "--seed", "2", "--steps",
                 "3", "--width", "128", "--height", "128", "--no-binning", "--dtype", "fp32", "--quiet",
                 "--guidance-interval", "0.28", "5.42", "--cache", "fast"]) == 0
    image = Image.open(out)
    settings = json.loads(image.text["parameters"])
    assert settings["guidance_interval"] == [0.28, 5.42] and settings["cache"] == "fast"
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("artistic", num_inference_steps=3, width=128, height=128, use_resolution_binning=False,
                    generator=[torch.Generator().manual_seed(2)], guidance_interval=(0.28, 5.42), cache="fast").images[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))


def test_cuda_graphs_flag_reaches_the_pipeline_and_is_checked_against_cache(pipeline_dir_512, tmp_path, capsys):
    out = tmp_path / "graphs.png"
    common = ["generate", "artistic", "--model", str(pipeline_dir_512), "-o", str(out), "--seed", "2", "--steps", "2",
              "--width", "128", "--height", "128", "--no-binning", "--dtype", "fp32", "--quiet", "--cuda-graphs"]
    assert main(common) == 0  # on a CPU the steps run eagerly: the option is recorded and changes nothing
    assert json.loads(Image.open(out).text["parameters"])["cuda_graphs"] is True
    assert main(common + ["--cache", "fast"]) != 0
    assert "does not combine with cache" in capsys.readouterr().err


def test_bad_cache_value_exits_with_usage(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "x", "--model", "m", "--cache", "quick"])
    assert "not a preset" in capsys.readouterr().err
