"""pixart extract and the features reader: format, parity with the pipeline's encoders, resume, torchrun, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pixart.train.data import Features, epoch_batches

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
