// kernels.cu -- fused MIPT scan, forward and backward, for mipt.
//
// Recurrence, per batch b, channel d, time t (state and arithmetic in fp32):
//   p_t = sigmoid(logit_t), q_t = 1 - p_t, a_t = q_t e^{i theta_t}, b_t = p_t (u_re_t + i u_im_t)
//   h_t = a_t h_{t-1} + b_t,   y_t = Re h_t,   h_{-1} = h0 (or 0);  also returns h_{T-1}.
//
// Design: one single-pass chunked scan with decoupled look-back (Merrill & Garland), used
// for both regimes (many channels; few channels with long T).
//  * A tile is 32 consecutive channels (a warp's lanes: a warp's row at one timestep is one
//    contiguous 128 B segment in fp32) times S*L timesteps.  A block has S compute warps,
//    warp w owning timesteps [w*L, (w+1)*L) of the tile, and one scan warp.
//  * Persistent blocks (as many as are resident) take tiles in global ticket order
//    (atomicAdd, tile-major).  The raw inputs of the next tile are staged into shared memory
//    with cp.async (16 B chunks when rows are aligned) while the current one is worked on.
//  * Per tile: each compute thread turns its L raw inputs into a_t, b_t (registers) and
//    folds them into an affine map h -> A h + H.  The scan warp composes the S maps into the
//    tile's map, publishes it (flag AGG), looks back over the preceding tiles of the same
//    channel group until one has published its inclusive state (flag INC), publishes its own
//    inclusive state and hands each warp its carry-in; the compute warps re-run their L steps
//    and write y.  Warp-specialised pipeline: while the scan warp looks back for tile i, the
//    compute warps write y of tile i-1 and compute the gates of tile i+1 (named barriers).
//    (The backward keeps the plain form: warp 0 looks back while the block waits.)
//    A tile only waits for smaller tickets, all already taken by running blocks: no deadlock.
//    Maps are applied to states in a fixed order, never composed across tiles, so results
//    do not depend on timing (bitwise deterministic).
//  * Traffic per element (fp32): 16 B read + 4 B written, plus 24 B per tile and channel of
//    aggregates (0.4 B/element at S*L = 64).  The inclusive states (the state at the end of
//    every tile, 8 B per 64 elements) are kept as the backward's checkpoints.
//  * Backward = the same machinery from the last tile to the first, on the adjoint
//      R_t := conj(a_t) G_t,  G_t = dL/dh_t = dy_t + R_{t+1},  R_T = dL/dh_{T-1} (h_last),
//    the affine recurrence R_t = conj(a_t) R_{t+1} + conj(a_t) dy_t.  A tile recomputes h
//    from its checkpoint (no waiting), scans the adjoint with look-back, and forms
//      dL/da_t = conj(h_{t-1}) G_t,  dL/db_t = G_t    (PyTorch's convention: dRe + i dIm)
//      dq = ga_re c + ga_im s,  dtheta = q (ga_im c - ga_re s)          (a = q (c + i s))
//      dp = G_re u_re + G_im u_im,  du_re = p G_re,  du_im = p G_im,
//      dlogit = (dp - dq) p q,  dh0 = R_0.
//    Traffic: 16 B inputs + 4 B dy read, 16 B gradients written per element (fp32).
#ifndef MIPT_DEVICE_ONLY  // -DMIPT_DEVICE_ONLY: kernels alone, for quick ptxas reports
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif
#include <cuda_bf16.h>


