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
    assert "with --no-binning, --width and --height must be multiples of 16, got 100x128 (image 0): use 96x128, or " \
           "leave out --no-binning" in capsys.readouterr().err  # the flags, not the pipeline's keyword
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
    assert main(common + ["--cache", "fast", "--overwrite"]) != 0
    assert "does not combine with cache" in capsys.readouterr().err


def test_bad_cache_value_exits_with_usage(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "x", "--model", "m", "--cache", "quick"])
    assert "not a preset" in capsys.readouterr().err


def _run(pipeline_dir, *args):
    return main(["generate", "artistic", "--model", str(pipeline_dir), "--steps", "1", "--width", "128", "--height",
                 "128", "--dtype", "fp32", "--quiet", *args])


def test_an_existing_image_is_never_replaced_without_overwrite(pipeline_dir_512, tmp_path, capsys):
    out = tmp_path / "keep.png"
    out.write_bytes(b"an earlier image")
    (tmp_path / "many-1.png").write_bytes(b"another")
    assert _run(pipeline_dir_512, "-o", str(out), "--seed", "1") == 2
    assert out.read_bytes() == b"an earlier image"
    assert "keep.png already exists: choose another -o, or pass --overwrite" in capsys.readouterr().err
    assert _run(pipeline_dir_512, "-o", str(tmp_path / "many.png"), "-n", "2", "--seed", "1") == 2
    assert not (tmp_path / "many-0.png").exists() and (tmp_path / "many-1.png").read_bytes() == b"another"
    assert _run(pipeline_dir_512, "-o", str(out), "--seed", "1", "--overwrite") == 0
    assert json.loads(Image.open(out).text["parameters"])["seed"] == 1
    (tmp_path / "dir.png").mkdir()
    assert _run(pipeline_dir_512, "-o", str(tmp_path / "dir.png"), "--overwrite") == 2
    assert "dir.png is a folder: give -o a .png file path" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--device", "foo"], "unknown device 'foo': use 'cpu', 'cuda'"),
    (["--width", "0"], "0 pixels: give 8 to 4096 (leave it out for the model's size)"),
    (["--height", "100000"], "100000 pixels: give 8 to 4096"),
    (["--width", "12.5"], "'12.5' is not a whole number of pixels"),
])
def test_a_bad_device_or_size_is_a_usage_error(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "x", "--model", "m", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "x", "--model", "m", "--device", "cuda"])
    assert "device 'cuda': there is no CUDA GPU here (or this torch is a CPU build): use 'cpu'" in capsys.readouterr().err


def test_a_port_out_of_range_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", "m", "--port", "99999"])
    assert exit_info.value.code == 2 and "99999 is not a TCP port: give 1 to 65535" in capsys.readouterr().err


def test_an_infinite_guidance_interval_is_refused_before_writing(pipeline_dir_512, tmp_path, capsys):
    out = tmp_path / "inf.png"
    assert _run(pipeline_dir_512, "-o", str(out), "--guidance-interval", "0", "1e400") == 2
    assert "bounds must be finite numbers" in capsys.readouterr().err and not out.exists()


def test_prompts_files_that_cannot_be_read_name_the_problem(pipeline_dir_512, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a red circle\na \xff square\n")
    line = tmp_path / "size.jsonl"
    line.write_text('{"prompt": "a", "width": 0}\n')
    for prompts, message in ((bad, "bad.txt, line 2: not UTF-8 text (byte 0xff): save the file as UTF-8"),
                             (tmp_path, "is a folder: give the text or JSONL file of prompts"),
                             (line, "size.jsonl, line 1: width must be 8 to 4096 pixels")):
        assert main(["generate", "--prompts", str(prompts), "--outdir", str(tmp_path / "o"), "--model",
                     str(pipeline_dir_512)]) == 2
        assert message in capsys.readouterr().err


def test_one_prompts_many_images_run_in_batches_of_at_most_four(pipeline_dir_512, tmp_path, monkeypatch):
    sizes = []
    original = pixart.PixArtAlphaPipeline.__call__

    def recording(self, prompt, *args, **kwargs):
        sizes.append(len(prompt))
        return original(self, prompt, *args, **kwargs)

    monkeypatch.setattr(pixart.PixArtAlphaPipeline, "__call__", recording)
    assert _run(pipeline_dir_512, "-o", str(tmp_path / "b.png"), "-n", "6", "--seed", "0") == 0
    assert sizes == [4, 2] and len(list(tmp_path.glob("b-*.png"))) == 6


def test_a_failed_write_names_the_fix_and_leaves_nothing_half_written(tmp_path):
    import errno

    from pixart.generate import _write_atomic

    target = tmp_path / "manifest.jsonl"
    target.write_text("the previous manifest\n")

    def full_disk(tmp):
        tmp.write_text("half of it")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"could not write .*manifest.jsonl: No space left on device \(free some disk "
                                      r"space or choose another --outdir\)"):
        _write_atomic(target, full_disk, "--outdir")
    assert target.read_text() == "the previous manifest\n" and list(tmp_path.iterdir()) == [target]


def test_int4_on_a_model_its_groups_do_not_divide_names_the_fixes():
    from pixart.quant import Int4Linear

    with pytest.raises(ValueError, match=r"quantize it to int8 instead \(--quantize-text-encoder int8\), or "
                                         r"QuantSpec\(4, 32\) in Python"):
        Int4Linear(96, 8, 128)


def test_a_lora_or_quantization_is_recorded_and_a_resume_with_other_ones_stops(pipeline_dir_512, tmp_path, capsys):
    from safetensors.torch import save_file

    lora = tmp_path / "style.safetensors"
    save_file({f"transformer.transformer_blocks.0.attn1.to_q.lora_{n}.weight": torch.randn(shape) * 0.1
               for n, shape in (("A", (4, 48)), ("B", (48, 4)))}, lora)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    common = ["generate", "--prompts", str(prompts), "--outdir", str(tmp_path / "out"), "--model",
              str(pipeline_dir_512), "--steps", "1", "--width", "128", "--height", "128", "--dtype", "fp32", "--quiet"]
    assert main([*common, "--lora", f"{lora}:0.5"]) == 0
    image = next((tmp_path / "out").glob("*.png"))
    assert json.loads(Image.open(image).text["parameters"])["lora"] == [[str(lora), 0.5]]
    manifest = json.loads((tmp_path / "out" / "manifest.jsonl").read_text())
    assert manifest["lora"] == [[str(lora), 0.5]]
    capsys.readouterr()
    for other in ([], ["--lora", f"{lora}:0.3"], ["--lora", f"{lora}:0.5", "--quantize-transformer", "int8"]):
        assert main([*common, *other]) == 2  # was: "generated 0 image(s)", the old images kept as this run's
        assert "was made with other settings" in capsys.readouterr().err
    assert main([*common, "--lora", f"{lora}:0.5"]) == 0  # the same run resumes
