"""The `zipnn` package as a codec, tensor by tensor inside safetensors files.

zipnn 0.5.4's byte-input mode does not restore bf16/fp32 bit-exactly (it leaves the sign bit
rotated), so we hand it torch tensors, whose path round-trips; our container checks sha256 anyway.
"""

from __future__ import annotations

from typing import Any

from forge.compress.byteplanes import SegmentedCodec

_TORCH_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


class ZipnnCodec(SegmentedCodec):
    name = "zipnn"

    def _zipnn(self):
        from zipnn import ZipNN

        # threads=1: throughput is measured per core, like the other codecs.
        return ZipNN(input_format="torch", threads=1, zstd_level=self.level)

    def _encode_tensor(self, data: memoryview, dtype: str) -> tuple[dict[str, Any], list[bytes]]:
        import torch

        if dtype not in _TORCH_DTYPES:  # F64: zipnn has no mode for it
            from forge.compress.codecs import zstd_compress

            return {"kind": "raw-float"}, [zstd_compress(data, self.level)]
        tensor = torch.frombuffer(bytearray(data), dtype=getattr(torch, _TORCH_DTYPES[dtype]))
        return {"kind": "zipnn"}, [bytes(self._zipnn().compress(tensor))]

    def _decode_tensor(self, seg: dict[str, Any], parts: list[memoryview]) -> bytes:
        if seg["kind"] == "raw-float":
            from forge.compress.codecs import zstd_decompress

            return zstd_decompress(parts[0], seg["size"])
        import torch

        tensor = self._zipnn().decompress(bytes(parts[0]))
        return tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