namespace {

constexpr unsigned FULL = 0xffffffffu;
constexpr int FLAG_AGG = 1, FLAG_INC = 2;

// ---- small helpers ------------------------------------------------------------------
__device__ __forceinline__ float2 cmul(float2 a, float2 b) {
  return make_float2(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x);
}
__device__ __forceinline__ float2 cfma(float2 a, float2 b, float2 c) {  // a*b + c
  return make_float2(fmaf(a.x, b.x, fmaf(-a.y, b.y, c.x)), fmaf(a.x, b.y, fmaf(a.y, b.x, c.y)));
}
__device__ __forceinline__ float2 conjf2(float2 a) { return make_float2(a.x, -a.y); }
// Affine map x -> A x + B stored as float4 (A.re, A.im, B.re, B.im).
__device__ __forceinline__ float2 lo(float4 v) { return make_float2(v.x, v.y); }
__device__ __forceinline__ float2 hi(float4 v) { return make_float2(v.z, v.w); }
__device__ __forceinline__ float4 pack(float2 a, float2 b) { return make_float4(a.x, a.y, b.x, b.y); }

__device__ __forceinline__ void stx(float* p, float v) { __stcs(p, v); }
__device__ __forceinline__ void stx(__nv_bfloat16* p, float v) { __stcs(p, __float2bfloat16(v)); }

__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release(int* p, int v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// p = sigmoid(x) and q = 1 - p, both without cancellation or overflow; (c, s) = cos, sin.
// Precise expf/sincosf/division (the build does not use --use_fast_math).
// (Measured on an H100: __expf, an approximate reciprocal, sincospif or __sincosf here do not make
// the kernels faster beyond the run-to-run spread, and __sincosf costs two digits near |a| = 1.)
__device__ __forceinline__ void gate(float x, float th, float& p, float& q, float& c, float& s) {
  const float e = expf(-fabsf(x));
  const float r = __frcp_rn(1.0f + e);  // correctly rounded, as 1/(1+e)
  const float er = e * r;
  p = x >= 0.f ? r : er;
  q = x >= 0.f ? er : r;
  sincosf(th, &s, &c);
}

// Warp-wide decoupled look-back (all 32 lanes; lane = channel).  Tiles of this channel
// group are numbered 0..n-1; the predecessors of tile c are c+dir, c+2dir, ...  Returns the
// state entering tile c.  Lanes poll a 32-tile window of flags at once until every tile in
// it has published; the nearest tile with an inclusive state is the starting point, and the
// maps of the tiles between it and c are then applied to that state in order.  Applying maps
// (never composing them) makes the result bitwise identical to a serial chain, whichever
// tile happened to be inclusive: the scan is deterministic.
__device__ float2 look_back(const int* flg, const float4* agg, const float2* inc, int c,
                            int n, int dir, int lane) {
  int j = c + dir, jinc;
  while (true) {
    const int jj = j + dir * lane;
    // The end tile (0 forward, n-1 backward) publishes FLAG_INC only, so the search never
    // passes it; lanes beyond it just read as inclusive.
    const bool in_range = jj >= 0 && jj < n;
    int f;
    unsigned ns = 16;
    while (true) {  // exponential back-off keeps the polling off the L2
      f = in_range ? ld_acquire(flg + jj) : FLAG_INC;
      if (!__any_sync(FULL, f == 0)) break;
      __nanosleep(ns);
      ns = min(2 * ns, 512u);
    }
    const unsigned inc_mask = __ballot_sync(FULL, f == FLAG_INC);
    if (inc_mask) { jinc = j + dir * (__ffs(inc_mask) - 1); break; }
    j += 32 * dir;
  }
  __syncwarp();  // orders every lane's reads after the acquiring lanes' flag reads
  float2 h = __ldcg(inc + (size_t)jinc * 32 + lane);
#pragma unroll 8
  for (int x = jinc - dir; x != c; x -= dir) {
    const float4 m = __ldcg(agg + (size_t)x * 32 + lane);
    h = cfma(lo(m), h, hi(m));
  }
  return h;
}

// ---- tiles and staging --------------------------------------------------------------
// Where a tile lies.  Tickets are tile-major: ticket = r*G + g, g = channel group (batch,
// 32-channel slice), r = tile along time (forward: c = r; backward: c = NC-1-r).
struct Tile {
  int c, g, b, d0, d, t0, Tlen;  // t0: first timestep of this thread's warp
  bool dok;
  __device__ Tile(int ticket, bool reverse, int G, int NC, int ngd, int Tlen_, int D, int TL,
                  int L) {
    const int r = ticket / G;
    g = ticket - r * G;
    c = reverse ? NC - 1 - r : r;
    b = g / ngd;
    d0 = (g - b * ngd) * 32;
    d = d0 + (threadIdx.x & 31);
    dok = d < D;
    Tlen = Tlen_;
    t0 = c * TL + (threadIdx.x >> 5) * L;
  }
  __device__ bool ok(int k) const { return dok && t0 + k < Tlen; }
  __device__ size_t off(int k, int D) const { return ((size_t)b * Tlen + t0 + k) * D + d; }
};

__device__ __forceinline__ void cp_async16(void* s, const void* g) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((unsigned)__cvta_generic_to_shared(s)),
               "l"(g) : "memory");
}
__device__ __forceinline__ void cp_async4(void* s, const void* g) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"((unsigned)__cvta_generic_to_shared(s)),
               "l"(g) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Copy one tensor's rows [t0, t0+L) x channels [d0, d0+32) into the warp's staging area
// sm[L][32] (row k, lane = channel).  VEC: 16 B cp.async chunks (rows 16 B aligned, D a
// multiple of the chunk); else one element per lane (cp.async 4 B for fp32; a plain load and
// store for bf16, which cp.async cannot move alone).
template <typename T, int L, bool VEC>
__device__ __forceinline__ void stage(T* sm, const T* __restrict__ src, const Tile& t, int D) {
  const int lane = threadIdx.x & 31;
  if constexpr (VEC) {
    constexpr int EPC = 16 / sizeof(T), CPR = 32 / EPC;  // elements per chunk, chunks per row
#pragma unroll
    for (int i = lane; i < L * CPR; i += 32) {
      const int k = i / CPR, e = (i % CPR) * EPC;
      if (t.t0 + k < t.Tlen && t.d0 + e < D)
        cp_async16(sm + k * 32 + e, src + ((size_t)t.b * t.Tlen + t.t0 + k) * D + t.d0 + e);
    }
  } else {
#pragma unroll
    for (int k = 0; k < L; ++k)
      if (t.ok(k)) {
        if constexpr (sizeof(T) == 4) cp_async4(sm + k * 32 + lane, src + t.off(k, D));
        else sm[k * 32 + lane] = src[t.off(k, D)];
      }
  }
}
__device__ __forceinline__ float tof(float v) { return v; }
__device__ __forceinline__ float tof(__nv_bfloat16 v) { return __bfloat162float(v); }

