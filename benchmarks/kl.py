"""Reverse KL over the vocabulary: naive PyTorch vs kat.scorer.reverse_kl vs the fused Triton kernel.

    python benchmarks/kl.py --quick --threads 1         # CPU: (1024, 32000), (4096, 152064)
    python benchmarks/kl.py --device cuda               # GPU: larger shapes, adds the Triton kernel
    python benchmarks/kl.py --device cuda --passes fwd fwd+bwd --dtypes fp16

Implementations (all return d = KL(p_student || q_teacher) per row, float32):
- ``naive``: what one writes first, two fp32 log-softmaxes over the whole (rows, V) tensor, then
  exp, product and sum. About five fp32 (rows, V) buffers live at once.
- ``chunked``: ``kat.scorer.reverse_kl``, the same maths over row chunks of ~64 MiB of fp32.
- ``triton``: ``kat.kernels.reverse_kl_triton``, one streaming pass (CUDA only here; the
  interpreter that tests it on CPU is far too slow to time).

Per case: median wall time over repeats, peak memory beyond the inputs, and the minimum memory
traffic (forward: read both inputs; forward + backward: those reads again and the student
gradient written, 5 (rows, V) tensors in all) per second, also as a share of the bandwidth of a
same-device copy measured in the same run. On CPU every case runs in its own process (see
benchmarks/common.py) and a case whose estimated need exceeds the available memory is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_SHAPES = [(1024, 32000), (4096, 152064)]
GPU_SHAPES = [(4096, 152064), (16384, 32000), (16384, 152064)]
PASSES = ("fwd", "fwd+bwd")
IMPLS = ("naive", "chunked", "triton")
# A case is skipped when its estimated need is above this share of the available memory. On CPU
# the guess keeps the machine out of swap and the OOM killer; on CUDA an OOM is caught and reported.
MEMORY_HEADROOM = {"cpu": 0.75, "cuda": 1.0}


def naive_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """d = sum_v p (log p - log q) the straightforward way: whole-tensor fp32 log-softmaxes."""
    logp = torch.log_softmax(student_logits.float(), dim=-1)  # (R, V) fp32
    logq = torch.log_softmax(teacher_logits.float(), dim=-1)  # (R, V) fp32
    return (logp.exp() * (logp - logq)).sum(-1)  # (R,)


def chunked_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """kat.scorer.reverse_kl on its PyTorch path: an explicit chunk size keeps it off the fused kernel."""
    scorer = common.import_kat("scorer")
    return scorer.reverse_kl(student_logits, teacher_logits,
                             chunk_rows=scorer.default_chunk_rows(student_logits.shape[-1]))


def implementation(name: str):
    if name == "naive":
        return naive_reverse_kl
    if name == "chunked":
        return chunked_reverse_kl
    if name == "triton":
        return common.import_kat("kernels").reverse_kl_triton
    raise ValueError(f"unknown implementation {name!r}; choose from {IMPLS}")


def triton_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        return common.import_kat("kernels").triton_available()
    except ImportError:
        return False


def make_logits(rows: int, vocab: int, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits ~ N(0, 4^2), sampled in place in their dtype (no fp32 temporary)."""
    g = torch.Generator(device=device).manual_seed(seed)
    s = torch.empty(rows, vocab, dtype=dtype, device=device).normal_(0.0, 4.0, generator=g)  # (R, V)
    t = torch.empty(rows, vocab, dtype=dtype, device=device).normal_(0.0, 4.0, generator=g)  # (R, V)
    return s, t


def estimated_bytes(impl: str, rows: int, vocab: int, dtype: torch.dtype, passes: str) -> int:
    """A generous guess of a case's memory, inputs included, to skip cases that cannot fit."""
    size = rows * vocab
    need = 2 * size * dtype.itemsize  # inputs
    if passes == "fwd+bwd":
        need += size * dtype.itemsize  # the student's gradient
    if impl == "naive":
        need += (5 if passes == "fwd" else 9) * size * 4  # fp32 (R, V) temporaries (and saved ones)
    else:
        need += 6 * (1 << 24) * 4  # a few fp32 chunks of 2**24 floats
    return need


@dataclass
class Case:
    impl: str
    rows: int
    vocab: int
    dtype: str
    passes: str  # "fwd" or "fwd+bwd"


def traffic_bytes(case: Case) -> int:
    """Minimum memory traffic: forward reads s and t; backward reads them again and writes ds."""
    tensors = 2 if case.passes == "fwd" else 5
    return tensors * case.rows * case.vocab * DTYPES[case.dtype].itemsize


def run_case(case: Case, device: torch.device, repeats: int, warmup: int) -> dict:
    """Time one case in this process: {"seconds": median, "peak_bytes": beyond the inputs}."""
    fn = implementation(case.impl)
    s, t = make_logits(case.rows, case.vocab, DTYPES[case.dtype], device)
    if case.passes == "fwd":
        call = lambda: fn(s, t)  # noqa: E731
    else:
        s.requires_grad_(True)

        def call():
            s.grad = None
            fn(s, t).sum().backward()

    for _ in range(warmup):
        call()
    s.grad = None  # the gradient the measured call allocates counts as its memory
    with common.PeakMemory(device) as mem:
        call()
    seconds = common.time_call(call, device, repeats, warmup=0)
    return {"seconds": common.median(seconds), "peak_bytes": mem.bytes}


