"""T5 tokenizer parity with transformers' T5Tokenizer, and prompt cleaning parity with diffusers' PixArt pipeline."""
import io
import json
import logging
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

from pixart import tokenizer as tokenizer_module
from pixart.tokenizer import T5Tokenizer, clean_caption_once, preprocess_prompt, warn_truncated

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

PROMPTS = (Path(__file__).resolve().parent / "data" / "prompts.txt").read_text().splitlines()
FILLER = [f"the quick brown fox number {i} jumps over a lazy dog in red, green and blue light" for i in range(40)]
# Special tokens inside the text, odd whitespace, unicode that NFKC changes, characters outside the vocabulary.
ODD_TEXTS = [
    "", " ", "hello <extra_id_0> world</s>x", "a<extra_id_10>b<extra_id_1>c", "<extra_id_99><extra_id_100>",
    "<pad><unk></s>", "tab\there  two  spaces\nnew line", "ÉCOLE ﬁ ①² naïve café — “quotes”",
    "一只可爱的猫 🐱 ok", "  leading and trailing  ", "x" * 300,
]


@pytest.fixture(scope="module")
def spiece_folder(tmp_path_factory):
    """A folder holding only a small unigram spiece.model with T5's ids: pad 0, eos 1, unk 2."""
    folder = tmp_path_factory.mktemp("spiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(PROMPTS + FILLER), model_writer=model, vocab_size=200, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    return folder


@pytest.fixture(scope="module")
def hf(spiece_folder):
    return transformers.T5Tokenizer.from_pretrained(spiece_folder, extra_ids=100)


@pytest.fixture(scope="module")
def folders(hf, spiece_folder, tmp_path_factory):
    """transformers' own save (tokenizer.json + config) with spiece.model added as PixArt folders ship it,
    and the same save without spiece.model."""
    both, fast_only = tmp_path_factory.mktemp("both"), tmp_path_factory.mktemp("fast_only")
    hf.save_pretrained(both)
    hf.save_pretrained(fast_only)
    assert not (fast_only / "spiece.model").exists() and (fast_only / "tokenizer.json").is_file()
    shutil.copy(spiece_folder / "spiece.model", both)
    return {"sentencepiece": (both, False), "tokenizer.json only": (fast_only, False),
            "tokenizer.json asked": (both, True)}


@pytest.fixture(params=["sentencepiece", "tokenizer.json only", "tokenizer.json asked"])
def ours(request, folders):
    folder, use_fast = folders[request.param]
    return T5Tokenizer.from_pretrained(folder, use_fast=use_fast)


def assert_same_encoding(ours, hf, texts, **kwargs):
    expected = hf(texts, return_tensors="pt", **kwargs)
    got = ours(texts, return_tensors="pt", **kwargs)
    for i, text in enumerate(texts):
        assert got.input_ids[i].tolist() == expected.input_ids[i].tolist(), text
        assert got.attention_mask[i].tolist() == expected.attention_mask[i].tolist(), text
    assert got.input_ids.shape == expected.input_ids.shape
    assert got.input_ids.dtype == got.attention_mask.dtype == torch.long
    return got


@pytest.mark.parametrize("padding", ["max_length", "longest"])
def test_every_prompt_matches_transformers(ours, hf, padding):
    texts = [preprocess_prompt(t, clean_caption=False) for t in PROMPTS]
    got = assert_same_encoding(ours, hf, texts, max_length=120, padding=padding, truncation=True)
    assert got.input_ids.shape[1] == 120  # the long prompt is truncated to exactly max_length ...
    longest = max(range(len(texts)), key=lambda i: len(texts[i]))
    assert got.attention_mask[longest].all() and got.input_ids[longest, -1] == 1  # ... with `</s>` kept last
    assert len(ours.encode(texts[longest])) > 120


@pytest.mark.parametrize("padding", ["max_length", "longest"])
def test_special_tokens_and_odd_text_match_transformers(ours, hf, padding):
    assert_same_encoding(ours, hf, ODD_TEXTS, max_length=120, padding=padding, truncation=True)
    assert_same_encoding(ours, hf, ODD_TEXTS, max_length=16, padding=padding, truncation=True,
                         add_special_tokens=False)


def test_batch_decode_matches_transformers(ours, hf):
    ids = hf(ODD_TEXTS + PROMPTS, padding="longest", return_tensors="pt").input_ids
    for skip in (True, False):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == hf.batch_decode(ids, skip_special_tokens=skip)


def test_pixart_folder_layout_matches_transformers(spiece_folder, tmp_path):
    """spiece.model with added_tokens.json, special_tokens_map.json and tokenizer_config.json, as on the Hub."""
    extra = [f"<extra_id_{i}>" for i in range(100)]
    shutil.copy(spiece_folder / "spiece.model", tmp_path)
    (tmp_path / "added_tokens.json").write_text(json.dumps({t: 299 - i for i, t in enumerate(extra)}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": extra}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 100, "additional_special_tokens": extra,
         "model_max_length": 512, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    hf = transformers.T5Tokenizer.from_pretrained(tmp_path)
    ours = T5Tokenizer.from_pretrained(tmp_path)
    assert ours.model_max_length == 512
    assert_same_encoding(ours, hf, ODD_TEXTS + PROMPTS, max_length=120, padding="max_length", truncation=True)


def test_pipeline_subfolder_and_call_conventions(folders):
    folder, _ = folders["sentencepiece"]
    pipeline = folder.parent / "pipeline"
    shutil.copytree(folder, pipeline / "tokenizer")
    tok = T5Tokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    enc = tok("a red circle", max_length=120, padding="max_length", truncation=True, return_tensors="pt")
    assert enc.input_ids.shape == enc["attention_mask"].shape == (1, 120)
    assert enc["input_ids"] is enc.input_ids
    n = int(enc.attention_mask.sum())
    assert enc.input_ids[0, n - 1] == 1 and (enc.input_ids[0, n:] == 0).all()
    assert tok("a red circle", padding=False, return_tensors=None).input_ids == enc.input_ids[0, :n].tolist()
    with pytest.raises(ValueError, match="padding='longest'"):
        tok(["a", "a red circle"], padding=False, return_tensors="pt")
    # called without options, as transformers' tokenizer: no padding, no truncation, lists
    assert tok("a red circle").input_ids == enc.input_ids[0, :n].tolist()
    assert tok(["a", "a red circle"]).input_ids == [tok.encode("a"), tok.encode("a red circle")]


def test_missing_tokenizer_files_are_reported(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="spiece.model or tokenizer.json.*config.json"):
        T5Tokenizer.from_pretrained(tmp_path)


def test_truncation_log_names_the_dropped_text(folders, hf, caplog):
    tok = T5Tokenizer.from_pretrained(folders["sentencepiece"][0])
    texts = [preprocess_prompt(t, clean_caption=False) for t in PROMPTS]
    with caplog.at_level(logging.WARNING, logger="pixart"):
        dropped = warn_truncated(tok, texts, max_length=120)
    # what diffusers logs: the ids past max_length - 1, without `</s>` (the tiny vocabulary truncates several)
    expected = [hf.decode(ids[119:-1]) if len(ids) > 120 else "" for ids in hf(texts).input_ids]
    assert dropped == expected
    truncated = [(t, d) for t, d in zip(texts, expected) if d]
    assert 1 < len(truncated) < len(texts) and all(t.endswith(d) for t, d in truncated)
    assert [r.getMessage() for r in caplog.records] == [
        f"The following part of your input was truncated because T5 can only handle sequences up to 120 tokens: {d}"
        for _, d in truncated]


def caption_strings():
    """prompts.txt, hand-written hard cases and seeded random mixes of the things the cleaner removes."""
    hard = [
        "Check https://example.com/a/b?x=1 and www.test.org/page now, mail@host.net",
        "<b>Bold</b> &amp; <i>italic</i> &quot;q&quot; <person> here &lt;tag&gt;",
        "@someone_1 said hi to @other", "日本語のテキスト 中文 한국어 カタカナ ㇰ ㈱ ㎏",
        "photo_final.JPG and scan.pdf, image.webp images", "this-is-my-cute-cat_photo",
        "free shipping worldwide free shipping, download free, click for more, page 12",
        "jc6640 jc6640vc 6640vc231 j2d1a2a 1920x1080 3.5×4", "'quoted caption'", "...dots... and — dashes – here",
        "ip 192.168.0.1 #123 #12345 1234567 12:34  ", "a\\nb", "100%25 encoded+plus%20space",
        "«Guillemets» ‘single’ ´acute´", "_-leading:", "trailing+", ".hidden", "hello : world,next.thing/other",
        "   ", "", "Mojibake: Ã©tÃ©", "###***AUSVERKAUFT***###", "a . b", "\"\"\"triple\"\"\"",
    ]
    rng = random.Random(0)
    parts = ["a cat", "https://x.com/p", "www.y.org", "<p>", "</p>", "@bob", "猫", "—", "&amp;", "#12", "123456",
             "pic.png", "...", "*", "|", "-", "_", "free shipping", "page 3", "4x5", ":", ",", "'", "\"", " ", "é",
             "Ã©", "%20", "+", "\\n", "ab12cd", "1.2.3.4"]
    fuzz = ["".join(rng.choice(parts) + rng.choice(["", " "]) for _ in range(rng.randint(1, 12))) for _ in range(150)]
    return PROMPTS + hard + fuzz


def test_clean_caption_matches_diffusers():
    pytest.importorskip("bs4")
    pytest.importorskip("ftfy")
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.PixArtAlphaPipeline.__new__(diffusers.PixArtAlphaPipeline)  # no models needed
    for text in caption_strings():
        for clean in (True, False):
            assert preprocess_prompt(text, clean) == pipe._text_preprocessing(text, clean_caption=clean)[0], text
    assert preprocess_prompt("  A Cat @bob <b>hi</b> www.cat.com ", True) == "a cat hi"
    assert preprocess_prompt("  A Cat @bob  ", False) == "a cat @bob"


def test_missing_cleaning_libraries_warn_once_and_fall_back(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "ftfy", None)  # makes `import ftfy` raise ImportError
    tokenizer_module._caption_libraries.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="pixart"):
            assert preprocess_prompt("  A Cat @bob  ", True) == "a cat @bob"
            assert clean_caption_once("  Two @bob ") == "two @bob"
        assert len([r for r in caplog.records if "beautifulsoup4 and ftfy" in r.getMessage()]) == 1
    finally:
        tokenizer_module._caption_libraries.cache_clear()
