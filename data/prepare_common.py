"""Shared data preparation for the character-level datasets (SPEC section 2).

Each ``data/<dataset>/prepare.py`` is a thin wrapper around :func:`main`;
experiment.py calls :func:`prepare`, :func:`is_prepared` and
:func:`find_local_source` directly.

Output of a preparation, all in one folder:

* ``train.bin``, ``val.bin`` (and ``test.bin`` for enwik8/text8): raw
  ``numpy.uint16`` token ids;
* ``meta.pkl``: ``{'vocab_size', 'itos', 'stoi'}`` exactly as nanoGPT writes it,
  for other tools;
* ``meta.json``: the same vocabulary plus split sizes, the sha256 of each .bin
  (``bin_sha256``) and provenance, for our own loading (we never unpickle). It is
  written last and marks the folder complete.

A failed preparation leaves nothing behind that a later run could mistake for
data: outputs are written to temporary files and renamed into place only once
everything has succeeded, and a download is renamed from ``.part`` only after
its checksum has been verified.

A local source named as the standard archive (``enwik8.zip``, ``enwik8``,
``text8.zip``, ``text8``) must be the standard file: the standard size and its
checksum. A shorter file is accepted (split in proportion, with a warning) when
its name says it is something else (``enwik8_prefix``) or with
``allow_nonstandard``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import numpy as np

from harness.files import atomic_write_files, sha256_file

FORMAT_VERSION = 1
DOWNLOAD_TIMEOUT_S = (15, 60)  # (connect, read between chunks): fail rather than hang
CHUNK_BYTES = 1 << 20


class PrepareError(Exception):
    """A user-facing failure; the message is a single line."""

    exit_code = 1  # of the prepare.py CLI: a download or the disk failed

    def __init__(self, message: str):
        # Exception texts from libraries may span lines; the CLI promises one.
        super().__init__(" ".join(str(message).split()))


class SourceError(PrepareError):
    """The user's own source file or arguments are at fault (not a download)."""

    exit_code = 2


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    url: str
    archive_member: str | None  # file inside the zip; None: the URL serves the plain text
    standard_size: int  # bytes of the raw text
    checksum: str  # "algo:hex" of the raw text bytes
    encoding: str
    splits: tuple[tuple[str, float], ...]  # (split name, fraction), in file order
    local_names: tuple[str, ...]  # candidate names in a source folder, preferred first

    @property
    def standard_names(self) -> tuple[str, ...]:
        """Lower-case local file names that claim to be the standard file.

        They are the download's name and its archive member. A plain-text download has
        none: shakespeare_char's ``input.txt`` is a generic name (nanoGPT reads any
        input.txt), so there the size alone decides, as it always has.
        """
        if self.archive_member is None:
            return ()
        names = (Path(urlsplit(self.url).path).name, self.archive_member)
        return tuple(dict.fromkeys(name.lower() for name in names))


DATASETS: dict[str, DatasetSpec] = {
    "shakespeare_char": DatasetSpec(
        name="shakespeare_char",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        archive_member=None,
        standard_size=1_115_394,
        checksum="sha256:86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        encoding="utf-8",
        splits=(("train", 0.9), ("val", 0.1)),
        local_names=("input.txt",),
    ),
    "enwik8": DatasetSpec(
        name="enwik8",
        url="http://mattmahoney.net/dc/enwik8.zip",
        archive_member="enwik8",
        standard_size=100_000_000,
        checksum="md5:a1fa5ffddb56f4953e226637dabbb36a",
        encoding="latin-1",  # one byte = one character; enwik8 has bytes >= 128
        splits=(("train", 0.9), ("val", 0.05), ("test", 0.05)),
        local_names=("enwik8.zip", "enwik8", "enwik8_prefix"),
    ),
    "text8": DatasetSpec(
        name="text8",
        url="http://mattmahoney.net/dc/text8.zip",
        archive_member="text8",
        standard_size=100_000_000,
        checksum="crc32:7d6be66f",  # the only published value: the CRC in the zip header
        encoding="latin-1",
        splits=(("train", 0.9), ("val", 0.05), ("test", 0.05)),
        local_names=("text8.zip", "text8", "text8_prefix"),
    ),
}


