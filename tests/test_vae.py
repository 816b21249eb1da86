"""AutoencoderKL parity with diffusers: tiny random VAEs saved by diffusers, loaded by pixart, compared in fp32."""
import copy
import json

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from safetensors.torch import save_file

from pixart.models.vae import AutoencoderKL
from pixart.weights.files import WeightsError

ATOL = 1e-4
TINY = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)
VARIANTS = {
    "default": {},
    "no_quant_convs": dict(use_quant_conv=False, use_post_quant_conv=False),
    "no_mid_attention": dict(mid_block_add_attention=False),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant name -> (diffusers VAE, the pipeline-style folder it was saved into under vae/)."""
    out = {}
    for name, overrides in VARIANTS.items():
        torch.manual_seed(0)
        ref = DiffusersVAE(**TINY, **overrides).eval()
        with torch.no_grad():  # random GroupNorm affines too, so a swapped norm weight/bias would show
            for module in ref.modules():
                if isinstance(module, torch.nn.GroupNorm):
                    module.weight.normal_(1.0, 0.2)
                    module.bias.normal_(0.0, 0.2)
        folder = tmp_path_factory.mktemp(name)
        ref.save_pretrained(folder / "vae")
        out[name] = ref, folder
    return out


def load(saved, name="default", **kwargs):
    ref, folder = saved[name]
    return ref, AutoencoderKL.from_pretrained(folder, subfolder="vae", **kwargs)


def latents(h=8, w=8, seed=1):
    return torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(seed))


def images(h=16, w=16, seed=2):
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("h,w", [(8, 8), (6, 10)])
@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_decode_matches_diffusers(saved, variant, h, w):
    ref, vae = load(saved, variant)
    z = latents(h, w)
    out = vae.decode(z).sample
    assert out.shape == (2, 3, 2 * h, 2 * w)
    torch.testing.assert_close(out, ref.decode(z).sample, atol=ATOL, rtol=0)


@pytest.mark.parametrize("h,w", [(16, 16), (12, 20)])
@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_encode_posterior_matches_diffusers(saved, variant, h, w):
    ref, vae = load(saved, variant)
    x = images(h, w)
    ours, theirs = vae.encode(x).latent_dist, ref.encode(x).latent_dist
    assert ours.mean.shape == (2, 4, h // 2, w // 2)
    for name in ("mean", "logvar", "std", "var"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=ATOL, rtol=0, msg=name)
    torch.testing.assert_close(ours.mode(), theirs.mode(), atol=ATOL, rtol=0)


@torch.no_grad()
def test_logvar_is_clamped_like_diffusers(saved):
    ref, vae = load(saved)
    ref = copy.deepcopy(ref)  # the fixture's model is shared
    for model in (ref, vae):  # push the logvar half of quant_conv far out of [-30, 20] both ways
        model.quant_conv.bias[4:] = torch.tensor([100.0, -100.0, 100.0, -100.0])
    ours, theirs = vae.encode(images()).latent_dist, ref.encode(images()).latent_dist
    assert ours.logvar.max() == 20.0 and ours.logvar.min() == -30.0
    torch.testing.assert_close(ours.logvar, theirs.logvar, atol=ATOL, rtol=0)


@torch.no_grad()
def test_posterior_sample_with_same_generator_matches_diffusers(saved):
    ref, vae = load(saved)
    x = images()
    ours, theirs = vae.encode(x).latent_dist, ref.encode(x).latent_dist
    a = ours.sample(generator=torch.Generator().manual_seed(7))
    b = theirs.sample(generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert not torch.allclose(a, ours.mean, atol=1e-3)  # noise was added
    a = ours.sample(generator=[torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)])
    b = theirs.sample(generator=[torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)])
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="generators"):
        ours.sample(generator=[torch.Generator()] * 3)


@torch.no_grad()
def test_forward_with_sampled_posterior_matches_diffusers(saved):
    ref, vae = load(saved)
    x = images()
    torch.testing.assert_close(vae(x).sample, ref(x).sample, atol=ATOL, rtol=0)
    ours = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(5)).sample
    theirs = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(5)).sample
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@torch.no_grad()
def test_tuple_outputs_and_config_as_the_pipeline_uses_them(saved):
    _, vae = load(saved)
    assert vae.config.scaling_factor == 0.18215
    image = vae.decode(latents(6, 10) / vae.config.scaling_factor, return_dict=False)[0]
    assert image.shape == (2, 3, 12, 20)
    (posterior,) = vae.encode(images(), return_dict=False)
    assert posterior.mean.shape == (2, 4, 8, 8)
    (image,) = vae(images(), return_dict=False)
    assert image.shape == (2, 3, 16, 16)


def old_attention_layout(state):
    """diffusers' keys with the attention renamed to query/key/value/proj_attn; q and proj as 1x1-conv weights."""
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, t in state.items():
        for new, old in names.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if old in ("query", "proj_attn") and key.endswith("weight"):
                    t = t[:, :, None, None]
        out[key] = t.contiguous()
    return out


def save_folder(folder, config_path, state):
    folder.mkdir()
    (folder / "config.json").write_text(config_path.read_text())
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


@torch.no_grad()
def test_old_attention_key_names_load_and_give_the_same_output(saved, tmp_path):
    ref, vae_folder = saved["default"]
    state = old_attention_layout(ref.state_dict())
    assert any(k.endswith("attentions.0.proj_attn.weight") and state[k].ndim == 4 for k in state)
    folder = save_folder(tmp_path / "old", vae_folder / "vae" / "config.json", state)
    vae = AutoencoderKL.from_pretrained(folder)
    torch.testing.assert_close(vae.decode(latents()).sample, ref.decode(latents()).sample, atol=ATOL, rtol=0)
    x = images()
    torch.testing.assert_close(vae.encode(x).latent_dist.mean, ref.encode(x).latent_dist.mean, atol=ATOL, rtol=0)


def test_loading_stays_strict_for_other_keys(saved, tmp_path):
    ref, vae_folder = saved["default"]
    config = vae_folder / "vae" / "config.json"
    state = old_attention_layout(ref.state_dict())
    extra = save_folder(tmp_path / "extra", config, {**state, "decoder.mid_block.attentions.0.stray.weight": torch.ones(1)})
    with pytest.raises(WeightsError, match="(?s)unexpected keys.*stray"):
        AutoencoderKL.from_pretrained(extra)
    state.pop("encoder.conv_in.bias")
    with pytest.raises(WeightsError, match="(?s)missing keys.*encoder.conv_in.bias"):
        AutoencoderKL.from_pretrained(save_folder(tmp_path / "missing", config, state))
    wide = json.loads(config.read_text()) | {"block_out_channels": [32, 96]}
    (tmp_path / "extra" / "config.json").write_text(json.dumps(wide))
    with pytest.raises(WeightsError, match="shape mismatches"):
        AutoencoderKL.from_pretrained(tmp_path / "extra")


@torch.no_grad()
def test_bf16_decode_is_as_close_to_fp32_as_diffusers_own_bf16(saved):
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%) and the error grows through ~12 conv/norm layers, so a
    # fixed 1e-4 cannot hold; we bound ours by 2x the error diffusers itself makes in bf16 on the same model, and by
    # 0.1 absolute on outputs of unit scale (measured: 0.03 for both).
    ref, vae = load(saved, torch_dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16
    z = latents()
    exact = ref.decode(z).sample
    ours = vae.decode(z).sample  # fp32 latents are cast to the VAE dtype
    assert ours.dtype == torch.bfloat16
    theirs = copy.deepcopy(ref).to(torch.bfloat16).decode(z.bfloat16()).sample  # a copy: the fixture's is shared
    our_err, their_err = (ours.float() - exact).abs().max(), (theirs.float() - exact).abs().max()
    assert our_err <= max(2 * their_err, 1e-2) and our_err < 0.1, (our_err, their_err)


@torch.no_grad()
def test_channels_last_gives_the_same_output(saved):
    ref, vae = load(saved)
    vae = vae.to(memory_format=torch.channels_last)
    z = latents(6, 10).to(memory_format=torch.channels_last)
    out = vae.decode(z).sample
    assert out.is_contiguous(memory_format=torch.channels_last)  # no hidden NCHW copies on the way
    torch.testing.assert_close(out, ref.decode(latents(6, 10)).sample, atol=ATOL, rtol=0)
    x = images(12, 20)
    mean = vae.encode(x.to(memory_format=torch.channels_last)).latent_dist.mean
    torch.testing.assert_close(mean, ref.encode(x).latent_dist.mean, atol=ATOL, rtol=0)


@torch.no_grad()
def test_cpu_decode_runs_channels_last_and_equals_the_nchw_decoder(saved):
    _, vae = load(saved)
    layouts = []
    vae.decoder.conv_in.register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    z = latents(6, 10)
    out = vae.decode(z).sample
    assert layouts == [True]
    nchw = vae.decoder(vae.post_quant_conv(z))  # the same layers on the contiguous NCHW input
    assert nchw.is_contiguous()
    torch.testing.assert_close(out, nchw, atol=ATOL, rtol=0)  # only the convolutions' summation order differs


def test_gradients_match_diffusers_despite_in_place_ops(saved):
    ref, vae = load(saved)
    x = images()
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    vae(ours).sample.square().mean().backward()
    ref(theirs).sample.square().mean().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-3)
    ref.zero_grad()