def run_cases(cases: list[Case], device: torch.device, repeats: int, warmup: int) -> list[dict]:
    """Each case's result (or ``error``), printed as it finishes. CPU cases run in fresh processes."""
    results = []
    for case in cases:
        need = estimated_bytes(case.impl, case.rows, case.vocab, DTYPES[case.dtype], case.passes)
        free = common.available_memory(device)
        if need > MEMORY_HEADROOM[device.type] * free:
            result = {"error": f"skipped: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"}
        elif device.type == "cpu":
            result = common.run_isolated(__file__, ["--worker", json.dumps(asdict(case)),
                                                    "--repeats", str(repeats), "--warmup", str(warmup),
                                                    "--threads", str(torch.get_num_threads())])
        else:
            try:
                result = run_case(case, device, repeats, warmup)
            except torch.cuda.OutOfMemoryError:
                result = {"error": "out of memory"}
            torch.cuda.empty_cache()
        print(f"  {case.impl:8s} {case.rows}x{case.vocab} {case.dtype} {case.passes}: "
              f"{result.get('error') or common.fmt_ms(result['seconds']) + ' ms'}", file=sys.stderr, flush=True)
        results.append({**asdict(case), **result})
    return results


def table(results: list[dict], copy_bytes_per_s: float) -> str:
    """Markdown table; ratios are against the naive case of the same shape, dtype and passes."""
    naive = {(r["rows"], r["vocab"], r["dtype"], r["passes"]): r for r in results if r["impl"] == "naive"}
    rows = []
    for r in results:
        base = naive.get((r["rows"], r["vocab"], r["dtype"], r["passes"]), {})
        ok, base_ok = "error" not in r, "seconds" in base
        case = Case(r["impl"], r["rows"], r["vocab"], r["dtype"], r["passes"])
        bandwidth = traffic_bytes(case) / r["seconds"] if ok else None
        rows.append([
            f"{r['rows']} x {r['vocab']}", r["dtype"], r["passes"], r["impl"],
            common.fmt_ms(r["seconds"]) if ok else r["error"],
            common.fmt_ratio(base["seconds"] / r["seconds"]) if ok and base_ok else "-",
            common.fmt_mib(r["peak_bytes"]) if ok else "-",
            common.fmt_ratio(r["peak_bytes"] / max(base["peak_bytes"], 1)) if ok and base_ok else "-",
            f"{bandwidth / 1e9:.1f}" if ok else "-",
            common.fmt_share(bandwidth / copy_bytes_per_s) if ok else "-",
        ])
    headers = ["rows x vocab", "dtype", "pass", "impl", "median ms", "speed-up vs naive",
               "peak MiB beyond inputs", "memory vs naive", "GB/s", "share of copy BW"]
    return common.markdown_table(headers, rows)


def benchmark(device: torch.device, shapes, dtypes, impls, passes, repeats: int, warmup: int) -> str:
    """Run every (shape, dtype, pass, impl) case and return the table with the copy bandwidth line."""
    cases = [Case(impl, rows, vocab, dtype, p)
             for rows, vocab in shapes for dtype in dtypes for p in passes for impl in impls]
    results = run_cases(cases, device, repeats, warmup)
    copy_bw = common.copy_bandwidth(device)
    return (table(results, copy_bw) + f"\n\nSame-device copy bandwidth (read + write): {copy_bw / 1e9:.1f} GB/s. "
            "GB/s counts the minimum traffic: the two inputs read (fwd), plus both re-read and the "
            "student gradient written (fwd+bwd); a read-mostly stream can pass 100% of a copy, which "
            "reads and writes equal amounts.")


def parse_shape(text: str) -> tuple[int, int]:
    try:
        rows, vocab = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} must be ROWSxVOCAB, e.g. 4096x152064") from None
    return rows, vocab


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, help="ROWSxVOCAB (default: per device)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, help="default: naive, chunked, and triton where usable")
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=["fwd"])
    parser.add_argument("--repeats", type=int, help="timed calls per case (default 5 on CPU, 20 on GPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per case before timing")
    parser.add_argument("--quick", action="store_true", help="2 timed calls per case and no warm-up on CPU")
    parser.add_argument("--threads", type=int, help="torch CPU threads (pass 1 on a shared machine)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one case, JSON, run by run_cases on CPU
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")

    if args.worker:
        case = Case(**json.loads(args.worker))
        print(json.dumps(run_case(case, device, args.repeats, args.warmup)))
        return

    gpu = device.type == "cuda"
    repeats = args.repeats or (2 if args.quick else 20 if gpu else 5)
    warmup = 0 if args.quick and not gpu else args.warmup
    impls = args.impls or [i for i in IMPLS if i != "triton" or triton_usable(device)]
    if "triton" in impls and not triton_usable(device):
        parser.error("--impls triton needs triton and --device cuda")
    print(common.header(device, "python benchmarks/kl.py " + " ".join(sys.argv[1:] if argv is None else argv)))
    print()
    print(benchmark(device, args.shapes or (GPU_SHAPES if gpu else CPU_SHAPES), args.dtypes, impls,
                    args.passes, repeats, warmup))


if __name__ == "__main__":
    main()
