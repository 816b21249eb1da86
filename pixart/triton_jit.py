"""The @triton.jit kernels behind `triton_kernels`: importing this module imports triton (reading TRITON_INTERPRET)."""
import triton
import triton.language as tl

RINT = tl.constexpr(12582912.0)  # 1.5 * 2**23: fp32 values this large have no fraction bits left
FP8_MIN_NORMAL = tl.constexpr(2.0 ** -6)  # e4m3's smallest normal; below it the grid step stays 2**-9


@triton.jit
def round_to_grid(q, step):
    """q rounded half to even to a multiple of `step` (a power of two, |q| < step * 2**22): q + step·1.5·2**23 has
    no bits below `step`, so the fp32 addition rounds, as torch.round and the fp8 casts do; the subtraction is exact."""
    magic = step * RINT
    return (q + magic) - magic


@triton.jit
def quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, M, K, stride_x, QMAX: tl.constexpr, INT8: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """ROWS rows of x: amax over K in BLOCK chunks, then q = x / scale, clamped to ±QMAX, rounded and cast."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    x_rows, q_rows, live = x_ptr + rows[:, None] * stride_x, q_ptr + rows[:, None] * K, rows[:, None] < M
    amax = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)[None, :]
        x = tl.load(x_rows + cols, mask=live & (cols < K), other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    # times 1/QMAX in fp32, as torch's CUDA division by a Python number computes it (quant_dynamic.quantize_rows)
    scale = tl.maximum(tl.max(amax, axis=1), 1e-12) * (1.0 / QMAX)  # (ROWS,)
    tl.store(scale_ptr + rows, scale, mask=rows < M)
    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)[None, :]
        mask = live & (cols < K)
        x = tl.load(x_rows + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.math.div_rn(x, scale[:, None])  # IEEE division, as torch's; `/` is approximate (div.full) on CUDA
        q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
        if INT8:
            tl.store(q_rows + cols, round_to_grid(q, 1.0).to(tl.int8), mask=mask)
        else:  # e4m3's step: 2**(exponent of q - 3 mantissa bits); rounded here, the cast is exact (the interpreter's
            # own rounding cast drops the carry into the exponent: 7.9 becomes 4)
            power = (q.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)  # 2**floor(log2|q|)
            r = round_to_grid(q, tl.maximum(power, FP8_MIN_NORMAL) * 0.125)
            r = tl.where(r == 0, q * 0.0, r)  # zeros keep q's sign, as the cast does
            tl.store(q_rows + cols, r.to(tl.float8e4nv), mask=mask)
