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
Chan et al.'s parallel variance update (no E[x^2] - E[x]^2 cancellation), summing deviations
from a chunk's mean rather than values of size |mean|; the running variance uses the unbiased
batch variance, as PyTorch does. The normalisation is ``(x - mean) * (weight * invstd) + bias``,
not ``x * scale + (bias - mean * scale)``, whose two terms cancel when |mean| >> std.

Cost per element of x, s = bytes of the storage dtype (per-channel vectors negligible):

| pass | launches | kernel bytes | minimum bytes | FLOPs (approx.) |
|---|---|---|---|---|
| training forward | 2 | 3s (read x twice: statistics, normalise; write y) | 2s | 9 + act |
| eval forward | 1 | 2s | 2s | 3 + act |
| backward (training or eval) | 2 | 5s (read x, dy for the sums, again for dx; write dx) | 3s | 17 + 2 act' |

act = CELU: 4 FLOPs + exp; GELU: 6 + erf; SiLU: 4 + exp (sigmoid); act' (the derivative,
from z alone): CELU exp, GELU erf + exp, SiLU exp. At ~0.5-1.5 FLOP/byte every variant is
memory-bound, so the roofline time is bytes / bandwidth.

Launches. Every kernel runs on the grid (chunk k, ghost batch g, channel block): the rows
of ghost batch g (its samples' pixels) are split in K chunks of whole [BLOCK_R, BLOCK_C]
tiles, so a program's per-channel tables (mean, scale, bias) are loaded once, not per element.
Training forward: (1) ``_bn_stats_partial``, each chunk's mean and M2 into a (2, G, K, C)
float32 buffer; (2) ``_bn_act_fwd``, where each program first merges its ghost batch's K chunk
statistics (one [K, BLOCK_C] tile load, K about sqrt(rows / 8) so that read stays small beside
the chunk), then normalises its chunk; chunk 0 writes mean and invstd, and program (0, 0, c)
the running statistics. Eval forward: (2) alone, with the running statistics. Backward: (1)
``_bn_act_bwd_partial``, each chunk's sum(dz) and sum(dz * xhat); (2) ``_bn_act_bwd_dx``, each
program merging its ghost batch's K sums, then dx; program (0, 0, c) writes dweight and dbias.
Between launches the launchers only allocate outputs and scratch. Chunks are merged in a
fixed order: results are deterministic.

Host work. Traced calls (torch.compile, make_fx) go through the ``fastgraph::bn_act`` custom
operator and its registered autograd, which Inductor lowers to these kernels. Eager calls skip
the operator's dispatcher, custom-op autograd and wrap_triton layers: a plain autograd Function
calls the same implementations and launches the kernels directly. Measured on a 2-core CPU with
the launches stubbed, one training forward + backward call takes about 115 us of host time
instead of 250 (bench/results/bn-act-host-overhead-cpu-2026-12-04.json).
"""

import functools
import math
import threading

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

try:
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode as _in_dispatch_mode
except ImportError:  # older torch: no way to tell, so every call takes the operator

    def _in_dispatch_mode() -> bool:
        return True

ACTIVATIONS = ("celu", "gelu", "silu", "identity")
_ACT_CODE = {"identity": 0, "celu": 1, "gelu": 2, "silu": 3}


# ----------------------------------------------------------------------------- kernels

if HAS_TRITON:

    @triton.jit
    def _rows(r0, M, HW, g, G, s_n, s_p, BLOCK_R: tl.constexpr, IN_SAMPLE: tl.constexpr,
              LINEAR: tl.constexpr):
        """Element offsets (int64, channel term excluded) and mask of rows r0 .. r0 + BLOCK_R of
        ghost batch g: row r is pixel r % HW of sample g + G * (r // HW).

        LINEAR (one ghost batch, channels_last): row r sits at r * s_p, no division. IN_SAMPLE
        (BLOCK_R divides HW and r0 is a multiple of BLOCK_R): the block lies in one sample, whose
        index is a scalar, so the pixel offsets are provably contiguous and NCHW loads coalesce.
        """
        r = r0 + tl.arange(0, BLOCK_R)
        mask = r < M
        if LINEAR:
            offs = r.to(tl.int64) * s_p
        elif IN_SAMPLE:
            n = g + G * (r0 // HW)
            offs = n.to(tl.int64) * s_n + (r0 % HW + tl.arange(0, BLOCK_R)) * s_p
        else:
            n = g + G * (r // HW)
            offs = n.to(tl.int64) * s_n + (r % HW) * s_p
        return offs, mask

    @triton.jit
    def _activation(z, alpha, inv_alpha, ACT: tl.constexpr):
        if ACT == 1:  # CELU (Barron 2017): x > 0 ? x : alpha * (exp(x / alpha) - 1)
            # exp of min(z, 0): the branch tl.where discards would overflow to inf for large z
            y = tl.where(z > 0, z, alpha * (tl.exp(tl.minimum(z, 0.0) * inv_alpha) - 1.0))
        elif ACT == 2:  # GELU, erf form (Hendrycks & Gimpel 2016)
            y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
        elif ACT == 3:  # SiLU (Elfwing et al. 2018)
            y = z * tl.sigmoid(z)
        else:
            y = z
        return y

    @triton.jit
    def _activation_grad(z, inv_alpha, ACT: tl.constexpr):
        if ACT == 1:
            d = tl.where(z > 0, 1.0, tl.exp(tl.minimum(z, 0.0) * inv_alpha))
        elif ACT == 2:
            # GELU'(z) = Phi(z) + z phi(z): one erf and one exp, no recomputation of GELU itself.
            d = (0.5 + 0.5 * tl.math.erf(z * 0.7071067811865476)) + z * (
                0.3989422804014327 * tl.exp(-0.5 * z * z))
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
    def _batch_tables(mean_ptr, invstd_ptr, w_ptr, b_ptr, g, cols, cmask, C, HAS_WEIGHT: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
        """The backward's per-channel tables of ghost batch ``g``, each (1, BLOCK_C) float32 but
        the bias (BLOCK_C,): (mean, invstd, bias, scale = weight * invstd)."""
        mean = tl.load(mean_ptr + g * C + cols, mask=cmask, other=0.0)[None, :]
        invstd = tl.load(invstd_ptr + g * C + cols, mask=cmask, other=0.0)[None, :]
        w, b = _load_affine(w_ptr, b_ptr, cols, cmask, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
        return mean, invstd, b, w[None, :] * invstd

    @triton.jit
    def _tile_dz(x_ptr, dy_ptr, ptrs, m, mean, scale, b, inv_alpha, ACT: tl.constexpr):
        """A backward tile: (x - mean, dz) as float32, dz = dy * act'(z) at the forward's
        z = (x - mean) * scale + b; dy loads 0 where masked, so dz is 0 there."""
        x = tl.load(x_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
        xc = x - mean
        return xc, dy * _activation_grad(xc * scale + b[None, :], inv_alpha, ACT)

    @triton.jit
    def _chunk_counts(ks, K, M, rows_per_chunk):
        """Rows in chunks ``ks`` of a ghost batch (the last chunk may be short; 0 past K)."""
        return tl.where(ks < K, tl.minimum(M - ks * rows_per_chunk, rows_per_chunk), 0).to(tl.float32)

    @triton.jit
    def _merge_chunks(part_ptr, plane, g, K, M, C, rows_per_chunk, cols, cmask,
                      BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
        """Mean and M2 of ghost batch g from its K chunk statistics, read as one
        [BLOCK_K, BLOCK_C] tile (BLOCK_K >= K): the exact merge of Chan, Golub & LeVeque,
        mean = sum(n_k mean_k) / M, M2 = sum(M2_k + n_k (mean_k - mean)^2), in a fixed order."""
        ks = tl.arange(0, BLOCK_K)
        n_k = _chunk_counts(ks, K, M, rows_per_chunk)[:, None]
        src = (g * K + ks)[:, None] * C + cols[None, :]
        m = (ks < K)[:, None] & cmask[None, :]
        mean_k = tl.load(part_ptr + src, mask=m, other=0.0)
        m2_k = tl.load(part_ptr + plane + src, mask=m, other=0.0)
        ref = tl.sum(tl.where((ks == 0)[:, None], mean_k, 0.0), axis=0)  # chunk 0's mean
        mean = ref + tl.sum(n_k * (mean_k - ref[None, :]), axis=0) / M
        d = mean_k - mean[None, :]
        m2 = tl.sum(m2_k + n_k * d * d, axis=0)
        return mean, m2

    @triton.jit
    def _bn_stats_partial(
        x_ptr, part_ptr, C, HW, G, M, K, s_n, s_c, s_p, tiles_per_chunk,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, IN_SAMPLE: tl.constexpr, LINEAR: tl.constexpr,
    ):
        """Forward launch 1, program (chunk k, ghost batch g, channel block): mean and M2 of the
        chunk's rows into part[0, g, k] and part[1, g, k] of a float32 (2, G, K, C) buffer.

        Each element of the [BLOCK_R, BLOCK_C] tile keeps its own Welford mean and M2 over the
        tiles of the chunk (no cross-warp reduction per tile); the BLOCK_R rows are merged once,
        at the end, with Chan's pairwise formula."""
        k = tl.program_id(0)
        g = tl.program_id(1)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        cnt = tl.zeros([BLOCK_R], dtype=tl.float32)
        mean = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        r_start = k * tiles_per_chunk * BLOCK_R
        for t in range(tiles_per_chunk):
            offs, rmask = _rows(r_start + t * BLOCK_R, M, HW, g, G, s_n, s_p, BLOCK_R, IN_SAMPLE, LINEAR)
            x = tl.load(x_ptr + offs[:, None] + (cols * s_c)[None, :],
                        mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            cnt += rmask.to(tl.float32)
            inv = tl.where(rmask, 1.0 / tl.maximum(cnt, 1.0), 0.0)[:, None]
            delta = x - mean
            mean += delta * inv
            m2 += tl.where(rmask[:, None], delta * (x - mean), 0.0)
        n = tl.sum(cnt, axis=0)
        # Sum deviations from row 0's mean (row 0 always holds data), not the means themselves:
        # a float32 sum of values ~|mean| loses digits that matter when |mean| >> std.
        ref = tl.sum(tl.where((tl.arange(0, BLOCK_R) == 0)[:, None], mean, 0.0), axis=0)[None, :]
        mean_c = ref + tl.sum(cnt[:, None] * (mean - ref), axis=0)[None, :] / tl.maximum(n, 1.0)
        d = mean - mean_c
        m2_c = tl.sum(m2 + cnt[:, None] * d * d, axis=0)
        dst = (g * K + k) * C + cols
        tl.store(part_ptr + dst, tl.sum(mean_c, axis=0), mask=cmask)
        tl.store(part_ptr + G * K * C + dst, m2_c, mask=cmask)

    @triton.jit
    def _bn_act_fwd(
        x_ptr, y_ptr, part_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, mean_ptr, invstd_ptr, new_rm_ptr, new_rv_ptr,
        C, HW, G, M, K, s_n, s_c, s_p, tiles_per_chunk, eps, momentum, alpha, inv_alpha,
        ACT: tl.constexpr, TRAINING: tl.constexpr, HAS_RUNNING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_G: tl.constexpr, IN_SAMPLE: tl.constexpr, LINEAR: tl.constexpr,
    ):
        """Forward launch 2 (the only one in eval), program (chunk k, ghost batch g, channel
        block): y = act((x - mean) * (weight * invstd) + bias) over the chunk's rows.

        In training each program merges its ghost batch's K chunk statistics itself (one tile
        load), so no separate finalize launch is needed; the programs of chunk 0 write mean and
        invstd (G, C) for the backward, and program (0, 0, c) the new running statistics: the
        mean over ghost batches of their updates, running_var with the unbiased variance as
        PyTorch. In eval mean and var are the running statistics, copied to the new ones."""
        k = tl.program_id(0)
        g = tl.program_id(1)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        rows_per_chunk = tiles_per_chunk * BLOCK_R
        if TRAINING:
            mean, m2 = _merge_chunks(part_ptr, G * K * C, g, K, M, C, rows_per_chunk, cols, cmask,
                                     BLOCK_K, BLOCK_C)
            var = m2 / M
        else:
            mean = tl.load(rm_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            var = tl.load(rv_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
        invstd = 1.0 / tl.sqrt(var + eps)
        w, b = _load_affine(w_ptr, b_ptr, cols, cmask, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
        scale = w * invstd
        r_start = k * rows_per_chunk
        for t in range(tiles_per_chunk):
            offs, rmask = _rows(r_start + t * BLOCK_R, M, HW, g, G, s_n, s_p, BLOCK_R, IN_SAMPLE, LINEAR)
            ptrs = offs[:, None] + (cols * s_c)[None, :]
            m = rmask[:, None] & cmask[None, :]
            x = tl.load(x_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
            # (x - mean) * scale + bias, not x * scale + (bias - mean * scale): the latter
            # subtracts two large terms when |mean| >> std and loses the normalised value.
            y = _activation((x - mean[None, :]) * scale[None, :] + b[None, :], alpha, inv_alpha, ACT)
            tl.store(y_ptr + ptrs, y.to(y_ptr.dtype.element_ty), mask=m)
        if k == 0:
            tl.store(mean_ptr + g * C + cols, mean, mask=cmask)
            tl.store(invstd_ptr + g * C + cols, invstd, mask=cmask)
            if HAS_RUNNING:
                if g == 0:
                    rm = tl.load(rm_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                    rv = tl.load(rv_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                    if TRAINING:
                        # Every ghost batch's (mean, var), as [BLOCK_G, BLOCK_K, BLOCK_C] tiles of
                        # the chunk statistics, in a fixed order.
                        ks = tl.arange(0, BLOCK_K)
                        n_k = _chunk_counts(ks, K, M, rows_per_chunk)[None, :, None]
                        sum_mean = tl.zeros([BLOCK_C], dtype=tl.float32)
                        sum_m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
                        for g0 in range(0, G, BLOCK_G):
                            gs = g0 + tl.arange(0, BLOCK_G)
                            src = ((gs[:, None] * K + ks[None, :]) * C)[:, :, None] + cols[None, None, :]
                            m3 = ((gs < G)[:, None] & (ks < K)[None, :])[:, :, None] & cmask[None, None, :]
                            mean_k = tl.load(part_ptr + src, mask=m3, other=0.0)
                            m2_k = tl.load(part_ptr + G * K * C + src, mask=m3, other=0.0)
                            ref = tl.sum(tl.where((ks == 0)[None, :, None], mean_k, 0.0), axis=1)[:, None, :]
                            mean_g = ref + tl.sum(n_k * (mean_k - ref), axis=1)[:, None, :] / M
                            d = mean_k - mean_g
                            sum_mean += tl.sum(tl.sum(mean_g, axis=1), axis=0)
                            sum_m2 += tl.sum(tl.sum(m2_k + n_k * d * d, axis=1), axis=0)
                        unbiased = M / (M - 1.0)
                        rm = (1.0 - momentum) * rm + momentum * (sum_mean / G)
                        rv = (1.0 - momentum) * rv + momentum * (sum_m2 / M * unbiased / G)
                    tl.store(new_rm_ptr + cols, rm.to(new_rm_ptr.dtype.element_ty), mask=cmask)
                    tl.store(new_rv_ptr + cols, rv.to(new_rv_ptr.dtype.element_ty), mask=cmask)

    @triton.jit
    def _bn_act_bwd_partial(
        x_ptr, dy_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, part_ptr,
        C, HW, G, M, K, s_n, s_c, s_p, tiles_per_chunk, inv_alpha,
        ACT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, IN_SAMPLE: tl.constexpr, LINEAR: tl.constexpr,
    ):
        """Backward launch 1, program (chunk k, ghost batch g, channel block): sum(dz) and
        sum(dz * xhat) over the chunk, dz = dy * act'(z), into part[0, g, k] and part[1, g, k]
        of a float32 (2, G, K, C) buffer; elementwise accumulators, one row reduction at the end."""
        k = tl.program_id(0)
        g = tl.program_id(1)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mean, invstd, b, scale = _batch_tables(mean_ptr, invstd_ptr, w_ptr, b_ptr, g, cols, cmask, C,
                                               HAS_WEIGHT, HAS_BIAS, BLOCK_C)
        acc_dz = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        acc_dzx = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        r_start = k * tiles_per_chunk * BLOCK_R
        for t in range(tiles_per_chunk):
            offs, rmask = _rows(r_start + t * BLOCK_R, M, HW, g, G, s_n, s_p, BLOCK_R, IN_SAMPLE, LINEAR)
            ptrs = offs[:, None] + (cols * s_c)[None, :]
            m = rmask[:, None] & cmask[None, :]
            xc, dz = _tile_dz(x_ptr, dy_ptr, ptrs, m, mean, scale, b, inv_alpha, ACT)
            acc_dz += dz
            acc_dzx += dz * (xc * invstd)
        dst = (g * K + k) * C + cols
        tl.store(part_ptr + dst, tl.sum(acc_dz, axis=0), mask=cmask)
        tl.store(part_ptr + G * K * C + dst, tl.sum(acc_dzx, axis=0), mask=cmask)

    @triton.jit
    def _bn_act_bwd_dx(
        x_ptr, dy_ptr, dx_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, part_ptr, dw_ptr, db_ptr,
        C, HW, G, M, K, s_n, s_c, s_p, tiles_per_chunk, inv_alpha,
        ACT: tl.constexpr, TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
        IN_SAMPLE: tl.constexpr, LINEAR: tl.constexpr,
    ):
        """Backward launch 2, program (chunk k, ghost batch g, channel block): sums its ghost
        batch's K partial sums (one tile load), then dx = w * invstd * (dz - mean(dz) - xhat *
        mean(dz * xhat)) in training (the batch statistics depend on x), w * invstd * dz in eval.
        Program (0, 0, c) writes dweight = sum(dz * xhat) and dbias = sum(dz) over all ghost
        batches, summing the G * K partials in a fixed order."""
        k = tl.program_id(0)
        g = tl.program_id(1)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        plane = G * K * C
        mean, invstd, b, scale = _batch_tables(mean_ptr, invstd_ptr, w_ptr, b_ptr, g, cols, cmask, C,
                                               HAS_WEIGHT, HAS_BIAS, BLOCK_C)
        if TRAINING:
            ks = tl.arange(0, BLOCK_K)
            src = (g * K + ks)[:, None] * C + cols[None, :]
            pm = (ks < K)[:, None] & cmask[None, :]
            mean_dz = (tl.sum(tl.load(part_ptr + src, mask=pm, other=0.0), axis=0) / M)[None, :]
            mean_dzx = (tl.sum(tl.load(part_ptr + plane + src, mask=pm, other=0.0), axis=0) / M)[None, :]
        r_start = k * tiles_per_chunk * BLOCK_R
        for t in range(tiles_per_chunk):
            offs, rmask = _rows(r_start + t * BLOCK_R, M, HW, g, G, s_n, s_p, BLOCK_R, IN_SAMPLE, LINEAR)
            ptrs = offs[:, None] + (cols * s_c)[None, :]
            m = rmask[:, None] & cmask[None, :]
            xc, dz = _tile_dz(x_ptr, dy_ptr, ptrs, m, mean, scale, b, inv_alpha, ACT)
            if TRAINING:
                dz = dz - mean_dz - (xc * invstd) * mean_dzx
            tl.store(dx_ptr + ptrs, (scale * dz).to(dx_ptr.dtype.element_ty), mask=m)
        if (k == 0) & (g == 0):
            dw = tl.zeros([BLOCK_C], dtype=tl.float32)
            db = tl.zeros([BLOCK_C], dtype=tl.float32)
            for j0 in range(0, G * K, BLOCK_J):
                js = j0 + tl.arange(0, BLOCK_J)
                src_j = js[:, None] * C + cols[None, :]
                mask_j = (js < G * K)[:, None] & cmask[None, :]
                db += tl.sum(tl.load(part_ptr + src_j, mask=mask_j, other=0.0), axis=0)
                dw += tl.sum(tl.load(part_ptr + plane + src_j, mask=mask_j, other=0.0), axis=0)
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


_TILE = 4096  # elements per [BLOCK_R, BLOCK_C] tile on a GPU: 8 KiB of bfloat16 per load round
_MAX_CHUNKS = 128  # chunks per ghost batch: the merge reads them as one [BLOCK_K, BLOCK_C] tile
_MERGE_ROWS = 8  # K <= sqrt(rows / _MERGE_ROWS): the merge reads <= 1/4 of a bfloat16 chunk's bytes
_PROGRAMS_PER_TARGET = 2  # about 8 resident programs an SM: bytes in flight to cover HBM latency


class _Config:
    """Tile shape and grid size of the kernels for one tensor shape and device (see :func:`_config`)."""

    def __init__(self, block_r, block_c, in_sample, programs, num_warps):
        self.block_r, self.block_c, self.in_sample = block_r, block_c, in_sample
        self.programs, self.num_warps = programs, num_warps

    def chunks(self, rows: int, groups: int, channels: int, merge: bool = True):
        """(tiles per chunk, number of chunks K) splitting the ``rows`` of each ghost batch so
        that the grid (K, groups, channel blocks) holds about ``programs`` programs.

        With ``merge`` every program of the second launch reads all K chunk results of its
        ghost batch (8 bytes per chunk and channel): K is kept near sqrt(rows / 8), where that
        read stays a small fraction of the chunk's own bytes, and at most _MAX_CHUNKS.
        """
        tiles = triton.cdiv(rows, self.block_r)
        k = max(1, triton.cdiv(self.programs, groups * triton.cdiv(channels, self.block_c)))
        if merge:
            k = min(k, _MAX_CHUNKS, max(1, math.isqrt(rows // _MERGE_ROWS)))
        tiles_per_chunk = triton.cdiv(tiles, min(k, tiles))
        return tiles_per_chunk, triton.cdiv(tiles, tiles_per_chunk)


def _config(device_type: str, channels: int, hw: int, rows: int, channels_last: bool,
            programs: int = 4, groups: int = 1) -> _Config:
    """Tiles of _TILE elements on a GPU, the channel axis contiguous for channels_last (64
    channels, 128 bytes of bfloat16 per row; 32 where 64 would leave too few programs), the
    pixel axis for NCHW; a few large tiles in the interpreter, which pays per program."""
    if device_type != "cuda":
        block_c = min(next_power_of_2(channels), 32)
        block_r = min(next_power_of_2(rows), 4096)
        return _Config(block_r, block_c, hw % block_r == 0, programs, 1)
    if channels_last:
        block_c = min(next_power_of_2(channels), 64)
        k_max = min(_MAX_CHUNKS, max(1, math.isqrt(rows // _MERGE_ROWS)))
        if block_c == 64 and groups * triton.cdiv(channels, 64) * k_max < programs:
            block_c = 32
        block_r = min(_TILE // block_c, next_power_of_2(rows))
    else:
        pow2_divisor = hw & -hw  # largest power of two dividing H*W
        block_r = min(pow2_divisor, 512) if pow2_divisor >= 16 else min(256, next_power_of_2(rows))
        block_c = max(1, min(next_power_of_2(channels), _TILE // block_r))
    # 16 elements a thread at 4096-element tiles: two 16-byte bfloat16 vectors per load.
    num_warps = 8 if block_r * block_c >= _TILE else 4
    return _Config(block_r, block_c, hw % block_r == 0, programs, num_warps)


class _Plan:
    """Everything a launch needs beyond the tensors, for one shape (cached per shape)."""

    def __init__(self, cfg: _Config, c: int, hw: int, rows: int, groups: int, channels_last: bool,
                 merge: bool):
        self.cfg = cfg
        self.tiles_per_chunk, self.k = cfg.chunks(rows, groups, c, merge)
        self.grid = (self.k, groups, triton.cdiv(c, cfg.block_c))
        self.block_k = next_power_of_2(self.k)
        self.block_g = max(1, min(next_power_of_2(groups), _TILE // (self.block_k * cfg.block_c)))
        self.block_j = max(1, min(next_power_of_2(groups * self.k), _TILE // cfg.block_c))
        # One ghost batch in channels_last: row r of the batch sits at r * C, no division.
        self.linear = channels_last and groups == 1
        self.consts = dict(BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, IN_SAMPLE=cfg.in_sample,
                           LINEAR=self.linear, num_warps=cfg.num_warps)


@functools.lru_cache(maxsize=512)
def _default_plan(device: torch.device, n: int, c: int, hw: int, groups: int, channels_last: bool,
                  merge: bool) -> _Plan:
    rows = (n // groups) * hw
    programs = target_programs(device)
    if device.type == "cuda":
        programs *= _PROGRAMS_PER_TARGET
    cfg = _config(device.type, c, hw, rows, channels_last, programs, groups)
    return _Plan(cfg, c, hw, rows, groups, channels_last, merge)


def _plan(x: Tensor, fmt, groups: int, merge: bool, config: _Config | None) -> _Plan:
    n, c, h, w = x.shape
    channels_last = fmt is torch.channels_last
    if config is None:
        return _default_plan(x.device, n, c, h * w, groups, channels_last, merge)
    return _Plan(config, c, h * w, (n // groups) * h * w, groups, channels_last, merge)


class _Launch(threading.local):
    """Per thread: whether the launchers hand the kernels to Triton as they are (``direct``)."""

    direct = False


_launch = _Launch()


def _wrap(kernel):
    # Traced (torch.compile, make_fx, fake tensors) the kernels enter the graph through
    # wrap_triton. _BnActFunction's eager calls launch them as they are: an eager wrap_triton
    # call dispatches through a higher-order operator, which torch's set_wrap_triton_enabled note
    # puts at about 1 ms of host time (the operator's own eager implementation turns it off too).
    if _launch.direct:
        return kernel
    wrap = getattr(torch.library, "wrap_triton", None)  # torch >= 2.6
    return wrap(kernel) if wrap is not None else kernel


def _forward_triton(x, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                    alpha, ghost_splits, config: _Config | None = None):
    """Launch the forward kernels (two in training, one in eval); returns (y, mean, invstd, new
    running mean, new running var).

    ``mean``/``invstd`` are float32 (G, C), G = ghost_splits in training else 1; the new running
    statistics are (0,)-shaped where ``running_mean`` is None. Raises ``RuntimeError`` where the
    kernels cannot run on ``x``.
    """
    require_launchable(x, "bn_act")
    n, c, h, w = x.shape
    fmt, (s_n, s_c, s_p) = _layout(x)
    groups = ghost_splits if training else 1
    p = _plan(x, fmt, groups, training, config)
    rows = (n // groups) * h * w
    f32 = dict(dtype=torch.float32, device=x.device)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    mean, invstd = torch.empty((groups, c), **f32), torch.empty((groups, c), **f32)
    has_running = running_mean is not None and running_var is not None
    dummy = mean  # stands in for absent tensors; never read (constexpr flags)
    if has_running:
        new_rm, new_rv = torch.empty_like(running_mean), torch.empty_like(running_var)
        rm_arg, rv_arg, new_rm_arg, new_rv_arg = running_mean, running_var, new_rm, new_rv
    else:
        new_rm, new_rv = x.new_empty(0), x.new_empty(0)
        rm_arg = rv_arg = new_rm_arg = new_rv_arg = dummy
    part = dummy
    if training:
        part = torch.empty((2, groups, p.k, c), **f32)
        _wrap(_bn_stats_partial)[p.grid](
            x, part, c, h * w, groups, rows, p.k, s_n, s_c, s_p, p.tiles_per_chunk, **p.consts)
    _wrap(_bn_act_fwd)[p.grid](
        x, y, part, weight if weight is not None else dummy, bias if bias is not None else dummy,
        rm_arg, rv_arg, mean, invstd, new_rm_arg, new_rv_arg,
        c, h * w, groups, rows, p.k, s_n, s_c, s_p, p.tiles_per_chunk, eps, momentum, alpha,
        1.0 / alpha if alpha else 0.0,
        ACT=_ACT_CODE[activation], TRAINING=training, HAS_RUNNING=has_running,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_K=p.block_k, BLOCK_G=p.block_g,
        **p.consts,
    )
    return y, mean, invstd, new_rm, new_rv


def _backward_triton(dy, x, weight, bias, mean, invstd, training, activation, alpha,
                     config: _Config | None = None):
    """Launch the two backward kernels; returns (dx, dweight float32 (C,), dbias float32 (C,))."""
    require_launchable(x, "bn_act backward")
    n, c, h, w = x.shape
    fmt, (s_n, s_c, s_p) = _layout(x)
    dy = dy.contiguous(memory_format=fmt)
    groups = mean.shape[0]
    p = _plan(x, fmt, groups, True, config)
    rows = (n // groups) * h * w
    f32 = dict(dtype=torch.float32, device=x.device)
    part = torch.empty((2, groups, p.k, c), **f32)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    dweight, dbias = torch.empty(c, **f32), torch.empty(c, **f32)
    w_arg = weight if weight is not None else mean
    b_arg = bias if bias is not None else mean
    flags = dict(ACT=_ACT_CODE[activation], HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None)
    inv_alpha = 1.0 / alpha if alpha else 0.0
    _wrap(_bn_act_bwd_partial)[p.grid](
        x, dy, mean, invstd, w_arg, b_arg, part,
        c, h * w, groups, rows, p.k, s_n, s_c, s_p, p.tiles_per_chunk, inv_alpha, **flags, **p.consts)
    _wrap(_bn_act_bwd_dx)[p.grid](
        x, dy, dx, mean, invstd, w_arg, b_arg, part, dweight, dbias,
        c, h * w, groups, rows, p.k, s_n, s_c, s_p, p.tiles_per_chunk, inv_alpha,
        TRAINING=training, BLOCK_K=p.block_k, BLOCK_J=p.block_j, **flags, **p.consts)
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
    shift = bias.to(dt)[:, None, None] if bias is not None else 0.0
    # (x - mean) * scale + bias, as the kernels: no cancellation when |mean| >> std
    y = _act_torch((xg - _per_group(mean)) * _per_group(scale) + shift, activation, alpha)
    y = y.reshape(n, c, h, w).to(x.dtype).contiguous(memory_format=fmt)
    return y, mean, invstd, new_rm, new_rv


def _backward_torch(dy, x, weight, bias, mean, invstd, training, activation, alpha):
    fmt, _ = _layout(x)
    n, c, h, w = x.shape
    groups = mean.shape[0]
    dt = _compute_dtype(x)
    xg, dyg = _grouped(x, groups, dt), _grouped(dy, groups, dt)
    scale = invstd * (weight.to(dt) if weight is not None else 1.0)
    shift = bias.to(dt)[:, None, None] if bias is not None else 0.0
    xc = xg - _per_group(mean)
    dz = dyg * _act_grad_torch(xc * _per_group(scale) + shift, activation, alpha)
    xhat = xc * _per_group(invstd)
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


def _input_grads(ctx, dy, backward):
    """Gradients for the 11 inputs of ``fastgraph::bn_act`` from ``backward`` (the backward
    operator, or its implementation), given dy like y."""
    x, weight, bias, mean, invstd = ctx.saved_tensors
    dx, dweight, dbias = backward(dy, x, weight, bias, mean, invstd, ctx.training, ctx.activation, ctx.alpha)
    return (dx, None, None, dweight if weight is not None else None, dbias if bias is not None else None,
            None, None, None, None, None, None)


def _backward(ctx, dy, *_unused_grads):
    return _input_grads(ctx, dy, _bn_act_backward_op)


_bn_act_op.register_autograd(_backward, setup_context=_setup_context)


def _launched_directly(fn, *args):
    """``fn(*args)`` with the kernels launched as they are, not through wrap_triton."""
    before, _launch.direct = _launch.direct, True
    try:
        return fn(*args)
    finally:
        _launch.direct = before


class _BnActFunction(torch.autograd.Function):
    """``fastgraph::bn_act`` with its autograd, for eager calls: the same forward and backward
    implementations (the same kernels, the same PyTorch path, hence the same numbers), called
    from a plain autograd Function instead of through the dispatcher, torch's custom-op autograd
    wrapper and wrap_triton, which cost more host time than the launchers themselves (module
    docstring). Traced calls keep the operator, which is what torch.compile and Inductor see.
    Inputs and outputs as ``_bn_act_op_impl``; double backward raises (the backward kernels have
    no derivative)."""

    # forward(ctx, ...), not a separate setup_context: with one, Function.apply binds the
    # arguments to forward's signature with inspect on every call. torch.func transforms, which
    # need setup_context, take the operator (_traced).
    @staticmethod
    def forward(ctx, *args):
        output = _launched_directly(_bn_act_op_impl, *args)
        _setup_context(ctx, args, output)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero tensors for the four outputs without a gradient
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, *_unused_grads):
        if dy is None:  # y's gradient is undefined: so are the inputs'
            return (None,) * 11
        return _launched_directly(_input_grads, ctx, dy, _bn_act_backward_op_impl)


_PLAIN_TYPES = (Tensor, nn.Parameter)


def _traced(*tensors: Tensor | None) -> bool:
    """Whether this call of :func:`bn_act` is traced or intercepted rather than just run:
    torch.compile, torch.jit.trace, torch.func transforms, an active TorchFunctionMode (the pass
    manager's float64 mode) or TorchDispatchMode (make_fx, fake tensors, FlopCounterMode), or a
    tensor subclass among the inputs. Those calls take the ``fastgraph::bn_act`` operator."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active():
        return True
    if torch._C._is_torch_function_mode_enabled() or _in_dispatch_mode():
        return True
    return any(t is not None and type(t) not in _PLAIN_TYPES for t in tensors)


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

    Computes the ``fastgraph::bn_act`` operator: Triton kernels on CUDA for float32, bfloat16
    and float16 (on CPU under ``TRITON_INTERPRET=1``, float32 only), the same math in PyTorch
    ops (float32 accumulation) elsewhere, and always in float64 for float64 inputs.
    ``torch.compile`` traces the operator without a graph break; an eager call runs the same
    implementation through a plain autograd Function, without the operator's dispatch.

    Raises:
        ValueError: wrong shapes, unknown activation, batch not divisible by ghost_splits,
            one value per channel in training, eval without running statistics.
    """
    _check(x, running_mean, running_var, weight, bias, training, momentum, activation, alpha, ghost_splits)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    # Eager calls skip the operator's dispatch (_BnActFunction); traced ones keep it.
    op = _bn_act_op if _traced(x, running_mean, running_var, weight, bias) else _BnActFunction.apply
    y, _, _, new_rm, new_rv = op(x, running_mean, running_var, weight, bias, bool(training), float(momentum),
                                 float(eps), activation, float(alpha), int(ghost_splits))
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
