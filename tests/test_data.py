"""Specification of the data preparation (SPEC section 2): data/prepare_common.py
and the data/<dataset>/prepare.py scripts.

Real offline copies of the sources are looked up in $GPT_RL_DATA_SOURCE, else in
<repo>/../shared/data; tests that need them are skipped when they are absent.
Downloads are exercised against a local HTTP server on 127.0.0.1 serving small
synthetic archives in the real formats; nothing here touches the network.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import json
import os
import pickle
import random
import subprocess
import sys
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # so that "data.prepare_common" imports as experiment.py imports it

from data import prepare_common as pc  # noqa: E402

SHARED_DATA = Path(os.environ.get("GPT_RL_DATA_SOURCE", REPO.parent / "shared" / "data"))


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"offline data {path} is absent (set GPT_RL_DATA_SOURCE to the shared data folder)")
    return path


def quiet(_message: str) -> None:
    pass


def decode_bytes(out_dir: Path, split: str) -> bytes:
    """The original bytes of a latin-1 split: token id -> char -> byte."""
    meta = json.loads((out_dir / "meta.json").read_text())
    byte_of = np.array([ord(meta["itos"][str(i)]) for i in range(meta["vocab_size"])], dtype=np.uint8)
    return byte_of[np.fromfile(out_dir / f"{split}.bin", dtype=np.uint16)].tobytes()


def decode_text(out_dir: Path, split: str) -> str:
    meta = json.loads((out_dir / "meta.json").read_text())
    ids = np.fromfile(out_dir / f"{split}.bin", dtype=np.uint16)
    return "".join(meta["itos"][str(i)] for i in ids.tolist())


def leftovers(out_dir: Path) -> list[str]:
    """Files that a later run could mistake for (part of) a dataset."""
    bad_suffixes = (".bin", ".part", ".zip", ".tmp", ".pkl", ".json")
    if not out_dir.exists():
        return []
    return sorted(p.name for p in out_dir.iterdir() if p.name.endswith(bad_suffixes) or p.name.startswith("meta."))


# ---------------------------------------------------------------- synthetic sources

SYNTHETIC_ENWIK8_BYTES = 20_000  # -> 18,000 / 1,000 / 1,000 tokens
SYNTHETIC_TEXT8_BYTES = 10_000  # -> 9,000 / 500 / 500 tokens


def synthetic_enwik8() -> bytes:
    # Wiki markup with UTF-8 multibyte text, as in the real file: bytes >= 128 must
    # each become one latin-1 character. The cut may split a multibyte sequence,
    # which byte-level (latin-1) handling must not mind.
    page = "<page>\n  <title>Zürich</title>\n  <text>Ærøskøbing — 東京 — naïve café [[Köln]]</text>\n</page>\n"
    data = (page.encode("utf-8") * 1000)[:SYNTHETIC_ENWIK8_BYTES]
    assert max(data) >= 128
    return data


def synthetic_text8() -> bytes:
    words = "the quick brown fox jumps over the lazy dog".split()  # a pangram: all 26 letters
    rng = random.Random(0)
    text = " " + " ".join(rng.choice(words) for _ in range(5000))
    return text[:SYNTHETIC_TEXT8_BYTES].encode("ascii")


def make_zip(path: Path, member: str, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, data)
    return path


# ---------------------------------------------------------------- local HTTP server


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the fixture folder; files under /truncated/ announce their full
    Content-Length but only half the bytes are sent before the connection closes."""

    requests_seen: list[str] = []

    def do_GET(self):
        Handler.requests_seen.append(self.path)
        if not self.path.startswith("/truncated/"):
            return super().do_GET()
        data = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(root folder served, base URL) of an HTTP server on 127.0.0.1."""
    root = tmp_path_factory.mktemp("served")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def run_cli(dataset: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(var, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    script = REPO / "data" / dataset / "prepare.py"
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


# ---------------------------------------------------------------- split arithmetic


def test_split_sizes_give_the_standard_and_nanogpt_splits():
    assert pc.split_sizes(100_000_000, (0.9, 0.05, 0.05)) == [90_000_000, 5_000_000, 5_000_000]
    assert pc.split_sizes(1_115_394, (0.9, 0.1)) == [1_003_854, 111_540]  # nanoGPT's int(n*0.9)
    for n in (0, 1, 19, 4_154_064, 12_549_837):
        sizes = pc.split_sizes(n, (0.9, 0.05, 0.05))
        assert sum(sizes) == n and min(sizes) >= 0


def test_dataset_specs_match_the_spec():
    assert set(pc.DATASETS) == {"shakespeare_char", "enwik8", "text8"}
    sh, en, t8 = pc.DATASETS["shakespeare_char"], pc.DATASETS["enwik8"], pc.DATASETS["text8"]
    assert (sh.standard_size, en.standard_size, t8.standard_size) == (1_115_394, 100_000_000, 100_000_000)
    assert sh.checksum == "sha256:86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert en.checksum == "md5:a1fa5ffddb56f4953e226637dabbb36a" and t8.checksum == "crc32:7d6be66f"
    assert (sh.archive_member, en.archive_member, t8.archive_member) == (None, "enwik8", "text8")
    assert (sh.encoding, en.encoding, t8.encoding) == ("utf-8", "latin-1", "latin-1")
    assert [name for name, _ in en.splits] == ["train", "val", "test"] == [name for name, _ in t8.splits]
    # Names that claim the standard file: the download's and its member's (input.txt is generic).
    assert (sh.standard_names, en.standard_names, t8.standard_names) == ((), ("enwik8.zip", "enwik8"), ("text8.zip", "text8"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        en.standard_size = 1


def test_encoding_uses_sorted_set_of_chars_with_and_without_the_byte_table():
    for text in ("hello world", "caf\xe9 \xff\x00", "h\xe9llo \u6771\u4eac \U0001f600"):  # last: beyond latin-1
        chars, ids = pc.build_vocab_and_encode(text)
        assert chars == sorted(set(text))
        assert ids.dtype == np.uint16
        assert "".join(chars[i] for i in ids) == text


# ---------------------------------------------------------------- shakespeare_char


def test_shakespeare_char_from_the_real_input(tmp_path):
    source = shared_file("shakespeare_char", "input.txt")
    text = source.read_text(encoding="utf-8")
    meta = pc.prepare("shakespeare_char", tmp_path, source=source, log=quiet)

    assert meta["splits"] == {"train": 1_003_854, "val": 111_540}
    assert meta["vocab_size"] == 65
    assert [meta["itos"][str(i)] for i in range(65)] == sorted(set(text))
    assert meta["standard_split"] is True and meta["warning"] is None
    assert meta["dtype"] == "uint16" and meta["encoding"] == "utf-8" and meta["format_version"] == 1
    assert meta["source"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert not (tmp_path / "test.bin").exists()
    assert decode_text(tmp_path, "train") + decode_text(tmp_path, "val") == text
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    assert pc.is_prepared("shakespeare_char", tmp_path)


def test_meta_pkl_is_what_nanogpt_writes_and_matches_meta_json(tmp_path):
    source = shared_file("shakespeare_char", "input.txt")
    pc.prepare("shakespeare_char", tmp_path, source=source, log=quiet)
    with open(tmp_path / "meta.pkl", "rb") as f:
        pkl = pickle.load(f)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert set(pkl) == {"vocab_size", "itos", "stoi"}
    assert pkl["vocab_size"] == meta["vocab_size"] == 65
    assert pkl["itos"] == {int(k): v for k, v in meta["itos"].items()}
    assert pkl["stoi"] == meta["stoi"] == {c: i for i, c in pkl["itos"].items()}


def test_shakespeare_cli_runs_from_another_cwd(tmp_path):
    source = shared_file("shakespeare_char", "input.txt")
    result = run_cli("shakespeare_char", "--source", str(source), "--out_dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "1,003,854" in result.stdout and "111,540" in result.stdout
    assert pc.is_prepared("shakespeare_char", tmp_path / "out")  # a relative --out_dir is relative to the cwd

    # The default output folder is the script's own folder, whatever the cwd.
    help_text = run_cli("shakespeare_char", "--help", cwd=tmp_path)
    assert help_text.returncode == 0
    assert str(REPO / "data" / "shakespeare_char") in help_text.stdout.replace("\n", "").replace(" ", "")


def test_cli_rejects_a_malformed_checksum_as_an_argument_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        pc.main("text8", ["--checksum", "nonsense", "--out_dir", str(tmp_path)])
    assert exited.value.code == 2
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- downloads (local HTTP server)


def test_enwik8_downloaded_from_a_zip_is_split_90_5_5_byte_for_byte(server, tmp_path):
    root, base = server
    data = synthetic_enwik8()
    make_zip(root / "ok" / "enwik8.zip", "enwik8", data)
    out = tmp_path / "enwik8"
    md5 = hashlib.md5(data).hexdigest()

    result = run_cli("enwik8", "--url", f"{base}/ok/enwik8.zip", "--checksum", f"md5:{md5}", "--out_dir", str(out), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"] == {"train": 18_000, "val": 1_000, "test": 1_000}
    assert (out / "test.bin").stat().st_size == 2 * 1_000
    assert meta["encoding"] == "latin-1"
    assert max(ord(c) for c in meta["stoi"]) >= 128  # bytes >= 128 are single characters
    assert b"".join(decode_bytes(out, s) for s in ("train", "val", "test")) == data
    assert meta["standard_split"] is False
    assert "20,000 bytes, not the standard 100,000,000" in meta["warning"]
    assert "not comparable" in meta["warning"] and "warning" in result.stdout
    assert meta["source"]["url"] == f"{base}/ok/enwik8.zip"
    assert meta["source"]["sha256"] == hashlib.sha256((root / "ok" / "enwik8.zip").read_bytes()).hexdigest()
    assert (out / "enwik8.zip").is_file() and not list(out.glob("*.part"))  # the archive is kept as a cache


def test_text8_downloaded_and_verified_with_crc32(server, tmp_path):
    root, base = server
    data = synthetic_text8()
    make_zip(root / "ok" / "text8.zip", "text8", data)
    out = tmp_path / "text8"
    crc = f"{zlib.crc32(data):08x}"

    result = run_cli("text8", "--url", f"{base}/ok/text8.zip", "--checksum", f"crc32:{crc}", "--out_dir", str(out), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"] == {"train": 9_000, "val": 500, "test": 500}
    assert meta["vocab_size"] == 27
    assert meta["standard_split"] is False and meta["warning"]
    assert meta["source"]["checksum"] == f"crc32:{crc}"
    assert b"".join(decode_bytes(out, s) for s in ("train", "val", "test")) == data
    assert pc.is_prepared("text8", out)


def test_a_cached_download_is_verified_and_reused_without_downloading_again(server, tmp_path):
    root, base = server
    data = synthetic_text8()
    make_zip(root / "cache" / "text8.zip", "text8", data)
    url, checksum = f"{base}/cache/text8.zip", f"crc32:{zlib.crc32(data):08x}"

    pc.prepare("text8", tmp_path, url=url, checksum=checksum, log=quiet)
    downloads = Handler.requests_seen.count("/cache/text8.zip")
    pc.prepare("text8", tmp_path, url=url, checksum=checksum, log=quiet)
    assert Handler.requests_seen.count("/cache/text8.zip") == downloads == 1

    # A cached archive that no longer verifies is not used: it is downloaded again.
    make_zip(tmp_path / "text8.zip", "text8", b"corrupted cache")
    pc.prepare("text8", tmp_path, url=url, checksum=checksum, log=quiet)
    assert Handler.requests_seen.count("/cache/text8.zip") == 2
    assert b"".join(decode_bytes(tmp_path, s) for s in ("train", "val", "test")) == data


@pytest.mark.parametrize(
    "case, expected_in_message",
    [
        ("checksum_mismatch", "checksum mismatch"),
        ("truncated", "truncated"),
        ("missing_member", "'enwik8'"),
        ("not_a_zip", "not a readable zip"),
        ("not_found", "404"),
    ],
)
def test_a_failed_download_exits_1_with_one_line_and_leaves_nothing_behind(server, tmp_path, case, expected_in_message):
    root, base = server
    data = synthetic_enwik8()
    checksum = f"md5:{hashlib.md5(data).hexdigest()}"
    if case == "checksum_mismatch":
        make_zip(root / case / "enwik8.zip", "enwik8", data + b"tampered")
    elif case == "truncated":
        make_zip(root / "truncated" / "enwik8.zip", "enwik8", data)
    elif case == "missing_member":
        make_zip(root / case / "enwik8.zip", "other.txt", data)
    elif case == "not_a_zip":
        (root / case).mkdir()
        (root / case / "enwik8.zip").write_bytes(data)
    out = tmp_path / "out"

    result = run_cli("enwik8", "--url", f"{base}/{case}/enwik8.zip", "--checksum", checksum, "--out_dir", str(out), cwd=tmp_path)

    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert expected_in_message in lines[0]
    if case == "missing_member":
        assert "other.txt" in lines[0]  # the message lists what the zip has
    assert leftovers(out) == []
    assert not pc.is_prepared("enwik8", out)


def test_an_interrupted_download_leaves_no_part_file(tmp_path, monkeypatch):
    def interrupted_download(url, dest, log):
        dest.write_bytes(b"half an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(pc, "download", interrupted_download)
    with pytest.raises(KeyboardInterrupt):
        pc.prepare("enwik8", tmp_path, url="http://127.0.0.1:9/enwik8.zip", log=quiet)
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- local sources


def test_real_enwik8_prefix_is_split_in_proportion_with_a_warning(tmp_path):
    source = shared_file("enwik8", "enwik8_prefix")
    logged: list[str] = []
    meta = pc.prepare("enwik8", tmp_path, source=source, log=logged.append)

    assert meta["splits"] == {"train": 3_738_657, "val": 207_703, "test": 207_704}
    assert meta["standard_split"] is False
    assert "4,154,064 bytes, not the standard 100,000,000: split 90/5/5 in proportion" in meta["warning"]
    assert any(meta["warning"] in line for line in logged)
    assert meta["source"] == {
        "path": str(source.resolve()),
        "bytes": 4_154_064,
        "sha256": "d8b3b95fb4993726ea7dcc93ae3c9e08a1a04cc540d05d7656fd267cc8ab5d6a",
        "member": None,
        "checksum": None,  # a prefix cannot match the full file's md5, so none is checked
        "allow_nonstandard": False,  # named as a prefix: no flag needed
    }
    assert b"".join(decode_bytes(tmp_path, s) for s in ("train", "val", "test")) == source.read_bytes()


def test_real_text8_prefix_has_27_symbols(tmp_path):
    source = shared_file("text8", "text8_prefix")
    meta = pc.prepare("text8", tmp_path, source=source, log=quiet)
    assert meta["vocab_size"] == 27
    assert meta["splits"] == dict(zip(("train", "val", "test"), pc.split_sizes(12_549_837, (0.9, 0.05, 0.05))))
    assert meta["standard_split"] is False and "12,549,837 bytes" in meta["warning"]
    assert pc.is_prepared("text8", tmp_path)


def test_a_local_zip_source_is_read_through_its_member(tmp_path):
    data = synthetic_text8()
    archive = make_zip(tmp_path / "src" / "text8_prefix.zip", "text8", data)  # short: named as a prefix
    meta = pc.prepare("text8", tmp_path / "out", source=archive, log=quiet)
    assert meta["source"]["member"] == "text8" and meta["source"]["bytes"] == archive.stat().st_size
    assert b"".join(decode_bytes(tmp_path / "out", s) for s in ("train", "val", "test")) == data


def test_a_standard_size_source_must_match_the_checksum(tmp_path, monkeypatch):
    data = synthetic_text8()[:1000]
    source = tmp_path / "text8"
    source.write_bytes(data)
    spec = pc.DATASETS["text8"]
    # Pretend the standard file is 1,000 bytes, so the full-size rules apply to this one.
    monkeypatch.setitem(pc.DATASETS, "text8", dataclasses.replace(spec, standard_size=1000))

    out = tmp_path / "refused"
    with pytest.raises(pc.PrepareError, match="checksum mismatch"):
        pc.prepare("text8", out, source=source, log=quiet)
    assert leftovers(out) == []

    matching = dataclasses.replace(spec, standard_size=1000, checksum=f"crc32:{zlib.crc32(data):08x}")
    monkeypatch.setitem(pc.DATASETS, "text8", matching)
    meta = pc.prepare("text8", tmp_path / "ok", source=source, log=quiet)
    assert meta["standard_split"] is True and meta["warning"] is None
    assert meta["splits"] == {"train": 900, "val": 50, "test": 50}


def test_an_explicit_checksum_is_checked_even_for_a_short_local_source(tmp_path):
    source = tmp_path / "text8_head"
    source.write_bytes(synthetic_text8())
    with pytest.raises(pc.PrepareError, match="checksum mismatch"):
        pc.prepare("text8", tmp_path / "out", source=source, checksum="crc32:00000000", log=quiet)
    assert leftovers(tmp_path / "out") == []


# ---------------------------------------------------------------- a file named as the standard archive


def short_source(folder: Path, dataset: str, name: str) -> tuple[Path, bytes]:
    """A synthetic (short) source of dataset named name: a zip with the member when name ends in .zip."""
    data = synthetic_enwik8() if dataset == "enwik8" else synthetic_text8()
    path = folder / "src" / name
    if name.lower().endswith(".zip"):
        return make_zip(path, dataset, data), data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path, data


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


@pytest.mark.parametrize("dataset, name", [("enwik8", "enwik8"), ("text8", "text8.zip"), ("enwik8", "ENWIK8.ZIP")])
def test_a_short_file_named_as_the_standard_archive_exits_2_and_prepares_nothing(tmp_path, dataset, name):
    source, data = short_source(tmp_path, dataset, name)
    out = tmp_path / "out"

    result = run_cli(dataset, "--source", str(source), "--out_dir", str(out), cwd=tmp_path)

    assert result.returncode == 2
    line = one_error_line(result)
    assert f"named as the standard {dataset} file but is {len(data):,} bytes, not 100,000,000" in line
    assert f"{dataset}_prefix" in line and "--allow_nonstandard" in line  # says both ways out
    assert leftovers(out) == [] and not pc.is_prepared(dataset, out)
    with pytest.raises(pc.PrepareError, match="named as the standard"):  # the API refuses it too
        pc.prepare(dataset, out, source=source, log=quiet)
    assert leftovers(out) == []


@pytest.mark.parametrize("dataset, name", [("enwik8", "enwik8_prefix"), ("text8", "my_text8_head"), ("text8", "text8_prefix.zip")])
def test_the_same_short_file_named_as_a_prefix_is_split_in_proportion_with_a_warning(tmp_path, dataset, name):
    source, data = short_source(tmp_path, dataset, name)
    out = tmp_path / "out"

    result = run_cli(dataset, "--source", str(source), "--out_dir", str(out), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["standard_split"] is False
    assert f"{len(data):,} bytes, not the standard 100,000,000: split 90/5/5 in proportion" in meta["warning"]
    assert meta["source"]["allow_nonstandard"] is False and meta["source"]["checksum"] is None
    assert b"".join(decode_bytes(out, s) for s in ("train", "val", "test")) == data


def test_allow_nonstandard_accepts_a_short_file_named_as_the_standard_and_records_it(tmp_path):
    source, data = short_source(tmp_path, "enwik8", "enwik8")
    out = tmp_path / "out"

    result = run_cli("enwik8", "--source", str(source), "--allow_nonstandard", "--out_dir", str(out), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["standard_split"] is False and "20,000 bytes, not the standard 100,000,000" in meta["warning"]
    assert meta["source"]["allow_nonstandard"] is True
    assert b"".join(decode_bytes(out, s) for s in ("train", "val", "test")) == data

    # experiment.py passes the same switch by this keyword.
    archive, _ = short_source(tmp_path, "text8", "text8.zip")
    meta = pc.prepare("text8", tmp_path / "api", source=archive, log=quiet, allow_nonstandard=True)
    assert meta["source"]["allow_nonstandard"] is True and meta["standard_split"] is False


def test_a_standard_size_source_failing_its_checksum_exits_2_even_with_allow_nonstandard(tmp_path, monkeypatch, capsys):
    source = tmp_path / "text8"
    source.write_bytes(synthetic_text8()[:1000])
    # Pretend the standard file is 1,000 bytes, so this one claims to be it (but is not).
    monkeypatch.setitem(pc.DATASETS, "text8", dataclasses.replace(pc.DATASETS["text8"], standard_size=1000))
    out = tmp_path / "out"
    for flags in ([], ["--allow_nonstandard"]):
        assert pc.main("text8", ["--source", str(source), "--out_dir", str(out), *flags]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and "checksum mismatch" in err[0]
        assert leftovers(out) == []


def test_a_missing_local_source_is_an_argument_error_exit_2(tmp_path):
    result = run_cli("text8", "--source", str(tmp_path / "nowhere"), "--out_dir", "out", cwd=tmp_path)
    assert result.returncode == 2 and "does not exist" in one_error_line(result)
    (tmp_path / "empty").mkdir()
    result = run_cli("text8", "--source_dir", str(tmp_path / "empty"), "--out_dir", "out", cwd=tmp_path)
    assert result.returncode == 2 and "no text8 source" in one_error_line(result)
    assert leftovers(tmp_path / "out") == []


def test_a_short_input_txt_keeps_the_proportional_split_without_a_flag(tmp_path):
    source = tmp_path / "input.txt"  # a generic name: the size alone decides, as before
    source.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50, encoding="utf-8")
    meta = pc.prepare("shakespeare_char", tmp_path / "out", source=source, log=quiet)
    assert meta["standard_split"] is False and "not the standard 1,115,394" in meta["warning"]
    assert meta["splits"] == dict(zip(("train", "val"), pc.split_sizes(source.stat().st_size, (0.9, 0.1))))


def test_meta_json_records_the_sha256_of_each_bin_file(tmp_path):
    source, _ = short_source(tmp_path, "enwik8", "enwik8_prefix")
    out = tmp_path / "out"
    meta = pc.prepare("enwik8", out, source=source, log=quiet)
    assert list(meta["bin_sha256"]) == ["train", "val", "test"]
    for split in ("train", "val", "test"):
        assert meta["bin_sha256"][split] == hashlib.sha256((out / f"{split}.bin").read_bytes()).hexdigest()
    assert json.loads((out / "meta.json").read_text())["bin_sha256"] == meta["bin_sha256"]


# ---------------------------------------------------------------- find_local_source / is_prepared


def test_find_local_source_prefers_the_dataset_folder_then_the_listed_order(tmp_path):
    assert pc.find_local_source("enwik8", tmp_path) is None
    (tmp_path / "enwik8_prefix").write_bytes(b"x")
    assert pc.find_local_source("enwik8", tmp_path) == tmp_path / "enwik8_prefix"
    (tmp_path / "enwik8").mkdir()
    (tmp_path / "enwik8" / "enwik8_prefix").write_bytes(b"x")
    assert pc.find_local_source("enwik8", tmp_path) == tmp_path / "enwik8" / "enwik8_prefix"
    (tmp_path / "enwik8" / "enwik8.zip").write_bytes(b"x")
    assert pc.find_local_source("enwik8", tmp_path) == tmp_path / "enwik8" / "enwik8.zip"
    assert pc.find_local_source("text8", tmp_path) is None


def test_find_local_source_finds_the_shared_offline_copies():
    shared_file("shakespeare_char", "input.txt")
    assert pc.find_local_source("shakespeare_char", SHARED_DATA) == SHARED_DATA / "shakespeare_char" / "input.txt"
    for dataset in ("enwik8", "text8"):
        found = pc.find_local_source(dataset, SHARED_DATA)
        assert found is not None and found.parent.name == dataset


def test_is_prepared_requires_meta_json_and_bins_of_the_recorded_size(tmp_path):
    source = tmp_path / "text8_prefix"
    source.write_bytes(synthetic_text8())
    out = tmp_path / "out"
    assert not pc.is_prepared("text8", out)
    pc.prepare("text8", out, source=source, log=quiet)
    assert pc.is_prepared("text8", out)
    assert not pc.is_prepared("enwik8", out)  # prepared for another dataset

    val = (out / "val.bin").read_bytes()
    (out / "val.bin").write_bytes(val[:-2])
    assert not pc.is_prepared("text8", out)
    (out / "val.bin").write_bytes(val)
    assert pc.is_prepared("text8", out)

    (out / "test.bin").unlink()
    assert not pc.is_prepared("text8", out)
    pc.prepare("text8", out, source=source, log=quiet)  # preparing again overwrites in place
    (out / "meta.json").write_text("{not json")
    assert not pc.is_prepared("text8", out)
    (out / "meta.json").unlink()
    assert not pc.is_prepared("text8", out)
