"""
kernels.py: the fast paths of mipt.py, and where each is chosen.

mipt.py makes one call per fast path, kernels().<name>(*args, impl=<the config's setting>, reference=<its PyTorch
function>); each runs the fused path where impl and the tensors allow it, and reference(*args) otherwise:

    recurrence(logit, theta, u_re, u_im, h0)       the fused CUDA scan (kernels.cu) for scan_impl 'auto' or 'cuda'
    cache_readout(q, k, v, log_s, end, cand, null_k, null_v, L)   the fused Triton read-out (cache_kernel.py) for
                                                   cache_impl 'auto' (on a GPU) or 'triton'
    cache_plan(s, K, tau, L, R, noise)             compiled once per shape and replayed as a CUDA graph wherever the
                                                   read-out runs fused on a GPU

Also here: load_scan (builds kernels.cu on first use), MIPTScanCUDA (its autograd Function), the tests' hooks
(POISON_OUTPUTS, FWD_TILE, BWD_TILE, MAX_BLOCKS), and allow_recompiles (torch.compile's recompile limit, for the
compiled plan and engine.py's compiled step). Only torch is imported up front; Triton and the CUDA toolkit on use.
"""

import os
import warnings

import torch

# -----------------------------------------------------------------------------
# The MIPT recurrence: the fused CUDA scan (kernels.cu). It computes p, a and b in registers from the raw
# projections, scans in fp32 with a single-pass chunked look-back, writes only y and the chunk-boundary states,
# and runs the reverse scan with conjugated gates for the gradients. Compiled on first use; without a GPU or a
# compiler, mipt_recurrence runs its PyTorch reference.


def recurrence(logit, theta, u_re, u_im, h0, *, impl, reference):
    """The scan of mipt.mipt_recurrence: the kernel for float32 or bfloat16 (float16 is read as float32) CUDA
    tensors when impl is 'auto' and the kernel builds, or when impl is 'cuda', which insists; reference otherwise."""
    if logit.is_cuda and logit.dtype == torch.float16:  # the kernel reads fp32 or bf16
        logit, theta, u_re, u_im = (t.float() for t in (logit, theta, u_re, u_im))
    fits = logit.is_cuda and logit.dtype in (torch.float32, torch.bfloat16)
    if impl == 'cuda' or (impl == 'auto' and fits and load_scan() is not None):
        if not fits or load_scan() is None:
            raise RuntimeError("scan_impl='cuda' needs float32 or bfloat16 inputs on a CUDA device and a "
                               "working nvcc; use scan_impl='auto' or 'torch' for the PyTorch scan")
        return MIPTScanCUDA.apply(logit, theta, u_re, u_im, h0)
    return reference(logit, theta, u_re, u_im, h0)


FWD_TILE = (8, 8)
BWD_TILE = (8, 8)
# Persistent grid size; 0 = as many blocks as are resident at once (occupancy x SMs).
MAX_BLOCKS = 0
# Debug hook for tests: when True, every output buffer is filled with NaN before the kernel
# runs, so an element the kernel fails to write shows up as NaN.
POISON_OUTPUTS = False

_SCAN = None
_SCAN_TRIED = False


def load_scan(verbose: bool = False):
    """Compile (once) and load kernels.cu; return the module, or None with a warning."""
    global _SCAN, _SCAN_TRIED
    if _SCAN is not None or _SCAN_TRIED:
        return _SCAN
    _SCAN_TRIED = True
    if not torch.cuda.is_available():
        warnings.warn("mipt CUDA scan unavailable: no CUDA device", RuntimeWarning, stacklevel=2)
        return None
    try:
        from torch.utils import cpp_extension

        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError("no CUDA toolkit (nvcc) found")
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.cu")
        build = os.environ.get("MIPT_BUILD_DIR") or os.path.join(
            os.path.expanduser("~"), ".cache", "mipt_kernels"
        )
        os.makedirs(build, exist_ok=True)
        _SCAN = cpp_extension.load(
            name="mipt_kernels",
            sources=[src],
            build_directory=build,
            extra_cflags=["-O3"],
            extra_cuda_cflags=[
                "-O3",
                "-std=c++17",
                "-gencode=arch=compute_90a,code=sm_90a",
                "-gencode=arch=compute_80,code=compute_80",
                "--split-compile=0",
                "--threads=2",
                "-lineinfo",
            ],
            verbose=verbose,
        )
    except Exception as exc:  # no compiler, build failure, ...
        warnings.warn(f"mipt CUDA scan unavailable: {exc}", RuntimeWarning, stacklevel=2)
        _SCAN = None
    return _SCAN