def get_spec(dataset: str) -> DatasetSpec:
    try:
        return DATASETS[dataset]
    except KeyError:
        raise PrepareError(f"unknown dataset {dataset!r} (known: {', '.join(DATASETS)})") from None


# ---------------------------------------------------------------- checksums


def parse_checksum(checksum: str) -> tuple[str, str]:
    """Split "algo:hex" into (algo, lower-case hex); crc32 or any hashlib algorithm."""
    algo, sep, digest = checksum.strip().partition(":")
    algo, digest = algo.lower(), digest.lower()
    if not sep or not digest or any(c not in "0123456789abcdef" for c in digest):
        raise SourceError(f"checksum {checksum!r} is not of the form algo:hex (e.g. md5:a1fa...)")
    if algo != "crc32" and algo not in hashlib.algorithms_available:
        raise SourceError(f"checksum {checksum!r}: unknown algorithm {algo!r} (use crc32, md5, sha256, ...)")
    return algo, digest


def compute_checksum(data: bytes, algo: str) -> str:
    if algo == "crc32":
        return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"
    return hashlib.new(algo, data).hexdigest()


def verify_checksum(data: bytes, checksum: str, what: str, error: type[PrepareError] = PrepareError) -> str:
    """Raise error unless data matches checksum; return the normalised "algo:hex"."""
    algo, expected = parse_checksum(checksum)
    actual = compute_checksum(data, algo)
    if actual != expected:
        raise error(f"{what}: {algo} checksum mismatch (expected {expected}, got {actual}); refusing to use it")
    return f"{algo}:{expected}"


# ---------------------------------------------------------------- reading sources


def read_text_bytes(spec: DatasetSpec, path: Path, is_zip: bool, label: str) -> bytes:
    """The raw text bytes of a source file: the zip member, or the file itself."""
    if not is_zip:
        return path.read_bytes()
    if spec.archive_member is None:
        raise PrepareError(f"{label}: {spec.name} expects a plain text file, not a zip archive")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if spec.archive_member not in names:
                shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "") or "nothing"
                raise PrepareError(f"{label} has no member {spec.archive_member!r} (it contains: {shown})")
            # zipfile checks the member's CRC-32 as it reads, so corruption raises here.
            return archive.read(spec.archive_member)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
        raise PrepareError(f"{label} is not a readable zip archive: {exc}") from None


def read_local_source(spec: DatasetSpec, source: Path) -> tuple[bytes, dict]:
    """Read a user-given source (a .zip or the raw file); no checksum check yet."""
    if not source.is_file():
        raise SourceError(f"source {source} does not exist or is not a file")
    is_zip = source.suffix.lower() == ".zip"
    try:
        raw = read_text_bytes(spec, source, is_zip, label=str(source))
        # For a plain file the text is the file, so hash it in memory instead of re-reading.
        sha256 = sha256_file(source) if is_zip else hashlib.sha256(raw).hexdigest()
        size = source.stat().st_size
    except OSError as exc:
        raise SourceError(f"cannot read source {source}: {exc}") from None
    except PrepareError as exc:  # not a zip, no such member: the user's file is at fault
        raise SourceError(str(exc)) from None
    info = {
        "path": str(source.resolve()),
        "bytes": size,
        "sha256": sha256,
        "member": spec.archive_member if is_zip else None,
    }
    return raw, info


