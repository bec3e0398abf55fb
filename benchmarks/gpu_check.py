"""One command for a machine with a CUDA GPU: kernel correctness, then the benchmark tables.

    python benchmarks/gpu_check.py            # from the repository root; a few minutes

1. Checks the fused Triton reverse KL (kat.kernels) against the PyTorch path (kat.scorer) and a
   float64 reference on CUDA: values and gradients, fp32/fp16/bf16, odd vocabularies, huge
   fp16 logits, masked (-inf) vocabulary, many-block streaming. Prints PASS/FAIL per check.
2. Times the kernel's launch configurations (block width x warps) at one large shape.
3. Prints the KL table of benchmarks/kl.py (naive vs chunked vs Triton, fwd and fwd+bwd).
4. The rollout table of benchmarks/rollout.py (toy models and a random ~110M Llama pair).

Imports only torch, triton and kat's maths modules (not kat/__init__.py), so it runs on a GPU
machine without the training dependencies. Exit status 1 if any correctness check failed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import kl  # noqa: E402

INF = float("inf")


def ref_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """float64 reference, 0 log 0 = 0 where the student masks a token."""
    logp, logq = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def max_scaled_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max(1, max |want|): fp32 sums are accurate relative to their largest term."""
    return ((got.double() - want.double()).abs().max() / max(1.0, want.abs().max().item())).item()


class Checks:
    def __init__(self):
        self.failed = []

    def expect(self, name: str, error: float, tol: float) -> None:
        ok = error <= tol  # also False for nan
        print(f"{'PASS' if ok else 'FAIL'}  {name}: scaled error {error:.2e} (tolerance {tol:.0e})", flush=True)
        if not ok:
            self.failed.append(name)


def check_case(checks: Checks, label: str, s0: torch.Tensor, t0: torch.Tensor, grad_tol: float) -> None:
    """Values and both gradients of the kernel vs float64 autograd and vs kat.scorer's PyTorch path."""
    kernel = common.import_kat("kernels").reverse_kl_triton
    pytorch = kl.chunked_reverse_kl
    w = torch.rand(s0.shape[:-1], device=s0.device) * 2 - 1  # (...) upstream gradient per row

    s, t = s0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
    got = kernel(s, t)
    (got * w).sum().backward()
    s64, t64 = s0.double().requires_grad_(True), t0.double().requires_grad_(True)
    want = ref_kl(s64, t64)
    (want * w.double()).sum().backward()
    checks.expect(f"{label} value vs float64", max_scaled_error(got, want), 2e-5)
    checks.expect(f"{label} d/d student vs float64", max_scaled_error(s.grad, s64.grad), grad_tol)
    checks.expect(f"{label} d/d teacher vs float64", max_scaled_error(t.grad, t64.grad), grad_tol)

    s_pt, t_pt = s0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
    got_pt = pytorch(s_pt, t_pt)
    (got_pt * w).sum().backward()
    # The PyTorch path's fp32 log-softmaxes are themselves ~3e-5 off float64 at V = 152k.
    checks.expect(f"{label} value vs kat.scorer", max_scaled_error(got, got_pt), 1e-4)
    checks.expect(f"{label} d/d student vs kat.scorer", max_scaled_error(s.grad, s_pt.grad), max(grad_tol, 1e-4))


def check_masked(checks: Checks, s0: torch.Tensor, t0: torch.Tensor, masked: torch.Tensor, grad_tol: float) -> None:
    """Logits at -inf in both models: the KL and its gradients equal those over the kept vocabulary."""
    kernel = common.import_kat("kernels").reverse_kl_triton
    s, t = s0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
    got = kernel(s, t)
    got.sum().backward()
    s64, t64 = s0[:, ~masked].double().requires_grad_(True), t0[:, ~masked].double().requires_grad_(True)
    want = ref_kl(s64, t64)
    want.sum().backward()
    checks.expect("fp16 masked vocabulary: value vs kept vocabulary", max_scaled_error(got, want), 2e-5)
    checks.expect("fp16 masked vocabulary: d/d student", max_scaled_error(s.grad[:, ~masked], s64.grad), grad_tol)
    checks.expect("fp16 masked vocabulary: d/d teacher", max_scaled_error(t.grad[:, ~masked], t64.grad), grad_tol)
    zero = (s.grad[:, masked] == 0).all() and (t.grad[:, masked] == 0).all()
    checks.expect("fp16 masked vocabulary: zero gradient on masked tokens", 0.0 if zero else INF, 0.0)