// Named barriers between the compute warps and the scan warp (id 0 is __syncthreads).
// Two ids per handshake, alternating with the tile's parity, keep consecutive phases apart;
// the ids are immediates so that the block reserves only five barriers.
template <int ID>
__device__ __forceinline__ void bar_sync_id(int n) {
  asm volatile("bar.sync %0, %1;" ::"n"(ID), "r"(n) : "memory");
}
template <int ID>
__device__ __forceinline__ void bar_arrive_id(int n) {
  asm volatile("bar.arrive %0, %1;" ::"n"(ID), "r"(n) : "memory");
}
constexpr int BAR_SEG = 1;    // +parity: the compute warps' maps of tile i are in smem
constexpr int BAR_CARRY = 3;  // +parity: the scan warp's carries of tile i are in smem
template <int BASE>
__device__ __forceinline__ void bar_sync(int par, int n) {
  if (par) bar_sync_id<BASE + 1>(n); else bar_sync_id<BASE>(n);
}
template <int BASE>
__device__ __forceinline__ void bar_arrive(int par, int n) {
  if (par) bar_arrive_id<BASE + 1>(n); else bar_arrive_id<BASE>(n);
}

// ---- forward ----------------------------------------------------------------------------
// Block = S compute warps + 1 scan warp, software-pipelined over the block's tiles i:
//   compute warps: [wait staged inputs of i] gates + fold of i -> seg | arrive BAR_SEG(i) |
//                  stage inputs of i+1 (cp.async) | sync BAR_CARRY(i-1) | write y of i-1
//   scan warp:     sync BAR_SEG(i) | compose, publish, look back, carries of i | arrive
//                  BAR_CARRY(i)
// so the look-back latency of tile i hides behind the compute warps' work on i-1 and i+1,
// and the loads of tile i+1 fly during the handshakes and the writes of tile i-1.
// The scan warp takes tickets three tiles ahead (ticket ring s_tick[3]).
template <typename T, int S, int L, int MINB, bool VEC>
__global__ void __launch_bounds__((S + 1) * 32, MINB)
mipt_fwd_kernel(const T* __restrict__ logit, const T* __restrict__ theta,
                const T* __restrict__ ure, const T* __restrict__ uim,
                const float2* __restrict__ h0,  // (B*D) or nullptr
                float* __restrict__ y, float2* __restrict__ hlast,
                float4* agg, float2* inc, int* flags,  // [G*NC(*32)]; flags[G*NC] = ticket
                int Tlen, int D, int ngd, int G, int NC) {
  constexpr int NT = (S + 1) * 32;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sx = reinterpret_cast<T*>(smem_raw) + (threadIdx.x >> 5) * 4 * L * 32;  // warp's [4][L][32]
  __shared__ float4 seg[2][S][32];
  __shared__ float2 carry[2][S][32];
  __shared__ int s_tick[3];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, total = G * NC;
  int* counter = flags + total;
  if (threadIdx.x == 0)
    for (int j = 0; j < 3; ++j) s_tick[j] = atomicAdd(counter, 1);
  __syncthreads();
  int tick = s_tick[0];
  if (tick >= total) return;

  if (w < S) {  // ---------------- compute warps
    auto prefetch = [&](const Tile& t) {
      stage<T, L, VEC>(sx, logit, t, D);
      stage<T, L, VEC>(sx + L * 32, theta, t, D);
      stage<T, L, VEC>(sx + 2 * L * 32, ure, t, D);
      stage<T, L, VEC>(sx + 3 * L * 32, uim, t, D);
      cp_async_commit();
    };
    Tile cur(tick, false, G, NC, ngd, Tlen, D, S * L, L), prev = cur;
    prefetch(cur);
    float2 a[L], bb[L], pa[L], pb[L];  // this tile's and the previous tile's a_t, b_t
    for (int i = 0;; ++i) {
      const int par = i & 1;
      const bool have = tick < total;
      int next = total;
      if (have) {
        cp_async_wait();
        __syncwarp();
        float2 A = make_float2(1.f, 0.f), H = make_float2(0.f, 0.f);  // h -> A h + H
#pragma unroll
        for (int k = 0; k < L; ++k) {
          if (cur.ok(k)) {
            float p, q, cs, sn;
            gate(tof(sx[k * 32 + lane]), tof(sx[(L + k) * 32 + lane]), p, q, cs, sn);
            a[k] = make_float2(q * cs, q * sn);
            bb[k] = make_float2(p * tof(sx[(2 * L + k) * 32 + lane]),
                                p * tof(sx[(3 * L + k) * 32 + lane]));
          } else {  // padding step: identity map
            a[k] = make_float2(1.f, 0.f);
            bb[k] = make_float2(0.f, 0.f);
          }
          H = cfma(a[k], H, bb[k]);
          A = cmul(a[k], A);
        }
        seg[par][w][lane] = pack(A, H);
      }
      bar_arrive<BAR_SEG>(par, NT);
      if (have) {
        // Stage tile i+1 now, so that its loads fly during the wait for the carries and the
        // writes of tile i-1.  Its ticket was taken by the scan warp in its iteration i-2,
        // before BAR_CARRY(i-2).
        next = s_tick[(i + 1) % 3];
        __syncwarp();  // every lane is done reading the staging area
        if (next < total) prefetch(Tile(next, false, G, NC, ngd, Tlen, D, S * L, L));
      }
      if (i > 0) bar_sync<BAR_CARRY>(par ^ 1, NT);
      if (i > 0) {  // write y of tile i-1
        float2 h = carry[par ^ 1][w][lane];
#pragma unroll
        for (int k = 0; k < L; ++k) {
          h = cfma(pa[k], h, pb[k]);
          if (prev.ok(k)) stx(y + prev.off(k, D), h.x);
        }
      }
      if (!have) break;
#pragma unroll
      for (int k = 0; k < L; ++k) { pa[k] = a[k]; pb[k] = bb[k]; }
      prev = cur;
      tick = next;
      cur = Tile(next < total ? next : 0, false, G, NC, ngd, Tlen, D, S * L, L);
    }
  } else {  // ---------------- scan warp
    for (int i = 0;; ++i) {
      const int par = i & 1;
      bar_sync<BAR_SEG>(par, NT);
      if (tick >= total) break;
      if (lane == 0) s_tick[i % 3] = atomicAdd(counter, 1);  // ticket of tile i+3
      const Tile t(tick, false, G, NC, ngd, Tlen, D, S * L, L);
      float2 TA = make_float2(1.f, 0.f), TH = make_float2(0.f, 0.f);
#pragma unroll
      for (int s = 0; s < S; ++s) {
        const float4 m = seg[par][s][lane];
        TH = cfma(lo(m), TH, hi(m));
        TA = cmul(lo(m), TA);
      }
      const size_t slot = (size_t)t.g * NC + t.c;
      float2 h;
      if (t.c == 0) {
        h = (h0 != nullptr && t.dok) ? h0[(size_t)t.b * D + t.d] : make_float2(0.f, 0.f);
      } else {
        agg[slot * 32 + lane] = pack(TA, TH);
        __threadfence();
        __syncwarp();
        if (lane == 0) st_release(flags + slot, FLAG_AGG);
        h = look_back(flags + (size_t)t.g * NC, agg + (size_t)t.g * NC * 32,
                      inc + (size_t)t.g * NC * 32, t.c, NC, -1, lane);
      }
      inc[slot * 32 + lane] = cfma(TA, h, TH);  // inclusive state = backward checkpoint
      __threadfence();
      __syncwarp();
      if (lane == 0) st_release(flags + slot, FLAG_INC);
#pragma unroll
      for (int s = 0; s < S; ++s) {
        carry[par][s][lane] = h;
        const float4 m = seg[par][s][lane];
        h = cfma(lo(m), h, hi(m));
      }
      if (t.c == NC - 1 && t.dok) hlast[(size_t)t.b * D + t.d] = h;
      __syncwarp();
      bar_arrive<BAR_CARRY>(par, NT);
      tick = s_tick[(i + 1) % 3];  // ticket of tile i+1
    }
  }
}

