"""T5 encoder parity with transformers' own T5EncoderModel, saved by transformers."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from pixart.models.t5 import T5EncoderModel
from pixart.weights.files import WeightsError

transformers = pytest.importorskip("transformers")

VOCAB = 300  # the size of the test tokenizer's vocabulary (200 pieces + 100 extra ids)


def hf_encoder(folder, feed_forward_proj="gated-gelu", seed=0, **save_kwargs):
    """A tiny random transformers T5EncoderModel saved into `folder`."""
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj=feed_forward_proj, relative_attention_num_buckets=8, relative_attention_max_distance=20,
    )
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(config).eval()
    with torch.no_grad():  # the default init leaves norms at 1: randomise them so a wrong norm shows
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, **save_kwargs)
    return model


def inputs(seed=1, length=40):
    """Two prompts of token ids, the second padded (mask 0) after 17 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    ids[1, 17:], mask[1, 17:] = 0, 0
    ids[:, -1] = 1
    return ids, mask


def reference(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("proj", ["gated-gelu", "relu"])
def test_fp32_matches_transformers_with_padding_mask(tmp_path, proj):
    hf = hf_encoder(tmp_path, proj)
    ids, mask = inputs()  # 40 tokens with 8 buckets / max distance 20 reach the log-spaced and clipped buckets
    ours = T5EncoderModel.from_pretrained(tmp_path)
    with torch.no_grad():
        out = ours(ids, attention_mask=mask)
    assert torch.equal(out[0], out.last_hidden_state)
    torch.testing.assert_close(out[0], reference(hf, ids, mask), atol=1e-4, rtol=0)
    with torch.no_grad():  # without a mask every token attends everywhere
        torch.testing.assert_close(ours(ids)[0], reference(hf, ids, None), atol=1e-4, rtol=0)


def test_padding_mask_changes_the_output(tmp_path):
    hf_encoder(tmp_path)
    ids, mask = inputs()
    ours = T5EncoderModel.from_pretrained(tmp_path)
    with torch.no_grad():
        masked, unmasked = ours(ids, mask)[0], ours(ids)[0]
    assert torch.equal(masked[0], unmasked[0])
    assert not torch.allclose(masked[1, :17], unmasked[1, :17], atol=1e-3)


def test_sharded_save_loads(tmp_path):
    hf = hf_encoder(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids, mask = inputs()
    out = T5EncoderModel.from_pretrained(tmp_path)(ids, mask)[0]
    torch.testing.assert_close(out, reference(hf, ids, mask), atol=1e-4, rtol=0)


def test_pipeline_subfolder_loads(tmp_path):
    hf_encoder(tmp_path / "text_encoder")
    model = T5EncoderModel.from_pretrained(tmp_path, subfolder="text_encoder", torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_bf16_runs_and_is_close(tmp_path):
    hf = hf_encoder(tmp_path)
    ids, mask = inputs()
    model = T5EncoderModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(ids, mask)[0]
    assert out.dtype == torch.bfloat16
    # bf16 has 8 mantissa bits; the tiny model's outputs are O(1)
    torch.testing.assert_close(out.float(), reference(hf, ids, mask), atol=0.1, rtol=0.05)


def test_fp16_keeps_wo_fp32_and_is_finite(tmp_path):
    hf = hf_encoder(tmp_path)
    with torch.no_grad():  # make the FFN output (~1e5) overflow fp16 unless wo runs in fp32, as T5-XXL's does
        for block in hf.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(2e5)
    hf.save_pretrained(tmp_path)
    ids, mask = inputs()
    expected = reference(hf, ids, mask)
    model = T5EncoderModel.from_pretrained(tmp_path, torch_dtype=torch.float16)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if name.endswith(".wo.weight") else torch.float16), name
    with torch.no_grad():
        out = model(ids, mask)[0]
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
        for block in model.encoder.block:  # the same weights with wo in fp16 go wrong: this test can fail
            block.layer[1].DenseReluDense.wo.half()
        bad = model(ids, mask)[0].float()
    assert not torch.allclose(bad, expected, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("keep_shared", [True, False])
def test_file_with_tied_embed_tokens_loads(tmp_path, keep_shared):
    hf = hf_encoder(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()
    if not keep_shared:
        del state["shared.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids, mask = inputs()
    out = T5EncoderModel.from_pretrained(tmp_path)(ids, mask)[0]
    torch.testing.assert_close(out, reference(hf, ids, mask), atol=1e-4, rtol=0)


def test_foreign_keys_fail_loudly(tmp_path):
    hf_encoder(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(32, 32)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="decoder.block.0"):
        T5EncoderModel.from_pretrained(tmp_path)


def test_save_pretrained_round_trip(tmp_path):
    hf_encoder(tmp_path / "a")
    ids, mask = inputs()
    model = T5EncoderModel.from_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    again = T5EncoderModel.from_pretrained(tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(model(ids, mask)[0], again(ids, mask)[0])