def correctness(device: torch.device) -> list[str]:
    """Every check's PASS/FAIL line; returns the names of the failed ones."""
    kernels = common.import_kat("kernels")
    checks = Checks()
    grad_tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=4.0, dtype=torch.float32):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for shape in ((4, 1000), (2, 3, 4099), (64, 32000), (8, 152064)):
            label = f"{str(dtype)[6:]} {'x'.join(map(str, shape))}"
            check_case(checks, label, randn(*shape, dtype=dtype), randn(*shape, dtype=dtype), grad_tol[dtype])

    for dtype in (torch.float16, torch.bfloat16):  # e^{3000} overflows every float format
        check_case(checks, f"{str(dtype)[6:]} logits ~ 3000", randn(8, 32000, scale=3000.0, dtype=dtype),
                   randn(8, 32000, scale=3000.0, dtype=dtype), grad_tol[dtype])

    s, t = randn(8, 5000, dtype=torch.float16), randn(8, 5000, dtype=torch.float16)
    masked = torch.zeros(5000, dtype=torch.bool, device=device)
    masked[4096:] = True  # a padded vocabulary: a whole block masked, and a partial one
    masked[:3] = True
    s[:, masked], t[:, masked] = -INF, -INF
    check_masked(checks, s, t, masked, grad_tol[torch.float16])

    # Many small blocks: with rising logits every block raises the running max.
    saved = kernels._MAX_BLOCK_V
    kernels._MAX_BLOCK_V = 256
    try:
        rising = torch.linspace(-30, 30, 20000, device=device).expand(4, -1).contiguous()
        check_case(checks, "fp32 rising logits, 256-wide blocks", rising, randn(4, 20000), grad_tol[torch.float32])
    finally:
        kernels._MAX_BLOCK_V = saved
    return checks.failed


def launch_sweep(device: torch.device, rows: int = 16384, vocab: int = 152064, repeats: int = 10) -> str:
    """Median ms of the forward and backward kernels per (BLOCK_V, num_warps), fp16 logits."""
    kernels = common.import_kat("kernels")
    default = kernels._launch_config(vocab)
    configs = [(b, w) for b in (1024, 2048, 4096, 8192) for w in (4, 8, 16) if b // w >= 128]
    table = []
    s, t = kl.make_logits(rows, vocab, torch.float16, device)
    kl_, lse_s, lse_t = kernels._forward(s, t)
    grad_out = torch.ones(rows, device=device)
    bytes_fwd = 2 * s.numel() * s.element_size()  # read s, t
    for block_v, num_warps in configs:
        fwd = common.median(common.time_call(
            lambda b=block_v, w=num_warps: kernels._forward(s, t, b, w), device, repeats))
        bwd = common.median(common.time_call(
            lambda b=block_v, w=num_warps: kernels._backward(s, t, lse_s, lse_t, kl_, grad_out, True, False, b, w),
            device, repeats))
        mark = " (default)" if (block_v, num_warps) == default else ""
        table.append([f"{block_v}{mark}", num_warps, common.fmt_ms(fwd), f"{bytes_fwd / fwd / 1e9:.0f}",
                      common.fmt_ms(bwd), f"{1.5 * bytes_fwd / bwd / 1e9:.0f}"])  # bwd: read s, t, write ds
    return (f"fp16 logits, {rows} x {vocab}:\n\n"
            + common.markdown_table(["BLOCK_V", "warps", "fwd ms", "fwd GB/s", "bwd ms", "bwd GB/s"], table))


def rollout_benchmark(device: torch.device) -> str:
    """The rollout table of benchmarks/rollout.py: token-by-token vs chunked lockstep vs post-hoc.

    On the toy models (random ones of the same shapes where kat/toy/rich is not built) and on a
    random ~110M-parameter Llama teacher with a ~30M student (no checkpoint needs downloading),
    bf16, median of 3. A failure is reported in the output rather than raised, so the tables
    printed before it still count.
    """
    import traceback

    import rollout

    try:
        return rollout.benchmark(device, ["toy", "llm"], llm="random", repeats=3)
    except Exception:  # noqa: BLE001 - report whatever broke, with its traceback
        return "rollout benchmark failed:\n\n" + traceback.format_exc()


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA device; none is visible to torch", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    kernels = common.import_kat("kernels")
    if not kernels.triton_available():
        print("triton is not importable: only the PyTorch path can be benchmarked", file=sys.stderr)
    start = time.perf_counter()
    print(common.header(device, "python benchmarks/gpu_check.py"), "\n", flush=True)

    failed = []
    if kernels.triton_available():
        print("## Correctness of the fused kernel on CUDA\n", flush=True)
        failed = correctness(device)
        print(f"\n{'FAIL: ' + ', '.join(failed) if failed else 'PASS: all checks'}\n", flush=True)
        print("## Kernel launch configurations\n")
        print(launch_sweep(device), "\n", flush=True)

    print("## Reverse KL: naive vs chunked vs fused\n", flush=True)
    print(kl.benchmark(device, kl.GPU_SHAPES, ["fp16", "bf16", "fp32"],
                       [i for i in kl.IMPLS if i != "triton" or kernels.triton_available()],
                       ["fwd", "fwd+bwd"], repeats=10, warmup=2), "\n", flush=True)

    print("## Rollouts\n")
    print(rollout_benchmark(device), "\n", flush=True)
    print(f"gpu_check finished in {time.perf_counter() - start:.0f} s; "
          f"{'FAIL' if failed else 'PASS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
