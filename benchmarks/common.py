"""Helpers shared by the benchmarks: importing kat's modules, timing, peak memory, tables.

Every benchmark prints a markdown table whose ratios are against a baseline measured in the
same run on the same machine, with a header naming the machine, torch version and commit.

Memory is "peak beyond what was allocated when the case started" (the inputs):
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
- CPU: the process's peak resident set (VmHWM), reset through ``/proc/self/clear_refs`` where
  Linux allows it, else ``ru_maxrss``, which is the peak since the process started. Either way
  run each CPU case in a fresh process (``run_isolated``): allocator caches and earlier cases
  must not be counted, and tracemalloc does not see torch's allocations.
"""

from __future__ import annotations

import importlib
import json
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from collections.abc import Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]


def import_kat(name: str) -> types.ModuleType:
    """``kat.<name>`` without running kat/__init__.py.

    The benchmarks time the maths modules, which need torch (and triton) only; importing them
    this way keeps the benchmarks runnable on a GPU machine that lacks the rest of the package's
    dependencies (``datasets``, say). Relative imports between kat's modules still work.
    """
    if "kat" not in sys.modules:
        package = types.ModuleType("kat")
        package.__path__ = [str(ROOT / "kat")]
        sys.modules["kat"] = package
    return importlib.import_module(f"kat.{name}")


# ---------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
    return seconds


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes per second moved by a same-device tensor copy, counting the read and the write.

    The practical roofline for a kernel that streams its inputs once: a memory-bound kernel's
    (bytes read + written) / time is compared against it.
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = median(time_call(lambda: dst.copy_(src), device, repeats, warmup=2))
    return 2 * nbytes / seconds


# ---------------------------------------------------------------------------- memory

def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_cpu_peak() -> bool:
    """Reset the process's peak RSS (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _current_rss_bytes() -> int:
    kib = _proc_status_kib("VmRSS")
    if kib is None:  # not Linux: fall back on psutil if it is there
        import psutil

        return psutil.Process().memory_info().rss
    return kib * 1024


def _peak_rss_bytes() -> int:
    kib = _proc_status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        if sys.platform == "darwin":
            kib //= 1024  # bytes there
    return kib * 1024


class PeakMemory:
    """Context manager: ``.bytes`` = peak memory during the block beyond what was in use at entry."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0

    def __enter__(self) -> PeakMemory:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _reset_cpu_peak()
            self._base = _current_rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _peak_rss_bytes()
        self.bytes = max(0, peak - self._base)


def available_memory(device: torch.device) -> int:
    """Bytes that a new allocation can still get: free GPU memory, or MemAvailable on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return int(re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.MULTILINE).group(1)) * 1024
    except (OSError, AttributeError):
        import psutil

        return psutil.virtual_memory().available


# ---------------------------------------------------------------------------- processes

def run_isolated(script: Path | str, args: Sequence[str], timeout: float | None = None) -> dict:
    """Run ``python script *args`` in a fresh process; it must print one JSON object as its last line.

    A crash (the kernel's OOM killer included) comes back as ``{"error": ...}`` instead of raising.
    """
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return {"error": f"{reason} {tail[0]}".strip()}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------- reporting

def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def git_commit() -> str:
    import_kat("config")  # kat without its __init__, as above; experiments.runs imports kat.config and kat.plot
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("experiments.runs").git_commit()


def header(device: torch.device, command: str) -> str:
    """Lines that say what produced a table: command, machine, software, commit."""
    versions = f"torch {torch.__version__}"
    try:
        import triton

        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    return (f"`{command}`\n\n{describe_device(device)}; {versions}; python {platform.python_version()}; "
            f"commit {git_commit()}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g}" if seconds < 1 else f"{seconds * 1e3:.0f}"


def fmt_mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f}"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return "<0.001x" if value < 1e-3 else f"{value:.3g}x"


def fmt_share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"