// ---- backward ---------------------------------------------------------------------------
// Not warp-specialised: pipelining would keep two tiles' per-step values (7 floats a step)
// in registers, which costs more occupancy than it saves (measured); instead all S warps
// wait while warp 0 looks back, and the next tile's inputs are staged meanwhile.
template <typename T, int S, int L, int MINB, bool VEC>
__global__ void __launch_bounds__(S * 32, MINB)
mipt_bwd_kernel(const T* __restrict__ logit, const T* __restrict__ theta,
                const T* __restrict__ ure, const T* __restrict__ uim,
                const float* __restrict__ dy,     // (B,T,D) fp32
                const float2* __restrict__ h0,    // (B*D) or nullptr
                const float2* __restrict__ ghl,   // dL/dh_last (B*D) or nullptr
                const float2* __restrict__ ckpt,  // forward's inclusive states [G*NCf*32]
                int ck_ratio, int NCf,            // backward tile = ck_ratio forward tiles
                T* __restrict__ glogit, T* __restrict__ gtheta,
                T* __restrict__ gure, T* __restrict__ guim, float2* __restrict__ gh0,
                float4* agg, float2* inc, int* flags,
                int Tlen, int D, int ngd, int G, int NC) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sx = reinterpret_cast<T*>(smem_raw) + (threadIdx.x >> 5) * 4 * L * 32;  // [4][L][32]
  float* sg = reinterpret_cast<float*>(smem_raw + (size_t)S * 4 * L * 32 * sizeof(T)) +
              (threadIdx.x >> 5) * L * 32;                                  // dy: [L][32]
  __shared__ float4 segf[S][32], segr[S][32];
  __shared__ float2 hcar[S][32], rcar[S][32];
  __shared__ int s_next;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, total = G * NC;
  int* counter = flags + total;
  if (threadIdx.x == 0) s_next = atomicAdd(counter, 1);
  __syncthreads();
  if (s_next >= total) return;
  Tile cur(s_next, true, G, NC, ngd, Tlen, D, S * L, L);
  float2 hin = make_float2(0.f, 0.f);  // warp 0: state entering the tile (checkpoint)
  auto prefetch = [&](const Tile& t) {
    stage<T, L, VEC>(sx, logit, t, D);
    stage<T, L, VEC>(sx + L * 32, theta, t, D);
    stage<T, L, VEC>(sx + 2 * L * 32, ure, t, D);
    stage<T, L, VEC>(sx + 3 * L * 32, uim, t, D);
    stage<float, L, VEC>(sg, dy, t, D);
    cp_async_commit();
    if (w == 0) {
      if (t.c == 0) hin = (h0 != nullptr && t.dok) ? h0[(size_t)t.b * D + t.d] : make_float2(0.f, 0.f);
      else hin = ckpt[((size_t)t.g * NCf + (size_t)t.c * ck_ratio - 1) * 32 + lane];
    }
  };
  prefetch(cur);
  for (;;) {
    __syncthreads();
    if (threadIdx.x == 0) s_next = atomicAdd(counter, 1);
    cp_async_wait();
    __syncwarp();
    // Gates, forward map (A, H) and adjoint map (P, Q) of this warp's L steps:
    // h_out = A h_in + H;  R_first = P R_next + Q  with R_t = conj(a_t) (R_{t+1} + dy_t).
    float pp[L], qq[L], cs[L], sn[L], ur[L], ui[L], gy[L];
    float2 A = make_float2(1.f, 0.f), H = make_float2(0.f, 0.f);
#pragma unroll
    for (int k = 0; k < L; ++k) {
      if (cur.ok(k)) {
        gate(tof(sx[k * 32 + lane]), tof(sx[(L + k) * 32 + lane]), pp[k], qq[k], cs[k], sn[k]);
        ur[k] = tof(sx[(2 * L + k) * 32 + lane]);
        ui[k] = tof(sx[(3 * L + k) * 32 + lane]);
        gy[k] = sg[k * 32 + lane];
      } else {  // padding step: a = 1, b = 0, dy = 0
        pp[k] = 0.f; qq[k] = 1.f; cs[k] = 1.f; sn[k] = 0.f; ur[k] = 0.f; ui[k] = 0.f; gy[k] = 0.f;
      }
      const float2 ak = make_float2(qq[k] * cs[k], qq[k] * sn[k]);
      H = cfma(ak, H, make_float2(pp[k] * ur[k], pp[k] * ui[k]));
      A = cmul(ak, A);
    }
    float2 P = make_float2(1.f, 0.f), Q = make_float2(0.f, 0.f);
#pragma unroll
    for (int k = L - 1; k >= 0; --k) {
      const float2 ac = make_float2(qq[k] * cs[k], -qq[k] * sn[k]);
      Q = cmul(ac, make_float2(Q.x + gy[k], Q.y));
      P = cmul(ac, P);
    }
    segf[w][lane] = pack(A, H);
    segr[w][lane] = pack(P, Q);
    __syncthreads();
    const int next = s_next;
    const Tile nxt(next < total ? next : 0, true, G, NC, ngd, Tlen, D, S * L, L);
    float2 h = hin;
    if (next < total) prefetch(nxt);

    if (w == 0) {
      // (1) forward carries of the warps, from the checkpoint: no waiting.
#pragma unroll
      for (int s = 0; s < S; ++s) {
        hcar[s][lane] = h;
        const float4 m = segf[s][lane];
        h = cfma(lo(m), h, hi(m));
      }
      // (2) adjoint: fold the warps' maps, last warp first, then look back over later tiles.
      float2 TP = make_float2(1.f, 0.f), TQ = make_float2(0.f, 0.f);
#pragma unroll
      for (int s = S - 1; s >= 0; --s) {
        const float4 m = segr[s][lane];
        TQ = cfma(lo(m), TQ, hi(m));
        TP = cmul(lo(m), TP);
      }
      const size_t slot = (size_t)cur.g * NC + cur.c;
      float2 r;
      if (cur.c == NC - 1) {
        r = (ghl != nullptr && cur.dok) ? ghl[(size_t)cur.b * D + cur.d] : make_float2(0.f, 0.f);
      } else {
        agg[slot * 32 + lane] = pack(TP, TQ);
        __threadfence();
        __syncwarp();
        if (lane == 0) st_release(flags + slot, FLAG_AGG);
        r = look_back(flags + (size_t)cur.g * NC, agg + (size_t)cur.g * NC * 32,
                      inc + (size_t)cur.g * NC * 32, cur.c, NC, +1, lane);
      }
      const float2 r_first = cfma(TP, r, TQ);
      inc[slot * 32 + lane] = r_first;
      __threadfence();
      __syncwarp();
      if (lane == 0) st_release(flags + slot, FLAG_INC);
      if (cur.c == 0 && cur.dok) gh0[(size_t)cur.b * D + cur.d] = r_first;  // conj(a_0) G_0
#pragma unroll
      for (int s = S - 1; s >= 0; --s) {
        rcar[s][lane] = r;
        const float4 m = segr[s][lane];
        r = cfma(lo(m), r, hi(m));
      }
    }
    __syncthreads();

    // (3) per step: states h_{t-1}, then the adjoint backwards and the gradients.
    float2 hp[L];
    h = hcar[w][lane];
#pragma unroll
    for (int k = 0; k < L; ++k) {
      hp[k] = h;
      h = cfma(make_float2(qq[k] * cs[k], qq[k] * sn[k]), h,
               make_float2(pp[k] * ur[k], pp[k] * ui[k]));
    }
    float2 r = rcar[w][lane];  // R_{t+1} for the last step of this warp
#pragma unroll
    for (int k = L - 1; k >= 0; --k) {
      const float2 G = make_float2(r.x + gy[k], r.y);  // dL/dh_t
      const float2 ga = cmul(conjf2(hp[k]), G);         // dL/da_t
      const float dq = ga.x * cs[k] + ga.y * sn[k];
      const float dth = qq[k] * (ga.y * cs[k] - ga.x * sn[k]);
      const float dp = G.x * ur[k] + G.y * ui[k];
      if (cur.ok(k)) {
        const size_t o = cur.off(k, D);
        stx(glogit + o, (dp - dq) * pp[k] * qq[k]);
        stx(gtheta + o, dth);
        stx(gure + o, pp[k] * G.x);
        stx(guim + o, pp[k] * G.y);
      }
      r = cmul(make_float2(qq[k] * cs[k], -qq[k] * sn[k]), G);  // R_t = conj(a_t) G_t
    }
    if (next >= total) break;
    cur = nxt;
  }
}

}  // namespace

