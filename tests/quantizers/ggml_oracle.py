"""llama.cpp's own quantizer and dequantizer through ctypes: the oracle our codecs are checked by.

Loads libggml-base from the llama_cpp package (llama-cpp-python) and calls `ggml_quantize_chunk`
(what llama-quantize runs per tensor) and the `to_float` of `ggml_get_type_traits`. The ctypes
pattern of gguf-py's own tests (gguf-py/tests/test_quants.py).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
from numpy.typing import NDArray


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml/include/ggml.h (llama-cpp-python 0.3.36)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class Ggml:
    def __init__(self, llama_cpp_module) -> None:
        lib_dir = Path(llama_cpp_module.__file__).parent / "lib"
        self.lib = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
        q = self.lib.ggml_quantize_chunk
        q.restype = ctypes.c_size_t
        q.argtypes = (
            [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
            + [ctypes.c_int64] * 3
            + [ctypes.c_void_p]
        )
        self.lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        self.lib.ggml_get_type_traits.argtypes = [ctypes.c_int]

    @staticmethod
    def _type(name: str) -> gguf.GGMLQuantizationType:
        return gguf.GGMLQuantizationType[name.upper()]

    def quantize(
        self, name: str, x: NDArray[np.float32], importance: NDArray[np.float32] | None = None
    ) -> NDArray[np.uint8]:
        """`ggml_quantize_chunk(type, x, dst, 0, rows, cols, imatrix)`: (rows, cols) -> bytes."""
        qtype = self._type(name)
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        out = np.zeros((rows, cols // block_size * type_size), np.uint8)
        qw = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
        n = self.lib.ggml_quantize_chunk(
            int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, cols,
            None if qw is None else qw.ctypes.data,
        )  # fmt: skip
        assert n == out.nbytes, (n, out.nbytes)
        return out

    def dequantize(self, name: str, data: NDArray[np.uint8], n: int) -> NDArray[np.float32]:
        """The type's `to_float` (dequantize_row_*) over n weights."""
        traits = self.lib.ggml_get_type_traits(int(self._type(name))).contents
        src = np.ascontiguousarray(data, dtype=np.uint8)
        if not traits.to_float:  # f32 has none: its bytes are the floats
            return src.view(np.float32).reshape(n).copy()
        out = np.zeros(n, np.float32)
        _TO_FLOAT(traits.to_float)(
            src.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n
        )
        return out
