"""PixArt-α transformer: parity with diffusers' PixArtTransformer2DModel, the original-checkpoint key map, loading."""
import re

import pytest
import torch
from safetensors.torch import save_file

from pixart.configs import TransformerConfig
from pixart.models.transformer import PixArtTransformer2DModel, TransformerOutput
from pixart.weights.files import WeightsError, lazy_tensors
from pixart.weights.keymaps import PIXART_ORIGINAL, apply_key_map

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
CAPTION_CHANNELS, CAPTION_LEN = 32, 7
# inner dim 48: divisible by 3, as the micro-condition embedders (2 × D/3 + D/3) need
TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=24, caption_channels=CAPTION_CHANNELS,
            cross_attention_dim=48)
VARIANTS = {
    "1024-MS": dict(sample_size=128),  # micro-conditions on, pe interpolation 2
    "512": dict(sample_size=64),
    "256": dict(sample_size=32, interpolation_scale=0.5),
    # the published three all give grid coordinate i·32/n; this one does not, so it tests the formula itself
    "64-interp-0.5": dict(sample_size=64, interpolation_scale=0.5),
}


def build_diffusers(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return diffusers.PixArtTransformer2DModel(**{**TINY, **kwargs}).eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def saved(request, tmp_path_factory):
    """(diffusers model, the folder its own save_pretrained wrote)."""
    ref = build_diffusers(**VARIANTS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return ref, folder


def inputs(ref, H: int, W: int, seed: int = 1):
    """Batch 2, different timesteps, the second caption padded after 3 tokens, and micro-conditions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, ref.config.in_channels, H, W, generator=g)
    t = torch.tensor([999, 17])
    y = torch.randn(2, CAPTION_LEN, ref.config.caption_channels, generator=g)
    mask = torch.ones(2, CAPTION_LEN, dtype=torch.long)
    mask[1, 3:] = 0
    res = torch.tensor([[8.0 * H, 8.0 * W]] * 2)
    ar = torch.tensor([[H / W]] * 2)
    return x, t, y, mask, res, ar


def reference(ref, x, t, y, mask, res, ar):
    cond = {"resolution": res, "aspect_ratio": ar} if ref.use_additional_conditions else None
    with torch.no_grad():
        return ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask, added_cond_kwargs=cond).sample


def ours(model, x, t, y, mask, res, ar):
    with torch.no_grad():
        return model(x, t, y, mask, resolution=res, aspect_ratio=ar)


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of the key map, written independently: diffusers names → original names, q|k|v and k|v fused."""
    top = {
        "pos_embed.proj.": "x_embedder.proj.",
        "adaln_single.emb.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
        "adaln_single.emb.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
        "adaln_single.emb.resolution_embedder.linear_1.": "csize_embedder.mlp.0.",
        "adaln_single.emb.resolution_embedder.linear_2.": "csize_embedder.mlp.2.",
        "adaln_single.emb.aspect_ratio_embedder.linear_1.": "ar_embedder.mlp.0.",
        "adaln_single.emb.aspect_ratio_embedder.linear_2.": "ar_embedder.mlp.2.",
        "adaln_single.linear.": "t_block.1.",
        "caption_projection.linear_1.": "y_embedder.y_proj.fc1.",
        "caption_projection.linear_2.": "y_embedder.y_proj.fc2.",
        "proj_out.": "final_layer.linear.",
        "scale_shift_table": "final_layer.scale_shift_table",
    }
    block = {
        "scale_shift_table": "scale_shift_table",
        "attn1.to_out.0.": "attn.proj.",
        "attn2.to_q.": "cross_attn.q_linear.",
        "attn2.to_out.0.": "cross_attn.proj.",
        "ff.net.0.proj.": "mlp.fc1.",
        "ff.net.2.": "mlp.fc2.",
    }
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.*)", key)
        if m:
            n, rest = m.groups()
            if rest.startswith(("attn1.to_k", "attn1.to_v", "attn2.to_v")):
                continue
            if rest.startswith("attn1.to_q."):
                p = rest.split(".")[-1]
                parts = [state[f"transformer_blocks.{n}.attn1.to_{c}.{p}"] for c in "qkv"]
                out[f"blocks.{n}.attn.qkv.{p}"] = torch.cat(parts)
            elif rest.startswith("attn2.to_k."):
                p = rest.split(".")[-1]
                parts = [state[f"transformer_blocks.{n}.attn2.to_{c}.{p}"] for c in "kv"]
                out[f"blocks.{n}.cross_attn.kv_linear.{p}"] = torch.cat(parts)
            else:
                prefix = next(k for k in block if rest.startswith(k))
                out[f"blocks.{n}.{block[prefix]}{rest[len(prefix):]}"] = value
        else:
            prefix = next(k for k in top if key.startswith(k))
            out[top[prefix] + key[len(prefix):]] = value
    return out


def original_checkpoint(ref) -> dict[str, torch.Tensor]:
    """The weights as the original repository stores them, with its pos_embed table and null caption."""
    sd = to_original({k: v.detach().clone() for k, v in ref.state_dict().items() if k != "pos_embed.pos_embed"})
    sd["pos_embed"] = ref.pos_embed.pos_embed.clone()  # (1, N, D), N = (sample_size / patch)²
    sd["y_embedder.y_embedding"] = torch.randn(CAPTION_LEN, ref.config.caption_channels)
    return sd


@pytest.mark.parametrize("size", [(16, 16), (12, 20)], ids=["square", "non-square"])
def test_forward_matches_diffusers(saved, size):
    ref, folder = saved
    model = PixArtTransformer2DModel.from_pretrained(folder)
    args = inputs(ref, *size)
    expected, got = reference(ref, *args), ours(model, *args)
    assert got.shape == expected.shape == (2, 8, *size)
    assert (got - expected).abs().max() < TOL


def test_diffusers_style_call_gives_the_same_prediction(saved):
    ref, folder = saved
    model = PixArtTransformer2DModel.from_pretrained(folder)
    x, t, y, mask, res, ar = inputs(ref, 16, 16)
    conds = {"resolution": res, "aspect_ratio": ar}
    with torch.no_grad():
        want = reference(ref, x, t, y, mask, res, ar)
        got = model(x, encoder_hidden_states=y, encoder_attention_mask=mask, timestep=t, added_cond_kwargs=conds,
                    return_dict=False)[0]
        assert (got - want).abs().max() < TOL
        out = model(hidden_states=x, encoder_hidden_states=y, encoder_attention_mask=mask, timestep=t,
                    added_cond_kwargs=conds)
        torch.testing.assert_close(out.sample, got, rtol=0, atol=0)
        with pytest.raises(ValueError, match="set_adapters"):
            model(x, encoder_hidden_states=y, timestep=t, added_cond_kwargs=conds, cross_attention_kwargs={"scale": 2})
        # without any diffusers-only keyword (added_cond_kwargs is optional there), and with diffusers' positional
        # order (latents, captions, timestep): still diffusers' (sample,) output, never a bare tensor whose [0] is
        # the first image
        if not model.config.micro_conditions:  # (a micro-conditioned model needs added_cond_kwargs, as in diffusers)
            for out in (model(x, encoder_hidden_states=y, encoder_attention_mask=mask, timestep=t),
                        model(x, y, t, None, None, None, mask)):
                assert isinstance(out, TransformerOutput)
                torch.testing.assert_close(out.sample, model(x, t, y, mask), rtol=0, atol=0)  # pixart's own call
        out = model(x, y, t, conds, None, None, mask)
        assert isinstance(out, TransformerOutput)
        one_step = model(x, 500, y, mask, res, ar)  # pixart's call with a plain number for the timestep
        torch.testing.assert_close(one_step, model(x, torch.full((x.shape[0],), 500), y, mask, res, ar), rtol=0, atol=0)
        torch.testing.assert_close(out.sample, model(x, t, y, mask, res, ar), rtol=0, atol=0)
        with pytest.raises(TypeError, match="unexpected keyword arguments encoder_mask"):
            model(x, encoder_hidden_states=y, timestep=t, encoder_mask=mask)
        with pytest.raises(TypeError, match="needs timestep"):
            model(x, encoder_hidden_states=y)


def test_from_config_builds_the_model_diffusers_builds_from_that_config(saved):
    ref, folder = saved
    config = PixArtTransformer2DModel.load_config(folder)
    assert config == PixArtTransformer2DModel.from_pretrained(folder).config
    for source in (config, dict(ref.config)):  # ours, and diffusers' FrozenDict
        model = PixArtTransformer2DModel.from_config(source)
        assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert PixArtTransformer2DModel.from_config(config, num_layers=1).config.num_layers == 1


def test_diffusers_fuse_qkv_calls_are_accepted_and_keep_the_output(saved):
    ref, folder = saved
    model = PixArtTransformer2DModel.from_pretrained(folder)
    args = inputs(ref, 16, 16)
    before = ours(model, *args)
    model.fuse_qkv_projections()
    torch.testing.assert_close(ours(model, *args), before, rtol=0, atol=0)
    model.unfuse_qkv_projections()
    assert set(dict(model.named_parameters())) == set(dict(PixArtTransformer2DModel(model.config).named_parameters()))


def test_float_timesteps_and_broadcast_conditions_match_diffusers(saved):
    ref, folder = saved
    model = PixArtTransformer2DModel.from_pretrained(folder)
    x, _, y, mask, res, ar = inputs(ref, 8, 8)
    t = torch.tensor([500.25, 0.5])
    expected = reference(ref, x, t, y, mask, res, ar)
    assert (ours(model, x, t, y, mask, res[:1], ar[:1]) - expected).abs().max() < TOL


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_original_checkpoint_loads_and_matches_diffusers(saved, tmp_path, suffix):
    ref, folder = saved
    sd = original_checkpoint(ref)
    path = tmp_path / f"PixArt-XL-2-tiny{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": sd, "epoch": 3}, path)
    else:
        save_file(sd, path)
    model = PixArtTransformer2DModel.from_single_file(path, config=folder)
    args = inputs(ref, 12, 20)
    assert (ours(model, *args) - reference(ref, *args)).abs().max() < TOL