#ifndef MIPT_DEVICE_ONLY
namespace {
// ---- host side --------------------------------------------------------------------------
struct Dims { int B, T, D, ngd, G; };

Dims check_inputs(const at::Tensor& logit, const at::Tensor& theta, const at::Tensor& ure,
                  const at::Tensor& uim) {
  TORCH_CHECK(logit.is_cuda() && logit.dim() == 3, "logit must be a CUDA (B,T,D) tensor");
  for (const auto* t : {&theta, &ure, &uim}) {
    TORCH_CHECK(t->sizes() == logit.sizes() && t->scalar_type() == logit.scalar_type() &&
                t->device() == logit.device(), "inputs must share shape, dtype and device");
    TORCH_CHECK(t->is_contiguous(), "inputs must be contiguous");
  }
  TORCH_CHECK(logit.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(logit.scalar_type() == at::kFloat || logit.scalar_type() == at::kBFloat16,
              "inputs must be float32 or bfloat16");
  Dims m;
  m.B = (int)logit.size(0); m.T = (int)logit.size(1); m.D = (int)logit.size(2);
  m.ngd = (m.D + 31) / 32; m.G = m.B * m.ngd;
  return m;
}

const float2* opt_c2(const at::Tensor& t, const Dims& m) {  // optional (B,D,2) fp32
  if (!t.defined() || t.numel() == 0) return nullptr;
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == 2LL * m.B * m.D,
              "state tensors must be contiguous float32 (B,D,2)");
  return reinterpret_cast<const float2*>(t.data_ptr<float>());
}

// (S, L) tile configurations compiled in: S warps per block, L steps per thread.
#ifndef MIPT_CONFIGS
// X(S, L, forward min blocks per SM, backward min blocks per SM): the min-blocks bound caps
// registers at 64K / (blocks * threads), threads = (S+1)*32 forward and S*32 backward.
#define MIPT_CONFIGS(X) X(8, 8, 2, 2) X(8, 4, 3, 4) X(4, 8, 4, 4)
#endif

template <typename T>
const T* cptr(const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }
template <typename T>
T* mptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// Persistent grid: as many blocks as fit on the device at once (max_blocks > 0 overrides).
// Looked up once per kernel (all devices taken to be alike): the calls cost microseconds.
template <auto Kernel>
int resident_blocks(int threads, size_t smem) {
  static const int n = [&] {
    int per_sm = 0, dev = 0, sms = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    // Static + dynamic shared memory above 48 KB needs the opt-in; harmless below.
    C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)smem));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, threads, smem));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    return std::max(per_sm, 1) * sms;
  }();
  return n;
}