def check_local_source(spec: DatasetSpec, source: Path, raw: bytes, checksum: str | None, allow_nonstandard: bool) -> str | None:
    """Refuse a source that is not what its name says; return the verified "algo:hex" or None.

    A file named as the standard archive must be the standard size (unless
    allow_nonstandard); a standard-size file must match the checksum, whatever its name.
    """
    standard_size = len(raw) == spec.standard_size
    if not standard_size and source.name.lower() in spec.standard_names and not allow_nonstandard:
        raise SourceError(
            f"{source} is named as the standard {spec.name} file but is {len(raw):,} bytes, not {spec.standard_size:,}: "
            f"name a prefix as such (e.g. {spec.name}_prefix) or pass --allow_nonstandard"
        )
    # A prefix of the standard file cannot match its checksum; only check what can match.
    if checksum is not None or standard_size:
        return verify_checksum(raw, checksum or spec.checksum, str(source), error=SourceError)
    return None


def load_local_source(spec: DatasetSpec, source: Path, checksum: str | None, allow_nonstandard: bool) -> tuple[bytes, dict]:
    """Read and check a user-given source; raise SourceError if it is refused."""
    raw, info = read_local_source(spec, source)
    info["checksum"] = check_local_source(spec, source, raw, checksum, allow_nonstandard)
    info["allow_nonstandard"] = bool(allow_nonstandard)
    return raw, info


# ---------------------------------------------------------------- downloading


