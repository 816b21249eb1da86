"""pixart extract and the features reader: format, parity with the pipeline's encoders, resume, torchrun, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pixart.bins import ASPECT_RATIO_512_BIN, classify_height_width_bin, resolution_bin_table
from pixart.cli import main
from pixart.models.vae import AutoencoderKL
from pixart.pipeline import PixArtAlphaPipeline
from pixart.train.data import Features, epoch_batches, read_items
from pixart.train.extract import Options, extract

D, C, L = 6, 4, 8  # caption dim, latent channels, max_length of the hand-written folders


def write_features(root: Path, buckets: dict[tuple[int, int], int], seed: int = 0) -> dict[str, dict]:
    """A features folder written by hand (two ranks' files), independent of the writer; returns id -> tensors."""
    g = torch.Generator().manual_seed(seed)
    (root / "shards").mkdir(parents=True)
    (root / "items").mkdir()
    index = {"format": "pixart-features", "version": 1, "max_length": L, "caption_dim": D, "latent_channels": C,
             "vae_scale_factor": 8, "scaling_factor": 0.18215, "resolution": 64, "model": "m", "encoder": "e"}
    (root / "index.json").write_text(json.dumps(index))
    save_file({"caption": torch.randn(1, D, generator=g), "mask": torch.ones(1, dtype=torch.int64)},
              str(root / "null.safetensors"))
    truth, shards, lines = {}, [{}, {}], ["", ""]
    n = 0
    for (h, w), count in buckets.items():
        for _ in range(count):
            rank, key = n % 2, f"img/{n:03d}.png"
            tokens = 1 + n % L
            truth[key] = {"caption": torch.randn(tokens, D, generator=g).to(torch.bfloat16),
                          "mean": torch.randn(C, h // 8, w // 8, generator=g),
                          "std": torch.rand(C, h // 8, w // 8, generator=g)}
            shards[rank].update({f"{key}/{name}": t for name, t in truth[key].items()})
            lines[rank] += json.dumps({"id": key, "prompt": f"p{n}", "height": h, "width": w, "bucket": [h, w],
                                       "shard": f"shards/rank{rank}-00000.safetensors", "tokens": tokens}) + "\n"
            n += 1
    for rank in (0, 1):
        save_file(shards[rank], str(root / f"shards/rank{rank}-00000.safetensors"))
        (root / f"items/rank{rank}.jsonl").write_text(lines[rank])
    return truth


def test_reader_pads_captions_and_reads_latents_of_a_hand_written_folder(tmp_path):
    truth = write_features(tmp_path, {(64, 64): 3, (48, 80): 2})
    features = Features(tmp_path)
    assert len(features) == 5 and [it["id"] for it in features.items] == sorted(truth)
    assert features.buckets() == {(64, 64): [0, 1, 2], (48, 80): [3, 4]}
    for i, item in enumerate(features.items):
        got, want = features[i], truth[item["id"]]
        n = want["caption"].shape[0]
        assert got["caption"].shape == (L, D) and got["caption"].dtype == torch.float32
        assert torch.equal(got["caption"][:n], want["caption"].float()) and not got["caption"][n:].any()
        assert got["mask"].dtype == torch.int64 and got["mask"].tolist() == [1] * n + [0] * (L - n)
        assert torch.equal(got["mean"], want["mean"]) and torch.equal(got["std"], want["std"])
        assert got["prompt"] == item["prompt"]
    caption, mask = features.null_caption()
    assert caption.shape == (L, D) and mask.tolist() == [1] + [0] * (L - 1) and not caption[1:].any()


def test_batches_equal_the_items_cut_to_the_batch_length_from_disk_and_from_memory(tmp_path):
    write_features(tmp_path, {(64, 64): 4})
    null_caption, null_mask = Features(tmp_path).null_caption()
    for cache_bytes in (0, 2 << 30):  # nothing kept in memory (every read from the shard), everything kept
        features = Features(tmp_path, cache_bytes=cache_bytes)
        for _ in range(2):  # the second pass reads the memory copies where they were kept
            indices, null, length = [3, 0, 2], [False, True, False], 2
            got = features.batch(indices, length, null=null)
            items = [features[i] for i in indices]
            want_caption = torch.stack([null_caption if d else it["caption"] for it, d in zip(items, null)])
            want_mask = torch.stack([null_mask if d else it["mask"] for it, d in zip(items, null)])
            assert torch.equal(got["caption"], want_caption[:, :length])
            assert torch.equal(got["mask"], want_mask[:, :length])
            assert torch.equal(got["mean"], torch.stack([it["mean"] for it in items]))
            assert torch.equal(got["std"], torch.stack([it["std"] for it in items]))
        assert sorted(features._cache) == ([] if cache_bytes == 0 else [0, 2, 3])  # the items read


def test_epoch_batches_are_one_bucket_each_deterministic_and_reshuffled_per_epoch(tmp_path):
    write_features(tmp_path, {(64, 64): 9, (48, 80): 5, (80, 48): 1})
    features = Features(tmp_path)
    buckets = {i: tuple(it["bucket"]) for i, it in enumerate(features.items)}
    batches = epoch_batches(features, 2, seed=3, epoch=0)
    assert batches == epoch_batches(features, 2, seed=3, epoch=0)
    assert all(len(b) == 2 and len({buckets[i] for i in b}) == 1 for b in batches)
    assert len(batches) == 4 + 2  # each bucket's incomplete last batch dropped; the lone 80x48 item too
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat)
    assert epoch_batches(features, 2, seed=3, epoch=1) != batches
    assert epoch_batches(features, 2, seed=4, epoch=0) != batches
    with pytest.raises(ValueError, match="larger than every aspect-ratio bucket"):
        epoch_batches(features, 10, seed=0, epoch=0)


def test_reader_ignores_a_cut_off_last_line_and_names_a_missing_folder(tmp_path):
    write_features(tmp_path / "f", {(64, 64): 2})
    with open(tmp_path / "f/items/rank0.jsonl", "a") as f:
        f.write('{"id": "img/9')  # a run killed mid-append
    assert len(Features(tmp_path / "f")) == 2
    with pytest.raises(FileNotFoundError, match="no index.json"):
        Features(tmp_path / "nothing")


# Extraction with the tiny pipeline of conftest (sample_size 64, VAE factor 8, patch 2: buckets are multiples of 16)

SIZES = {"a.png": (64, 64), "sub/b.jpg": (32, 64), "sub/deeper/c.webp": (48, 48), "d.png": (64, 32)}
FAST = Options(resolution=64, batch_size=2, shard_size=2, quiet=True)


def make_images(root: Path, sizes: dict[str, tuple[int, int]] = SIZES, captions: bool = True) -> dict[str, str]:
    """Random images of the given (height, width) with same-name captions; returns id -> caption."""
    rng = np.random.default_rng(len(sizes))
    out = {}
    for n, (name, (h, w)) in enumerate(sizes.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=95)
        out[name] = f"a red circle number {n}"
        if captions:
            path.with_suffix(".txt").write_text(out[name] + "\n")
    return out


def counting(monkeypatch) -> dict[str, int]:
    """Count the captions T5 encodes and the images the VAE encodes."""
    calls = {"captions": 0, "images": 0}
    encode_prompt, vae_encode = PixArtAlphaPipeline.encode_prompt, AutoencoderKL.encode

    def count_prompts(self, prompt, *args, **kwargs):
        calls["captions"] += len(prompt)
        return encode_prompt(self, prompt, *args, **kwargs)

    def count_images(self, x, *args, **kwargs):
        calls["images"] += x.shape[0]
        return vae_encode(self, x, *args, **kwargs)

    monkeypatch.setattr(PixArtAlphaPipeline, "encode_prompt", count_prompts)
    monkeypatch.setattr(AutoencoderKL, "encode", count_images)
    return calls


def contents(root: Path) -> dict[str, dict]:
    """id -> everything the reader gives for it (with the item's bucket and shard-independent fields)."""
    features = Features(root)
    return {item["id"]: {**features[i], "bucket": tuple(item["bucket"])} for i, item in enumerate(features.items)}


@pytest.fixture(scope="module")
def whole(pipeline_dir_512, tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """The SIZES dataset and its features, extracted in one uninterrupted run by one process."""
    root = tmp_path_factory.mktemp("whole")
    make_images(root / "ds")
    extract(root / "ds", str(pipeline_dir_512), root / "f", FAST)
    return root / "ds", contents(root / "f")


def test_captions_and_latents_equal_the_pipelines_own_encoders(pipeline_dir_512, tmp_path):
    captions = make_images(tmp_path / "ds", {"a.png": (64, 64), "b.png": (64, 64), "c.png": (48, 48)})
    extract(tmp_path / "ds", str(pipeline_dir_512), tmp_path / "f32", replace(FAST, dtype=torch.float32))
    extract(tmp_path / "ds", str(pipeline_dir_512), tmp_path / "bf16", FAST)
    got, got_bf16 = contents(tmp_path / "f32"), contents(tmp_path / "bf16")
    pipe = PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, transformer=None, memory="full")
    for key in ("a.png", "b.png"):  # 64x64 images in the 64x64 bucket: no resampling, pixels / 127.5 - 1
        embeds, mask, _, _ = pipe.encode_prompt(captions[key], do_classifier_free_guidance=False,
                                                clean_caption=True, max_sequence_length=120)
        n = int(mask.sum())
        assert got[key]["mask"].tolist() == mask[0].tolist()
        # fp32 on both sides; only the batch composition differs (1 vs 2 captions): 1e-5
        torch.testing.assert_close(got[key]["caption"][:n], embeds[0, :n], atol=1e-5, rtol=1e-5)
        # bf16 storage: 8 mantissa bits, relative error 2^-8
        torch.testing.assert_close(got_bf16[key]["caption"][:n], embeds[0, :n], atol=1e-2, rtol=2 ** -8)
        pixels = torch.from_numpy(np.asarray(Image.open(tmp_path / "ds" / key).convert("RGB")).copy())
        image = pixels.permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            posterior = pipe.vae.encode(image).latent_dist
        torch.testing.assert_close(got[key]["mean"], posterior.mean[0], atol=1e-5, rtol=1e-5)  # batch of 2 vs 1
        torch.testing.assert_close(got[key]["std"], posterior.std[0], atol=1e-5, rtol=1e-5)
        assert got[key]["bucket"] == (64, 64) and got[key]["mean"].shape == (4, 8, 8)
    null, _, _, _ = pipe.encode_prompt("", do_classifier_free_guidance=False, max_sequence_length=120)
    caption, mask = Features(tmp_path / "f32").null_caption()
    torch.testing.assert_close(caption[: int(mask.sum())], null[0, : int(mask.sum())], atol=1e-5, rtol=1e-5)
    index = json.loads((tmp_path / "f32/index.json").read_text())
    assert index["caption_dim"] == 32 and index["latent_channels"] == 4 and index["resolution"] == 64


def test_bucketing_picks_the_nearest_bin_for_non_square_images(whole):
    got = whole[1]
    # 1024 table x 64/1024 snapped to 16 px: ratio 0.5 -> 704x1408 -> 44x88 -> 48x96; 2.0 -> 1408x704 -> 96x48
    assert got["sub/b.jpg"]["bucket"] == (48, 96) and got["sub/b.jpg"]["mean"].shape == (4, 6, 12)
    assert got["d.png"]["bucket"] == (96, 48) and got["d.png"]["mean"].shape == (4, 12, 6)
    assert got["sub/deeper/c.webp"]["bucket"] == (64, 64)
    assert resolution_bin_table(512, 16) is ASPECT_RATIO_512_BIN  # the model's own size uses the published table
    assert classify_height_width_bin(32, 64, ASPECT_RATIO_512_BIN) == (352, 704)
    assert all(v % 16 == 0 and v >= 16 for hw in resolution_bin_table(200, 16).values() for v in hw)


def test_resume_after_a_kill_encodes_only_what_is_left(pipeline_dir_512, whole, tmp_path, monkeypatch):
    make_images(tmp_path / "ds")
    vae_encode = AutoencoderKL.encode

    def killed_on_second_shard(self, x, *args, **kwargs):
        killed_on_second_shard.calls += 1
        if killed_on_second_shard.calls > 2:  # shard 1 holds 2 buckets (2 calls); die in shard 2
            raise KeyboardInterrupt
        return vae_encode(self, x, *args, **kwargs)

    killed_on_second_shard.calls = 0
    monkeypatch.setattr(AutoencoderKL, "encode", killed_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        extract(tmp_path / "ds", str(pipeline_dir_512), tmp_path / "f", FAST)
    monkeypatch.undo()
    assert len(read_items(tmp_path / "f")) == 2
    (tmp_path / "f/shards/rank0-00007.safetensors.tmp").write_bytes(b"half a file")
    with open(tmp_path / "f/items/rank0.jsonl", "a") as f:
        f.write('{"id": "x')  # cut off mid-append

    calls = counting(monkeypatch)
    extract(tmp_path / "ds", str(pipeline_dir_512), tmp_path / "f", FAST)
    assert calls == {"captions": 0, "images": 2}  # captions were staged before the kill; 2 images were left
    assert not list((tmp_path / "f").glob("*/*.tmp")) and not list((tmp_path / "f/staging").iterdir())
    got, want = contents(tmp_path / "f"), whole[1]
    assert got.keys() == want.keys() == SIZES.keys()
    for key in want:
        assert got[key]["bucket"] == want[key]["bucket"]
        for name in ("caption", "mask", "mean", "std"):
            torch.testing.assert_close(got[key][name], want[key][name], atol=1e-5, rtol=1e-5)  # batching only

    calls = counting(monkeypatch)
    make_images(tmp_path / "ds", {"e.png": (40, 40)})
    extract(tmp_path / "ds", str(pipeline_dir_512), tmp_path / "f", FAST)
    assert calls == {"captions": 1, "images": 1}  # only the new image
    assert len(Features(tmp_path / "f")) == 5


def test_data_info_json_layouts(pipeline_dir_512, tmp_path):
    """The repository's InternData/partition/data_info.json with images in InternImgs/, and paths beside the json."""
    root = tmp_path / "data"
    make_images(root / "InternImgs", {"000.png": (64, 64), "sub/001.png": (32, 64)}, captions=False)
    make_images(root / "InternData/partition", {"local.png": (48, 48)}, captions=False)
    entries = [{"path": p, "prompt": f"caption of {p}", "height": 64, "width": 64, "ratio": 1.0}
               for p in ("000.png", "sub/001.png", "local.png")]
    (root / "InternData/partition/data_info.json").write_text(json.dumps(entries))
    extract(root / "InternData/partition/data_info.json", str(pipeline_dir_512), tmp_path / "f", FAST)
    features = Features(tmp_path / "f")
    assert [(it["id"], it["prompt"]) for it in features.items] == sorted((e["path"], e["prompt"]) for e in entries)
    assert features.items[2]["bucket"] == [48, 96]  # sub/001.png is 32x64, read from InternImgs/

    entries.append({"path": "gone.png", "prompt": "x"})
    (root / "InternData/partition/data_info.json").write_text(json.dumps(entries))
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in .* are not found .*InternImgs.*: gone.png"):
        extract(root / "InternData/partition/data_info.json", str(pipeline_dir_512), tmp_path / "f", FAST)


def test_two_torchrun_processes_extract_the_same_items_as_one(pipeline_dir_512, whole, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pixart",
         "extract", str(whole[0]), "--model", str(pipeline_dir_512), "-o", str(tmp_path / "two"),
         "--resolution", "64", "--batch-size", "2", "--shard-size", "2", "--quiet"],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("extracted 4 item(s)") == 1  # the summary comes from rank 0 only
    assert sorted(p.name for p in (tmp_path / "two/items").iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    one, two = whole[1], contents(tmp_path / "two")
    assert one.keys() == two.keys() == SIZES.keys()
    for key in one:
        assert one[key]["bucket"] == two[key]["bucket"]
        for name in ("caption", "mask", "mean", "std"):
            torch.testing.assert_close(two[key][name], one[key][name], atol=1e-5, rtol=1e-5)  # batching only


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["extract", *map(str, args), "--resolution", "64", "--quiet"])
    return code, capsys.readouterr().err


def test_bad_inputs_are_clear_errors(pipeline_dir_512, tmp_path, capsys, caplog):
    model = str(pipeline_dir_512)
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, tmp_path / "empty", "--model", model, "-o", tmp_path / "f")
    assert code == 2 and "holds no captioned images" in err

    make_images(tmp_path / "ds", {"a.png": (32, 32), "b.png": (32, 32)})
    (tmp_path / "ds/b.txt").unlink()
    code, err = run_cli(capsys, tmp_path / "ds", "--model", model, "-o", tmp_path / "f")
    assert code == 2 and "1 image(s)" in err and "no caption" in err and "b.png" in err
    assert "--skip-missing-captions" in err
    code, err = run_cli(capsys, tmp_path / "ds", "--model", model, "-o", tmp_path / "f", "--skip-missing-captions")
    assert code == 0 and [it["id"] for it in Features(tmp_path / "f").items] == ["a.png"]

    (tmp_path / "ds/c.png").write_bytes(b"not a png at all")
    (tmp_path / "ds/c.txt").write_text("a broken image")
    code, err = run_cli(capsys, tmp_path / "ds", "--model", model, "-o", tmp_path / "f", "--skip-missing-captions")
    assert code == 2 and "cannot be read" in err and "c.png" in err and "--skip-bad-images" in err
    code, err = run_cli(capsys, tmp_path / "ds", "--model", model, "-o", tmp_path / "f", "--skip-missing-captions",
                        "--skip-bad-images")
    assert code == 0 and "leaving out 1 unreadable image(s)" in caplog.text and "c.png" in caplog.text
    (tmp_path / "ds/c.png").unlink()

    make_images(tmp_path / "ds", {"t.png": (32, 32)})  # a truncated PNG: its header reads, its pixels do not
    data = (tmp_path / "ds/t.png").read_bytes()
    (tmp_path / "ds/t.png").write_bytes(data[: len(data) // 2])
    code, err = run_cli(capsys, tmp_path / "ds", "--model", model, "-o", tmp_path / "f", "--skip-missing-captions")
    assert code == 2 and "image" in err and "t.png cannot be read (image file is truncated)" in err
    code, err = run_cli(capsys, tmp_path / "ds", "--model", model, "-o", tmp_path / "f", "--skip-missing-captions",
                        "--skip-bad-images")
    assert code == 0 and "leaving out unreadable image" in caplog.text and "t.png" in caplog.text
    assert [it["id"] for it in Features(tmp_path / "f").items] == ["a.png"]

    code, err = run_cli(capsys, tmp_path / "ds", "--model", model, "-o", tmp_path / "f", "--skip-missing-captions",
                        "--max-length", "60")
    assert code == 2 and "holds features made differently" in err and "max_length: 120 there, 60 now" in err
    index = json.loads((tmp_path / "f/index.json").read_text())
    (tmp_path / "f/index.json").write_text(json.dumps({**index, "model": "/models/other"}))
    code, err = run_cli(capsys, tmp_path / "ds", "--model", model, "-o", tmp_path / "f", "--skip-missing-captions")
    assert code == 2 and f"model: '/models/other' there, '{pipeline_dir_512}' now" in err


def test_output_and_resolution_are_checked_before_extracting(pipeline_dir_512, tmp_path, capsys, monkeypatch):
    import errno
    import tempfile

    make_images(tmp_path / "ds", {"a.png": (32, 32)})
    common = [str(tmp_path / "ds"), "--model", str(pipeline_dir_512), "--quiet"]
    for value in ("0", "-64"):  # 0 was silently the model's default
        code = main(["extract", *common, "-o", str(tmp_path / "f"), "--resolution", value])
        assert code == 2 and f"--resolution must be at least 1, got {value}" in capsys.readouterr().err
    code = main(["extract", *common, "-o", str(tmp_path / "f"), "--resolution", "40"])
    assert code == 2 and "--resolution 40 must be a multiple of 16 px" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
    code = main(["extract", *common, "-o", str(tmp_path / "ds" / "a.png")])  # was "[Errno 20] Not a directory"
    assert code == 2 and f"-o {tmp_path / 'ds' / 'a.png'} is a file, not a folder" in capsys.readouterr().err

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    code = main(["extract", *common, "-o", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert code == 2 and f"-o {tmp_path / 'f'} cannot be created or written (Read-only file system)" in err
