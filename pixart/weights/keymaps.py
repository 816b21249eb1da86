"""Key maps from other checkpoint layouts to ours (diffusers' names), as data, and the function that applies them."""
from __future__ import annotations

import re

from .files import Lazy, WeightsError

# A rule is (regex matched against the whole source key, target): a target string renames the key
# (with \1-style groups), a tuple of targets cuts the fused tensor into that many equal chunks along
# dim 0, and None drops the key. The first rule that matches a key wins.
Rule = tuple[str, "str | tuple[str, ...] | None"]

# The original PixArt-alpha repository's PixArt-XL-2-*.pth (REFERENCE.md §2).
PIXART_ORIGINAL: list[Rule] = [
    (r"pos_embed", None),  # a fixed sin-cos table: recomputed for each grid size
    (r"y_embedder\.y_embedding", None),  # the original's learned null caption; CFG uses T5("") as diffusers does
    (r"x_embedder\.proj\.(\w+)", r"pos_embed.proj.\1"),
    (r"t_embedder\.mlp\.0\.(\w+)", r"adaln_single.emb.timestep_embedder.linear_1.\1"),
    (r"t_embedder\.mlp\.2\.(\w+)", r"adaln_single.emb.timestep_embedder.linear_2.\1"),
    (r"csize_embedder\.mlp\.0\.(\w+)", r"adaln_single.emb.resolution_embedder.linear_1.\1"),
    (r"csize_embedder\.mlp\.2\.(\w+)", r"adaln_single.emb.resolution_embedder.linear_2.\1"),
    (r"ar_embedder\.mlp\.0\.(\w+)", r"adaln_single.emb.aspect_ratio_embedder.linear_1.\1"),
    (r"ar_embedder\.mlp\.2\.(\w+)", r"adaln_single.emb.aspect_ratio_embedder.linear_2.\1"),
    (r"t_block\.1\.(\w+)", r"adaln_single.linear.\1"),
    (r"y_embedder\.y_proj\.fc1\.(\w+)", r"caption_projection.linear_1.\1"),
    (r"y_embedder\.y_proj\.fc2\.(\w+)", r"caption_projection.linear_2.\1"),
    (r"blocks\.(\d+)\.scale_shift_table", r"transformer_blocks.\1.scale_shift_table"),
    (r"blocks\.(\d+)\.attn\.qkv\.(\w+)", tuple(rf"transformer_blocks.\1.attn1.to_{n}.\2" for n in "qkv")),
    (r"blocks\.(\d+)\.attn\.proj\.(\w+)", r"transformer_blocks.\1.attn1.to_out.0.\2"),
    (r"blocks\.(\d+)\.cross_attn\.q_linear\.(\w+)", r"transformer_blocks.\1.attn2.to_q.\2"),
    (r"blocks\.(\d+)\.cross_attn\.kv_linear\.(\w+)", tuple(rf"transformer_blocks.\1.attn2.to_{n}.\2" for n in "kv")),
    (r"blocks\.(\d+)\.cross_attn\.proj\.(\w+)", r"transformer_blocks.\1.attn2.to_out.0.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(\w+)", r"transformer_blocks.\1.ff.net.0.proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(\w+)", r"transformer_blocks.\1.ff.net.2.\2"),
    (r"final_layer\.linear\.(\w+)", r"proj_out.\1"),
    (r"final_layer\.scale_shift_table", r"scale_shift_table"),
]


def apply_key_map(tensors: dict[str, Lazy], rules: list[Rule]) -> dict[str, Lazy]:
    """Rename, split and drop keys by `rules`; every source key must be consumed by one rule."""
    out: dict[str, Lazy] = {}
    unmatched = []
    for key, lazy in tensors.items():
        for pattern, target in rules:
            m = re.fullmatch(pattern, key)
            if m:
                break
        else:
            unmatched.append(key)
            continue
        if target is None:
            continue
        pieces = {m.expand(target): lazy} if isinstance(target, str) else _split(lazy, [m.expand(t) for t in target])
        for name, piece in pieces.items():
            if name in out:
                raise WeightsError(f"two checkpoint keys map to {name} (the second is {key}): the file mixes layouts")
            out[name] = piece
    if unmatched:
        more = f"\n    ... and {len(unmatched) - 20} more" if len(unmatched) > 20 else ""
        shown = "\n    ".join(unmatched[:20]) + more
        raise WeightsError(
            f"{len(unmatched)} checkpoint keys belong to no known layout of this model:\n    {shown}\n"
            "  Fix: check that the file is a PixArt-α transformer checkpoint (original .pth or diffusers)."
        )
    return out


def _split(lazy: Lazy, names: list[str]) -> dict[str, Lazy]:
    """Equal chunks of a fused tensor along dim 0 (q|k|v or k|v rows), read lazily."""
    n = len(names)
    shape = None if lazy.shape is None else (lazy.shape[0] // n, *lazy.shape[1:])
    if shape is not None and lazy.shape[0] % n:
        raise WeightsError(f"a fused tensor of shape {lazy.shape} cannot be cut into {n} equal parts for {names[0]}")

    def chunk(i: int) -> Lazy:
        # clone: a view would keep the whole fused tensor alive in memory after loading
        return Lazy(lambda: lazy().chunk(n, dim=0)[i].clone(), shape)

    return {name: chunk(i) for i, name in enumerate(names)}