def test_original_pth_use_ema_loads_the_ema_weights(tmp_path):
    ref, ema = build_diffusers(0, sample_size=64), build_diffusers(1, sample_size=64)
    path = tmp_path / "train.pth"
    torch.save({"state_dict": original_checkpoint(ref), "state_dict_ema": original_checkpoint(ema)}, path)
    cfg = TransformerConfig.from_dict(dict(ref.config))
    args = inputs(ref, 8, 8)
    raw = PixArtTransformer2DModel.from_single_file(path, config=cfg)
    averaged = PixArtTransformer2DModel.from_single_file(path, config=cfg, use_ema=True)
    assert (ours(raw, *args) - reference(ref, *args)).abs().max() < TOL
    assert (ours(averaged, *args) - reference(ema, *args)).abs().max() < TOL


def test_diffusers_keyed_single_file_loads(saved):
    ref, folder = saved
    model = PixArtTransformer2DModel.from_single_file(
        folder / "diffusion_pytorch_model.safetensors", config=folder / "config.json"
    )
    args = inputs(ref, 16, 16)
    assert (ours(model, *args) - reference(ref, *args)).abs().max() < TOL


@pytest.mark.parametrize(
    "kwargs, interpolation",
    [(dict(sample_size=32, interpolation_scale=0.5), 0.5), (dict(sample_size=128), 2.0)],
    ids=["256", "1024-MS"],
)
def test_config_is_inferred_from_original_checkpoint(tmp_path, kwargs, interpolation):
    # 72-wide heads as every published PixArt: the inference reads the head count from the width
    ref = build_diffusers(**{**TINY, "attention_head_dim": 72, "cross_attention_dim": 144, **kwargs})
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": original_checkpoint(ref)}, path)
    model = PixArtTransformer2DModel.from_single_file(path)
    c = model.config
    assert (c.sample_size, c.num_layers, c.inner_dim, c.num_attention_heads) == (kwargs["sample_size"], 2, 144, 2)
    assert (c.caption_channels, c.out_channels, c.in_channels) == (CAPTION_CHANNELS, 8, 4)
    assert c.pe_interpolation == interpolation
    assert c.micro_conditions == ref.use_additional_conditions
    args = inputs(ref, 12, 20)
    assert (ours(model, *args) - reference(ref, *args)).abs().max() < TOL