template <auto Kernel, typename... Args>
void launch(int threads, size_t smem, int64_t total, int64_t max_blocks, cudaStream_t stream,
            Args... args) {
  const int64_t cap = max_blocks > 0 ? max_blocks : resident_blocks<Kernel>(threads, smem);
  Kernel<<<(unsigned)std::min<int64_t>(total, cap), threads, smem, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 16-byte staging needs 16 B aligned rows: D * element size a multiple of 16, aligned bases.
bool rows_aligned(std::initializer_list<const at::Tensor*> ts, int D) {
  for (const auto* t : ts)
    if ((D * t->element_size()) % 16 != 0 || reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0)
      return false;
  return true;
}

template <typename T, int S, int L, int FM, int BM>
void launch_fwd(const at::Tensor& logit, const at::Tensor& theta, const at::Tensor& ure,
                const at::Tensor& uim, const float2* h0, const at::Tensor& y,
                const at::Tensor& hlast, const at::Tensor& agg, const at::Tensor& ckpt,
                const at::Tensor& flags, const Dims& m, int NC, int64_t max_blocks,
                cudaStream_t stream) {
  const size_t smem = (size_t)S * 4 * L * 32 * sizeof(T);
  const int nt = (S + 1) * 32;
  const int64_t total = (int64_t)m.G * NC;
  auto args = std::make_tuple(cptr<T>(logit), cptr<T>(theta), cptr<T>(ure), cptr<T>(uim), h0,
                              mptr<float>(y), mptr<float2>(hlast), mptr<float4>(agg),
                              mptr<float2>(ckpt), mptr<int>(flags), m.T, m.D, m.ngd, m.G, NC);
  std::apply([&](auto... a) {
    if (rows_aligned({&logit, &theta, &ure, &uim}, m.D))
      launch<mipt_fwd_kernel<T, S, L, FM, true>>(nt, smem, total, max_blocks, stream, a...);
    else
      launch<mipt_fwd_kernel<T, S, L, FM, false>>(nt, smem, total, max_blocks, stream, a...);
  }, args);
}

template <typename T, int S, int L, int FM, int BM>
void launch_bwd(const at::Tensor& logit, const at::Tensor& theta, const at::Tensor& ure,
                const at::Tensor& uim, const at::Tensor& dy, const float2* h0,
                const float2* ghl, const at::Tensor& ckpt, int ck_ratio, int NCf,
                const at::Tensor& gl, const at::Tensor& gt, const at::Tensor& gr,
                const at::Tensor& gi, const at::Tensor& gh0, const at::Tensor& agg,
                const at::Tensor& inc, const at::Tensor& flags, const Dims& m, int NC,
                int64_t max_blocks, cudaStream_t stream) {
  const size_t smem = (size_t)S * L * 32 * (4 * sizeof(T) + sizeof(float));
  const int nt = S * 32;
  const int64_t total = (int64_t)m.G * NC;
  auto args = std::make_tuple(
      cptr<T>(logit), cptr<T>(theta), cptr<T>(ure), cptr<T>(uim), cptr<float>(dy), h0, ghl,
      cptr<float2>(ckpt), ck_ratio, NCf, mptr<T>(gl), mptr<T>(gt), mptr<T>(gr), mptr<T>(gi),
      mptr<float2>(gh0), mptr<float4>(agg), mptr<float2>(inc), mptr<int>(flags),
      m.T, m.D, m.ngd, m.G, NC);
  std::apply([&](auto... a) {
    if (rows_aligned({&logit, &theta, &ure, &uim, &dy}, m.D))
      launch<mipt_bwd_kernel<T, S, L, BM, true>>(nt, smem, total, max_blocks, stream, a...);
    else
      launch<mipt_bwd_kernel<T, S, L, BM, false>>(nt, smem, total, max_blocks, stream, a...);
  }, args);
}

int num_tiles(const Dims& m, int64_t S, int64_t L) {
  return (int)((m.T + S * L - 1) / (S * L));
}

// Forward.  Writes y (B,T,D) fp32 and hlast (B,D,2) fp32 (h0: (B,D,2) fp32 or empty).
// Returns the checkpoints: the state at the end of every tile, float (G*NC*32*2).
at::Tensor mipt_fwd(at::Tensor logit, at::Tensor theta, at::Tensor ure, at::Tensor uim,
                    at::Tensor h0, at::Tensor y, at::Tensor hlast, int64_t S, int64_t L,
                    int64_t max_blocks) {
  const Dims m = check_inputs(logit, theta, ure, uim);
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && y.sizes() == logit.sizes(),
              "y must be contiguous float32 (B,T,D)");
  TORCH_CHECK(hlast.scalar_type() == at::kFloat && hlast.is_contiguous() &&
              hlast.numel() == 2LL * m.B * m.D, "hlast must be contiguous float32 (B,D,2)");
  const c10::cuda::CUDAGuard guard(logit.device());
  const int NC = num_tiles(m, S, L);
  TORCH_CHECK((int64_t)m.G * NC < INT32_MAX, "too many tiles");
  auto f32 = logit.options().dtype(at::kFloat);
  at::Tensor ckpt = at::empty({(int64_t)m.G * NC * 32 * 2}, f32);
  if (m.G == 0 || m.T == 0) return ckpt;
  at::Tensor agg = at::empty({(int64_t)m.G * NC * 32 * 4}, f32);
  at::Tensor flags = at::zeros({(int64_t)m.G * NC + 1}, logit.options().dtype(at::kInt));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float2* h0p = opt_c2(h0, m);
  const bool bf16 = logit.scalar_type() == at::kBFloat16;
#define MIPT_FWD_CASE(S_, L_, FM_, BM_)                                                        \
  if (S == S_ && L == L_) {                                                                   \
    if (bf16) launch_fwd<__nv_bfloat16, S_, L_, FM_, BM_>(logit, theta, ure, uim, h0p, y, hlast, agg,   \
                                                ckpt, flags, m, NC, max_blocks, stream);      \
    else launch_fwd<float, S_, L_, FM_, BM_>(logit, theta, ure, uim, h0p, y, hlast, agg, ckpt, flags,   \
                                   m, NC, max_blocks, stream);                                \
    return ckpt;                                                                              \
  }
  MIPT_CONFIGS(MIPT_FWD_CASE)
#undef MIPT_FWD_CASE
  TORCH_CHECK(false, "mipt_fwd: unsupported tile configuration S=", S, " L=", L);
}