def _progress(total: int | None, label: str, log: Callable[[str], None]) -> tuple[Callable[[int], None], Callable[[], None]]:
    """Return (advance(n_bytes), close()): tqdm on a terminal, else a log line every ~10%."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, file=sys.stderr)
        return bar.update, bar.close

    # Without a terminal (CI, log files) a bar would spam; log coarse milestones instead.
    step = max(total // 10, 1) if total else 10 * CHUNK_BYTES
    state = {"done": 0, "next": step}

    def advance(n: int) -> None:
        state["done"] += n
        if state["done"] >= state["next"]:
            while state["next"] <= state["done"]:
                state["next"] += step
            pct = f" ({100 * state['done'] // total}%)" if total else ""
            log(f"  {label}: {state['done']:,} bytes{pct}")

    return advance, lambda: None


def download(url: str, dest: Path, log: Callable[[str], None]) -> int:
    """Stream url to dest; raise PrepareError on HTTP/connection errors or truncation."""
    import requests  # imported here so that importing this module stays cheap

    log(f"downloading {url}")
    try:
        with requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT_S) as response:
            response.raise_for_status()
            length = response.headers.get("Content-Length")
            # With a Content-Encoding, iter_content yields decoded bytes, which need not
            # add up to Content-Length; urllib3 still enforces the raw length itself.
            expected = int(length) if length and length.isdigit() and not response.headers.get("Content-Encoding") else None
            received = 0
            advance, close = _progress(expected, dest.name.removesuffix(".part"), log)
            try:
                with open(dest, "wb") as f:
                    for chunk in response.iter_content(chunk_size=CHUNK_BYTES):
                        f.write(chunk)
                        received += len(chunk)
                        advance(len(chunk))
            finally:
                close()
    except requests.exceptions.ChunkedEncodingError as exc:
        # urllib3 raises this when the connection closes before Content-Length bytes came.
        raise PrepareError(f"download of {url} is truncated (connection broken): {exc}") from None
    except requests.RequestException as exc:
        raise PrepareError(f"download of {url} failed: {exc}") from None
    except OSError as exc:
        raise PrepareError(f"cannot write {dest}: {exc}") from None
    if expected is not None and received != expected:
        raise PrepareError(f"download of {url} is truncated: got {received:,} of {expected:,} bytes")
    return received


def fetch_source(spec: DatasetSpec, out_dir: Path, url: str, checksum: str, log: Callable[[str], None]) -> tuple[bytes, dict]:
    """Download (or reuse the cached download of) url into out_dir and verify it.

    The download goes to ``<name>.part`` and is renamed to ``<name>`` only after the
    text checksum matched, so the cache never holds an unverified file.
    """
    name = Path(urlsplit(url).path).name or spec.local_names[0]
    is_zip = name.lower().endswith(".zip")
    final = out_dir / name
    part = out_dir / (name + ".part")

    def load_and_verify(path: Path) -> tuple[bytes, str]:
        raw = read_text_bytes(spec, path, is_zip, label=name)
        what = f"{name} member {spec.archive_member!r}" if is_zip else name
        return raw, verify_checksum(raw, checksum, what)

    raw = verified = None
    if final.is_file():
        try:
            raw, verified = load_and_verify(final)
            log(f"using cached {final} (checksum verified)")
        except PrepareError as exc:
            log(f"cached {final} is unusable ({exc}); downloading again")
            final.unlink()
    if raw is None:
        try:
            download(url, part, log)
            raw, verified = load_and_verify(part)
            os.replace(part, final)
        except BaseException:  # includes KeyboardInterrupt: never leave a .part behind
            part.unlink(missing_ok=True)
            raise
    info = {
        "url": url,
        "bytes": final.stat().st_size,
        "sha256": sha256_file(final) if is_zip else hashlib.sha256(raw).hexdigest(),
        "member": spec.archive_member if is_zip else None,
        "checksum": verified,
    }
    return raw, info


# ---------------------------------------------------------------- tokenising


def split_sizes(n: int, fractions: tuple[float, ...] | list[float]) -> list[int]:
    """Token counts per split: int(n * f) for all but the last, which takes the rest.

    This is nanoGPT's ``int(n*0.9)`` rule; for n = 100,000,000 and (0.9, 0.05, 0.05)
    it gives exactly 90M / 5M / 5M.
    """
    sizes = [int(n * f) for f in fractions[:-1]]
    sizes.append(n - sum(sizes))
    return sizes


def build_vocab_and_encode(text: str) -> tuple[list[str], np.ndarray]:
    """Return (chars, ids) with chars = sorted(set(text)) and ids as uint16."""
    try:
        # Every char < 256 (always true for latin-1 text): one byte per char, so a
        # 256-entry lookup table encodes 100 MB in a fraction of a second.
        byte_view = np.frombuffer(text.encode("latin-1"), dtype=np.uint8)
    except UnicodeEncodeError:
        chars = sorted(set(text))
        _check_vocab_fits(len(chars))
        stoi = {c: i for i, c in enumerate(chars)}
        return chars, np.array([stoi[c] for c in text], dtype=np.uint16)
    present = np.flatnonzero(np.bincount(byte_view, minlength=256))  # sorted byte values == sorted chars
    table = np.zeros(256, dtype=np.uint16)
    table[present] = np.arange(len(present), dtype=np.uint16)
    return [chr(b) for b in present], table[byte_view]


def _check_vocab_fits(vocab_size: int) -> None:
    assert vocab_size <= 65535, f"vocabulary of {vocab_size} does not fit uint16 token ids"


# ---------------------------------------------------------------- writing


def bin_outputs(ids: np.ndarray, names: list[str], sizes: list[int]) -> tuple[list[tuple[str, memoryview]], dict[str, str]]:
    """The (file name, bytes) of each split's .bin and the sha256 of those bytes."""
    bounds = np.cumsum([0] + sizes)
    outputs, digests = [], {}
    for i, name in enumerate(names):
        # One buffer both hashed and written, so the digest is of exactly the bytes on disk.
        data = memoryview(np.ascontiguousarray(ids[bounds[i] : bounds[i + 1]])).cast("B")
        digests[name] = hashlib.sha256(data).hexdigest()
        outputs.append((f"{name}.bin", data))
    return outputs, digests


# ---------------------------------------------------------------- public API


