"""Byte-plane grouping + zstd for safetensors weights.

Float weights compress badly as a byte stream because exponent and mantissa bytes interleave.
Splitting each tensor into byte planes (plane i = byte i of every element) groups the
low-entropy exponent bytes together, so zstd finds their redundancy. For bf16 and fp32 we also
rotate each element left by one bit first, which moves the sign bit out of the top byte: that
byte then holds exactly the 8 exponent bits (the idea behind ZipNN's bit reordering).
The safetensors header, padding and non-float tensors go through plain zstd.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from forge.compress.codecs import Codec, LosslessError, zstd_compress, zstd_decompress

# safetensors dtype -> (bytes per element, rotate the sign bit out of the exponent byte?)
FLOAT_DTYPES: dict[str, tuple[int, bool]] = {
    "BF16": (2, True),
    "F16": (2, False),  # 5-bit exponent: no rotation aligns it to a byte
    "F32": (4, True),
    "F64": (8, False),
}
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    dtype: str | None  # a FLOAT_DTYPES key for float tensor data, None for raw bytes


def split_safetensors(data: memoryview) -> list[Segment]:
    """Cover the file with segments: float tensors by dtype, everything else raw.

    A file that is not a well-formed safetensors file is one raw segment (still lossless).
    """
    n = len(data)
    if n < 8:
        return [Segment(0, n, None)] if n else []
    (hlen,) = struct.unpack_from("<Q", data, 0)
    if hlen > n - 8:
        return [Segment(0, n, None)]
    try:
        header = json.loads(bytes(data[8 : 8 + hlen]))
        base = 8 + hlen
        spans = sorted(
            (base + int(t["data_offsets"][0]), base + int(t["data_offsets"][1]), str(t["dtype"]))
            for k, t in header.items() if k != "__metadata__"
        )
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return [Segment(0, n, None)]
    segments: list[Segment] = []
    pos = 0
    for start, end, dtype in spans:
        if start < pos or end > n or end < start:  # overlapping/out of range: not a file we trust
            return [Segment(0, n, None)]
        width = FLOAT_DTYPES.get(dtype, (0, False))[0]
        if width and end > start and (end - start) % width == 0:
            if start > pos:
                segments.append(Segment(pos, start, None))
            segments.append(Segment(start, end, dtype))
            pos = end
    if pos < n:
        segments.append(Segment(pos, n, None))
    return _merge_raw(segments)


def _merge_raw(segments: list[Segment]) -> list[Segment]:
    """Adjacent raw segments (header + int tensors) compress better as one zstd stream."""
    out: list[Segment] = []
    for s in segments:
        if out and out[-1].dtype is None and s.dtype is None and out[-1].end == s.start:
            out[-1] = Segment(out[-1].start, s.end, None)
        else:
            out.append(s)
    return out


def to_planes(data: memoryview, dtype: str) -> list[np.ndarray]:
    width, rotate = FLOAT_DTYPES[dtype]
    words = np.frombuffer(data, dtype=_UINT[width])
    if rotate:
        bits = width * 8
        words = (words << 1) | (words >> (bits - 1))
    as_bytes = words.view(np.uint8).reshape(-1, width)
    return [np.ascontiguousarray(as_bytes[:, i]) for i in range(width)]


def from_planes(planes: list[bytes], dtype: str) -> bytes:
    width, rotate = FLOAT_DTYPES[dtype]
    count = len(planes[0])
    out = np.empty((count, width), dtype=np.uint8)
    for i, plane in enumerate(planes):
        if len(plane) != count:
            raise LosslessError(f"byte plane {i} of a {dtype} tensor has {len(plane)} bytes, not {count}")
        out[:, i] = np.frombuffer(plane, dtype=np.uint8)
    if not rotate:
        return out.tobytes()
    words = out.view(_UINT[width]).reshape(-1)
    bits = width * 8
    return ((words >> 1) | (words << (bits - 1))).tobytes()


class SegmentedCodec(Codec):
    """Shared container for safetensors-aware codecs: one list of parts per segment."""

    def _encode_tensor(self, data: memoryview, dtype: str) -> tuple[dict[str, Any], list[bytes]]:
        raise NotImplementedError

    def _decode_tensor(self, seg: dict[str, Any], parts: list[memoryview]) -> bytes:
        raise NotImplementedError

    def _encode(self, data: memoryview) -> tuple[dict[str, Any], list[bytes]]:
        index: list[dict[str, Any]] = []
        blobs: list[bytes] = []
        for seg in split_safetensors(data):
            chunk = data[seg.start : seg.end]
            if seg.dtype is None:
                entry, parts = {"kind": "raw"}, [zstd_compress(chunk, self.level)]
            else:
                entry, parts = self._encode_tensor(chunk, seg.dtype)
                entry["dtype"] = seg.dtype
            entry.update(size=seg.end - seg.start, parts=[len(p) for p in parts])
            index.append(entry)
            blobs.extend(parts)
        return {"level": self.level, "segments": index}, blobs

    def _decode(self, meta: dict[str, Any], payload: memoryview) -> bytes:
        out: list[bytes] = []
        pos = 0
        for seg in meta["segments"]:
            parts = []
            for length in seg["parts"]:
                if pos + length > len(payload):
                    raise LosslessError("payload is shorter than its index says: the blob is truncated")
                parts.append(payload[pos : pos + length])
                pos += length
            if seg["kind"] == "raw":
                out.append(zstd_decompress(parts[0], seg["size"]))
            else:
                out.append(self._decode_tensor(seg, parts))
        if pos != len(payload):
            raise LosslessError(f"{len(payload) - pos} unexpected trailing bytes after the last segment")
        return b"".join(out)


class ByteplaneZstdCodec(SegmentedCodec):
    name = "byteplane-zstd"

    def _encode_tensor(self, data: memoryview, dtype: str) -> tuple[dict[str, Any], list[bytes]]:
        return {"kind": "planes"}, [zstd_compress(p, self.level) for p in to_planes(data, dtype)]

    def _decode_tensor(self, seg: dict[str, Any], parts: list[memoryview]) -> bytes:
        count = seg["size"] // FLOAT_DTYPES[seg["dtype"]][0]
        return from_planes([zstd_decompress(p, count) for p in parts], seg["dtype"])
