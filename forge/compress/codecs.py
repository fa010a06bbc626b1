"""Lossless codecs: a codec is a class with compress(bytes) -> bytes and decompress(bytes) -> bytes
plus a registry entry (RouteLLM style).

Every blob is self-describing: a small container header names the codec and carries the original
size and sha256, so decompression of a corrupted or mismatched blob fails with a clear error
instead of returning wrong bytes.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import struct
from typing import Any, ClassVar

import zstandard

MAGIC = b"FGLZ"
VERSION = 1

# name -> "module:Class"; imported lazily so zipnn (and torch) load only when that codec is used.
REGISTRY: dict[str, str] = {
    "zstd": "forge.compress.codecs:ZstdCodec",
    "byteplane-zstd": "forge.compress.byteplanes:ByteplaneZstdCodec",
    "zipnn": "forge.compress.zipnn_codec:ZipnnCodec",
}


class LosslessError(ValueError):
    """A blob that cannot be decoded back to its exact original bytes."""


class Codec:
    """Base class: subclasses implement _encode/_decode; the container framing and checks live here."""

    name: ClassVar[str]

    def __init__(self, level: int = 19, dictionary: bytes | None = None) -> None:
        self.level = level
        self.dictionary = dictionary

    def _encode(self, data: memoryview) -> tuple[dict[str, Any], list[bytes]]:
        raise NotImplementedError

    def _decode(self, meta: dict[str, Any], payload: memoryview) -> bytes:
        raise NotImplementedError

    def compress(self, data: bytes) -> bytes:
        mv = memoryview(data).cast("B")
        meta, parts = self._encode(mv)
        name = self.name.encode()
        # Binary size + sha256 and JSON only for codec details: small files must not pay much header.
        meta_b = json.dumps(meta, separators=(",", ":")).encode() if meta else b""
        head = b"".join([MAGIC, struct.pack("<BB", VERSION, len(name)), name,
                         struct.pack("<Q", len(mv)), hashlib.sha256(mv).digest(),
                         struct.pack("<I", len(meta_b)), meta_b])
        return b"".join([head, *parts])

    def decompress(self, blob: bytes) -> bytes:
        name, meta, payload = parse_container(blob)
        if name != self.name:
            raise LosslessError(f"blob was written by codec {name!r}, not {self.name!r}")
        try:
            data = self._decode(meta, payload)
        except LosslessError:
            raise
        except Exception as e:  # zstd/zipnn errors on damaged payloads: say what failed
            raise LosslessError(f"codec {self.name!r} could not decode the blob: {type(e).__name__}: {e}") \
                from e
        if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise LosslessError(
                f"codec {self.name!r}: decoded {len(data)} bytes whose sha256 does not match the original "
                f"({meta['size']} bytes, sha256 {meta['sha256'][:16]}...): the blob is corrupted"
            )
        return data


def parse_container(blob: bytes) -> tuple[str, dict[str, Any], memoryview]:
    mv = memoryview(blob).cast("B")
    if len(mv) < 10 or bytes(mv[:4]) != MAGIC:
        raise LosslessError("not a Forge lossless blob (bad magic): the file is not ours or is truncated")
    version, name_len = struct.unpack_from("<BB", mv, 4)
    if version != VERSION:
        raise LosslessError(f"unsupported lossless container version {version} (this code reads {VERSION})")
    pos = 6 + name_len
    try:
        name = bytes(mv[6:pos]).decode()
        (size,) = struct.unpack_from("<Q", mv, pos)
        digest = bytes(mv[pos + 8 : pos + 40])
        (meta_len,) = struct.unpack_from("<I", mv, pos + 40)
        pos += 44
        meta = json.loads(bytes(mv[pos : pos + meta_len])) if meta_len else {}
    except (UnicodeDecodeError, struct.error, json.JSONDecodeError) as e:
        raise LosslessError(f"damaged lossless container header: {e}") from e
    if not isinstance(meta, dict) or len(digest) != 32 or pos + meta_len > len(mv):
        raise LosslessError("damaged lossless container header")
    meta.update(size=size, sha256=digest.hex())
    return name, meta, mv[pos + meta_len :]


def get_codec(name: str, level: int = 19, dictionary: bytes | None = None) -> Codec:
    if name not in REGISTRY:
        raise KeyError(f"unknown lossless codec {name!r}; known: {sorted(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(level=level, dictionary=dictionary)


def decompress_blob(blob: bytes, dictionary: bytes | None = None) -> bytes:
    """Decode any Forge blob: the container names its codec."""
    name, _, _ = parse_container(blob)
    return get_codec(name, dictionary=dictionary).decompress(blob)


def zstd_compress(data: bytes | memoryview, level: int, dictionary: bytes | None = None) -> bytes:
    # threads=0 (the default): one thread, so measured throughput is per core.
    zdict = zstandard.ZstdCompressionDict(dictionary) if dictionary else None
    return zstandard.ZstdCompressor(level=level, dict_data=zdict, write_checksum=False).compress(data)


def zstd_decompress(data: bytes | memoryview, size: int, dictionary: bytes | None = None) -> bytes:
    zdict = zstandard.ZstdCompressionDict(dictionary) if dictionary else None
    return zstandard.ZstdDecompressor(dict_data=zdict).decompress(data, max_output_size=size)


class ZstdCodec(Codec):
    """Plain zstd over the whole file, optionally with a trained dictionary."""

    name = "zstd"

    def _encode(self, data: memoryview) -> tuple[dict[str, Any], list[bytes]]:
        meta: dict[str, Any] = {}
        if self.dictionary:  # a fingerprint, so a wrong or missing dictionary fails by name
            meta["dict"] = hashlib.sha256(self.dictionary).hexdigest()[:16]
        return meta, [zstd_compress(data, self.level, self.dictionary)]

    def _decode(self, meta: dict[str, Any], payload: memoryview) -> bytes:
        want = meta.get("dict")
        if want and (not self.dictionary or hashlib.sha256(self.dictionary).hexdigest()[:16] != want):
            raise LosslessError(
                f"this blob needs the zstd dictionary whose sha256 starts {want}; "
                + ("none was given" if not self.dictionary else "a different one was given")
            )
        return zstd_decompress(payload, meta["size"], self.dictionary if want else None)
