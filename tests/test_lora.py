"""LoRA: the layer, the training API, the key layouts people have on disk, and the pipeline's adapter methods."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import pixart
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


# Loading into the pipeline, with PEFT as the oracle

# the original repository's LoRA targets (REFERENCE.md §11)
ORIGINAL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_out", "linear", "linear_1",
                    "linear_2"]
TOL = 1e-4  # our transformer vs diffusers' in fp32 (as tests/test_transformer.py): attention kernels sum differently


@pytest.fixture(scope="module")
def peft_lora(pipeline_dir_512, tmp_path_factory):
    """(diffusers transformer with a PEFT LoRA, the folder PEFT's save_pretrained wrote)."""
    peft = pytest.importorskip("peft")
    from diffusers import PixArtTransformer2DModel as Reference

    torch.manual_seed(3)
    ref = Reference.from_pretrained(pipeline_dir_512 / "transformer").eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=ORIGINAL_TARGETS, alpha_pattern={"to_k": 2},
                             init_lora_weights=False)  # random A and B: the LoRA changes the output
    model = peft.get_peft_model(ref, config).eval()
    folder = tmp_path_factory.mktemp("peft-lora")
    model.save_pretrained(folder)
    return model, folder


def pipeline(folder, **kwargs):
    from pixart import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(folder, text_encoder=None, vae=None, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents_in(seed: int = 1) -> tuple:
    """Batch 2 for the 512 folder's transformer: latents, steps, captions (second one padded), mask."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 3:] = 0
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 17]), torch.randn(2, 7, 32, generator=g), mask


@torch.no_grad()
def run(pipe) -> torch.Tensor:
    return pipe.transformer(*latents_in())


def layouts(folder, tmp_path) -> dict[str, tuple]:
    """The PEFT LoRA rewritten in each key layout found on disk: name -> load_lora_weights arguments."""
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in state}
    out = {"peft": (folder,)}
    diffusers = {k.replace("base_model.model.", "transformer.", 1): v for k, v in state.items()}
    meta = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": config["alpha_pattern"]}
    save_file(diffusers, tmp_path / "pytorch_lora_weights.safetensors",
              metadata={"lora_adapter_metadata": json.dumps(meta)})
    out["diffusers"] = (tmp_path,)
    original = tmp_path / "original"
    original.mkdir()
    save_file({"unet." + k: v for k, v in state.items()}, original / "adapter_model.safetensors")
    (original / "adapter_config.json").write_text(json.dumps(config))
    out["original"] = (original,)
    named = tmp_path / "peft-named"  # a PEFT model's own state dict keeps the adapter name in the keys
    named.mkdir()
    save_file({k.replace(".weight", ".default.weight"): v for k, v in state.items()}, named / "adapter_model.safetensors")
    (named / "adapter_config.json").write_text(json.dumps(config))
    out["peft-named"] = (named,)
    kohya = {}
    for m in modules:
        key = "lora_unet_" + m.replace(".", "_")
        kohya[key + ".lora_down.weight"] = state[f"base_model.model.{m}.lora_A.weight"]
        kohya[key + ".lora_up.weight"] = state[f"base_model.model.{m}.lora_B.weight"]
        kohya[key + ".alpha"] = torch.tensor(2.0 if m.endswith("to_k") else 8.0)
    save_file(kohya, tmp_path / "kohya.safetensors")
    out["kohya"] = (tmp_path, None, "kohya.safetensors")
    return out


def test_peft_saved_lora_gives_peft_models_output(peft_lora, pipeline_dir_512):
    model, folder = peft_lora
    pipe = pipeline(pipeline_dir_512)
    base = run(pipe)
    pipe.load_lora_weights(folder)
    x, t, y, mask = latents_in()
    with torch.no_grad():
        expected = model(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    got = run(pipe)
    assert (got - expected).abs().max() < TOL
    assert (got - base).abs().max() > 100 * TOL  # the LoRA matters
    layer = pipe.transformer.get_submodule("transformer_blocks.0.attn1.to_k")
    assert layer.scaling == {"default_0": 0.5}  # alpha_pattern: 2 / 4


def test_every_key_layout_loads_to_the_same_output(peft_lora, pipeline_dir_512, tmp_path):
    outputs = {}
    for name, args in layouts(peft_lora[1], tmp_path).items():
        pipe = pipeline(pipeline_dir_512)
        pipe.load_lora_weights(*args)
        outputs[name] = run(pipe)
    assert len(outputs) == 5
    for name, out in outputs.items():
        torch.testing.assert_close(out, outputs["peft"], rtol=0, atol=0, msg=name)  # same tensors, same scales


def test_fused_equals_unfused_and_unload_restores_the_base_bit_for_bit(peft_lora, pipeline_dir_512):
    pipe = pipeline(pipeline_dir_512)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    base = run(pipe)
    pipe.load_lora_weights(peft_lora[1])
    unfused = run(pipe)
    pipe.fuse_lora()
    assert not any(isinstance(m, LoRALinear) and m.unfused is None for m in pipe.transformer.modules())
    torch.testing.assert_close(run(pipe), unfused, rtol=1e-5, atol=1e-5)  # fp32: W + BA vs Wx + B(Ax) order
    pipe.unfuse_lora()
    torch.testing.assert_close(run(pipe), unfused, rtol=0, atol=0)
    pipe.fuse_lora(lora_scale=0.5)
    pipe.unload_lora_weights()
    assert pipe.transformer.state_dict().keys() == before.keys()
    assert all(torch.equal(pipe.transformer.state_dict()[k], v) for k, v in before.items())
    assert not any(isinstance(m, LoRALinear) for m in pipe.transformer.modules())
    torch.testing.assert_close(run(pipe), base, rtol=0, atol=0)


def test_scale_zero_is_the_base_model(peft_lora, pipeline_dir_512):
    pipe = pipeline(pipeline_dir_512)
    base = run(pipe)
    pipe.load_lora_weights(peft_lora[1], adapter_name="style")
    pipe.set_adapters("style", 0.0)
    torch.testing.assert_close(run(pipe), base, rtol=0, atol=0)  # base(x) + 0 · B(A(x))
    pipe.set_adapters("style")
    pipe.fuse_lora(lora_scale=0.0)
    torch.testing.assert_close(run(pipe), base, rtol=0, atol=0)  # W + 0


def test_two_adapters_combine_linearly(pipeline_dir_512):
    pipe = pipeline(pipeline_dir_512)
    a, b = tiny_lora_state(pipe, seed=5), tiny_lora_state(pipe, seed=6)
    pipe.load_lora_weights(a, adapter_name="a")
    pipe.load_lora_weights(b, adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.5, -2.0])
    combined = run(pipe)
    deltas = {}
    for weights in ([0.5, -2.0], [1.0, 0.0], [0.0, 1.0]):
        pipe.set_adapters(["a", "b"], weights)
        pipe.fuse_lora()
        deltas[tuple(weights)] = {n: m.base_layer.weight - m.unfused for n, m in pipe.transformer.named_modules()
                                  if isinstance(m, LoRALinear)}
        pipe.unfuse_lora()
    for n, d in deltas[(0.5, -2.0)].items():  # per layer, the merged update is the weighted sum of the two
        expected = 0.5 * deltas[(1.0, 0.0)][n] - 2.0 * deltas[(0.0, 1.0)][n]
        torch.testing.assert_close(d, expected, rtol=1e-5, atol=1e-6)  # fp32 rounding of W + ΔW
    pipe.set_adapters(["a", "b"], [0.5, -2.0])
    pipe.fuse_lora()
    torch.testing.assert_close(run(pipe), combined, rtol=1e-5, atol=1e-5)


def tiny_lora_state(pipe, seed: int, targets=("to_q", "to_v", "proj_out")) -> dict[str, torch.Tensor]:
    """A random LoRA for the pipeline's transformer, made with inject_lora on a copy and saved in memory."""
    model = PixArtTransformer2DModel(pipe.transformer.config)
    inject_lora(model, rank=2, alpha=2, targets=targets)
    randomize_lora(model, seed)
    return lora_state_dict(model)


def test_a_trained_lora_saved_and_loaded_reproduces_the_trained_model(pipeline_dir_512, tmp_path):
    pipe = pipeline(pipeline_dir_512)
    trained = PixArtTransformer2DModel.from_pretrained(pipeline_dir_512 / "transformer")
    inject_lora(trained, rank=4, alpha=2, targets=ORIGINAL_TARGETS)
    randomize_lora(trained, seed=7)
    save_lora(tmp_path / "lora.safetensors", lora_state_dict(trained), rank=4, alpha=2, targets=ORIGINAL_TARGETS)
    pipe.load_lora_weights(tmp_path / "lora.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(run(pipe), trained(*latents_in()), rtol=0, atol=0)


def test_staged_pipeline_applies_the_lora_each_time_it_loads_the_transformer(peft_lora, pipeline_dir_512):
    full = pipeline(pipeline_dir_512)
    base = run(full)
    full.load_lora_weights(peft_lora[1])
    full.set_adapters("default_0", 0.7)
    staged = pipeline(pipeline_dir_512, memory="staged")
    staged.load_lora_weights(peft_lora[1])
    staged.set_adapters("default_0", 0.7)
    assert staged._loaded.get("transformer") is None  # checked against a weightless model, nothing loaded
    x, t, y, mask = latents_in()
    args = dict(prompt_embeds=y[:1], prompt_attention_mask=mask[:1], negative_prompt_embeds=y[1:],
                negative_prompt_attention_mask=mask[1:], num_inference_steps=1, width=64, height=64,
                use_resolution_binning=False, output_type="latent")
    images = [p(**args, generator=torch.Generator().manual_seed(0)).images for p in (full, staged, staged)]
    assert staged._loaded.get("transformer") is None  # released after each call, loaded (with the LoRA) in each
    torch.testing.assert_close(images[1], images[0], rtol=0, atol=0)
    torch.testing.assert_close(images[2], images[0], rtol=0, atol=0)
    staged.unload_lora_weights()
    torch.testing.assert_close(run(staged), base, rtol=0, atol=0)


def test_loading_errors_name_the_problem(pipeline_dir_512, tmp_path):
    from safetensors.torch import save_file

    pipe = pipeline(pipeline_dir_512)
    good = tiny_lora_state(pipe, seed=1)
    stray = {**good, "transformer.transformer_blocks.0.attn1.to_z.lora_A.weight": torch.zeros(2, 48),
             "lora_te_text_model_encoder_layers_0_q_proj.lora_down.weight": torch.zeros(2, 32)}
    with pytest.raises(ValueError, match=r"2 keys of the state dict match no linear layer(.|\n)*lora_te_(.|\n)*to_z"):
        pipe.load_lora_weights(stray)
    bad = dict(good)
    bad["transformer.proj_out.lora_B.weight"] = torch.zeros(7, 2)
    with pytest.raises(ValueError, match=r"LoRA of proj_out does not fit it: lora_A \(2, 48\) and lora_B \(7, 2\), "
                                         r"layer weight \(out, in\) = \(32, 48\)"):
        pipe.load_lora_weights(bad)
    half = {k: v for k, v in good.items() if k != "transformer.proj_out.lora_B.weight"}
    with pytest.raises(ValueError, match="LoRA of proj_out lacks its lora_B"):
        pipe.load_lora_weights(half)
    save_file({"proj_out.weight": torch.zeros(32, 48)}, tmp_path / "not-a-lora.safetensors")
    with pytest.raises(ValueError, match="no LoRA keys found in .*not-a-lora.safetensors"):
        pipe.load_lora_weights(tmp_path / "not-a-lora.safetensors")
    with pytest.raises(FileNotFoundError, match="no LoRA weights in .*not-a-lora.safetensors.*weight_name="):
        pipe.load_lora_weights(tmp_path)
    pipe.load_lora_weights(good, adapter_name="a")
    with pytest.raises(ValueError, match=r"unknown LoRA adapters \['b'\]: the loaded ones are \['a'\]"):
        pipe.set_adapters(["a", "b"])
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora_weights(good, adapter_name="a")


def test_lora_on_a_quantized_layer_adds_to_its_output_and_refuses_to_fuse():
    from pixart.quant import QuantSpec

    torch.manual_seed(0)
    float_layer = torch.nn.Linear(64, 32, bias=False)
    q = QuantSpec(8).linear(64, 32)
    for name, t in q.quantize(float_layer.weight.detach(), torch.float32).items():
        setattr(q, name, torch.nn.Parameter(t, requires_grad=False))
    model = torch.nn.Sequential(q)
    inject_lora(model, rank=2, alpha=4, targets=("0",))
    randomize_lora(model)
    layer = model[0]
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = q(x) + 2.0 * layer.lora_B["default"](layer.lora_A["default"](x))
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot fuse a LoRA into a quantized layer"):
        layer.fuse()


def test_cli_lora_option_end_to_end(pipeline_dir_512, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from pixart.cli import main

    pipe = pipeline(pipeline_dir_512)
    save_lora(tmp_path / "style.safetensors", tiny_lora_state(pipe, seed=4), rank=2, alpha=2, targets=("to_q",))
    common = ["a red circle", "--model", str(pipeline_dir_512), "--seed", "1", "--steps", "1", "--width", "128",
              "--height", "128", "--no-binning", "--dtype", "fp32", "--quiet", "--no-prompt-cache"]
    for name, extra in (("base", []), ("half", ["--lora", f"{tmp_path / 'style.safetensors'}:0.5"])):
        assert main(["generate", *common, "-o", str(tmp_path / f"{name}.png"), *extra]) == 0, capsys.readouterr().err
    base, half = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("base", "half"))
    assert np.abs(half - base).max() > 0
    from pixart import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "style.safetensors")
    pipe.set_adapters("default_0", 0.5)
    pipe.fuse_lora()
    expected = pipe("a red circle", num_inference_steps=1, width=128, height=128, use_resolution_binning=False,
                    generator=torch.Generator().manual_seed(1)).images[0]
    assert np.array_equal(half, np.asarray(expected, dtype=np.int16))
    code = main(["generate", *common, "-o", str(tmp_path / "x.png"), "--lora", str(tmp_path / "missing.safetensors")])
    assert code == 2 and "missing.safetensors" in capsys.readouterr().err


def test_lora_option_parses_file_and_scale():
    from pixart.cli import lora_option

    assert lora_option("style.safetensors:0.5") == ("style.safetensors", 0.5)
    assert lora_option("owner/name") == ("owner/name", 1.0)
    assert lora_option("C:\\loras\\x.safetensors") == ("C:\\loras\\x.safetensors", 1.0)
    assert lora_option("dir/x.safetensors:-1") == ("dir/x.safetensors", -1.0)


def test_adapter_listing_deleting_disabling_as_in_diffusers(pipeline_dir_512):
    pipe = pipeline(pipeline_dir_512)
    base = run(pipe)
    a, b = tiny_lora_state(pipe, seed=5), tiny_lora_state(pipe, seed=6)
    pipe.load_lora_weights(a, adapter_name="a")
    pipe.load_lora_weights(b, adapter_name="b")
    both = run(pipe)
    assert pipe.get_list_adapters() == {"transformer": ["a", "b"]} and pipe.get_active_adapters() == ["a", "b"]
    pipe.disable_lora()
    torch.testing.assert_close(run(pipe), base, rtol=0, atol=0)
    assert pipe.get_active_adapters() == []
    pipe.enable_lora()
    torch.testing.assert_close(run(pipe), both, rtol=0, atol=0)
    pipe.fuse_lora()
    pipe.disable_lora()  # fused: the base weights come back bit for bit
    torch.testing.assert_close(run(pipe), base, rtol=0, atol=0)
    pipe.enable_lora()
    pipe.unfuse_lora()
    pipe.delete_adapters("a")
    only_b = pipeline(pipeline_dir_512)
    only_b.load_lora_weights(b, adapter_name="b")
    torch.testing.assert_close(run(pipe), run(only_b), rtol=0, atol=0)
    assert pipe.get_list_adapters() == {"transformer": ["b"]}
    with pytest.raises(ValueError, match="unknown LoRA adapters \\['a'\\]"):
        pipe.delete_adapters(["a"])


@pytest.mark.parametrize("memory", ["full", "staged"])
def test_fusing_into_an_int8_transformer_is_refused_and_changes_nothing(pipeline_dir_512, memory):
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, transformer_quantization="int8", memory=memory)
    pipe.set_progress_bar_config(disable=True)
    lora = {f"transformer.transformer_blocks.0.attn1.to_q.lora_{n}.weight": torch.randn(shape) * 0.01
            for n, shape in (("A", (4, 48)), ("B", (48, 4)))}
    name = pipe.load_lora_weights(lora)
    with pytest.raises(ValueError, match="cannot fuse a LoRA into"):
        pipe.fuse_lora()
    assert pipe.lora.fused is None  # still unfused: the adapters and generation work as before
    pipe.set_adapters([name], [0.5])
    out = pipe("artistic", num_inference_steps=1, height=256, width=256, output_type="np").images
    assert np.isfinite(out).all()