def prepare(
    dataset: str,
    out_dir: Path,
    source: Path | None = None,
    url: str | None = None,
    checksum: str | None = None,
    log: Callable[[str], None] = print,
    allow_nonstandard: bool = False,
) -> dict:
    """Prepare dataset into out_dir from source (a local file) or by download.

    checksum ("algo:hex" of the raw text) overrides the spec's. A download is always
    verified. A local source is verified when checksum is given or when it has the
    standard size; a source of another size is split in proportion, with a warning,
    but one named as the standard file (enwik8.zip, enwik8, ...) is refused unless
    allow_nonstandard. Returns the meta.json dict. Raises PrepareError on any failure
    (SourceError when the local source or an argument is at fault).
    """
    spec = get_spec(dataset)
    out_dir = Path(out_dir)
    if checksum is not None:
        parse_checksum(checksum)  # reject a malformed value before any work
    raw, source_info, label = obtain_raw(spec, out_dir, source, url, checksum, log, allow_nonstandard)
    warning = nonstandard_warning(spec, len(raw), label)
    if warning is not None:
        log(f"warning: {warning}")

    try:
        text = raw.decode(spec.encoding)
    except UnicodeDecodeError as exc:
        error = SourceError if source is not None else PrepareError
        raise error(f"{label} is not valid {spec.encoding} text: {exc}") from None
    del raw  # enwik8 is 100 MB; do not hold every copy at once

    chars, ids = build_vocab_and_encode(text)
    _check_vocab_fits(len(chars))
    names = [name for name, _ in spec.splits]
    sizes = split_sizes(len(ids), [f for _, f in spec.splits])
    outputs, bin_sha256 = bin_outputs(ids, names, sizes)
    meta = {
        "format_version": FORMAT_VERSION,
        "dataset": spec.name,
        "vocab_size": len(chars),
        "itos": {str(i): c for i, c in enumerate(chars)},  # JSON keys must be strings
        "stoi": {c: i for i, c in enumerate(chars)},
        "dtype": "uint16",
        "encoding": spec.encoding,
        "splits": dict(zip(names, sizes)),
        "bin_sha256": bin_sha256,
        "standard_split": warning is None,
        "warning": warning,
        "source": source_info,
    }
    write_prepared(out_dir, outputs, chars, meta)
    return meta


def obtain_raw(spec: DatasetSpec, out_dir: Path, source: Path | None, url: str | None, checksum: str | None,
               log: Callable[[str], None], allow_nonstandard: bool) -> tuple[bytes, dict, str]:
    """(raw text bytes, source record, label for messages): from the local source, else downloaded.
    out_dir is created only once a local source passed its checks (a refused source leaves no folder)."""
    if source is not None:
        source = Path(source)
        raw, source_info = load_local_source(spec, source, checksum, allow_nonstandard)
        make_out_dir(out_dir)
        return raw, source_info, source_info["member"] or source.name
    url = url or spec.url
    make_out_dir(out_dir)
    raw, source_info = fetch_source(spec, out_dir, url, checksum or spec.checksum, log)
    return raw, source_info, source_info["member"] or Path(urlsplit(url).path).name or url


def nonstandard_warning(spec: DatasetSpec, n_bytes: int, label: str) -> str | None:
    """The warning a source of other than the standard size gets (recorded in meta.json); None if standard."""
    if n_bytes == spec.standard_size:
        return None
    percents = "/".join(f"{100 * f:g}" for _, f in spec.splits)
    return (
        f"{label} is {n_bytes:,} bytes, not the standard {spec.standard_size:,}: "
        f"split {percents} in proportion; losses are not comparable with published results"
    )


def write_prepared(out_dir: Path, outputs: list, chars: list[str], meta: dict) -> None:
    """The .bin files, nanoGPT's meta.pkl and our meta.json, written as one (meta.json last: it marks the
    folder complete, and is removed first, so a crash leaves no mix of old and new files)."""
    itos = dict(enumerate(chars))
    nanogpt_meta = {"vocab_size": len(chars), "itos": itos, "stoi": {c: i for i, c in itos.items()}}
    outputs = outputs + [("meta.pkl", pickle.dumps(nanogpt_meta)),
                         ("meta.json", (json.dumps(meta, indent=1) + "\n").encode("ascii"))]
    try:
        atomic_write_files(out_dir, outputs, marker="meta.json")
    except OSError as exc:
        raise PrepareError(f"cannot write the prepared data to {out_dir}: {exc}") from None


