"""
cache_kernel.py: the causal sparse cache's training-time attention as one fused Triton kernel.

mipt.py defines the function (cache_attention_torch, the reference); this file computes the same thing
without materialising the gathered keys, the (B, C, L, N) mask or the attention matrix:

    att_i = softmax over {null} U {j in cand[chunk(i)] : j <= i < end_j} of  q_i . k_j / sqrt(hd) + log s_j

The forward kernel runs one program per (query block, batch x head): it loads the block's queries,
walks the chunk's candidate list in tiles, gathers each tile's keys and values by index, masks them by
their interval and keeps an online softmax (flash attention's recurrence) seeded with the null slot.
The backward pass recomputes the probabilities from the saved log-sum-exp in two kernels: one per query
block for dq (in registers), one per (chunk, candidate tile) for dk, dv and d log s, which loops over the
chunk's queries and writes each candidate row once per chunk. A chunk's own positions are written with
plain stores; the carried ones, which sit in several chunks' lists, with atomic adds into a second buffer.

Triton runs on the GPU; with TRITON_INTERPRET=1 set before import it also runs on the CPU (slowly, and
in float32 only: the interpreter's bf16 dots are wrong), which is how the CPU tests check it. Without
Triton, `available()` is False and kernels.py runs mipt.py's reference instead. On the GPU, float32
inputs go through tf32 dots (about 1e-3 relative to the reference); under bf16 autocast, bf16 dots with
fp32 accumulation.
Limits: batch x heads <= 65535 (a grid axis); the candidate lists as mipt.cache_plan builds them.
"""

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: kernels.py falls back to mipt.py's PyTorch reference
    triton = None


INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'   # Triton fixes its mode when the kernels are defined


def available(device):
    """True when the fused kernel can run on tensors of this device."""
    if triton is None:
        return False
    if device.type == 'cuda':
        return True
    return device.type == 'cpu' and INTERPRET