def _out(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _state_as_real(h, B, D, device):
    """complex (B, D) -> contiguous float32 (B, D, 2); None -> empty tensor."""
    if h is None:
        return torch.empty(0, dtype=torch.float32, device=device)
    h = h.to(device=device, dtype=torch.complex64).resolve_conj().contiguous()
    assert h.shape == (B, D), f"state must be (B, D) = {(B, D)}, got {tuple(h.shape)}"
    return torch.view_as_real(h).contiguous()


class MIPTScanCUDA(torch.autograd.Function):
    """forward(logit, theta, u_re, u_im, h0) -> (y float32 (B,T,D), h_last complex64 (B,D))."""

    @staticmethod
    def forward(ctx, logit, theta, u_re, u_im, h0=None):
        mod = load_scan()
        if mod is None:
            raise RuntimeError("mipt CUDA scan kernels are not available")
        if logit.dim() != 3:
            raise ValueError("inputs must be (B, T, D)")
        dtype = logit.dtype
        if dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"inputs must be float32 or bfloat16, got {dtype}")
        for x in (theta, u_re, u_im):
            if x.shape != logit.shape or x.dtype != dtype or x.device != logit.device:
                raise ValueError("logit, theta, u_re, u_im must share shape, dtype and device")
        logit, theta, u_re, u_im = (x.contiguous() for x in (logit, theta, u_re, u_im))
        B, T, D = logit.shape
        dev = logit.device
        h0r = _state_as_real(h0, B, D, dev)
        y = _out((B, T, D), torch.float32, dev)
        hl = _out((B, D, 2), torch.float32, dev)
        if T == 0:
            hl.copy_(h0r if h0 is not None else torch.zeros_like(hl))
            ckpt = torch.empty(0, device=dev)
        else:
            ckpt = mod.fwd(logit, theta, u_re, u_im, h0r, y, hl, *FWD_TILE, MAX_BLOCKS)
        ctx.save_for_backward(logit, theta, u_re, u_im, h0r, ckpt)
        ctx.fwd_tile = FWD_TILE
        ctx.has_h0 = h0 is not None
        ctx.h0_dtype = h0.dtype if h0 is not None else None
        return y, torch.view_as_complex(hl)

    @staticmethod
    def backward(ctx, gy, ghl):
        logit, theta, u_re, u_im, h0r, ckpt = ctx.saved_tensors
        B, T, D = logit.shape
        dev = logit.device
        if gy is None:
            gy = torch.zeros((B, T, D), dtype=torch.float32, device=dev)
        gy = gy.to(torch.float32).contiguous()
        ghlr = _state_as_real(ghl, B, D, dev)
        gl, gt, gr, gi = (_out((B, T, D), logit.dtype, dev) for _ in range(4))
        gh0 = _out((B, D, 2), torch.float32, dev)
        if T == 0:
            gh0.copy_(ghlr if ghl is not None else torch.zeros_like(gh0))
        else:
            mod = load_scan()
            mod.bwd(logit, theta, u_re, u_im, gy, h0r, ghlr, ckpt, *ctx.fwd_tile,
                    gl, gt, gr, gi, gh0, *_bwd_tile(ctx.fwd_tile), MAX_BLOCKS)
        gh0c = None
        if ctx.has_h0 and ctx.needs_input_grad[4]:
            gh0c = torch.view_as_complex(gh0)
            if not ctx.h0_dtype.is_complex:
                gh0c = gh0c.real
            gh0c = gh0c.to(ctx.h0_dtype)
        return gl, gt, gr, gi, gh0c


def _bwd_tile(fwd_tile):
    S, L = BWD_TILE
    if (S * L) % (fwd_tile[0] * fwd_tile[1]) != 0:
        return fwd_tile
    return BWD_TILE


# -----------------------------------------------------------------------------
# The cache: the fused read-out (cache_kernel.py, Triton) and the compiled plan. cache_impl='auto' reads out
# fused for tensors on a GPU when Triton is installed; 'triton' insists (and runs on the CPU under
# TRITON_INTERPRET=1); 'torch' never.


def cache_readout(q, k, v, log_s, end, cand, null_k, null_v, L, *, impl, reference):
    """mipt.cache_attention_torch's function, fused where fused_cache(impl, device); reference otherwise."""
    if fused_cache(impl, q.device):
        import cache_kernel
        return cache_kernel.CacheAttention.apply(q, k, v, log_s, end, cand, null_k, null_v, L)
    return reference(q, k, v, log_s, end, cand, null_k, null_v, L)


_PLANS = {}


def cache_plan(s, K, tau, L, R, noise, *, impl, reference):
    """mipt.cache_plan's function. Its sorts and small tensors cost more in kernel launches than in work: where
    the read-out runs fused on a GPU, the plan is compiled once per shape and replayed as a CUDA graph."""
    if not (fused_cache(impl, s.device) and s.device.type == 'cuda'):
        return reference(s, K, tau, L, R, noise)
    if reference not in _PLANS:
        allow_recompiles()
        _PLANS[reference] = torch.compile(reference, mode='reduce-overhead', dynamic=False)
    return tuple(t.clone() for t in _PLANS[reference](s, K, tau, L, R, noise))   # graphs reuse their outputs


_FUSED = {}


def fused_cache(impl, device):
    """Whether the cache reads out fused (decided once per setting and device type)."""
    if (impl, device.type) not in _FUSED:
        _FUSED[impl, device.type] = _fused_available(impl, device)
    return _FUSED[impl, device.type]


def _fused_available(impl, device):
    if impl == 'torch' or (impl == 'auto' and device.type != 'cuda'):
        return False
    import cache_kernel
    if impl == 'auto':
        return cache_kernel.triton is not None
    if not cache_kernel.available(device):
        raise RuntimeError(f"cache_impl='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU); "
                           f"got {device.type}{'' if cache_kernel.triton else ' without Triton'}")
    return True


def allow_recompiles():
    """One compiled graph per shape (and per model, for engine.graphed_step): allow 64, not torch's default 8
    (the setting's name changed in torch 2.7)."""
    import torch._dynamo
    cfg = torch._dynamo.config
    name = 'recompile_limit' if hasattr(cfg, 'recompile_limit') else 'cache_size_limit'
    setattr(cfg, name, max(getattr(cfg, name), 64))
