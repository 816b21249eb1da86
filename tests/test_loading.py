"""Weight files in every layout load; every broken one fails with an error that names the problem and the fix."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pixart.models.t5 import T5EncoderModel
from pixart.weights.files import WeightsError
from pixart.weights.hub import resolve


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A tiny T5 encoder saved by transformers, and its outputs for reference."""
    from transformers import T5Config
    from transformers import T5EncoderModel as Reference

    torch.manual_seed(0)
    ref = Reference(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                             feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
    folder = tmp_path_factory.mktemp("t5") / "text_encoder"
    ref.save_pretrained(folder)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        expected = ref(ids).last_hidden_state
    return folder, ids, expected


def copy_folder(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_sharded_safetensors_with_index_load(t5_folder, tmp_path):
    from transformers import T5EncoderModel as Reference

    folder, ids, expected = t5_folder
    sharded = tmp_path / "sharded"
    Reference.from_pretrained(folder).save_pretrained(sharded, max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").is_file()
    model = T5EncoderModel.from_pretrained(sharded)
    assert torch.allclose(model(ids)[0], expected, atol=1e-5)


def test_pytorch_bin_loads_through_weights_only_torch_load(t5_folder, tmp_path):
    folder, ids, expected = t5_folder
    binned = copy_folder(folder, tmp_path)
    state = load_file(binned / "model.safetensors")
    (binned / "model.safetensors").unlink()
    torch.save(state, binned / "pytorch_model.bin")
    model = T5EncoderModel.from_pretrained(binned)
    assert torch.allclose(model(ids)[0], expected, atol=1e-5)


def test_missing_key_is_listed(t5_folder, tmp_path):
    folder, _, _ = t5_folder
    broken = copy_folder(folder, tmp_path)
    state = load_file(broken / "model.safetensors")
    del state["encoder.final_layer_norm.weight"]
    save_file(state, broken / "model.safetensors")
    with pytest.raises(WeightsError, match=r"missing keys \(1\):\s+encoder.final_layer_norm.weight"):
        T5EncoderModel.from_pretrained(broken)


def test_wrong_shape_is_listed_with_both_shapes(t5_folder, tmp_path):
    folder, _, _ = t5_folder
    broken = copy_folder(folder, tmp_path)
    config = json.loads((broken / "config.json").read_text())
    config["d_ff"] = 48  # the config no longer fits the weights
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"(?s)shape mismatches.*wi_0.weight: checkpoint \(64, 32\) vs model \(48, 32\)"):
        T5EncoderModel.from_pretrained(broken)


def test_unexpected_key_is_listed(t5_folder, tmp_path):
    folder, _, _ = t5_folder
    broken = copy_folder(folder, tmp_path)
    state = load_file(broken / "model.safetensors")
    state["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(2, 2)
    save_file(state, broken / "model.safetensors")
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\):\s+decoder.block.0"):
        T5EncoderModel.from_pretrained(broken)


def test_truncated_safetensors_says_download_again(t5_folder, tmp_path):
    folder, _, _ = t5_folder
    broken = copy_folder(folder, tmp_path)
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="(?s)truncated.*download it again"):
        T5EncoderModel.from_pretrained(broken)


def test_truncated_header_says_corrupted(t5_folder, tmp_path):
    folder, _, _ = t5_folder
    broken = copy_folder(folder, tmp_path)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(WeightsError, match="truncated or corrupted"):
        T5EncoderModel.from_pretrained(broken)


def test_truncated_bin_says_corrupted(t5_folder, tmp_path):
    folder, _, _ = t5_folder
    broken = copy_folder(folder, tmp_path)
    state = load_file(broken / "model.safetensors")
    (broken / "model.safetensors").unlink()
    torch.save(state, broken / "pytorch_model.bin")
    data = (broken / "pytorch_model.bin").read_bytes()
    (broken / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match="truncated, corrupted or not a PyTorch checkpoint"):
        T5EncoderModel.from_pretrained(broken)


def test_missing_shard_is_named(t5_folder, tmp_path):
    from transformers import T5EncoderModel as Reference

    folder, _, _ = t5_folder
    sharded = tmp_path / "sharded"
    Reference.from_pretrained(folder).save_pretrained(sharded, max_shard_size="20KB")
    victim = sorted(sharded.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(WeightsError, match=f"missing.*{victim.name}"):
        T5EncoderModel.from_pretrained(sharded)


def test_folder_without_weights_lists_what_it_holds(t5_folder, tmp_path):
    folder, _, _ = t5_folder
    empty = copy_folder(folder, tmp_path)
    (empty / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="(?s)no weights found.*config.json"):
        T5EncoderModel.from_pretrained(empty)


def test_missing_config_names_the_file(t5_folder, tmp_path):
    folder, _, _ = t5_folder
    broken = copy_folder(folder, tmp_path)
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        T5EncoderModel.from_pretrained(broken)


def test_unknown_hub_id_offline_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="(?s)not in the local Hugging Face cache.*Fix: connect to the network"):
        resolve("PixArt-alpha/No-Such-Model-Here")


def test_bf16_load_never_holds_fp32_parameters(t5_folder):
    folder, ids, expected = t5_folder
    model = T5EncoderModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert (model(ids)[0].float() - expected).abs().max() < 0.1


def hub_cache(root, repo_id: str, folder) -> str:
    """A Hugging Face cache (cache_dir) holding `folder` as the main snapshot of `repo_id`, as huggingface_hub lays
    it out: models--owner--name/refs/main names the commit, snapshots/<commit>/ holds the files."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return str(root)


def test_a_hub_id_in_the_local_cache_loads_with_local_files_only(pipeline_dir_512, tmp_path):
    import pixart

    cache = hub_cache(tmp_path / "hub", "someone/tiny-pixart", pipeline_dir_512)
    pipe = pixart.PixArtAlphaPipeline.from_pretrained("someone/tiny-pixart", cache_dir=cache, local_files_only=True)
    assert pipe.transformer is not None and pipe.tokenizer is not None
    scheduler = pixart.EulerDiscreteScheduler.from_pretrained("someone/tiny-pixart", subfolder="scheduler",
                                                              cache_dir=cache, local_files_only=True)
    assert scheduler.class_name == "EulerDiscreteScheduler"
    with pytest.raises(FileNotFoundError, match="local_files_only=True forbids downloading it"):
        pixart.PixArtAlphaPipeline.from_pretrained("someone/other-model", cache_dir=cache, local_files_only=True)


def test_models_take_diffusers_loading_keywords_and_name_unknown_ones(pipeline_dir_512, tmp_path):
    import pixart

    cache = hub_cache(tmp_path / "hub", "someone/tiny-pixart", pipeline_dir_512)
    common = dict(cache_dir=cache, local_files_only=True, use_safetensors=True, low_cpu_mem_usage=True)
    transformer = pixart.PixArtTransformer2DModel.from_pretrained("someone/tiny-pixart", subfolder="transformer",
                                                                 torch_dtype=torch.bfloat16, **common)
    assert transformer.dtype == torch.bfloat16
    assert pixart.T5EncoderModel.from_pretrained("someone/tiny-pixart", subfolder="text_encoder", **common)
    assert pixart.AutoencoderKL.from_pretrained("someone/tiny-pixart", subfolder="vae", **common)
    assert pixart.T5Tokenizer.from_pretrained("someone/tiny-pixart", subfolder="tokenizer", cache_dir=cache,
                                              local_files_only=True).encode("a cat")
    with pytest.raises(TypeError, match="unexpected keyword arguments: sampel_size \\(neither a loading option nor a "
                                        "field of TransformerConfig\\)"):
        pixart.PixArtTransformer2DModel.from_pretrained(pipeline_dir_512, subfolder="transformer", sampel_size=64)


@pytest.mark.parametrize("path, content, message", [
    ("text_encoder/config.json", b"{not json", r"text_encoder/config\.json is not valid JSON .*re-download or fix"),
    ("transformer/config.json", b"\xb8\x00\x91", r"transformer/config\.json is not a JSON text file"),
    ("model_index.json", b"[]", r"model_index\.json holds a JSON list, not the object"),
    ("tokenizer/tokenizer_config.json", b"[1]", r"tokenizer_config\.json holds a JSON list"),
    ("tokenizer/spiece.model", b"\x00garbage" * 50, r"spiece\.model is not a sentencepiece model .*download the "
                                                    r"tokenizer again"),
])
def test_a_corrupted_config_or_tokenizer_file_is_named_with_the_fix(pipeline_dir_512, tmp_path, path, content,
                                                                    message):
    import pixart

    broken = copy_folder(pipeline_dir_512, tmp_path)
    (broken / path).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        pixart.PixArtAlphaPipeline.from_pretrained(broken)


def test_a_corrupted_tokenizer_json_is_named_with_the_fix(pipeline_dir_512, tmp_path):
    from transformers import T5TokenizerFast

    from pixart.tokenizer import T5Tokenizer

    folder = tmp_path / "tokenizer"
    T5TokenizerFast.from_pretrained(pipeline_dir_512 / "tokenizer").save_pretrained(folder)
    assert T5Tokenizer.from_pretrained(folder, use_fast=True)("a red circle").input_ids  # it loads when intact
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(WeightsError, match=r"tokenizer\.json is corrupted .*download the tokenizer again"):
        T5Tokenizer.from_pretrained(folder, use_fast=True)


def reference_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def assert_same_weights(ours, reference) -> None:
    theirs = reference_state(reference)
    assert ours.state_dict().keys() == theirs.keys()
    assert all(torch.equal(v.float(), theirs[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("index_name", ["diffusion_pytorch_model.safetensors.index.fp16.json",  # diffusers >= 0.28
                                        "diffusion_pytorch_model.safetensors.fp16.index.json"])  # older, still read
def test_sharded_variant_loads_the_files_diffusers_loads(pipeline_dir_512, tmp_path, index_name):
    from diffusers import PixArtTransformer2DModel as Reference

    import pixart

    default = Reference.from_pretrained(pipeline_dir_512, subfolder="transformer")
    fp16 = Reference.from_pretrained(pipeline_dir_512, subfolder="transformer")
    with torch.no_grad():
        for p in fp16.parameters():
            p.add_(1.0)  # the variant's weights differ from the default ones
    folder = tmp_path / "transformer"
    fp16.to(torch.float16).save_pretrained(folder, variant="fp16", max_shard_size="50KB")
    assert len(list(folder.glob("diffusion_pytorch_model.fp16-0000*-of-*.safetensors"))) > 1
    (folder / "diffusion_pytorch_model.safetensors.index.fp16.json").rename(folder / index_name)
    default.save_pretrained(tmp_path / "default")
    shutil.copy(tmp_path / "default" / "diffusion_pytorch_model.safetensors", folder)

    ours = pixart.PixArtTransformer2DModel.from_pretrained(folder, variant="fp16")
    assert_same_weights(ours, Reference.from_pretrained(folder, variant="fp16"))
    assert_same_weights(pixart.PixArtTransformer2DModel.from_pretrained(folder), default)


def test_sharded_t5_variant_loads_as_transformers_saves_it(t5_folder, tmp_path):
    from transformers import T5EncoderModel as Reference

    folder, ids, expected = t5_folder
    sharded = tmp_path / "sharded"
    Reference.from_pretrained(folder).save_pretrained(sharded, variant="fp16", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.fp16.json").is_file()
    assert not list(sharded.glob("model.safetensors")) and len(list(sharded.glob("*.safetensors"))) > 1
    model = T5EncoderModel.from_pretrained(sharded, variant="fp16")
    assert torch.allclose(model(ids)[0], expected, atol=1e-5)


@pytest.mark.parametrize("sharded", [False, True], ids=["pytorch_model.fp16.bin", "pytorch_model.bin.index.fp16.json"])
def test_bin_variant_single_or_sharded_loads_as_transformers_loads_it(t5_folder, tmp_path, sharded):
    from transformers import T5EncoderModel as Reference

    folder, ids, expected = t5_folder
    binned = copy_folder(folder, tmp_path)
    state = load_file(binned / "model.safetensors")
    (binned / "model.safetensors").unlink()
    if sharded:  # transformers' layout: shards named by the variant, an index naming them
        keys = sorted(state)
        shards = {f"pytorch_model.fp16-0000{i + 1}-of-00002.bin": keys[i::2] for i in range(2)}
        for name, shard_keys in shards.items():
            torch.save({k: state[k] for k in shard_keys}, binned / name)
        weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
        index = {"metadata": {}, "weight_map": weight_map}
        (binned / "pytorch_model.bin.index.fp16.json").write_text(json.dumps(index))
    else:
        torch.save(state, binned / "pytorch_model.fp16.bin")
    with torch.no_grad():
        assert torch.allclose(Reference.from_pretrained(binned, variant="fp16")(ids).last_hidden_state, expected,
                              atol=1e-5)
    assert torch.allclose(T5EncoderModel.from_pretrained(binned, variant="fp16")(ids)[0], expected, atol=1e-5)


def test_pipeline_saved_with_a_sharded_variant_loads_with_it(pipeline_dir_512, tmp_path):
    from diffusers import PixArtAlphaPipeline as Reference

    import pixart

    reference = Reference.from_pretrained(pipeline_dir_512)
    reference.save_pretrained(tmp_path / "pipe", variant="fp16", max_shard_size="50KB")
    assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(tmp_path / "pipe", variant="fp16", memory="auto")
    assert_same_weights(pipe.transformer, reference.transformer)


def test_a_pipeline_variant_that_only_some_components_have_loads_the_others_default_weights(
        pipeline_dir_512, tmp_path, caplog):
    """As diffusers: with variant="fp16", the transformer's fp16 files; the text encoder and VAE, which have none,
    their default ones (a warning names them)."""
    from diffusers import PixArtTransformer2DModel as Reference

    import pixart

    folder = copy_folder(pipeline_dir_512, tmp_path)
    other = Reference.from_pretrained(folder, subfolder="transformer")
    with torch.no_grad():
        other.proj_out.weight.add_(1.0)  # the variant's weights differ from the default ones
    other.save_pretrained(folder / "transformer", variant="fp16")
    with caplog.at_level("WARNING", logger="pixart"):
        pipe = pixart.PixArtAlphaPipeline.from_pretrained(folder, variant="fp16")
    assert_same_weights(pipe.transformer, other)
    assert "text_encoder has no 'fp16' variant: loading its default weights" in caplog.text
    assert "vae has no 'fp16' variant" in caplog.text
    default = pixart.PixArtAlphaPipeline.from_pretrained(folder)
    assert not torch.equal(default.transformer.proj_out.weight, pipe.transformer.proj_out.weight)


def test_missing_variant_says_which_and_how_to_fix(t5_folder):
    folder, _, _ = t5_folder
    with pytest.raises(WeightsError, match=r"(?s)no 'fp16' variant of the weights in .*it holds: config\.json, "
                                           r"model\.safetensors.*Fix: drop variant='fp16' to load the default weights.*"
                                           r"or download the fp16 variant"):
        T5EncoderModel.from_pretrained(folder, variant="fp16")


def test_hub_download_with_a_variant_fetches_that_variant_only(pipeline_dir_512, tmp_path, monkeypatch):
    """A fake Hub: snapshot_download copies the files its allow_patterns select, as huggingface_hub filters them."""
    import huggingface_hub
    from diffusers import PixArtTransformer2DModel as Reference
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    import pixart

    repo = tmp_path / "repo"
    shutil.copytree(pipeline_dir_512, repo)
    reference = Reference.from_pretrained(repo, subfolder="transformer")
    reference.save_pretrained(repo / "transformer", variant="fp16", max_shard_size="50KB")
    fetched = tmp_path / "fetched"

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        files = [p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (fetched / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repo / name, fetched / name)
        return str(fetched)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = pixart.PixArtTransformer2DModel.from_pretrained("someone/tiny-pixart", subfolder="transformer",
                                                            variant="fp16")
    assert_same_weights(model, reference)
    names = sorted(p.name for p in (fetched / "transformer").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in names
    assert "diffusion_pytorch_model.safetensors" not in names  # the default weights are not downloaded too
    assert len([n for n in names if n.startswith("diffusion_pytorch_model.fp16-")]) > 1


@pytest.mark.parametrize("load", [
    lambda path: __import__("pixart").PixArtAlphaPipeline.from_pretrained(path),
    lambda path: __import__("pixart").PixArtTransformer2DModel.from_pretrained(path.with_suffix(".pth")),
], ids=["pipeline", "transformer"])
def test_a_weight_file_given_to_from_pretrained_names_it_and_from_single_file(pipeline_dir_512, tmp_path, load):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    shutil.copy(pipeline_dir_512 / "transformer" / path.name, path)
    shutil.copy(path, path.with_suffix(".pth"))
    with pytest.raises(NotADirectoryError, match=r"(?s)diffusion_pytorch_model\.(safetensors|pth) is a weight file, "
                                                 r"not a model folder.*from_single_file\(.*transformer=transformer"):
        load(path)


def transformer_state(pipeline_dir) -> dict[str, torch.Tensor]:
    return load_file(pipeline_dir / "transformer" / "diffusion_pytorch_model.safetensors")


def save_training_checkpoint(state, path):
    torch.save({"state_dict": state, "epoch": np.int64(3), "loss": np.float32(0.25), "lr": np.float64(1e-4),
                "seen": np.arange(3)}, path)


def save_training_checkpoint_numpy_1(state, path):
    """As NumPy 1 wrote it: its functions named numpy.core.multiarray.*, not numpy._core (NumPy 2)."""
    import zipfile

    save_training_checkpoint(state, path.with_suffix(".tmp"))
    with zipfile.ZipFile(path.with_suffix(".tmp")) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(info.filename, data)


@pytest.mark.parametrize("save", [
    lambda state, path: torch.save(state, path, _use_new_zipfile_serialization=False),  # no mmap for these
    save_training_checkpoint,
    save_training_checkpoint_numpy_1,
], ids=["legacy-format", "numpy-scalars", "numpy-1-scalars"])
def test_a_valid_checkpoint_torch_loads_safely_is_not_called_corrupt(pipeline_dir_512, tmp_path, save):
    import pixart

    state = transformer_state(pipeline_dir_512)
    save(state, tmp_path / "ckpt.pth")
    model = pixart.PixArtTransformer2DModel.from_single_file(tmp_path / "ckpt.pth",
                                                            config=pipeline_dir_512 / "transformer")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_checkpoint_with_python_objects_says_why_and_how_to_convert_it(pipeline_dir_512, tmp_path):
    import subprocess
    import sys

    import pixart

    state = transformer_state(pipeline_dir_512)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": state, "optimizer_class": torch.optim.AdamW}, path)
    with pytest.raises(WeightsError, match=r"(?s)holds Python objects beyond tensors \(torch\.optim\.adamw\.AdamW\), "
                                           r"which torch refuses to unpickle for safety.*safetensors") as error:
        pixart.PixArtTransformer2DModel.from_single_file(path, config=pipeline_dir_512 / "transformer")
    assert "download it again" not in str(error.value)
    command = str(error.value).splitlines()[-1].strip()
    assert command.startswith("python -c ")
    subprocess.run([sys.executable, "-c", command.removeprefix("python -c ")[1:-1]], check=True)  # the fix works
    model = pixart.PixArtTransformer2DModel.from_single_file(path.with_suffix(".safetensors"),
                                                            config=pipeline_dir_512 / "transformer")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