def test_single_file_without_position_table_asks_for_config(saved, tmp_path):
    ref, _ = saved
    sd = original_checkpoint(ref)
    del sd["pos_embed"]
    save_file(sd, tmp_path / "comfy.safetensors")
    with pytest.raises(WeightsError, match="pass config="):
        PixArtTransformer2DModel.from_single_file(tmp_path / "comfy.safetensors")


def test_key_map_consumes_every_source_key_and_produces_every_model_key(saved, tmp_path):
    ref, folder = saved
    save_file(original_checkpoint(ref), tmp_path / "orig.safetensors")
    mapped = apply_key_map(lazy_tensors([tmp_path / "orig.safetensors"]), PIXART_ORIGINAL)
    expected = PixArtTransformer2DModel.from_pretrained(folder).state_dict()
    assert mapped.keys() == expected.keys()
    for key, lazy in mapped.items():
        assert lazy.shape == tuple(expected[key].shape), key  # known before reading
        assert torch.equal(lazy(), expected[key]), key


def test_key_map_names_a_key_no_rule_consumes(saved, tmp_path):
    ref, _ = saved
    sd = original_checkpoint(ref)
    sd["blocks.0.attn.rope.freqs"] = torch.zeros(3)
    save_file(sd, tmp_path / "odd.safetensors")
    with pytest.raises(WeightsError, match=r"blocks\.0\.attn\.rope\.freqs"):
        apply_key_map(lazy_tensors([tmp_path / "odd.safetensors"]), PIXART_ORIGINAL)


