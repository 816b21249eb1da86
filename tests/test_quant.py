"""Weight-only int8 / int4 T5 encoder: quality against the float model, kernels, folder round trip, memory, errors."""
import json
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import pixart.weights.loading as loading_module
from pixart.models.t5 import T5EncoderModel
from pixart.quant import Int4Linear, Int8Linear, QuantSpec, quant_spec
from pixart.weights.files import Lazy, WeightsError

transformers = pytest.importorskip("transformers")

VOCAB = 300
LINEARS = ("q", "k", "v", "o", "wi_0", "wi_1", "wo")
# d_model 128 and d_ff 256 hold two and four int4 groups of 64 per row
SPECS = {"int8": QuantSpec(8), "int4": QuantSpec(4, 64)}


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    """A random T5 v1.1-style encoder saved by transformers (fp32)."""
    folder = tmp_path_factory.mktemp("t5")
    config = transformers.T5Config(vocab_size=VOCAB, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
                                   feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(config).eval()
    with torch.no_grad():  # randomise the norms too, so every kept-float parameter matters
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 40), generator=g)
    mask = torch.ones(2, 40, dtype=torch.long)
    ids[1, 25:], mask[1, 25:] = 0, 0
    return ids, mask


def encode(model):
    ids, mask = inputs()
    with torch.no_grad():
        return model(ids, mask)[0].float()


