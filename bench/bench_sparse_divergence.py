"""Benchmark: sparse-teacher divergence kernels against eager PyTorch.

GPU (CUDA available):
    PYTHONPATH=. python bench/bench_sparse_divergence.py [--mode fkl] [--sweep] [--json out.json]
  * device peak: a large device-to-device copy (bytes read + written per second), measured in the run;
  * for N in {4096, 16384}, V in {32000, 151936}, k in {8, 64} (bf16 logits, fp16 teacher log-probs):
    forward+backward time of `sparse_divergence` (Triton; median of triton.testing.do_bench), achieved
    bandwidth = minimum bytes moved (read the logits once, write the bf16 gradient once, plus the small
    inputs) / time, as % of the measured copy peak; peak allocated memory above the inputs; and the same
    for eager PyTorch (log_softmax of the upcast logits, gather, the same coarsened loss, autograd);
  * fused-linear vs unfused (logits = h @ W.T, then sparse_divergence) at N=16384, V=151936, H=4096:
    time and peak memory above the inputs;
  * --sweep: kernel configurations (BLOCK_V, num_warps, programs per SM) at N=16384, V=151936, k=64.
CPU (no CUDA): small sizes, the chunked PyTorch path against eager PyTorch (time, peak RSS growth
measured in a child process per variant). Finishes in about a minute on 2 cores.
--shapes "N,V,k;N,V,k" replaces the sizes of the loss table (GPU or CPU): a short run (bench/gpu_check.sh).

The last thing printed is a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opd_kernels import fused_linear_sparse_divergence, sparse_divergence  # noqa: E402

GB = 1e9


# ------------------------------------------------------------------------------------------------
# Inputs and the eager baseline


def make_inputs(N, V, k, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    z = (torch.randn(N, V, device=device, generator=g, dtype=torch.float32) * 2.0).to(dtype)
    # teacher top-k: random distinct-ish ids (random offsets in a random permutation window), descending
    base = torch.randint(0, V, (N, 1), device=device, generator=g)
    step = torch.randint(1, max(2, V // max(k, 1)), (N, 1), device=device, generator=g)
    ids = ((base + step * torch.arange(k, device=device)[None, :]) % V).to(torch.int32)
    lp = torch.log_softmax(torch.randn(N, k + 1, device=device, generator=g) * 2, -1)[:, :k]
    lp = lp.sort(1, descending=True).values.to(torch.float16)
    return z, ids, lp


def eager_loss(z, ids, lp, mode, eps=1e-6):
    """The plain formulation: full-vocabulary log_softmax in float32, gather, loss on S + tail."""
    lq_all = torch.log_softmax(z.float(), dim=-1)
    lq = lq_all.gather(1, ids.long())
    lpf = lp.float()
    p_t = (1 - lpf.exp().sum(1, keepdim=True)).clamp_min(eps)
    q_t = (1 - lq.exp().sum(1, keepdim=True)).clamp_min(eps)
    logP = torch.cat([lpf, p_t.log()], 1)
    logQ = torch.cat([lq, q_t.log()], 1)
    P, Q = logP.exp(), logQ.exp()
    if mode == "fkl":
        return (P * (logP - logQ)).sum(1)
    if mode == "rkl":
        return (Q * (logQ - logP)).sum(1)
    if mode == "jsd":
        logM = torch.logaddexp(logP + torch.log(torch.tensor(0.5)), logQ + torch.log(torch.tensor(0.5)))
        return 0.5 * (P * (logP - logM)).sum(1) + 0.5 * (Q * (logQ - logM)).sum(1)
    raise ValueError(f"eager baseline implements fkl, rkl, jsd; got {mode}")


# ------------------------------------------------------------------------------------------------
# GPU


def gpu_peak_copy_bw():
    import triton.testing as tt

    n = 1 << 30  # 2 GiB of bf16 each way
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = tt.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    bw = 2 * a.numel() * a.element_size() / (ms * 1e-3)
    del a, b
    torch.cuda.empty_cache()
    return bw


def peak_extra(fn):
    """Peak allocated bytes above what was allocated before the call (the call's outputs included)."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


GPU_SHAPES = [(N, V, k) for N in (4096, 16384) for V in (32000, 151936) for k in (8, 64)]
CPU_SHAPES = [(1024, 32000, 8), (1024, 32000, 64), (256, 151936, 64)]


def shape_list(text: str) -> list[tuple[int, int, int]]:
    """"N,V,k;N,V,k" -> [(N, V, k), ...]"""
    return [tuple(int(x) for x in item.split(",")) for item in text.split(";") if item.strip()]


def bench_gpu_loss(args, peak_bw):
    import triton.testing as tt

    rows = []
    for N, V, k in args.shapes or GPU_SHAPES:
        torch.cuda.empty_cache()
        try:
            z, ids, lp = make_inputs(N, V, k, "cuda", torch.bfloat16)
        except torch.cuda.OutOfMemoryError:
            print(f"skip N={N} V={V} k={k}: inputs do not fit")
            continue
        zr = z.requires_grad_(True)

        def ours():
            loss = sparse_divergence(zr, ids, lp, args.mode)
            return torch.autograd.grad(loss.sum(), zr)[0]

        buf = z.detach().clone().requires_grad_(True)

        def ours_inplace():
            # times the kernel on the same buffer: after the first call it holds gradients, which
            # costs the same (the work does not depend on the values)
            loss = sparse_divergence(buf, ids, lp, args.mode, inplace_grad=True)
            return torch.autograd.grad(loss.sum(), buf)[0]

        def eager():
            loss = eager_loss(zr, ids, lp, args.mode)
            return torch.autograd.grad(loss.sum(), zr)[0]

        r = dict(N=N, V=V, k=k)
        r["ours_ms"] = tt.do_bench(ours, warmup=25, rep=args.rep, return_mode="median")
        r["ours_inplace_ms"] = tt.do_bench(ours_inplace, warmup=25, rep=args.rep, return_mode="median")
        r["ours_peak"] = peak_extra(ours)
        del buf
        buf = z.detach().clone().requires_grad_(True)
        r["ours_inplace_peak"] = peak_extra(ours_inplace)
        del buf
        nbytes = N * V * 2 * 2 + N * k * (4 + 2) + N * 4
        r["bytes"] = nbytes
        r["gbps"] = nbytes / (r["ours_ms"] * 1e-3) / GB
        r["pct_peak"] = 100 * nbytes / (r["ours_ms"] * 1e-3) / peak_bw
        r["pct_peak_inplace"] = 100 * nbytes / (r["ours_inplace_ms"] * 1e-3) / peak_bw
        try:
            r["eager_ms"] = tt.do_bench(eager, warmup=25, rep=args.rep, return_mode="median")
            r["eager_peak"] = peak_extra(eager)
        except torch.cuda.OutOfMemoryError:
            r["eager_ms"] = r["eager_peak"] = None
            print(f"eager OOM at N={N} V={V} k={k}")
        torch.cuda.empty_cache()
        print(json.dumps(r), flush=True)
        rows.append(r)
        del z, zr, ids, lp
    return rows


def bench_gpu_fused(args):
    import triton.testing as tt

    N, V, H, k = 16384, 151936, args.hidden, 64
    torch.cuda.empty_cache()
    z_ids = make_inputs(N, V, k, "cuda", torch.bfloat16)  # only ids and log-probs are used
    ids, lp = z_ids[1], z_ids[2]
    del z_ids
    torch.cuda.empty_cache()
    g = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(N, H, device="cuda", generator=g).to(torch.bfloat16).requires_grad_(True)
    W = (torch.randn(V, H, device="cuda", generator=g) / H ** 0.5).to(torch.bfloat16).requires_grad_(True)

    def unfused(inplace):
        def f():
            logits = h @ W.t()
            loss = sparse_divergence(logits, ids, lp, args.mode, inplace_grad=inplace)
            return torch.autograd.grad(loss.sum(), (h, W))
        return f

    def fused():
        loss = fused_linear_sparse_divergence(h, W, ids, lp, args.mode)
        return torch.autograd.grad(loss.sum(), (h, W))

    out = {}
    for name, fn in (("unfused", unfused(False)), ("unfused_inplace", unfused(True)), ("fused", fused)):
        torch.cuda.empty_cache()
        try:
            out[name + "_peak"] = peak_extra(fn)
            out[name + "_ms"] = tt.do_bench(fn, warmup=100, rep=args.rep_fused, return_mode="median")
        except torch.cuda.OutOfMemoryError:
            out[name + "_peak"] = out[name + "_ms"] = None
        print(json.dumps({name: [out[name + "_ms"], out[name + "_peak"]]}), flush=True)
    # accuracy of the fused path against the unfused one on this size (bf16)
    a = unfused(False)()
    b = fused()
    out["rel_err_grad_h"] = ((a[0].float() - b[0].float()).norm() / a[0].float().norm()).item()
    out["rel_err_grad_w"] = ((a[1].float() - b[1].float()).norm() / a[1].float().norm()).item()
    from opd_kernels.fused_linear import default_chunk_rows

    out.update(N=N, V=V, H=H, k=k, chunk_rows=default_chunk_rows(N, V, h.device))
    return out


SWEEP = [  # (kernel, BLOCK_V or SEG, num_warps, programs per SM, L2 hints (two-pass only))
    ("twopass", 16384, 16, 1, True), ("twopass", 8192, 8, 2, True), ("twopass", 16384, 32, 1, True),
    ("twopass", 8192, 16, 1, True), ("twopass", 16384, 16, 1, False), ("coop", 2048, 2, 16, False),
]


def bench_gpu_sweep(args, peak_bw):
    import triton.testing as tt

    res = []
    for N, V, k in ((16384, 151936, 64), (16384, 32000, 64)):
        z, ids, lp = make_inputs(N, V, k, "cuda", torch.bfloat16)
        zr = z.requires_grad_(True)

        def ours():
            loss = sparse_divergence(zr, ids, lp, args.mode)
            return torch.autograd.grad(loss.sum(), zr)[0]

        nbytes = N * V * 4 + N * k * 6 + N * 4
        for kern, bv, nw, per_sm, hints in SWEEP:
            os.environ.update(OPD_SPARSE_KERNEL=kern, OPD_SPARSE_BLOCK_V=str(bv), OPD_SPARSE_WARPS=str(nw),
                              OPD_SPARSE_PROGS_PER_SM=str(per_sm), OPD_SPARSE_EV1="evict_last" if hints else "",
                              OPD_SPARSE_EV2="evict_first" if hints else "")
            ms = tt.do_bench(ours, warmup=25, rep=args.rep, return_mode="median")
            r = dict(N=N, V=V, k=k, kernel=kern, block_v=bv, warps=nw, progs_per_sm=per_sm, hints=hints, ms=ms,
                     pct_peak=100 * nbytes / (ms * 1e-3) / peak_bw)
            print(json.dumps(r), flush=True)
            res.append(r)
        del z, zr, ids, lp
        torch.cuda.empty_cache()
    for key in ("OPD_SPARSE_KERNEL", "OPD_SPARSE_BLOCK_V", "OPD_SPARSE_WARPS", "OPD_SPARSE_PROGS_PER_SM",
                "OPD_SPARSE_EV1", "OPD_SPARSE_EV2"):
        os.environ.pop(key, None)
    return res


def gpu_main(args):
    props = torch.cuda.get_device_properties(0)
    peak_bw = gpu_peak_copy_bw()
    print(f"device: {props.name}, {props.multi_processor_count} SMs; measured copy peak {peak_bw / GB:.0f} GB/s",
          flush=True)
    sweep = bench_gpu_sweep(args, peak_bw) if args.sweep else []
    rows = bench_gpu_loss(args, peak_bw)
    fused = bench_gpu_fused(args) if not args.skip_fused else None
    result = dict(device=props.name, peak_copy_gbps=peak_bw / GB, mode=args.mode, loss=rows, fused=fused,
                  sweep=sweep)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print_gpu_tables(result)


def _gb(x):
    return "n/a" if x is None else f"{x / GB:.2f}"


def print_gpu_tables(res):
    if res["sweep"]:
        print("\nKernel configurations, k=64, fwd+bwd:\n")
        print("| N | V | kernel | BLOCK_V / SEG | warps | programs/SM | L2 hints | ms | % of copy peak |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in res["sweep"]:
            print(f"| {r['N']} | {r['V']} | {r['kernel']} | {r['block_v']} | {r['warps']} | {r['progs_per_sm']} | "
                  f"{'yes' if r.get('hints') else 'no'} | {r['ms']:.3f} | {r['pct_peak']:.0f}% |")
    f = res["fused"]
    if f:
        print(f"\nFused linear vs unfused, N={f['N']}, V={f['V']}, H={f['H']}, k={f['k']}, bf16, mode {res['mode']}, "
              f"{f['chunk_rows']} tokens per chunk "
              f"(fwd+bwd; peak allocated above inputs; grad rel. error fused vs unfused: "
              f"h {f['rel_err_grad_h']:.1e}, W {f['rel_err_grad_w']:.1e}):\n")
        print("| path | ms | peak extra GB | peak vs fused |")
        print("|---|---|---|---|")
        for name in ("unfused", "unfused_inplace", "fused"):
            ms, pk = f[name + "_ms"], f[name + "_peak"]
            ratio = "n/a" if pk is None or not f["fused_peak"] else f"{pk / f['fused_peak']:.1f}x"
            print(f"| {name} | {'n/a' if ms is None else f'{ms:.1f}'} | {_gb(pk)} | {ratio} |")
    print(f"\n{res['device']}: sparse_divergence mode={res['mode']}, bf16 logits, fp16 teacher log-probs, "
          f"forward+backward; copy peak {res['peak_copy_gbps']:.0f} GB/s; bytes = read logits + write grad "
          f"+ small inputs.\n")
    print("| N | V | k | ours ms | GB/s | % peak | ours inplace ms (% peak) | ours peak extra GB "
          "(grad buffer / inplace) | eager ms | eager peak extra GB | speedup | eager/ours memory |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["loss"]:
        sp = "n/a" if r["eager_ms"] is None else f"{r['eager_ms'] / r['ours_ms']:.1f}x"
        mr = "n/a" if r["eager_peak"] is None else f"{r['eager_peak'] / r['ours_peak']:.1f}x"
        em = "n/a" if r["eager_ms"] is None else f"{r['eager_ms']:.2f}"
        print(f"| {r['N']} | {r['V']} | {r['k']} | {r['ours_ms']:.3f} | {r['gbps']:.0f} | {r['pct_peak']:.0f}% | "
              f"{r['ours_inplace_ms']:.3f} ({r['pct_peak_inplace']:.0f}%) | {_gb(r['ours_peak'])} / "
              f"{_gb(r['ours_inplace_peak'])} | {em} | {_gb(r['eager_peak'])} | {sp} | {mr} |")


# ------------------------------------------------------------------------------------------------
# CPU


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss():
    """Reset the process's peak RSS (Linux: write 5 to clear_refs); returns the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not resettable: fall back to the lifetime peak
        return _status_kb("VmHWM") * 1024
    return _status_kb("VmRSS") * 1024


def cpu_child(variant, N, V, k, mode, reps):
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    z, ids, lp = make_inputs(N, V, k, "cpu", torch.float32)
    z.requires_grad_(True)

    def ours():
        loss = sparse_divergence(z, ids, lp, mode, backend="torch")
        return torch.autograd.grad(loss.sum(), z)[0]

    def eager():
        return torch.autograd.grad(eager_loss(z, ids, lp, mode).sum(), z)[0]

    fn = ours if variant == "chunked" else eager
    base = _reset_peak_rss()
    fn()  # warm-up, and the memory high-water mark
    peak = _status_kb("VmHWM") * 1024 - base
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    print(json.dumps(dict(ms=1e3 * min(times), peak=peak)))  # best of reps: the 2 cores are shared


def cpu_main(args):
    rows = []
    for N, V, k in args.shapes or CPU_SHAPES:
        r = dict(N=N, V=V, k=k)
        for variant in ("chunked", "eager"):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--cpu-child", variant, str(N), str(V),
                                  str(k), "--mode", args.mode, "--reps", str(args.reps)],
                                 capture_output=True, text=True, check=True)
            r[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(r), flush=True)
        rows.append(r)
    print(f"\nCPU ({os.cpu_count()} cores), mode={args.mode}, fp32 logits, forward+backward; chunked path "
          f"(backend='torch') vs eager PyTorch, best of {args.reps}; peak = the child process's peak RSS above its RSS before the "
          f"call (the returned fp32 [N, V] gradient, 4 bytes per logit, is part of both).\n")
    print("| N | V | k | chunked ms | eager ms | speedup | chunked peak MB | eager peak MB | eager/chunked memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, e = r["chunked"], r["eager"]
        print(f"| {r['N']} | {r['V']} | {r['k']} | {c['ms']:.1f} | {e['ms']:.1f} | {e['ms'] / c['ms']:.2f}x | "
              f"{c['peak'] / 1e6:.0f} | {e['peak'] / 1e6:.0f} | {e['peak'] / max(c['peak'], 1):.1f}x |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="fkl", choices=["fkl", "rkl", "jsd"])
    ap.add_argument("--sweep", action="store_true", help="GPU: time kernel configurations first")
    ap.add_argument("--skip-fused", action="store_true")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--rep", type=int, default=200, help="do_bench repetition time (ms)")
    ap.add_argument("--rep-fused", type=int, default=1000, help="do_bench repetition time for fused (ms)")
    ap.add_argument("--json", help="write the results as JSON here")
    ap.add_argument("--cpu", action="store_true", help="run the CPU benchmark even when CUDA is present")
    ap.add_argument("--cpu-child", nargs=4, metavar=("VARIANT", "N", "V", "K"), help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--shapes", type=shape_list, help='sizes of the loss table, "N,V,k;N,V,k" (default: all)')
    args = ap.parse_args()
    if args.cpu_child:
        v, N, V, k = args.cpu_child
        return cpu_child(v, int(N), int(V), int(k), args.mode, args.reps)
    if torch.cuda.is_available() and not args.cpu:
        return gpu_main(args)
    return cpu_main(args)


if __name__ == "__main__":
    main()