def test_latent_size_not_divisible_by_patch_raises(saved):
    ref, folder = saved
    model = PixArtTransformer2DModel.from_pretrained(folder)
    x, t, y, mask, res, ar = inputs(ref, 16, 16)
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(model, x[..., :15], t, y, mask, res, ar)


def test_micro_conditioned_model_requires_resolution(tmp_path):
    ref = build_diffusers(**VARIANTS["1024-MS"])  # the only micro-conditioned variant
    ref.save_pretrained(tmp_path)
    model = PixArtTransformer2DModel.from_pretrained(tmp_path)
    x, t, y, mask, _, _ = inputs(ref, 8, 8)
    with pytest.raises(ValueError, match="resolution"):
        model(x, t, y, mask)


def test_fully_masked_caption_stays_finite(saved):
    ref, folder = saved
    model = PixArtTransformer2DModel.from_pretrained(folder)
    x, t, y, mask, res, ar = inputs(ref, 8, 8)
    assert torch.isfinite(ours(model, x, t, y, torch.zeros_like(mask), res, ar)).all()


def test_bf16_load_creates_no_fp32_params_and_runs_in_bf16(saved):
    ref, folder = saved
    model = PixArtTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not list(model.buffers())
    x, t, y, mask, res, ar = inputs(ref, 8, 12)
    out = ours(model, x.bfloat16(), t, y.bfloat16(), mask, res, ar)
    assert out.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits; 0.1 catches a broken path, not rounding
    assert (out.float() - reference(ref, x, t, y, mask, res, ar)).abs().max() < 0.1


