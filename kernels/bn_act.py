"""BatchNorm fused with its activation (CELU, GELU, SiLU or identity), forward and backward.

``y = act((x - mean[g, c]) * invstd[g, c] * weight[c] + bias[c])`` over (N, C, H, W), with
batch statistics in training (per ghost batch ``g`` and channel ``c``) and running
statistics in eval. Page's DAWNBench ResNet-9 ("How to Train Your ResNet", 2018) uses
BN -> CELU(alpha=0.075) with ghost batches of 32; airbench94 (Jordan 2024) BN -> GELU;
later records BN -> SiLU/GELU with a frozen BN weight. Fusing the activation saves one
write and one read of the activation tensor each way, and the backward recomputes the
pre-activation from ``x`` instead of storing it.

Ghost batch norm: with ``ghost_splits = S``, ghost batch ``g`` holds the samples
``n`` with ``n % S == g`` -- exactly the grouping of the one-reshape ghost BN of Page's
cifar10-fast, ``x.view(N // S, S * C, H, W)`` followed by a single batch norm, so the
kernel and fastgraph's ``ghost_batchnorm`` pass agree. Each ghost batch normalises with
its own statistics; the running statistics are updated with the mean over ghost batches of
their per-batch updates (what that reshape does with repeated running stats, averaged
afterwards). Eval never splits.

Accumulation is in float32 whatever the storage dtype; the statistics are merged with
Chan et al.'s parallel variance update (no E[x^2] - E[x]^2 cancellation); the running
variance uses the unbiased batch variance, as PyTorch does.

Cost per element of x, s = bytes of the storage dtype (per-channel vectors negligible):

| pass | kernel bytes | minimum bytes | FLOPs (approx.) |
|---|---|---|---|
| training forward | 3s (read x twice: statistics, normalise; write y) | 2s | 5 + act |
| eval forward | 2s | 2s | 2 + act |
| backward (training or eval) | 5s (read x, dy for the sums, again for dx; write dx) | 3s | 12 + 2 act |

act = CELU: 4 FLOPs + exp; GELU: 6 + erf; SiLU: 4 + exp (sigmoid); derivatives about
twice that. At ~0.5-1.5 FLOP/byte every variant is memory-bound, so the roofline time is
bytes / bandwidth.

Launches: training forward = chunk statistics -> merge (per ghost batch and channel
block) -> normalise + activation (whose first row block also writes the running
statistics); eval forward skips the first; backward = chunk sums of dz and dz·xhat ->
merge -> dx (whose first row block also writes dweight and dbias). Reductions are split
in a fixed number of chunks and merged in a fixed order: results are deterministic.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgraph.core.modules import GhostBatchSizeError
from fastgraph.kernels._triton import (
    HAS_TRITON,
    can_launch,
    next_power_of_2,
    require_launchable,
    target_programs,
)

if HAS_TRITON:
    from fastgraph.kernels._triton import tl, triton

ACTIVATIONS = ("celu", "gelu", "silu", "identity")
_ACT_CODE = {"identity": 0, "celu": 1, "gelu": 2, "silu": 3}


# ----------------------------------------------------------------------------- kernels

if HAS_TRITON:

    @triton.jit
    def _rows(r0, n_rows, HW, g, G, s_n, s_p, BLOCK_R: tl.constexpr, IN_SAMPLE: tl.constexpr):
        """Element offsets (channel term excluded), mask and sample of BLOCK_R rows from r0.

        Row r of ghost batch g is pixel r % HW of sample g + G * (r // HW). With IN_SAMPLE
        (BLOCK_R divides HW) the block lies in one sample: the sample is a scalar and the
        pixel offsets are provably contiguous, so NCHW loads coalesce.
        """
        if IN_SAMPLE:
            n = g + G * (r0 // HW)
            p = r0 % HW + tl.arange(0, BLOCK_R)
            mask = r0 + tl.arange(0, BLOCK_R) < n_rows
        else:
            r = r0 + tl.arange(0, BLOCK_R)
            mask = r < n_rows
            n = g + G * (r // HW)
            p = r % HW
        return n.to(tl.int64) * s_n + p * s_p, mask, n

    @triton.jit
    def _activation(z, alpha, ACT: tl.constexpr):
        if ACT == 1:  # CELU (Barron 2017): x > 0 ? x : alpha * (exp(x / alpha) - 1)
            y = tl.where(z > 0, z, alpha * (tl.exp(z / alpha) - 1.0))
        elif ACT == 2:  # GELU, erf form (Hendrycks & Gimpel 2016)
            y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
        elif ACT == 3:  # SiLU (Elfwing et al. 2018)
            y = z * tl.sigmoid(z)
        else:
            y = z
        return y

    @triton.jit
    def _activation_grad(z, alpha, ACT: tl.constexpr):
        if ACT == 1:
            d = tl.where(z > 0, 1.0, tl.exp(z / alpha))
        elif ACT == 2:
            cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
            d = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)  # Phi(z) + z * phi(z)
        elif ACT == 3:
            s = tl.sigmoid(z)
            d = s * (1.0 + z * (1.0 - s))
        else:
            d = tl.full(z.shape, 1.0, tl.float32)
        return d

    @triton.jit
    def _load_affine(w_ptr, b_ptr, cols, cmask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_C: tl.constexpr):
        """(weight, bias) of a channel block in float32; 1 and 0 where the BN has none."""
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
        else:
            w = tl.full([BLOCK_C], 1.0, tl.float32)
        if HAS_BIAS:
            b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        else:
            b = tl.zeros([BLOCK_C], dtype=tl.float32)
        return w, b

    @triton.jit
    def _group_channel(n, cols, C, G, IN_SAMPLE: tl.constexpr):
        """Offsets into (G, C) per-ghost-batch vectors for samples ``n`` (a scalar when the row
        block lies in one sample) and channels ``cols``: ghost batch n % G."""
        grp = n % G
        if IN_SAMPLE:
            gc = (grp * C + cols)[None, :]
        else:
            gc = grp[:, None] * C + cols[None, :]
        return gc

    @triton.jit
    def _sum_over_groups(a_ptr, b_ptr, cols, cmask, C, G, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
        """Sums over the G ghost batches of two (G, C) vectors for a channel block, read as
        [BLOCK_G, BLOCK_C] tiles in a fixed order (deterministic)."""
        sum_a = tl.zeros([BLOCK_C], dtype=tl.float32)
        sum_b = tl.zeros([BLOCK_C], dtype=tl.float32)
        for g0 in range(0, G, BLOCK_G):
            gs = g0 + tl.arange(0, BLOCK_G)
            gm = (gs < G)[:, None] & cmask[None, :]
            src = gs[:, None] * C + cols[None, :]
            sum_a += tl.sum(tl.load(a_ptr + src, mask=gm, other=0.0), axis=0)
            sum_b += tl.sum(tl.load(b_ptr + src, mask=gm, other=0.0), axis=0)
        return sum_a, sum_b

    @triton.jit
    def _chunk_tile(k0, K, M, rows_per_chunk, g, G, C, cols, cmask, BLOCK_K: tl.constexpr):
        """Offsets and mask of chunks k0 .. k0 + BLOCK_K of ghost batch g in (K, G, C) partial
        statistics, and the row count of each chunk (the last one may be short)."""
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        n_k = tl.where(kmask, tl.minimum(M - ks * rows_per_chunk, rows_per_chunk), 0).to(tl.float32)
        return (ks[:, None] * G + g) * C + cols[None, :], kmask[:, None] & cmask[None, :], n_k

    @triton.jit
    def _bn_stats_partial(
        x_ptr, part_mean_ptr, part_m2_ptr,
        C, HW, G, M, s_n, s_c, s_p, tiles_per_chunk,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, IN_SAMPLE: tl.constexpr,
    ):
        """Stage 1 of the statistics: mean and M2 of one chunk of rows of one ghost batch."""
        k = tl.program_id(0)
        g = tl.program_id(1)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        count = 0.0
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        r_start = k * tiles_per_chunk * BLOCK_R
        for t in range(tiles_per_chunk):
            offs, rmask, _ = _rows(r_start + t * BLOCK_R, M, HW, g, G, s_n, s_p, BLOCK_R, IN_SAMPLE)
            m = rmask[:, None] & cmask[None, :]
            x = tl.load(x_ptr + offs[:, None] + (cols * s_c)[None, :], mask=m, other=0.0).to(tl.float32)
            n_t = tl.sum(rmask.to(tl.float32), axis=0)
            mean_t = tl.sum(x, axis=0) / tl.maximum(n_t, 1.0)
            d = tl.where(m, x - mean_t[None, :], 0.0)
            m2_t = tl.sum(d * d, axis=0)
            # Chan, Golub & LeVeque's pairwise merge of (count, mean, M2).
            n_new = count + n_t
            w = n_t / tl.maximum(n_new, 1.0)
            delta = mean_t - mean
            mean = mean + delta * w
            m2 = m2 + m2_t + delta * delta * (count * w)
            count = n_new
        out = (k * G + g) * C + cols
        tl.store(part_mean_ptr + out, mean, mask=cmask)
        tl.store(part_m2_ptr + out, m2, mask=cmask)

    @triton.jit
    def _bn_stats_finalize(
        part_mean_ptr, part_m2_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr,
        mean_ptr, var_ptr, invstd_ptr, scale_ptr, shift_ptr,
        C, G, K, M, rows_per_chunk, eps,
        TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Stage 2, one program per (channel block, ghost batch): merge the K chunks, then the
        normalisation's scale and shift. The chunks are read as [BLOCK_K, BLOCK_C] tiles, not
        one after another, so the merge costs a load round, not K of them."""
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        g = tl.program_id(1)
        w, b = _load_affine(w_ptr, b_ptr, cols, cmask, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
        if TRAINING:
            # Two passes over the chunk statistics (exact merge of Chan, Golub & LeVeque):
            # mean = sum(n_k mean_k) / M, then M2 = sum(M2_k + n_k (mean_k - mean)^2).
            acc = tl.zeros([BLOCK_C], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                src, m, n_k = _chunk_tile(k0, K, M, rows_per_chunk, g, G, C, cols, cmask, BLOCK_K)
                mean_k = tl.load(part_mean_ptr + src, mask=m, other=0.0)
                acc += tl.sum(n_k[:, None] * mean_k, axis=0)
            mean = acc / M
            m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                src, m, n_k = _chunk_tile(k0, K, M, rows_per_chunk, g, G, C, cols, cmask, BLOCK_K)
                mean_k = tl.load(part_mean_ptr + src, mask=m, other=0.0)
                m2_k = tl.load(part_m2_ptr + src, mask=m, other=0.0)
                d = mean_k - mean[None, :]
                m2 += tl.sum(m2_k + n_k[:, None] * d * d, axis=0)
            var = m2 / M
        else:
            mean = tl.load(rm_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            var = tl.load(rv_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
        invstd = 1.0 / tl.sqrt(var + eps)
        scale = w * invstd
        dst = g * C + cols
        tl.store(mean_ptr + dst, mean, mask=cmask)
        tl.store(var_ptr + dst, var, mask=cmask)
        tl.store(invstd_ptr + dst, invstd, mask=cmask)
        tl.store(scale_ptr + dst, scale, mask=cmask)
        tl.store(shift_ptr + dst, b - mean * scale, mask=cmask)

    @triton.jit
    def _bn_act_apply(
        x_ptr, y_ptr, scale_ptr, shift_ptr, mean_ptr, var_ptr, rm_ptr, rv_ptr, new_rm_ptr, new_rv_ptr,
        n_rows, C, HW, G, M, s_n, s_c, s_p, alpha, momentum,
        ACT: tl.constexpr, UPDATE_RUNNING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_G: tl.constexpr, IN_SAMPLE: tl.constexpr,
    ):
        """Stage 3: y = act(x * scale[g, c] + shift[g, c]), elementwise over (n, c, h, w); the
        first row block also updates the running statistics with the mean over ghost batches
        of their updates (running_var with the unbiased variance, as PyTorch)."""
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        offs, rmask, n = _rows(tl.program_id(0) * BLOCK_R, n_rows, HW, 0, 1, s_n, s_p, BLOCK_R, IN_SAMPLE)
        gc = _group_channel(n, cols, C, G, IN_SAMPLE)
        m = rmask[:, None] & cmask[None, :]
        ptrs = offs[:, None] + (cols * s_c)[None, :]
        x = tl.load(x_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + gc, mask=cmask[None, :], other=0.0)
        shift = tl.load(shift_ptr + gc, mask=cmask[None, :], other=0.0)
        y = _activation(x * scale + shift, alpha, ACT)
        tl.store(y_ptr + ptrs, y.to(y_ptr.dtype.element_ty), mask=m)
        if UPDATE_RUNNING:
            if tl.program_id(0) == 0:
                sum_mean, sum_var = _sum_over_groups(mean_ptr, var_ptr, cols, cmask, C, G, BLOCK_G, BLOCK_C)
                rm = tl.load(rm_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                rv = tl.load(rv_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                unbiased = M / (M - 1.0)
                new_rm = (1.0 - momentum) * rm + momentum * (sum_mean / G)
                new_rv = (1.0 - momentum) * rv + momentum * (sum_var * unbiased / G)
                tl.store(new_rm_ptr + cols, new_rm.to(new_rm_ptr.dtype.element_ty), mask=cmask)
                tl.store(new_rv_ptr + cols, new_rv.to(new_rv_ptr.dtype.element_ty), mask=cmask)

    @triton.jit
    def _bn_act_bwd_partial(
        x_ptr, dy_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, part_dz_ptr, part_dzx_ptr,
        C, HW, G, M, s_n, s_c, s_p, tiles_per_chunk, alpha,
        ACT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, IN_SAMPLE: tl.constexpr,
    ):
        """Backward stage 1: per chunk, sum(dz) and sum(dz * xhat), dz = dy * act'(z)."""
        k = tl.program_id(0)
        g = tl.program_id(1)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mean = tl.load(mean_ptr + g * C + cols, mask=cmask, other=0.0)
        invstd = tl.load(invstd_ptr + g * C + cols, mask=cmask, other=0.0)
        w, b = _load_affine(w_ptr, b_ptr, cols, cmask, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
        scale = w * invstd
        shift = b - mean * scale  # the forward's formula, so z is the forward's z
        acc_dz = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc_dzx = tl.zeros([BLOCK_C], dtype=tl.float32)
        r_start = k * tiles_per_chunk * BLOCK_R
        for t in range(tiles_per_chunk):
            offs, rmask, _ = _rows(r_start + t * BLOCK_R, M, HW, g, G, s_n, s_p, BLOCK_R, IN_SAMPLE)
            m = rmask[:, None] & cmask[None, :]
            ptrs = offs[:, None] + (cols * s_c)[None, :]
            x = tl.load(x_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
            dz = dy * _activation_grad(x * scale[None, :] + shift[None, :], alpha, ACT)
            dz = tl.where(m, dz, 0.0)
            acc_dz += tl.sum(dz, axis=0)
            acc_dzx += tl.sum(dz * ((x - mean[None, :]) * invstd[None, :]), axis=0)
        out = (k * G + g) * C + cols
        tl.store(part_dz_ptr + out, acc_dz, mask=cmask)
        tl.store(part_dzx_ptr + out, acc_dzx, mask=cmask)

    @triton.jit
    def _bn_act_bwd_finalize(
        part_dz_ptr, part_dzx_ptr, sum_dz_ptr, sum_dzx_ptr,
        C, G, K, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Backward stage 2, one program per (channel block, ghost batch): sum(dz) and
        sum(dz * xhat) over the K chunks, read as [BLOCK_K, BLOCK_C] tiles."""
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        g = tl.program_id(1)
        sdz = tl.zeros([BLOCK_C], dtype=tl.float32)
        sdzx = tl.zeros([BLOCK_C], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            m = (ks < K)[:, None] & cmask[None, :]
            src = (ks[:, None] * G + g) * C + cols[None, :]
            sdz += tl.sum(tl.load(part_dz_ptr + src, mask=m, other=0.0), axis=0)
            sdzx += tl.sum(tl.load(part_dzx_ptr + src, mask=m, other=0.0), axis=0)
        tl.store(sum_dz_ptr + g * C + cols, sdz, mask=cmask)
        tl.store(sum_dzx_ptr + g * C + cols, sdzx, mask=cmask)

    @triton.jit
    def _bn_act_bwd_dx(
        x_ptr, dy_ptr, dx_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, sum_dz_ptr, sum_dzx_ptr, dw_ptr, db_ptr,
        n_rows, C, HW, G, M, s_n, s_c, s_p, alpha,
        ACT: tl.constexpr, TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, IN_SAMPLE: tl.constexpr,
    ):
        """Backward stage 3: dx = w * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)) in
        training (the batch statistics depend on x), w * invstd * dz in eval; the first row
        block also writes dweight = sum(dz * xhat) and dbias = sum(dz) over all ghost batches."""
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        offs, rmask, n = _rows(tl.program_id(0) * BLOCK_R, n_rows, HW, 0, 1, s_n, s_p, BLOCK_R, IN_SAMPLE)
        gc = _group_channel(n, cols, C, G, IN_SAMPLE)
        cm = cmask[None, :]
        m = rmask[:, None] & cm
        ptrs = offs[:, None] + (cols * s_c)[None, :]
        x = tl.load(x_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + gc, mask=cm, other=0.0)
        invstd = tl.load(invstd_ptr + gc, mask=cm, other=0.0)
        w, b = _load_affine(w_ptr, b_ptr, cols, cmask, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
        scale = w[None, :] * invstd
        shift = b[None, :] - mean * scale
        dz = dy * _activation_grad(x * scale + shift, alpha, ACT)
        if TRAINING:
            inv_m = 1.0 / M
            mean_dz = tl.load(sum_dz_ptr + gc, mask=cm, other=0.0) * inv_m
            mean_dzx = tl.load(sum_dzx_ptr + gc, mask=cm, other=0.0) * inv_m
            dx = scale * (dz - mean_dz - (x - mean) * invstd * mean_dzx)
        else:
            dx = scale * dz
        tl.store(dx_ptr + ptrs, dx.to(dx_ptr.dtype.element_ty), mask=m)
        if tl.program_id(0) == 0:
            dw, db = _sum_over_groups(sum_dzx_ptr, sum_dz_ptr, cols, cmask, C, G, BLOCK_G, BLOCK_C)
            tl.store(dw_ptr + cols, dw, mask=cmask)
            tl.store(db_ptr + cols, db, mask=cmask)


# ----------------------------------------------------------------------------- launchers


def _layout(x: Tensor):
    """(memory format, (s_n, s_c, s_p)) element strides of a dense NCHW or channels-last x.

    Strides come from the shape, not ``x.stride()``: PyTorch ignores the strides of size-1
    dimensions when it calls a tensor contiguous, and so do the kernels.
    """
    n, c, h, w = x.shape
    if x.is_contiguous():
        return torch.contiguous_format, (c * h * w, h * w, 1)
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last, (h * w * c, 1, c)
    raise ValueError("bn_act kernels take NCHW-contiguous or channels_last tensors")


class _Config:
    """Tile shape of the kernels for one tensor shape and device (see :func:`_config`)."""

    def __init__(self, block_r, block_c, in_sample, programs, num_warps):
        self.block_r, self.block_c, self.in_sample = block_r, block_c, in_sample
        self.programs, self.num_warps = programs, num_warps

    def chunks(self, rows: int, groups: int, channels: int):
        """(tiles per chunk, number of chunks K) splitting ``rows`` of each ghost batch."""
        tiles = triton.cdiv(rows, self.block_r)
        per_layer = groups * triton.cdiv(channels, self.block_c)
        k_target = max(1, self.programs // per_layer)
        tiles_per_chunk = triton.cdiv(tiles, k_target)
        return tiles_per_chunk, triton.cdiv(tiles, tiles_per_chunk)


def _config(device_type: str, channels: int, hw: int, rows: int, channels_last: bool,
            programs: int = 4) -> _Config:
    """Tiles of about 2K elements on a GPU (the channel axis contiguous for channels_last,
    the pixel axis for NCHW); a few large tiles in the interpreter, which pays per program."""
    if device_type != "cuda":
        block_c = min(next_power_of_2(channels), 32)
        block_r = min(next_power_of_2(rows), 4096)
        return _Config(block_r, block_c, hw % block_r == 0, programs, 1)
    if channels_last:
        block_c = min(next_power_of_2(channels), 64)
        block_r = max(16, 2048 // block_c)
    else:
        pow2_divisor = hw & -hw  # largest power of two dividing H*W
        block_r = min(pow2_divisor, 512) if pow2_divisor >= 16 else min(256, next_power_of_2(rows))
        block_c = max(1, min(next_power_of_2(channels), 2048 // block_r))
    num_warps = 8 if block_r * block_c >= 4096 else 4
    return _Config(block_r, block_c, hw % block_r == 0, programs, num_warps)


def _small_block(n: int) -> int:
    """Rows of the [rows, BLOCK_C] tiles that read per-chunk or per-ghost-batch statistics."""
    return min(next_power_of_2(n), 32)


def _default_config(x: Tensor, rows: int, fmt) -> _Config:
    c, h, w = x.shape[1:]
    return _config(x.device.type, c, h * w, rows, fmt is torch.channels_last, target_programs(x.device))


def _wrap(kernel):
    # Inside torch.compile the kernels enter the graph through wrap_triton; eagerly it is a no-op.
    wrap = getattr(torch.library, "wrap_triton", None)  # torch >= 2.6
    return wrap(kernel) if wrap is not None else kernel


def _forward_triton(x, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                    alpha, ghost_splits, config: _Config | None = None):
    """Launch the forward kernels; returns (y, mean, invstd, new running mean, new running var).

    ``mean``/``invstd`` are float32 (G, C), G = ghost_splits in training else 1. Raises
    ``RuntimeError`` where the kernels cannot run on ``x``.
    """
    require_launchable(x, "bn_act")
    n, c, h, w = x.shape
    hw = h * w
    fmt, (s_n, s_c, s_p) = _layout(x)
    groups = ghost_splits if training else 1
    rows = (n // groups) * hw
    cfg = config or _default_config(x, rows, fmt)
    f32 = dict(dtype=torch.float32, device=x.device)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    mean, invstd, scale, shift = (torch.empty((groups, c), **f32) for _ in range(4))
    has_running = running_mean is not None and running_var is not None
    if has_running:
        new_rm, new_rv = torch.empty_like(running_mean), torch.empty_like(running_var)
    else:
        new_rm, new_rv = x.new_empty(0), x.new_empty(0)
    dummy = mean  # stands in for absent optional tensors; never read (constexpr flags)
    var = torch.empty((groups, c), **f32)
    c_blocks = triton.cdiv(c, cfg.block_c)
    tiles_per_chunk, k = cfg.chunks(rows, groups, c)
    part_mean = part_m2 = dummy
    if training:
        part_mean, part_m2 = torch.empty((k, groups, c), **f32), torch.empty((k, groups, c), **f32)
        _wrap(_bn_stats_partial)[(k, groups, c_blocks)](
            x, part_mean, part_m2, c, hw, groups, rows, s_n, s_c, s_p, tiles_per_chunk,
            BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, IN_SAMPLE=cfg.in_sample, num_warps=cfg.num_warps,
        )
    _wrap(_bn_stats_finalize)[(c_blocks, groups)](
        part_mean, part_m2,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        running_mean if has_running else dummy, running_var if has_running else dummy,
        mean, var, invstd, scale, shift,
        c, groups, k, rows, tiles_per_chunk * cfg.block_r, eps,
        TRAINING=training, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_K=_small_block(k), BLOCK_C=cfg.block_c,
    )
    _wrap(_bn_act_apply)[(triton.cdiv(n * hw, cfg.block_r), c_blocks)](
        x, y, scale, shift, mean, var,
        running_mean if has_running else dummy, running_var if has_running else dummy,
        new_rm if has_running else dummy, new_rv if has_running else dummy,
        n * hw, c, hw, groups, rows, s_n, s_c, s_p, alpha, momentum,
        ACT=_ACT_CODE[activation], UPDATE_RUNNING=training and has_running, BLOCK_R=cfg.block_r,
        BLOCK_C=cfg.block_c, BLOCK_G=_small_block(groups), IN_SAMPLE=cfg.in_sample, num_warps=cfg.num_warps,
    )
    return y, mean, invstd, new_rm, new_rv


def _backward_triton(dy, x, weight, bias, mean, invstd, training, activation, alpha,
                     config: _Config | None = None):
    """Launch the backward kernels; returns (dx, dweight float32 (C,), dbias float32 (C,))."""
    require_launchable(x, "bn_act backward")
    n, c, h, w = x.shape
    hw = h * w
    fmt, (s_n, s_c, s_p) = _layout(x)
    dy = dy.contiguous(memory_format=fmt)
    groups = mean.shape[0]
    rows = (n // groups) * hw
    cfg = config or _default_config(x, rows, fmt)
    f32 = dict(dtype=torch.float32, device=x.device)
    c_blocks = triton.cdiv(c, cfg.block_c)
    tiles_per_chunk, k = cfg.chunks(rows, groups, c)
    part_dz, part_dzx = torch.empty((k, groups, c), **f32), torch.empty((k, groups, c), **f32)
    sum_dz, sum_dzx = torch.empty((groups, c), **f32), torch.empty((groups, c), **f32)
    dweight, dbias = torch.empty(c, **f32), torch.empty(c, **f32)
    w_arg = weight if weight is not None else mean
    b_arg = bias if bias is not None else mean
    act = _ACT_CODE[activation]
    _wrap(_bn_act_bwd_partial)[(k, groups, c_blocks)](
        x, dy, mean, invstd, w_arg, b_arg, part_dz, part_dzx,
        c, hw, groups, rows, s_n, s_c, s_p, tiles_per_chunk, alpha,
        ACT=act, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, IN_SAMPLE=cfg.in_sample, num_warps=cfg.num_warps,
    )
    _wrap(_bn_act_bwd_finalize)[(c_blocks, groups)](
        part_dz, part_dzx, sum_dz, sum_dzx, c, groups, k, BLOCK_K=_small_block(k), BLOCK_C=cfg.block_c,
    )
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    _wrap(_bn_act_bwd_dx)[(triton.cdiv(n * hw, cfg.block_r), c_blocks)](
        x, dy, dx, mean, invstd, w_arg, b_arg, sum_dz, sum_dzx, dweight, dbias,
        n * hw, c, hw, groups, rows, s_n, s_c, s_p, alpha,
        ACT=act, TRAINING=training, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, BLOCK_G=_small_block(groups), IN_SAMPLE=cfg.in_sample,
        num_warps=cfg.num_warps,
    )
    return dx, dweight, dbias


# The same computation in PyTorch ops: the operator's implementation where the kernels cannot
# run (CPU without the interpreter, CPU graphs under torch.compile, no triton installed).


def _act_torch(z: Tensor, activation: str, alpha: float) -> Tensor:
    if activation == "celu":
        return F.celu(z, alpha)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "silu":
        return F.silu(z)
    return z


def _act_grad_torch(z: Tensor, activation: str, alpha: float) -> Tensor:
    if activation == "celu":
        return torch.where(z > 0, torch.ones_like(z), torch.exp(z / alpha))
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * math.sqrt(0.5)))
        return cdf + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    return torch.ones_like(z)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 accumulation for every storage dtype, float64 for float64 (the pass manager's check)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _grouped(t: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """(N, C, H, W) -> (N // G, G, C, H, W) in ``dtype``: sample n in ghost batch n % G."""
    n, c, h, w = t.shape
    return t.to(dtype).reshape(n // groups, groups, c, h, w)


def _per_group(v: Tensor) -> Tensor:
    return v[None, :, :, None, None]


def _forward_torch(x, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                   alpha, ghost_splits):
    fmt, _ = _layout(x)
    n, c, h, w = x.shape
    groups = ghost_splits if training else 1
    dt = _compute_dtype(x)
    xg = _grouped(x, groups, dt)
    has_running = running_mean is not None and running_var is not None
    new_rm, new_rv = x.new_empty(0), x.new_empty(0)
    if training:
        var, mean = torch.var_mean(xg, dim=(0, 3, 4), correction=0)  # (G, C)
        count = (n // groups) * h * w
        if has_running:
            new_rm = (1 - momentum) * running_mean.to(dt) + momentum * mean.mean(0)
            new_rv = (1 - momentum) * running_var.to(dt) + momentum * (var * (count / (count - 1))).mean(0)
            new_rm, new_rv = new_rm.to(running_mean.dtype), new_rv.to(running_var.dtype)
    else:
        # clone: an operator's outputs must not alias its inputs
        mean, var = running_mean.to(dt)[None].clone(), running_var.to(dt)[None]
        new_rm, new_rv = running_mean.clone(), running_var.clone()
    invstd = torch.rsqrt(var + eps)
    scale = invstd * (weight.to(dt) if weight is not None else 1.0)
    shift = (bias.to(dt) if bias is not None else 0.0) - mean * scale
    y = _act_torch(xg * _per_group(scale) + _per_group(shift), activation, alpha)
    y = y.reshape(n, c, h, w).to(x.dtype).contiguous(memory_format=fmt)
    return y, mean, invstd, new_rm, new_rv


def _backward_torch(dy, x, weight, bias, mean, invstd, training, activation, alpha):
    fmt, _ = _layout(x)
    n, c, h, w = x.shape
    groups = mean.shape[0]
    dt = _compute_dtype(x)
    xg, dyg = _grouped(x, groups, dt), _grouped(dy, groups, dt)
    scale = invstd * (weight.to(dt) if weight is not None else 1.0)
    shift = (bias.to(dt) if bias is not None else 0.0) - mean * scale
    dz = dyg * _act_grad_torch(xg * _per_group(scale) + _per_group(shift), activation, alpha)
    xhat = (xg - _per_group(mean)) * _per_group(invstd)
    sum_dz, sum_dzx = dz.sum(dim=(0, 3, 4)), (dz * xhat).sum(dim=(0, 3, 4))  # (G, C)
    if training:
        count = (n // groups) * h * w
        dz = dz - _per_group(sum_dz / count) - xhat * _per_group(sum_dzx / count)
    dx = (dz * _per_group(scale)).reshape(n, c, h, w).to(x.dtype).contiguous(memory_format=fmt)
    return dx, sum_dzx.sum(0), sum_dz.sum(0)


# ----------------------------------------------------------------------------- operator + autograd


def _use_kernels(x: Tensor) -> bool:
    """Triton for float32 (and bfloat16/float16 on CUDA: the interpreter has no bfloat16);
    float64, used by the pass manager's exactness check, stays in PyTorch ops in float64."""
    if x.dtype == torch.float32:
        return can_launch(x)
    return x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cuda" and can_launch(x)


def _bn_act_op_impl(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                    weight: Tensor | None, bias: Tensor | None, training: bool, momentum: float,
                    eps: float, activation: str, alpha: float,
                    ghost_splits: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    args = (x, running_mean, running_var, weight, bias, training, momentum, eps, activation, alpha,
            ghost_splits)
    if _use_kernels(x):
        return _forward_triton(*args)
    return _forward_torch(*args)


def _bn_act_backward_op_impl(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                             mean: Tensor, invstd: Tensor, training: bool, activation: str,
                             alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    args = (dy, x, weight, bias, mean, invstd, training, activation, alpha)
    dx, dweight, dbias = _backward_triton(*args) if _use_kernels(x) else _backward_torch(*args)
    dweight = dweight.to(weight.dtype) if weight is not None else x.new_empty(0)
    dbias = dbias.to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx, dweight, dbias


def _define(name, fn):
    # triton_op (torch >= 2.6) lets torch.compile see the kernels; else an opaque custom op.
    if HAS_TRITON and hasattr(torch.library, "triton_op"):
        return torch.library.triton_op(f"fastgraph::{name}", fn, mutates_args=())
    op = torch.library.custom_op(f"fastgraph::{name}", fn, mutates_args=())
    op.register_fake(fn)
    return op


_bn_act_op = _define("bn_act", _bn_act_op_impl)
_bn_act_backward_op = _define("bn_act_backward", _bn_act_backward_op_impl)


def _setup_context(ctx, inputs, output):
    x, _, _, weight, bias, training, _, _, activation, alpha, _ = inputs
    _, mean, invstd, _, _ = output
    ctx.save_for_backward(x, weight, bias, mean, invstd)
    ctx.training, ctx.activation, ctx.alpha = training, activation, alpha


def _backward(ctx, dy, *_unused_grads):
    x, weight, bias, mean, invstd = ctx.saved_tensors
    dx, dweight, dbias = _bn_act_backward_op(dy, x, weight, bias, mean, invstd, ctx.training,
                                             ctx.activation, ctx.alpha)
    return (dx, None, None, dweight if weight is not None else None, dbias if bias is not None else None,
            None, None, None, None, None, None)


_bn_act_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public function


def _check(x, running_mean, running_var, weight, bias, training, momentum, activation, alpha, ghost_splits):
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"bn_act takes a floating (N, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    n, c, h, w = x.shape
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"bn_act: {name} must have shape ({c},), got {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("bn_act: give both running_mean and running_var, or neither")
    if activation not in ACTIVATIONS:
        raise ValueError(f"bn_act: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "celu" and alpha == 0:
        raise ValueError("bn_act: CELU alpha cannot be 0")
    if momentum is None:
        raise ValueError("bn_act: momentum=None (cumulative moving average) is not supported")
    if ghost_splits < 1:
        raise ValueError(f"bn_act: ghost_splits must be >= 1, got {ghost_splits}")
    if training:
        if n % ghost_splits:
            raise ValueError(f"bn_act: batch {n} does not divide into {ghost_splits} ghost batches "
                             "(drop the last incomplete batch)")
        if (n // ghost_splits) * h * w <= 1:
            raise ValueError("bn_act: expected more than 1 value per channel when training, got "
                             f"{tuple(x.shape)} in {ghost_splits} ghost batch(es)")
    elif running_mean is None:
        raise ValueError("bn_act: eval mode needs running_mean and running_var")


def bn_act(x, running_mean, running_var, weight, bias, *, training, momentum=0.1, eps=1e-5,
           activation="celu", alpha=1.0, ghost_splits=1) -> Tensor:
    """BatchNorm then activation, fused; differentiable in x, weight and bias.

    Args:
        x: (N, C, H, W) float32/bfloat16/float16, NCHW-contiguous or channels_last (other
            layouts are made contiguous first).
        running_mean, running_var: (C,) buffers, updated in place in training (may be
            ``None`` in training: no update); required in eval.
        weight, bias: (C,) affine parameters or ``None`` (weight 1, bias 0).
        training: batch statistics (and running-stat update) if True, running stats if False.
        momentum: running-stat momentum, PyTorch's convention (new = (1-m)·old + m·batch).
        eps: added to the variance.
        activation: ``"celu"`` (with ``alpha``), ``"gelu"`` (erf form), ``"silu"``, ``"identity"``.
        ghost_splits: training only: the number S of ghost batches; sample n normalises with
            the statistics of the samples n' with n' % S == n % S (module docstring).

    Returns:
        y: like x (dtype and memory format).

    Runs the ``fastgraph::bn_act`` operator: Triton kernels on CUDA (and on CPU under
    ``TRITON_INTERPRET=1``, float32 only), the same math in PyTorch ops elsewhere, and
    always in float64 for float64 inputs; ``torch.compile`` traces it without a graph break.

    Raises:
        ValueError: wrong shapes, unknown activation, batch not divisible by ghost_splits,
            one value per channel in training, eval without running statistics.
    """
    _check(x, running_mean, running_var, weight, bias, training, momentum, activation, alpha, ghost_splits)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    y, _, _, new_rm, new_rv = _bn_act_op(x, running_mean, running_var, weight, bias, bool(training),
                                         float(momentum), float(eps), activation, float(alpha),
                                         int(ghost_splits))
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_rm)
            running_var.copy_(new_rv)
    return y


def _module_forward(x, running_mean, running_var, weight, bias, num_batches_tracked, training, momentum, eps,
                    activation, alpha, ghost_splits, ghost_batch_size):
    """:class:`BatchNormActivation`'s forward; registered with ``torch.fx.wrap`` so re-tracing
    a graph that holds the module records one call instead of failing on its shape checks."""
    if training:
        num_batches_tracked.add_(1)
        if ghost_batch_size is not None:
            n = x.shape[0]
            if n % ghost_batch_size:
                raise GhostBatchSizeError(
                    f"ghost batch norm: a training batch of N={n} samples does not split into ghost batches "
                    f"of S={ghost_batch_size}; use a batch size that is a multiple of {ghost_batch_size} "
                    "(drop the last incomplete batch)")
            ghost_splits = n // ghost_batch_size
    return bn_act(x, running_mean, running_var, weight, bias, training=training, momentum=momentum, eps=eps,
                  activation=activation, alpha=alpha, ghost_splits=ghost_splits)


torch.fx.wrap("_module_forward")


class BatchNormActivation(nn.Module):
    """``nn.BatchNorm2d`` followed by an activation, computed by the fused :func:`bn_act`.

    Holds the same parameters and buffers as ``nn.BatchNorm2d`` under the same state_dict
    keys (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``),
    so it replaces a BN in a graph and loads BN checkpoints. Input and output: (N, C, H, W).

    Args:
        num_features: C.
        activation: ``"celu"``, ``"gelu"``, ``"silu"`` or ``"identity"``; ``alpha``: CELU's alpha.
        momentum, eps: as ``nn.BatchNorm2d`` (``momentum=None`` is not supported).
        affine: learnable weight and bias (freeze the weight at 1 with ``weight.requires_grad_(False)``).
        ghost_splits: number of ghost batches in training (module docstring).
        ghost_batch_size: instead of ``ghost_splits``, samples per ghost batch S: a batch of N
            makes N / S ghost batches, the grouping of ``fastgraph.core.modules.GhostBatchNorm``
            (N not a multiple of S raises ``GhostBatchSizeError``).
    """

    def __init__(self, num_features, activation="celu", alpha=1.0, momentum=0.1, eps=1e-5, affine=True,
                 ghost_splits=1, ghost_batch_size=None, device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if momentum is None:
            raise ValueError("momentum=None (cumulative moving average) is not supported")
        if ghost_batch_size is not None and (ghost_splits != 1 or ghost_batch_size < 1):
            raise ValueError("give ghost_splits or ghost_batch_size (>= 1), not both")
        factory = dict(device=device, dtype=dtype)
        self.num_features, self.activation, self.alpha = num_features, activation, alpha
        self.momentum, self.eps, self.affine = momentum, eps, affine
        self.ghost_splits, self.ghost_batch_size = ghost_splits, ghost_batch_size
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def forward(self, x: Tensor) -> Tensor:
        return _module_forward(x, self.running_mean, self.running_var, self.weight, self.bias,
                               self.num_batches_tracked, self.training, self.momentum, self.eps,
                               self.activation, self.alpha, self.ghost_splits, self.ghost_batch_size)

    def extra_repr(self) -> str:
        act = f"celu(alpha={self.alpha})" if self.activation == "celu" else self.activation
        ghost = (f"ghost_batch_size={self.ghost_batch_size}" if self.ghost_batch_size is not None
                 else f"ghost_splits={self.ghost_splits}")
        return (f"{self.num_features}, activation={act}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, {ghost}")


# ----------------------------------------------------------------------------- reference


def bn_act_reference(x, running_mean, running_var, weight, bias, *, training, momentum=0.1, eps=1e-5,
                     activation="celu", alpha=1.0, ghost_splits=1) -> Tensor:
    """Plain-PyTorch :func:`bn_act`: ``F.batch_norm`` then the activation, computed in float32
    (float64 for float64 inputs).

    Ghost batches use the one-reshape form (Page's cifar10-fast): x viewed as
    (N/S, S·C, H, W) with the running statistics and affine parameters repeated S times,
    one ``F.batch_norm``, and the S running-stat copies averaged back to C. Differentiable
    by autograd; updates the running statistics in place like ``F.batch_norm``.

    Bytes moved (eager, training, storage s bytes, float32 compute): the float32 copy
    (s + 4, skipped for float32), F.batch_norm (3·4), the activation (2·4), cast (4 + s);
    ghost batches add two reshape copies (2·2·4).
    """
    _check(x, running_mean, running_var, weight, bias, training, momentum, activation, alpha, ghost_splits)
    fmt, _ = _layout(x) if (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)) \
        else (torch.contiguous_format, None)
    n, c, h, w = x.shape
    dt = _compute_dtype(x)

    def cast(t):
        return t.to(dt) if t is not None else None

    xf = x.to(dt)
    splits = ghost_splits if training else 1
    if splits == 1:
        rm, rv = cast(running_mean), cast(running_var)
        z = F.batch_norm(xf, rm, rv, cast(weight), cast(bias), training, momentum, eps)
    else:
        def rep(t):
            return t.to(dt).repeat(splits) if t is not None else None

        rm, rv = rep(running_mean), rep(running_var)
        z = F.batch_norm(xf.reshape(n // splits, splits * c, h, w), rm, rv, rep(weight), rep(bias),
                         True, momentum, eps).reshape(n, c, h, w)
        if rm is not None:
            rm, rv = rm.view(splits, c).mean(0), rv.view(splits, c).mean(0)
    if training and running_mean is not None and rm is not running_mean:
        with torch.no_grad():  # F.batch_norm updated a float32 copy or the repeated stats
            running_mean.copy_(rm)
            running_var.copy_(rv)
    y = _act_torch(z, activation, alpha)
    return y.to(x.dtype).contiguous(memory_format=fmt)