// Backward.  dy (B,T,D) fp32; ghl dL/dh_last (B,D,2) fp32 or empty; ckpt from mipt_fwd run
// with tile (Sf, Lf); (S, L) is this kernel's tile, S*L a multiple of Sf*Lf.  Writes the
// four input gradients (input dtype) and gh0 (B,D,2) fp32.
void mipt_bwd(at::Tensor logit, at::Tensor theta, at::Tensor ure, at::Tensor uim,
              at::Tensor dy, at::Tensor h0, at::Tensor ghl, at::Tensor ckpt, int64_t Sf,
              int64_t Lf, at::Tensor gl, at::Tensor gt, at::Tensor gr, at::Tensor gi,
              at::Tensor gh0, int64_t S, int64_t L, int64_t max_blocks) {
  const Dims m = check_inputs(logit, theta, ure, uim);
  TORCH_CHECK(dy.scalar_type() == at::kFloat && dy.is_contiguous() && dy.sizes() == logit.sizes(),
              "dy must be contiguous float32 (B,T,D)");
  for (const auto* t : {&gl, &gt, &gr, &gi})
    TORCH_CHECK(t->sizes() == logit.sizes() && t->scalar_type() == logit.scalar_type() &&
                t->is_contiguous(), "gradient buffers must match the inputs");
  TORCH_CHECK(gh0.scalar_type() == at::kFloat && gh0.is_contiguous() &&
              gh0.numel() == 2LL * m.B * m.D, "gh0 must be contiguous float32 (B,D,2)");
  TORCH_CHECK((S * L) % (Sf * Lf) == 0, "backward tile must be a multiple of the forward tile");
  const c10::cuda::CUDAGuard guard(logit.device());
  const int NC = num_tiles(m, S, L), NCf = num_tiles(m, Sf, Lf);
  TORCH_CHECK((int64_t)m.G * NC < INT32_MAX, "too many tiles");
  TORCH_CHECK(ckpt.scalar_type() == at::kFloat && ckpt.numel() == (int64_t)m.G * NCf * 64,
              "checkpoint does not match the forward tile configuration");
  if (m.G == 0 || m.T == 0) return;
  auto f32 = logit.options().dtype(at::kFloat);
  at::Tensor agg = at::empty({(int64_t)m.G * NC * 32 * 4}, f32);
  at::Tensor inc = at::empty({(int64_t)m.G * NC * 32 * 2}, f32);
  at::Tensor flags = at::zeros({(int64_t)m.G * NC + 1}, logit.options().dtype(at::kInt));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float2* h0p = opt_c2(h0, m);
  const float2* ghlp = opt_c2(ghl, m);
  const int ratio = (int)((S * L) / (Sf * Lf));
  const bool bf16 = logit.scalar_type() == at::kBFloat16;
#define MIPT_BWD_CASE(S_, L_, FM_, BM_)                                                        \
  if (S == S_ && L == L_) {                                                                   \
    if (bf16) launch_bwd<__nv_bfloat16, S_, L_, FM_, BM_>(logit, theta, ure, uim, dy, h0p, ghlp, ckpt,  \
        ratio, NCf, gl, gt, gr, gi, gh0, agg, inc, flags, m, NC, max_blocks, stream);         \
    else launch_bwd<float, S_, L_, FM_, BM_>(logit, theta, ure, uim, dy, h0p, ghlp, ckpt, ratio, NCf,   \
        gl, gt, gr, gi, gh0, agg, inc, flags, m, NC, max_blocks, stream);                     \
    return;                                                                                   \
  }
  MIPT_CONFIGS(MIPT_BWD_CASE)
#undef MIPT_BWD_CASE
  TORCH_CHECK(false, "mipt_bwd: unsupported tile configuration S=", S, " L=", L);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "Fused MIPT scan (decoupled look-back), forward and backward";
  mod.def("fwd", &mipt_fwd, "MIPT scan forward");
  mod.def("bwd", &mipt_bwd, "MIPT scan backward");
  mod.def("configs", [] {
    std::vector<std::pair<int, int>> v;
#define MIPT_LIST(S_, L_, FM_, BM_) v.emplace_back(S_, L_);
    MIPT_CONFIGS(MIPT_LIST)
#undef MIPT_LIST
    return v;
  }, "compiled (S, L) tile configurations");
}
#endif  // MIPT_DEVICE_ONLY