def test_position_embedding_is_cached_per_grid_outside_state_dict(saved):
    ref, folder = saved
    model = PixArtTransformer2DModel.from_pretrained(folder)
    for size in [(8, 8), (8, 8), (12, 20)]:
        ours(model, *inputs(ref, *size))
    assert set(model.pos_cache) == {(4, 4, torch.device("cpu")), (6, 10, torch.device("cpu"))}
    assert model.state_dict().keys() == ref.state_dict().keys() - {"pos_embed.pos_embed"}


def test_residual_stream_is_token_major_contiguous(saved):
    # the patch conv's output is channel-major; carried into the blocks it slowed every step ~10% on a GPU
    ref, folder = saved
    model = PixArtTransformer2DModel.from_pretrained(folder)
    seen = []
    model.transformer_blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].is_contiguous()))
    ours(model, *inputs(ref, 8, 12))
    assert seen == [True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens, masked", [(4096, False), (4096, True), (256, True)])
def test_cuda_attention_with_cudnn_first_equals_pytorchs_default_order(tokens, masked):
    """For inference on CUDA the transformer's attention puts cuDNN's kernel first; it must give what PyTorch's own
    order (flash, or the memory-efficient kernel with a bias) gives. Both take bf16 inputs and round their bf16
    output: against the float64 result of the same bf16 inputs each must be within 1e-2 relative to its norm (bf16
    keeps 8 bits: an output's rounding alone is up to 2e-3, a 5× margin for the probabilities' rounding), and the
    two within 1e-2 of each other."""
    from pixart.models.layers import attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, tokens, 1152, generator=g)
    kv = torch.randn(2, 120 if masked else tokens, 1152, generator=g)
    bias = None
    if masked:
        bias = torch.zeros(2, 1, 1, kv.shape[1])
        bias[..., 20:] = -10000.0
    exact = torch.nn.functional.scaled_dot_product_attention(
        *(t.bfloat16().double().view(2, -1, 16, 72).transpose(1, 2) for t in (q, kv, kv)),
        attn_mask=None if bias is None else bias.bfloat16().double()).transpose(1, 2).reshape(2, tokens, 1152)
    cuda = [t.cuda().bfloat16() for t in (q, kv, kv)]
    cuda_bias = None if bias is None else bias.cuda().bfloat16()
    with torch.no_grad():  # the order applies without autograd only
        ours = attention(*cuda, 16, cuda_bias).double().cpu()
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION,
                                         torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION]):
        q4, k4, v4 = (t.view(2, -1, 16, 72).transpose(1, 2) for t in cuda)
        default = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, attn_mask=cuda_bias)
    default = default.transpose(1, 2).reshape(2, tokens, 1152).double().cpu()
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(ours, exact) < 1e-2 and rel(default, exact) < 1e-2 and rel(ours, default) < 1e-2