def make_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrepareError(f"cannot create {out_dir}: {exc}") from None


def find_local_source(dataset: str, source_dir: Path) -> Path | None:
    """The first of spec.local_names found in source_dir/<dataset>/, then source_dir/."""
    spec = get_spec(dataset)
    source_dir = Path(source_dir)
    for folder in (source_dir / dataset, source_dir):
        for name in spec.local_names:
            if (folder / name).is_file():
                return folder / name
    return None


def is_prepared(dataset: str, out_dir: Path) -> bool:
    """True when out_dir holds a complete preparation of dataset (meta.json + every .bin)."""
    spec = get_spec(dataset)
    out_dir = Path(out_dir)
    try:
        meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
        splits = meta["splits"]
        if meta.get("format_version") != FORMAT_VERSION or meta.get("dataset") != spec.name:
            return False
        if list(splits) != [name for name, _ in spec.splits]:
            return False
        return all((out_dir / f"{name}.bin").stat().st_size == 2 * int(n) for name, n in splits.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _checksum_arg(value: str) -> str:
    try:
        parse_checksum(value)
    except PrepareError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def main(dataset: str, argv: list[str] | None = None) -> int:
    """CLI of data/<dataset>/prepare.py.

    Returns 0; 1 when a download or the disk fails; 2 when the arguments or the
    user's own source file are at fault (one ``error:`` line on stderr).
    """
    spec = get_spec(dataset)
    default_out = Path(__file__).resolve().parent / dataset  # beside that dataset's prepare.py
    parser = argparse.ArgumentParser(
        prog=f"data/{dataset}/prepare.py",
        description=f"Prepare {dataset} (train/val{'/test' if len(spec.splits) > 2 else ''} .bin files, meta.pkl, meta.json).",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--source", type=Path, help="local source file: a .zip or the raw text (no download)")
    where.add_argument("--source_dir", type=Path, help=f"folder to search for {', '.join(spec.local_names)} (also in <DIR>/{dataset}/)")
    where.add_argument("--url", help=f"download from this mirror instead of {spec.url}")
    parser.add_argument("--out_dir", type=Path, default=default_out, help=f"output folder (default: {default_out})")
    parser.add_argument("--checksum", type=_checksum_arg, help=f"expected algo:hex of the raw text (default for the standard file: {spec.checksum})")
    parser.add_argument(
        "--allow_nonstandard",
        action="store_true",
        help=f"accept a source named as the standard file ({', '.join(spec.standard_names) or 'none for this dataset'}) "
        "that is not the standard size: split in proportion, with a warning (a file named otherwise, e.g. "
        f"{spec.name}_prefix, needs no flag)",
    )
    args = parser.parse_args(argv)

    try:
        source = args.source
        if args.source_dir is not None:
            source = find_local_source(dataset, args.source_dir)
            if source is None:
                raise SourceError(f"no {dataset} source in {args.source_dir} or {args.source_dir / dataset} (looked for {', '.join(spec.local_names)})")
        meta = prepare(dataset, args.out_dir, source=source, url=args.url, checksum=args.checksum, allow_nonstandard=args.allow_nonstandard)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; nothing partial was left behind", file=sys.stderr)
        return 1

    counts = ", ".join(f"{name} {n:,}" for name, n in meta["splits"].items())
    split_kind = "standard split" if meta["standard_split"] else "NOT the standard split (see the warning above)"
    print(f"prepared {dataset} in {args.out_dir}: {counts} tokens; vocab {meta['vocab_size']}; {split_kind}")
    return 0
