"""LoRA: the layer, the training API, the key layouts people have on disk, and the pipeline's adapter methods."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from pixart.configs import TransformerConfig
from pixart.lora import (LoRALinear, inject_lora, linear_layers, lora_state_dict, remove_lora,
                         save_lora)
from pixart.models.transformer import PixArtTransformer2DModel

TINY = TransformerConfig(sample_size=8, num_layers=2, num_attention_heads=2, attention_head_dim=24, in_channels=4,
                         out_channels=8, caption_channels=32, cross_attention_dim=48, patch_size=2)


def tiny_transformer(seed: int = 0) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(TINY).eval()


def inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([10, 500]),
            "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
            "encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}


def randomize_lora(model, seed: int = 2) -> None:
    """LoRA B starts at zero (a no-op): random values make the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_inject_lora_wraps_targets_and_trains_only_lora_params():
    model = tiny_transformer()
    names = inject_lora(model, rank=4, alpha=8)
    assert len(names) == 2 * 2 * 4 and all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert len(trainable) == 2 * len(names)
    layer = model.get_submodule("transformer_blocks.0.attn1.to_q")
    assert isinstance(layer, LoRALinear) and layer.scaling["default"] == 2.0
    base = tiny_transformer()
    with torch.no_grad():  # B = 0 at initialisation: the wrapped model is the base model
        torch.testing.assert_close(model(**inputs()), base(**inputs()), rtol=0, atol=0)


def test_lora_state_dict_and_save_lora_use_the_diffusers_layout(tmp_path):
    model = tiny_transformer()
    inject_lora(model, rank=4, alpha=4, targets=("to_q", "ff.net.2"))
    state = lora_state_dict(model)
    assert "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight" in state
    assert state["transformer.transformer_blocks.1.ff.net.2.lora_B.weight"].shape == (48, 4)
    assert len(state) == 2 * 2 * 3  # (A, B) × 2 blocks × (attn1.to_q, attn2.to_q, ff.net.2)
    save_lora(tmp_path / "lora.safetensors", state, rank=4, alpha=4, targets=("to_q", "ff.net.2"))
    with safe_open(tmp_path / "lora.safetensors", "pt") as f:
        assert set(f.keys()) == set(state)
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert config == {"transformer.r": 4, "transformer.lora_alpha": 4, "transformer.target_modules": ["to_q", "ff.net.2"]}
    with pytest.raises(ValueError, match="no LoRA adapter named 'other'"):
        lora_state_dict(model, adapter_name="other")


def test_lora_gradients_reach_only_the_adapters():
    model = tiny_transformer()
    inject_lora(model, rank=2, alpha=2)
    randomize_lora(model)
    model(**inputs()).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_inject_lora_errors():
    with pytest.raises(ValueError, match="no linear layer"):
        inject_lora(tiny_transformer(), rank=2, alpha=2, targets=("nonexistent",))
    model = tiny_transformer()
    inject_lora(model, rank=2, alpha=2)
    with pytest.raises(ValueError, match="already has a LoRA adapter named 'default'"):
        inject_lora(model, rank=2, alpha=2)


def test_fuse_unfuse_and_remove_restore_the_base_bit_for_bit():
    model, base = tiny_transformer(), tiny_transformer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, rank=4, alpha=8)
    randomize_lora(model)
    with torch.no_grad():
        unfused = model(**inputs())
        for layer in linear_layers(model).values():
            if isinstance(layer, LoRALinear):
                layer.fuse()
        fused = model(**inputs())
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)  # fp32 sum order differs only
        assert (fused - base(**inputs())).abs().max() > 1e-2  # the LoRA does change the output
        remove_lora(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