def test_ordered_attention_traces_whole_and_a_failing_backend_falls_back(monkeypatch, caplog):
    """The CUDA backend order, made to apply on this CPU: it equals plain SDPA, dynamo traces it as one graph (as
    pipe.compile() does), and a backend that fails at run time gives way to PyTorch's order with one warning."""
    from pixart.models import layers

    if not layers._CAN_ORDER:
        pytest.skip("this PyTorch's sdpa_kernel cannot order backends")
    monkeypatch.setattr(layers, "ORDERED_DEVICES", ("cpu",))
    monkeypatch.setattr(layers, "CUDA_ORDER", list(layers.CUDA_ORDER))  # restored after the test turns it off
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 64, 32, generator=g), torch.randn(2, 10, 32, generator=g)
    bias = torch.zeros(2, 1, 1, 10)
    bias[..., 6:] = -10000.0
    plain = torch.nn.functional.scaled_dot_product_attention(
        *(t.view(2, -1, 4, 8).transpose(1, 2) for t in (q, k, k)), attn_mask=bias).transpose(1, 2).reshape(2, 64, 32)
    with torch.no_grad():
        assert torch.allclose(layers.attention(q, k, k, 4, bias), plain, atol=1e-6)
        torch._dynamo.reset()
        traced = torch.compile(layers.attention, backend="eager", fullgraph=True)
        assert torch.allclose(traced(q, k, k, 4, bias), plain, atol=1e-6)
        real, calls = torch.nn.functional.scaled_dot_product_attention, []

        def refuses_once(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("cuDNN Frontend error: No execution plans support the graph")
            return real(*args, **kwargs)
        monkeypatch.setattr(layers.F, "scaled_dot_product_attention", refuses_once)
        with caplog.at_level("WARNING", logger="pixart"):
            assert torch.allclose(layers.attention(q, k, k, 4, bias), plain, atol=1e-6)
    assert layers.CUDA_ORDER is None and len(calls) == 2
    assert "CUDNN_ATTENTION first failed (cuDNN Frontend error" in caplog.text


def test_a_pytorch_whose_compiler_mishandles_the_order_traces_without_it(monkeypatch):
    """Before PyTorch 2.9 torch.compile ignores or fails on sdpa_kernel's priorities: there the traced attention
    leaves the order out (eager calls keep it)."""
    from pixart.models import layers

    monkeypatch.setattr(layers, "ORDERED_DEVICES", ("cpu",))
    monkeypatch.setattr(layers, "_CAN_ORDER", True)
    monkeypatch.setattr(layers, "_ORDER_TRACES", False)
    ordered = []
    monkeypatch.setattr(layers, "_ordered_attention", lambda *args: ordered.append(1))  # None: the plain call runs
    q = torch.randn(2, 16, 32)
    with torch.no_grad():
        layers.attention(q, q, q, 4)
        assert ordered == [1]  # eager: ordered
        torch._dynamo.reset()
        torch.compile(layers.attention, backend="eager", fullgraph=True)(q, q, q, 4)
    assert ordered == [1]  # traced: not


def test_cpu_gelu_in_pieces_equals_pytorchs(monkeypatch):
    """The CPU fp32 inference GELU (x·sigmoid(2u), a few rows at a time) computes F.gelu's tanh form: within 1e-6
    (fp32 rounding of two formulas of one function, on values up to ~10), extremes and non-finite values alike."""
    from pixart.models import layers

    monkeypatch.setattr(layers, "GELU_PIECE_BYTES", 4 * 48 * 3)  # 3 rows per piece, the last one shorter
    torch.manual_seed(0)
    x = torch.randn(2, 7, 48) * 3
    x[0, 0, :6] = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e20, -1e20, -30.0])
    expected = torch.nn.functional.gelu(x, approximate="tanh")
    with torch.no_grad():
        out = layers.gelu_tanh(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert not torch.equal(out, expected)  # really the other formula (or this test proves nothing)
    torch._dynamo.reset()
    compiled = torch.compile(layers.gelu_tanh, dynamic=False)(x)  # the formula inside a CPU graph (~5 s)
    torch.testing.assert_close(compiled, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    traced = []

    def record(graph_module, example_inputs):
        traced.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module.forward

    torch._dynamo.reset()
    torch.compile(layers.gelu_tanh, backend=record)(x)
    assert any("sigmoid" in target for target in traced) and not any("gelu" in target for target in traced)
    # with autograd, in bf16 or on a strided view it is F.gelu itself
    leaf, reference = x[1].clone().requires_grad_(), x[1].clone().requires_grad_()
    layers.gelu_tanh(leaf).sum().backward()
    torch.nn.functional.gelu(reference, approximate="tanh").sum().backward()
    assert torch.equal(leaf.grad, reference.grad)
    for other in (x[1].bfloat16(), x[1].t()):
        assert torch.equal(layers.gelu_tanh(other), torch.nn.functional.gelu(other, approximate="tanh"))