if triton is not None:

    @triton.jit
    def _query_block(H, T, L, hd, BQ: tl.constexpr, HD: tl.constexpr):
        """This program's (batch b, head h) and queries: chunk c and its block of BQ positions, masked at the
        chunk's end and at T; the head dimension padded to HD and its mask."""
        pid_q = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)          # int64: b * T * 3D passes 2^31 at long contexts
        NQB = tl.cdiv(L, BQ)
        c = pid_q // NQB
        qb = pid_q % NQB
        offs_q = (c * L + qb * BQ + tl.arange(0, BQ)).to(tl.int64)                     # (BQ,)
        offs_d = tl.arange(0, HD)
        return b, pid_bh % H, c, offs_q, (offs_q < T) & (qb * BQ + tl.arange(0, BQ) < L), offs_d, offs_d < hd

    @triton.jit
    def _candidates(CAND, END, LOGS, K, V, b, c, h, offs_n, offs_d, dmask, q_last, T, C, N,
                    skb, skt, skh, svb, svt, svh):
        """One tile of chunk c's candidate list, gathered: positions idx (-1: none), which are live (listed,
        and not after q_last), their ends, log s, and their key and value rows (BN, HD) for head h."""
        idx = tl.load(CAND + (b * C + c) * N + offs_n, mask=offs_n < N, other=-1)          # (BN,)
        live = (idx >= 0) & (idx <= q_last)
        at = tl.where(live, idx, 0).to(tl.int64)       # int64 rows: T x 3D passes 2^31 at long contexts
        e = tl.load(END + b * T + at, mask=live, other=0)
        ls = tl.load(LOGS + b * T + at, mask=live, other=0.0)
        kd = live[:, None] & dmask[None, :]
        k = tl.load(K + b * skb + at[:, None] * skt + h * skh + offs_d[None, :], mask=kd, other=0.0)
        v = tl.load(V + b * svb + at[:, None] * svt + h * svh + offs_d[None, :], mask=kd, other=0.0)
        return idx, live, at, e, ls, k, v

    @triton.jit
    def _fwd_kernel(Q, K, V, LOGS, END, CAND, NK, NV, O, LSE,
                    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                    T, C, N, H, L, hd, scale,
                    HD: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr):
        b, h, c, offs_q, qmask, offs_d, dmask = _query_block(H, T, L, hd, BQ, HD)
        q = tl.load(Q + b * sqb + offs_q[:, None] * sqt + h * sqh + offs_d[None, :],
                    mask=qmask[:, None] & dmask[None, :], other=0.0)      # (BQ, HD)
        nk = tl.load(NK + h * hd + offs_d, mask=dmask, other=0.0).to(tl.float32)
        nv = tl.load(NV + h * hd + offs_d, mask=dmask, other=0.0).to(tl.float32)
        # the null slot seeds the online softmax: logit q.null_k, weight 1, value null_v
        m = tl.sum(q.to(tl.float32) * nk[None, :], 1) * scale            # (BQ,)
        l = tl.full((BQ,), 1.0, tl.float32)
        acc = tl.zeros((BQ, HD), tl.float32) + nv[None, :]
        q_last = tl.max(tl.where(qmask, offs_q, -1), 0)
        for n0 in range(0, N, BN):
            idx, live, at, e, ls, k, v = _candidates(CAND, END, LOGS, K, V, b, c, h, n0 + tl.arange(0, BN), offs_d,
                                                     dmask, q_last, T, C, N, skb, skt, skh, svb, svt, svh)
            s = tl.dot(q, tl.trans(k)) * scale + ls[None, :]              # (BQ, BN) fp32
            vis = live[None, :] & (idx[None, :] <= offs_q[:, None]) & (offs_q[:, None] < e[None, :])
            s = tl.where(vis, s, float('-inf'))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        o = acc / l[:, None]
        tl.store(O + b * sob + offs_q[:, None] * sot + h * soh + offs_d[None, :], o.to(O.dtype.element_ty),
                 mask=qmask[:, None] & dmask[None, :])
        tl.store(LSE + (b * H + h) * T + offs_q, m + tl.log(l), mask=qmask)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, LOGS, END, CAND, NK, NV, DO, LSE, DELTA, DQ, DNK, DNV,
                    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,
                    T, C, N, H, L, hd, scale,
                    HD: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr):
        b, h, c, offs_q, qmask, offs_d, dmask = _query_block(H, T, L, hd, BQ, HD)
        qd = qmask[:, None] & dmask[None, :]
        q = tl.load(Q + b * sqb + offs_q[:, None] * sqt + h * sqh + offs_d[None, :], mask=qd, other=0.0)
        do = tl.load(DO + b * sdb + offs_q[:, None] * sdt + h * sdh + offs_d[None, :], mask=qd, other=0.0)
        lse = tl.load(LSE + (b * H + h) * T + offs_q, mask=qmask, other=0.0)
        delta = tl.load(DELTA + (b * H + h) * T + offs_q, mask=qmask, other=0.0)
        nk = tl.load(NK + h * hd + offs_d, mask=dmask, other=0.0).to(tl.float32)
        nv = tl.load(NV + h * hd + offs_d, mask=dmask, other=0.0).to(tl.float32)
        qf = q.to(tl.float32)
        dof = do.to(tl.float32)
        # the null slot
        p0 = tl.where(qmask, tl.exp(tl.sum(qf * nk[None, :], 1) * scale - lse), 0.0)   # (BQ,)
        ds0 = p0 * (tl.sum(dof * nv[None, :], 1) - delta)
        dq = ds0[:, None] * nk[None, :] * scale                                         # (BQ, HD) fp32
        tl.atomic_add(DNK + h * hd + offs_d, tl.sum(ds0[:, None] * qf, 0) * scale, mask=dmask)
        tl.atomic_add(DNV + h * hd + offs_d, tl.sum(p0[:, None] * dof, 0), mask=dmask)
        q_last = tl.max(tl.where(qmask, offs_q, -1), 0)
        for n0 in range(0, N, BN):
            idx, live, at, e, ls, k, v = _candidates(CAND, END, LOGS, K, V, b, c, h, n0 + tl.arange(0, BN), offs_d,
                                                     dmask, q_last, T, C, N, skb, skt, skh, svb, svt, svh)
            s = tl.dot(q, tl.trans(k)) * scale + ls[None, :]
            vis = live[None, :] & (idx[None, :] <= offs_q[:, None]) & (offs_q[:, None] < e[None, :])
            p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)                  # (BQ, BN)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k) * scale
        tl.store(DQ + ((b * T + offs_q[:, None]) * H + h) * hd + offs_d[None, :], dq, mask=qd)

    @triton.jit
    def _bwd_dkv_kernel(Q, K, V, LOGS, END, CAND, DO, LSE, DELTA, DK, DV, DKC, DVC, DLOGS,
                        sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,
                        T, C, N, NC, H, L, hd, scale,
                        HD: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr):
        # one program per (chunk, tile of its candidates): dk, dv stay in registers over the chunk's queries.
        # The chunk's own positions (entries NC.. of its list) have no other writer: plain stores into DK, DV.
        # Carried entries also sit in other chunks' lists: atomic adds into DKC, DVC.
        NNB = tl.cdiv(N, BN)
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)          # int64: b * T * 3D passes 2^31 at long contexts
        h = pid_bh % H
        c = pid_n // NNB
        offs_n = (pid_n % NNB) * BN + tl.arange(0, BN)
        offs_d = tl.arange(0, HD)
        dmask = offs_d < hd
        idx, live, at, e, ls, k, v = _candidates(CAND, END, LOGS, K, V, b, c, h, offs_n, offs_d, dmask, T, T, C, N,
                                                 skb, skt, skh, svb, svt, svh)
        kd = live[:, None] & dmask[None, :]
        dk = tl.zeros((BN, HD), tl.float32)
        dv = tl.zeros((BN, HD), tl.float32)
        dls = tl.zeros((BN,), tl.float32)
        for q0 in range(0, L, BQ):
            offs_q = (c * L + q0 + tl.arange(0, BQ)).to(tl.int64)
            qmask = (offs_q < T) & (q0 + tl.arange(0, BQ) < L)
            qd = qmask[:, None] & dmask[None, :]
            q = tl.load(Q + b * sqb + offs_q[:, None] * sqt + h * sqh + offs_d[None, :], mask=qd, other=0.0)
            do = tl.load(DO + b * sdb + offs_q[:, None] * sdt + h * sdh + offs_d[None, :], mask=qd, other=0.0)
            lse = tl.load(LSE + (b * H + h) * T + offs_q, mask=qmask, other=0.0)
            delta = tl.load(DELTA + (b * H + h) * T + offs_q, mask=qmask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale + ls[None, :]                              # (BQ, BN)
            vis = (qmask[:, None] & live[None, :] & (idx[None, :] <= offs_q[:, None])
                   & (offs_q[:, None] < e[None, :]))
            p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dls += tl.sum(ds, 0)
        rows = (b * T + at) * H + h
        ptr = rows[:, None] * hd + offs_d[None, :]
        own = (offs_n >= NC)[:, None]
        tl.store(DK + ptr, dk * scale, mask=kd & own)
        tl.store(DV + ptr, dv, mask=kd & own)
        tl.atomic_add(DKC + ptr, dk * scale, mask=kd & ~own)
        tl.atomic_add(DVC + ptr, dv, mask=kd & ~own)
        tl.atomic_add(DLOGS + b * T + at, dls, mask=live)


def _configs():
    """Autotuned on a GPU (per candidate count, head size and chunk); one fixed block under the interpreter."""
    if INTERPRET or not torch.cuda.is_available():
        return [triton.Config({'BQ': 64, 'BN': 64})]
    return [triton.Config({'BQ': bq, 'BN': bn}, num_warps=w) for bq in (32, 64) for bn in (32, 64) for w in (4, 8)]


def _grid(T, L, B, H):
    return lambda meta: (-(-T // L) * -(-L // meta['BQ']), B * H)   # (chunks x blocks per chunk, B x H)


def _grid_dkv(T, L, N, B, H):
    return lambda meta: (-(-T // L) * -(-N // meta['BN']), B * H)   # (chunks x candidate tiles, B x H)


if triton is not None:
    _fwd = triton.autotune(_configs(), key=['N', 'HD', 'L'])(_fwd_kernel)
    _bwd_dq = triton.autotune(_configs(), key=['N', 'HD', 'L'], reset_to_zero=['DNK', 'DNV'])(_bwd_dq_kernel)
    _bwd_dkv = triton.autotune(_configs(), key=['N', 'HD', 'L'], reset_to_zero=['DKC', 'DVC', 'DLOGS'])(_bwd_dkv_kernel)


class CacheAttention(torch.autograd.Function):
    """att (B, T, H, hd) from q, k, v (B, T, H, hd), log_s (B, T), end (B, T) int, cand (B, C, N) int,
    null_k, null_v (H, hd) and the chunk length L. See cache_attention_torch in mipt.py. As mipt.cache_plan
    builds it, the last L entries of chunk c's list are its own positions c L .. c L + L - 1 (-1 past T)."""

    @staticmethod
    def forward(ctx, q, k, v, log_s, end, cand, null_k, null_v, L):
        B, T, H, hd = q.shape
        C, N = cand.shape[1], cand.shape[2]
        if B * H > 65535:
            raise ValueError(f"the fused cache read-out takes batch x heads <= 65535, got {B} x {H}: use a smaller "
                             f"batch, or cache_impl='torch'")
        HD = max(16, triton.next_power_of_2(hd))
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        v = v.to(q.dtype)
        k = k.to(q.dtype)
        log_s = log_s.float().contiguous()
        end, cand = end.to(torch.int32).contiguous(), cand.to(torch.int32).contiguous()
        null_k, null_v = null_k.float().contiguous(), null_v.float().contiguous()
        o = torch.empty(B, T, H, hd, device=q.device, dtype=q.dtype)
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        scale = 1.0 / math.sqrt(hd)
        _fwd[_grid(T, L, B, H)](q, k, v, log_s, end, cand, null_k, null_v, o, lse,
                                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                                T, C, N, H, L, hd, scale, HD=HD)
        ctx.save_for_backward(q, k, v, log_s, end, cand, null_k, null_v, o, lse)
        ctx.L = L
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, log_s, end, cand, null_k, null_v, o, lse = ctx.saved_tensors
        B, T, H, hd = q.shape
        C, N = cand.shape[1], cand.shape[2]
        HD = max(16, triton.next_power_of_2(hd))
        do = do.to(q.dtype)
        do = do if do.stride(-1) == 1 else do.contiguous()
        delta = (do.float() * o.float()).sum(-1).permute(0, 2, 1).contiguous()          # (B, H, T)
        dq = torch.empty(B, T, H, hd, device=q.device, dtype=torch.float32)
        dk, dv = (torch.empty(B, T, H, hd, device=q.device, dtype=torch.float32) for _ in range(2))
        dkc, dvc = (torch.zeros(B, T, H, hd, device=q.device, dtype=torch.float32) for _ in range(2))
        dls = torch.zeros(B, T, device=q.device, dtype=torch.float32)
        dnk = torch.zeros(H, hd, device=q.device, dtype=torch.float32)
        dnv = torch.zeros(H, hd, device=q.device, dtype=torch.float32)
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
        scale = 1.0 / math.sqrt(hd)
        _bwd_dq[_grid(T, ctx.L, B, H)](q, k, v, log_s, end, cand, null_k, null_v, do, lse, delta, dq, dnk, dnv,
                                       *strides, T, C, N, H, ctx.L, hd, scale, HD=HD)
        _bwd_dkv[_grid_dkv(T, ctx.L, N, B, H)](q, k, v, log_s, end, cand, do, lse, delta, dk, dv, dkc, dvc, dls,
                                               *strides, T, C, N, N - ctx.L, H, ctx.L, hd, scale, HD=HD)
        dk += dkc
        dv += dvc
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dls, None, None, dnk, dnv, None)