def test_tiled_decode_with_one_tile_is_the_plain_decode(saved):
    _, vae = load(saved)
    z = torch.randn(1, 4, 12, 20, generator=torch.Generator().manual_seed(5))
    plain = vae.decode(z).sample
    vae.enable_tiling(tile=20, overlap=4)
    torch.testing.assert_close(vae.decode(z).sample, plain, atol=1e-6, rtol=0)


def test_tiled_decode_is_no_further_from_untiled_than_diffusers_tiling_and_has_no_seams(saved):
    """Each tile sees only its own GroupNorm statistics (and attention span), so no tiling is exact; ours must be
    at least as close to the whole decode as diffusers' own tiled decode at the same tile and overlap, with no
    step at the tile borders."""
    ref, vae = load(saved)
    z = torch.nn.functional.interpolate(torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(6)),
                                        size=(24, 32), mode="bilinear")  # smooth latents, like real images
    with torch.no_grad():
        plain = ref.decode(z).sample
        ref.enable_tiling()  # diffusers: 16-latent tiles (sample_size 32 / 2), 25% overlap
        theirs = ref.decode(z).sample
        ref.disable_tiling()
    vae.enable_tiling(tile=ref.tile_latent_min_size, overlap=int(ref.tile_latent_min_size * ref.tile_overlap_factor))
    tiled = vae.decode(z).sample
    assert tiled.shape == plain.shape
    assert (tiled - plain).abs().mean() <= (theirs - plain).abs().mean()
    col_jump = (tiled[..., 1:] - tiled[..., :-1]).abs().mean(dim=(0, 1, 2))  # (W - 1,)
    assert col_jump.max() <= 3 * col_jump.median() + 1e-3


def test_sliced_decode_equals_batched_decode(saved):
    _, vae = load(saved)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    batched = vae.decode(z).sample
    vae.enable_slicing()
    torch.testing.assert_close(vae.decode(z).sample, batched, atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_equals_nearest_upsample_then_conv(channels_last):
    """Upsample runs the 3x3 conv as four 2x2 convs over the input; it must equal diffusers' Upsample2D (nearest ×2,
    then the conv) up to fp32 summation order, on an odd, non-square size, keeping the input's memory format."""
    from pixart.models.vae import Upsample
    torch.manual_seed(0)
    up = Upsample(16)
    x = torch.randn(2, 16, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    reference = up.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    out = up(x)
    assert out.shape == (2, 16, 10, 14)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)  # outputs ~1: fp32 rounding is ~1e-6

    # and its gradients, for training through the decoder
    grad = torch.randn_like(out)
    out.backward(grad)
    ours = up.conv.weight.grad.clone()
    up.conv.weight.grad = None
    reference.backward(grad)
    torch.testing.assert_close(ours, up.conv.weight.grad, atol=1e-4, rtol=1e-5)
