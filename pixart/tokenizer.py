"""T5 tokenization (sentencepiece `spiece.model` or `tokenizer.json`) and PixArt's prompt preprocessing."""
from __future__ import annotations

import functools
import html
import json
import logging
import os
import re
import shutil
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .configs import ConfigDict, read_json
from .weights.files import WeightsError
from .weights.hub import resolve

logger = logging.getLogger("pixart")

# the files of a T5 tokenizer folder (transformers' slow and fast layouts)
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")

# transformers' `clean_up_tokenization`, applied after decoding when tokenizer_config.json asks for it
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
            (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class Encoding(ConfigDict):
    """`input_ids` and `attention_mask`, by key or by attribute (as transformers' BatchEncoding)."""


def _token_name(value: Any, default: str) -> str:
    """A special token as tokenizer configs write it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value["content"]
    return value if isinstance(value, str) else default


class T5Tokenizer:
    """transformers' T5 tokenizer semantics: special tokens split out first, `</s>` appended, right padding with 0."""

    def __init__(self, encode: Callable[[str], list[int]], piece: Callable[[int], str],
                 special: dict[str, int], names: dict[str, str], model_max_length: int = int(1e30),
                 clean_up_tokenization_spaces: bool = False):
        self._encode, self._piece = encode, piece
        self.special_token_ids = special  # token -> id, matched verbatim in the text before tokenizing
        self._special_by_id = {i: t for t, i in special.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)) + ")")
        self.pad_token_id = special[names["pad"]]
        self.eos_token_id = special[names["eos"]]
        self.unk_token_id = special[names["unk"]]
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.source: Path | None = None  # the folder it was read from

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, subfolder: str | None = None,
                        use_fast: bool = False, **hub_kwargs: Any) -> "T5Tokenizer":
        """Read `spiece.model` with sentencepiece, else (or when use_fast) `tokenizer.json` with tokenizers."""
        folder = resolve(path_or_id, subfolder, **hub_kwargs)
        config = read_json(folder / "tokenizer_config.json", {})
        special_map = read_json(folder / "special_tokens_map.json", {})
        names = {k: _token_name(special_map.get(f"{k}_token", config.get(f"{k}_token")), d)
                 for k, d in (("pad", "<pad>"), ("eos", "</s>"), ("unk", "<unk>"))}
        options = dict(model_max_length=int(config.get("model_max_length", int(1e30))),
                       clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)))
        spiece, tokenizer_json = folder / "spiece.model", folder / "tokenizer.json"
        if tokenizer_json.is_file() and (use_fast or not spiece.is_file()):
            from tokenizers import Tokenizer

            try:
                tok = Tokenizer.from_file(str(tokenizer_json))
                added = json.loads(tokenizer_json.read_text(encoding="utf-8"))["added_tokens"]
                special = {t["content"]: t["id"] for t in added if t["special"]}
            except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
                raise WeightsError(f"{tokenizer_json} is corrupted ({str(e)[:200]}): download the tokenizer "
                                   "again") from None
            tok.no_truncation()  # we truncate and pad ourselves
            tok.no_padding()
            special.update({n: tok.token_to_id(n) for n in names.values() if tok.token_to_id(n) is not None})

            def encode(text: str) -> list[int]:
                return tok.encode(text, add_special_tokens=False).ids

            tokenizer = cls(encode, tok.id_to_token, special, names, **options)
        elif spiece.is_file():
            import sentencepiece

            try:
                sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece))
            except (RuntimeError, OSError) as e:
                raise WeightsError(f"{spiece} is not a sentencepiece model ({e}): download the tokenizer "
                                   "again") from None
            special = _spiece_special_tokens(folder, config, special_map, sp, names)
            tokenizer = cls(sp.encode, sp.id_to_piece, special, names, **options)
        else:
            listing = ", ".join(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else "it does not exist"
            raise FileNotFoundError(f"no spiece.model or tokenizer.json in {folder} ({listing}): download the "
                                    "tokenizer")
        tokenizer.source = folder
        return tokenizer

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Copy the tokenizer files this tokenizer was read from into `folder`."""
        source = self.source
        if source is None:
            raise ValueError("this tokenizer was not read from files (T5Tokenizer.from_pretrained): nothing to save")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (source / name).is_file() and (source / name).resolve() != (folder / name).resolve():
                tmp = folder / f".{name}.tmp"
                try:
                    shutil.copyfile(source / name, tmp)
                    os.replace(tmp, folder / name)
                finally:
                    tmp.unlink(missing_ok=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text, special tokens in it kept whole, `</s>` appended."""
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:  # odd parts are the matched special tokens
                ids.append(self.special_token_ids[part])
            elif part:
                ids.extend(self._encode(part))
        return ids + [self.eos_token_id] if add_special_tokens else ids

    def __call__(self, text: str | Sequence[str], max_length: int | None = None, padding: str | bool = False,
                 truncation: bool = False, add_special_tokens: bool = True,
                 return_tensors: str | None = None) -> Encoding:
        """Encode, truncate to max_length keeping `</s>` last, pad ("max_length", "longest"/True, or False); the
        defaults are transformers' (no padding, no truncation, lists), the pipeline passes PixArt's (120, padded)."""
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs a max_length")
        rows = []
        for t in [text] if isinstance(text, str) else text:
            ids = self.encode(t, add_special_tokens=False)
            if truncation and max_length is not None:  # cut the text, so that `</s>` stays last
                ids = ids[: max_length - 1 if add_special_tokens else max_length]
            rows.append(ids + [self.eos_token_id] if add_special_tokens else ids)
        masks = [[1] * len(r) for r in rows]
        if padding in ("max_length", "longest", True):
            width = max_length if padding == "max_length" else max(map(len, rows), default=0)
            masks = [m + [0] * (width - len(m)) for m in masks]
            rows = [r + [self.pad_token_id] * (width - len(r)) for r in rows]
        elif padding not in (False, "do_not_pad"):
            raise ValueError(f"padding={padding!r}: use 'max_length', 'longest', True or False")
        if return_tensors == "pt":
            if len({len(r) for r in rows}) > 1:
                raise ValueError("texts of different lengths cannot make one tensor: pass padding='longest'")
            return Encoding(input_ids=torch.tensor(rows, dtype=torch.long),
                            attention_mask=torch.tensor(masks, dtype=torch.long))
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' or None")
        if isinstance(text, str):
            return Encoding(input_ids=rows[0], attention_mask=masks[0])
        return Encoding(input_ids=rows, attention_mask=masks)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of one id sequence: pieces joined, '▁' read as a space, the leading one dropped."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_by_id]
        pieces = [self._special_by_id.get(i) or self._piece(i) for i in ids]
        text = "".join(pieces).replace("▁", " ")
        if pieces and pieces[0].startswith("▁"):
            text = text[1:]
        if self.clean_up_tokenization_spaces:
            for old, new in _CLEANUP:
                text = text.replace(old, new)
        return text

    def batch_decode(self, ids: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        """`decode` for each row."""
        return [self.decode(row, skip_special_tokens) for row in ids]


def _spiece_special_tokens(folder: Path, config: dict, special_map: dict, sp: Any,
                           names: dict[str, str]) -> dict[str, int]:
    """pad/eos/unk from the vocab, `<extra_id_N>` from the json files, else T5's ids (`<extra_id_0>` the last)."""
    def vocab_id(token: str) -> int | None:
        i = sp.piece_to_id(token)
        return i if i != sp.unk_id() or token == sp.id_to_piece(i) else None

    special = {n: vocab_id(n) for n in names.values()}
    missing = [n for n, i in special.items() if i is None]
    if missing:
        raise ValueError(f"special tokens {missing} are not in {folder / 'spiece.model'}")
    decoder = config.get("added_tokens_decoder", {})
    special.update({t["content"]: int(i) for i, t in decoder.items() if t.get("special", True)})
    added = read_json(folder / "added_tokens.json", {})
    special.update(added)
    extra = (special_map.get("additional_special_tokens") or config.get("additional_special_tokens")
             or config.get("extra_special_tokens") or [])
    for token in (_token_name(t, "") for t in extra):
        i = vocab_id(token)
        if token not in special and i is not None:
            special[token] = i
    if not any(t.startswith("<extra_id_") for t in special):
        n = int(config.get("extra_ids", 100))
        special.update({f"<extra_id_{i}>": sp.get_piece_size() + n - 1 - i for i in range(n)})
    return special


def warn_truncated(tokenizer: T5Tokenizer, texts: Sequence[str], max_length: int) -> list[str]:
    """The text each prompt loses to `max_length` tokens ("" when none), logged as diffusers does."""
    rows = tokenizer(list(texts), max_length=None, padding=False, truncation=False, return_tensors=None).input_ids
    dropped = [tokenizer.decode(ids[max_length - 1:-1]) if len(ids) > max_length else "" for ids in rows]
    for text in dropped:
        if text:
            logger.warning("The following part of your input was truncated because T5 can only handle sequences up "
                           "to %d tokens: %s", max_length, text)
    return dropped


def preprocess_prompt(text: str, clean_caption: bool = False) -> str:
    """As PixArtAlphaPipeline: lower-case and strip; with clean_caption, diffusers' caption cleaning twice instead."""
    if clean_caption and _caption_libraries() is not None:
        return clean_caption_once(clean_caption_once(text))
    return text.lower().strip()


@functools.cache
def _caption_libraries() -> tuple[Any, Any] | None:
    """(BeautifulSoup, ftfy), or None after one warning when either is missing (the cleaning is then skipped)."""
    try:
        import ftfy
        from bs4 import BeautifulSoup
    except ImportError as e:
        logger.warning("clean_caption needs beautifulsoup4 and ftfy (%s): prompts are only lower-cased; "
                       "`pip install beautifulsoup4 ftfy` to clean them", e)
        return None
    return BeautifulSoup, ftfy


def _url(prefix: str) -> re.Pattern:
    """diffusers' URL rule: a `<prefix>:` link or a bare domain of a few TLDs with its path."""
    return re.compile(rf"\b((?:{prefix}:(?:\/{{1,3}}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)"
                      r"[\w/-]*\b\/?(?!@)))")


_FILE_EXT = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"

# The rules of diffusers' `_clean_caption` (from DeepFloyd IF), in its order; each step is re.sub(pattern, repl).
def _compile(rules: list[tuple[str | re.Pattern, str]]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(pattern), repl) for pattern, repl in rules]


_BEFORE_HTML = _compile([("<person>", "person"), (_url("https?"), ""), (_url("www"), "")])
_BEFORE_FTFY = _compile([
    (r"@[\w\d]+\b", ""),  # @handles
    (r"[\u31c0-\u9fff]+", ""),  # CJK strokes .. unified ideographs (diffusers lists the adjacent blocks one by one)
    (r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0\uFE31\uFE32"
     r"\uFE58\uFE63\uFF0D]+", "-"),  # every dash
    (r"[`´«»“”¨]", '"'),
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (rf"[\S]+\.{_FILE_EXT}", ""),  # file names
    (r"[\"\']{2,}", '"'),
    (r"[\.]{2,}", " "),
    (r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\\/\*]{1,}", " "),  # stray punctuation
    (r"\s+\.\s+", " "),
])
_DASH_OR_UNDERSCORE = re.compile(r"[-_]")  # this-is-a-slug: more than 3 become spaces
_AFTER_FTFY = _compile([
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (rf"\b{_FILE_EXT}(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes: 1920x1080
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    # diffusers does not strip here (its `caption.strip()` is discarded), so the anchors below see the spaces
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),
    (r"^[\'\_,\-\:;]", ""),
    (r"[\'\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
])


def _substitute(rules: list[tuple[re.Pattern, str]], text: str) -> str:
    for pattern, repl in rules:
        text = pattern.sub(repl, text)
    return text


def clean_caption_once(text: str) -> str:
    """One pass of diffusers' caption cleaning: URLs, HTML, @handles, CJK, file names, spam words, ftfy."""
    libraries = _caption_libraries()
    if libraries is None:
        return text.lower().strip()
    beautiful_soup, ftfy = libraries
    text = urllib.parse.unquote_plus(str(text)).strip().lower()
    text = _substitute(_BEFORE_HTML, text)
    text = beautiful_soup(text, features="html.parser").text
    text = _substitute(_BEFORE_FTFY, text)
    if len(_DASH_OR_UNDERSCORE.findall(text)) > 3:
        text = _DASH_OR_UNDERSCORE.sub(" ", text)
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return _substitute(_AFTER_FTFY, text).strip()
