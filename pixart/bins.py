"""Aspect-ratio bins of PixArt-α (data) and the helpers that snap a requested size to its bin."""
from __future__ import annotations

# h/w -> [height, width] in pixels for the 1024-px models; the 512 and 256 tables are this one halved and
# quartered. Key order matters: the first of two equally close ratios wins, as in the reference.
ASPECT_RATIO_1024_BIN: dict[str, list[float]] = {
    "0.25": [512.0, 2048.0], "0.28": [512.0, 1856.0], "0.32": [576.0, 1792.0], "0.33": [576.0, 1728.0],
    "0.35": [576.0, 1664.0], "0.4": [640.0, 1600.0], "0.42": [640.0, 1536.0], "0.48": [704.0, 1472.0],
    "0.5": [704.0, 1408.0], "0.52": [704.0, 1344.0], "0.57": [768.0, 1344.0], "0.6": [768.0, 1280.0],
    "0.68": [832.0, 1216.0], "0.72": [832.0, 1152.0], "0.78": [896.0, 1152.0], "0.82": [896.0, 1088.0],
    "0.88": [960.0, 1088.0], "0.94": [960.0, 1024.0], "1.0": [1024.0, 1024.0], "1.07": [1024.0, 960.0],
    "1.13": [1088.0, 960.0], "1.21": [1088.0, 896.0], "1.29": [1152.0, 896.0], "1.38": [1152.0, 832.0],
    "1.46": [1216.0, 832.0], "1.67": [1280.0, 768.0], "1.75": [1344.0, 768.0], "2.0": [1408.0, 704.0],
    "2.09": [1472.0, 704.0], "2.4": [1536.0, 640.0], "2.5": [1600.0, 640.0], "3.0": [1728.0, 576.0],
    "4.0": [2048.0, 512.0],
}
ASPECT_RATIO_512_BIN = {k: [h / 2, w / 2] for k, (h, w) in ASPECT_RATIO_1024_BIN.items()}
ASPECT_RATIO_256_BIN = {k: [h / 4, w / 4] for k, (h, w) in ASPECT_RATIO_1024_BIN.items()}

# latent sample_size of the transformer -> its table
BINS_BY_SAMPLE_SIZE = {128: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_256_BIN}
BINS_BY_RESOLUTION = {1024: ASPECT_RATIO_1024_BIN, 512: ASPECT_RATIO_512_BIN, 256: ASPECT_RATIO_256_BIN}


def bin_table(sample_size: int) -> dict[str, list[float]]:
    """The table for a transformer of this latent sample_size (128, 64 or 32)."""
    if sample_size not in BINS_BY_SAMPLE_SIZE:
        raise ValueError(
            f"no aspect-ratio bins for a transformer of sample_size {sample_size} (known: 128, 64, 32); "
            "pass use_resolution_binning=False and a height and width that are multiples of 16"
        )
    return BINS_BY_SAMPLE_SIZE[sample_size]


def resolution_bin_table(resolution: int, multiple: int) -> dict[str, list[float]]:
    """The bins of `resolution`-px images: a published table, or the 1024 one scaled and snapped to `multiple` px."""
    if resolution in BINS_BY_RESOLUTION:
        return BINS_BY_RESOLUTION[resolution]
    scale = resolution / 1024

    def snap(v: float) -> float:
        return float(max(multiple, round(v * scale / multiple) * multiple))

    return {k: [snap(h), snap(w)] for k, (h, w) in ASPECT_RATIO_1024_BIN.items()}


def model_bin_table(sample_size: int, vae_scale_factor: int = 8, patch_size: int = 2) -> dict[str, list[float]]:
    """The bins a transformer generates at: the published table of its size, else the 1024 one scaled to it."""
    return resolution_bin_table(sample_size * vae_scale_factor, vae_scale_factor * patch_size)


def classify_height_width_bin(height: int, width: int, ratios: dict[str, list[float]]) -> tuple[int, int]:
    """The (height, width) of the bin whose ratio is nearest to height / width."""
    ar = float(height / width)
    nearest = min(ratios, key=lambda r: abs(float(r) - ar))
    h, w = ratios[nearest]
    return int(h), int(w)
