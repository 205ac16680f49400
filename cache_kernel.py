"""
cache_kernel.py: the causal sparse cache's training-time attention as one fused Triton kernel.

mipt.py defines the function (cache_attention_torch, the reference); this file computes the same thing
without materialising the gathered keys, the (B, C, L, N) mask or the attention matrix:

    att_i = softmax over {null} U {j in cand[chunk(i)] : j <= i < end_j} of  q_i . k_j / sqrt(hd) + log s_j

The forward kernel runs one program per (query block, batch x head): it loads the block's queries,
walks the chunk's candidate list in tiles, gathers each tile's keys and values by index, masks them by
their interval and keeps an online softmax (flash attention's recurrence) seeded with the null slot.
The backward kernel recomputes the probabilities from the saved log-sum-exp; dq stays in registers,
while dk, dv and d log s are scattered with atomic adds (a key sits in many chunks' candidate lists).

Triton runs on the GPU; with TRITON_INTERPRET=1 set before import it also runs on the CPU (slowly),
which is how the CPU tests check it. Without Triton, `available()` is False and mipt.py uses the
reference.
"""

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: mipt.py falls back to the PyTorch reference
    triton = None


def available(device):
    """True when the fused kernel can run on tensors of this device."""
    import os
    if triton is None:
        return False
    if device.type == 'cuda':
        return True
    return device.type == 'cpu' and os.environ.get('TRITON_INTERPRET') == '1'


if triton is not None:

    @triton.jit
    def _fwd_kernel(Q, K, V, LOGS, END, CAND, NK, NV, O, LSE,
                    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                    T, C, N, H, L, hd, scale,
                    HD: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr):
        NQB = tl.cdiv(L, BQ)
        pid_q = tl.program_id(0)                       # chunk c, block qb inside it
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        c = pid_q // NQB
        qb = pid_q % NQB
        offs_q = c * L + qb * BQ + tl.arange(0, BQ)    # (BQ,) query positions
        qmask = (offs_q < T) & (qb * BQ + tl.arange(0, BQ) < L)
        offs_d = tl.arange(0, HD)
        dmask = offs_d < hd
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
            offs_n = n0 + tl.arange(0, BN)
            idx = tl.load(CAND + (b * C + c) * N + offs_n, mask=offs_n < N, other=-1)   # (BN,)
            live = (idx >= 0) & (idx <= q_last)
            at = tl.where(live, idx, 0)
            e = tl.load(END + b * T + at, mask=live, other=0)
            ls = tl.load(LOGS + b * T + at, mask=live, other=0.0)
            kt = tl.load(K + b * skb + at[None, :] * skt + h * skh + offs_d[:, None],
                         mask=live[None, :] & dmask[:, None], other=0.0)   # (HD, BN)
            s = tl.dot(q, kt) * scale + ls[None, :]                       # (BQ, BN) fp32
            vis = live[None, :] & (idx[None, :] <= offs_q[:, None]) & (offs_q[:, None] < e[None, :])
            s = tl.where(vis, s, float('-inf'))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(V + b * svb + at[:, None] * svt + h * svh + offs_d[None, :],
                        mask=live[:, None] & dmask[None, :], other=0.0)    # (BN, HD)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        o = acc / l[:, None]
        tl.store(O + b * sob + offs_q[:, None] * sot + h * soh + offs_d[None, :], o.to(O.dtype.element_ty),
                 mask=qmask[:, None] & dmask[None, :])
        tl.store(LSE + (b * H + h) * T + offs_q, m + tl.log(l), mask=qmask)

    @triton.jit
    def _bwd_kernel(Q, K, V, LOGS, END, CAND, NK, NV, DO, LSE, DELTA,
                    DQ, DK, DV, DLOGS, DNK, DNV,
                    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,
                    T, C, N, H, L, hd, scale,
                    HD: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr):
        NQB = tl.cdiv(L, BQ)
        pid_q = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        c = pid_q // NQB
        qb = pid_q % NQB
        offs_q = c * L + qb * BQ + tl.arange(0, BQ)
        qmask = (offs_q < T) & (qb * BQ + tl.arange(0, BQ) < L)
        offs_d = tl.arange(0, HD)
        dmask = offs_d < hd
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
            offs_n = n0 + tl.arange(0, BN)
            idx = tl.load(CAND + (b * C + c) * N + offs_n, mask=offs_n < N, other=-1)
            live = (idx >= 0) & (idx <= q_last)
            at = tl.where(live, idx, 0)
            e = tl.load(END + b * T + at, mask=live, other=0)
            ls = tl.load(LOGS + b * T + at, mask=live, other=0.0)
            k = tl.load(K + b * skb + at[:, None] * skt + h * skh + offs_d[None, :],
                        mask=live[:, None] & dmask[None, :], other=0.0)    # (BN, HD)
            v = tl.load(V + b * svb + at[:, None] * svt + h * svh + offs_d[None, :],
                        mask=live[:, None] & dmask[None, :], other=0.0)    # (BN, HD)
            s = tl.dot(q, tl.trans(k)) * scale + ls[None, :]
            vis = live[None, :] & (idx[None, :] <= offs_q[:, None]) & (offs_q[:, None] < e[None, :])
            p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)                  # (BQ, BN)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k) * scale
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q) * scale                 # (BN, HD)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do)
            rows = (b * T + at) * H + h
            kd = live[:, None] & dmask[None, :]
            tl.atomic_add(DK + rows[:, None] * hd + offs_d[None, :], dk, mask=kd)
            tl.atomic_add(DV + rows[:, None] * hd + offs_d[None, :], dv, mask=kd)
            tl.atomic_add(DLOGS + b * T + at, tl.sum(ds, 0), mask=live)
        tl.store(DQ + ((b * T + offs_q[:, None]) * H + h) * hd + offs_d[None, :], dq, mask=qd)