def token_cosine(a, b):
    """Cosine similarity of each real token's embedding (B, L) -> the real tokens' values."""
    return F.cosine_similarity(a, b, dim=-1)[inputs()[1].bool()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name, floor", [("int8", 0.99), ("int4", 0.95)])
def test_quantized_embeddings_are_close_to_the_float_model(float_dir, name, floor, dtype):
    # observed on this random model: per-token cosine >= 0.9998 (int8), >= 0.97 (int4, mean 0.987); the floors leave
    # room for other seeds. Random Gaussian weights are the hard case for min-max int4: real T5 weights are similar.
    reference = encode(T5EncoderModel.from_pretrained(float_dir, torch_dtype=dtype))
    model = T5EncoderModel.from_pretrained(float_dir, torch_dtype=dtype, quantization=SPECS[name])
    block = model.encoder.block[0]
    assert isinstance(block.layer[0].SelfAttention.q, Int8Linear if name == "int8" else Int4Linear)
    assert model.shared.weight.dtype == block.layer[0].layer_norm.weight.dtype == dtype
    assert block.layer[0].SelfAttention.relative_attention_bias.weight.dtype == dtype
    cosine = token_cosine(encode(model), reference)
    assert cosine.min() >= floor
    assert cosine.min() < 1 - 1e-6  # the weights really were quantized


@pytest.mark.parametrize("layer", [Int8Linear(128, 96), Int4Linear(128, 96, 32)], ids=["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantized_linear_rounds_to_nearest_and_computes_with_its_dequantized_weight(layer, dtype):
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.05
    stored = layer.quantize(w, torch.float32)
    with torch.no_grad():
        for key, t in stored.items():
            setattr(layer, key, torch.nn.Parameter(t, requires_grad=False))
    if isinstance(layer, Int8Linear):
        dequantized, step = layer.weight.float() * layer.scale[:, None], layer.scale[:, None]
    else:
        dequantized, step = layer.dequantize(), layer.scale.repeat_interleave(32, dim=1)
    assert ((dequantized - w).abs() <= step / 2 + 1e-6).all()  # every weight at its nearest level
    layer.to(dtype)  # the scales: the layer computes in their dtype (fused CPU kernels for bf16 / fp16)
    x = torch.randn(3, 5, 128)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (3, 5, 96)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # half activations and half scales
    torch.testing.assert_close(out.float(), x.to(dtype).float() @ dequantized.t(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("make", [lambda: Int8Linear(128, 96), lambda: Int4Linear(128, 96, 32)], ids=["int8", "int4"])
def test_dequantizing_forward_in_pieces_equals_the_whole_weight(make, monkeypatch):
    """The fp32 path dequantizes a few output rows at a time (bounded memory): pieces of 10 rows (the last one
    shorter) give the whole-weight product; each output is the same dot product, so only BLAS blocking can differ."""
    import pixart.quant as quant

    torch.manual_seed(0)
    layer = make()
    for key, t in layer.quantize(torch.randn(96, 128) * 0.05, torch.float32).items():
        setattr(layer, key, torch.nn.Parameter(t, requires_grad=False))
    x = torch.randn(3, 5, 128)
    whole = layer(x)
    monkeypatch.setattr(quant, "PIECE_BYTES", 10 * 128 * 4)
    made = []
    real = F.linear
    monkeypatch.setattr(quant.F, "linear", lambda x, w, *a: made.append(w.shape[0]) or real(x, w, *a))
    pieces = layer(x)
    assert made == [10] * 9 + [6]
    torch.testing.assert_close(pieces, whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantized_folder_round_trip_is_bit_exact(float_dir, tmp_path, name):
    fresh = T5EncoderModel.from_pretrained(float_dir, torch_dtype=torch.bfloat16, quantization=SPECS[name])
    fresh.save_pretrained(tmp_path)
    entry = json.loads((tmp_path / "config.json").read_text())["quantization"]
    assert entry == {"method": "weight_only", "bits": SPECS[name].bits, "group_size": SPECS[name].group_size}
    reloaded = T5EncoderModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)  # detected, not requantized
    assert reloaded.quantization == SPECS[name]
    again = T5EncoderModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16, quantization=SPECS[name])
    for model in (reloaded, again):
        state, expected = model.state_dict(), fresh.state_dict()
        assert state.keys() == expected.keys()
        assert all(state[k].dtype == expected[k].dtype and torch.equal(state[k], expected[k]) for k in state)
        assert torch.equal(encode(model), encode(fresh))


@pytest.mark.parametrize("name, ratio", [("int8", 1 / 4 + 0.01), ("int4", 1 / 8 + 1 / 32)])
def test_quantized_layers_take_a_quarter_and_an_eighth_of_fp32(float_dir, name, ratio):
    # int8: 1 byte per weight + a 4-byte scale per row. int4: half a byte + two fp32 numbers per group of 64
    # (1/32 of fp32 here; with bf16 scales and groups of 128, as for T5-XXL, the overhead is 1/128 and int4 is 1/7.5)
    model = T5EncoderModel.from_pretrained(float_dir, quantization=SPECS[name])
    floats = T5EncoderModel.from_pretrained(float_dir)
    nbytes = {}
    for key, m in (("quantized", model), ("float", floats)):
        layers = [mod for n, mod in m.named_modules() if n.rsplit(".", 1)[-1] in LINEARS]
        assert len(layers) == 2 * len(LINEARS)
        nbytes[key] = sum(p.nbytes for layer in layers for p in layer.parameters())
    assert nbytes["quantized"] <= ratio * nbytes["float"]
    assert nbytes["quantized"] > (ratio - 0.04) * nbytes["float"]
    rest = sum(p.nbytes for n, p in model.named_parameters() if n.rsplit(".", 2)[-2] not in LINEARS)
    assert rest == sum(p.nbytes for n, p in floats.named_parameters() if n.rsplit(".", 2)[-2] not in LINEARS)


def test_quantize_while_loading_holds_one_float_linear_weight_at_a_time(float_dir, monkeypatch):
    alive, peak, reads = set(), [0], []

    def counting(files):
        tensors = original(files)

        def watched(key, lazy):
            def read():
                t = lazy()
                reads.append(key)
                alive.add(key)
                weakref.finalize(t, alive.discard, key)
                peak[0] = max(peak[0], len(alive))
                return t

            return Lazy(read, lazy.shape)

        return {k: watched(k, v) if k.rsplit(".", 2)[-2] in LINEARS else v for k, v in tensors.items()}

    original = loading_module.lazy_tensors
    monkeypatch.setattr(loading_module, "lazy_tensors", counting)  # every load reads its files there
    T5EncoderModel.from_pretrained(float_dir, quantization="int8")
    assert peak[0] == 1
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 2 * len(LINEARS)  # each read and quantized once
    reads.clear()
    T5EncoderModel.from_pretrained(float_dir)  # the counter does see a float load keeping every weight
    assert len(reads) == 2 * len(LINEARS) and peak[0] == len(reads)


def test_fp16_keeps_the_quantized_wo_in_fp32_and_cast_keeps_integer_weights(float_dir):
    model = T5EncoderModel.from_pretrained(float_dir, torch_dtype=torch.float16, quantization="int8")
    ff = model.encoder.block[0].layer[1].DenseReluDense
    assert ff.wo.scale.dtype == torch.float32 and ff.wi_0.scale.dtype == torch.float16  # REFERENCE §3
    x = torch.randn(1, 3, 128, dtype=torch.float16)
    assert ff(x).dtype == torch.float32
    model.cast(torch.bfloat16)  # as the pipeline's .to(dtype) does
    assert ff.wo.weight.dtype == torch.int8 and ff.wo.scale.dtype == torch.bfloat16
    assert torch.isfinite(encode(model)).all()


def test_unknown_quantization_names_and_specs_are_errors(float_dir):
    with pytest.raises(ValueError, match="unknown quantization 'fp8': choose one of int8, int4"):
        T5EncoderModel.from_pretrained(float_dir, quantization="fp8")
    for bits, group in ((4, None), (4, 100), (8, 128), (3, 32)):
        with pytest.raises(ValueError, match="weight-only quantization takes"):
            QuantSpec(bits, group)
    assert quant_spec("int4") == QuantSpec(4, 128) and quant_spec(None) is None
    with pytest.raises(ValueError, match="groups of 256 do not divide the 128 input features"):
        T5EncoderModel.from_pretrained(float_dir, quantization=QuantSpec(4, 256))


def test_corrupt_or_mismatched_quantized_folders_give_weights_errors(float_dir, tmp_path):
    T5EncoderModel.from_pretrained(float_dir, quantization="int8").save_pretrained(tmp_path)
    config_path, weights_path = tmp_path / "config.json", tmp_path / "model.safetensors"
    config = json.loads(config_path.read_text())
    with pytest.raises(WeightsError, match="quantized to int8, which cannot be requantized to int4"):
        T5EncoderModel.from_pretrained(tmp_path, quantization="int4")

    config_path.write_text(json.dumps({**config, "quantization": {"method": "weight_only", "bits": 3}}))
    with pytest.raises(WeightsError, match="quantization entry we cannot read"):
        T5EncoderModel.from_pretrained(tmp_path)
    config_path.write_text(json.dumps({**config, "quantization": QuantSpec(4, 64).to_dict()}))
    with pytest.raises(WeightsError, match=r"shape mismatches[\s\S]*unexpected|missing keys"):
        T5EncoderModel.from_pretrained(tmp_path)  # int8 tensors under an int4 entry
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "quantization"}))
    with pytest.raises(WeightsError, match="unexpected keys"):
        T5EncoderModel.from_pretrained(tmp_path)  # the entry lost: scales the float model does not have
    with pytest.raises(WeightsError, match="stored as torch.int8, not as floats"):
        T5EncoderModel.from_pretrained(tmp_path, quantization="int8")

    config_path.write_text(json.dumps(config))
    state = load_file(weights_path)
    key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    save_file({**state, key: state[key].float()}, weights_path)
    with pytest.raises(WeightsError, match=f"{key} is stored as torch.float32, but its config.json says"):
        T5EncoderModel.from_pretrained(tmp_path)
    weights_path.write_bytes(weights_path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="truncated"):
        T5EncoderModel.from_pretrained(tmp_path)