def _configs():
    """Autotuned on a GPU (per candidate count, head size and chunk); one fixed block under the interpreter."""
    import os
    if os.environ.get('TRITON_INTERPRET') == '1' or not torch.cuda.is_available():
        return [triton.Config({'BQ': 64, 'BN': 64})]
    return [triton.Config({'BQ': bq, 'BN': bn}, num_warps=w) for bq in (32, 64) for bn in (32, 64) for w in (4, 8)]


def _grid(T, L, B, H):
    return lambda meta: (-(-T // L) * -(-L // meta['BQ']), B * H)   # (chunks x blocks per chunk, B x H)


if triton is not None:
    _fwd = triton.autotune(_configs(), key=['N', 'HD', 'L'])(_fwd_kernel)
    _bwd = triton.autotune(_configs(), key=['N', 'HD', 'L'], reset_to_zero=['DK', 'DV', 'DLOGS', 'DNK', 'DNV'])(_bwd_kernel)


class CacheAttention(torch.autograd.Function):
    """att (B, T, H, hd) from q, k, v (B, T, H, hd), log_s (B, T), end (B, T) int, cand (B, C, N) int,
    null_k, null_v (H, hd) and the chunk length L. See cache_attention_torch in mipt.py."""

    @staticmethod
    def forward(ctx, q, k, v, log_s, end, cand, null_k, null_v, L):
        B, T, H, hd = q.shape
        C, N = cand.shape[1], cand.shape[2]
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
        dk = torch.zeros(B, T, H, hd, device=q.device, dtype=torch.float32)
        dv = torch.zeros(B, T, H, hd, device=q.device, dtype=torch.float32)
        dls = torch.zeros(B, T, device=q.device, dtype=torch.float32)
        dnk = torch.zeros(H, hd, device=q.device, dtype=torch.float32)
        dnv = torch.zeros(H, hd, device=q.device, dtype=torch.float32)
        _bwd[_grid(T, ctx.L, B, H)](q, k, v, log_s, end, cand, null_k, null_v, do, lse, delta,
                                    dq, dk, dv, dls, dnk, dnv,
                                    *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
                                    T, C, N, H, ctx.L, hd, 1.0 / math.sqrt(hd), HD=HD)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dls, None, None, dnk, dnv, None)


def cache_attention_fused(q, k, v, log_s, end, cand, null_k, null_v, L):
    return CacheAttention.apply(q, k, v, log_s, end, cand, null_k, null_v, L)
