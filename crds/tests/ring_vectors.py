#!/usr/bin/env python3
"""Independent reference for the ring's test vectors (see crds/src/ring.rs, "Test vectors").

The vectors asserted in `crds/src/ring/tests.rs` were produced by this script, not by the crate
under test: the key hash comes from the C reference library (libxxhash, `XXH3_64bits`, through
ctypes) and the jump hash is Lamping & Veach's C++ function transcribed line by line. A client
in another language can port `jump()` below and check itself against the same table.

Run: python3 crds/tests/ring_vectors.py   (needs Debian's libxxhash0)
"""
import ctypes
import ctypes.util

_lib = ctypes.CDLL(ctypes.util.find_library("xxhash") or "libxxhash.so.0")
_lib.XXH3_64bits.restype = ctypes.c_uint64
_lib.XXH3_64bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]

MASK64 = (1 << 64) - 1


def xxh3_64(key: bytes) -> int:
    return _lib.XXH3_64bits(key, len(key))


def jump(key: int, n: int) -> int:
    b, j = -1, 0
    while j < n:
        b = j
        key = (key * 2862933555777941757 + 1) & MASK64
        # Python floats are IEEE-754 doubles and int() truncates toward zero, as C's cast does.
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


KEYS = [
    b"",
    b"a",
    b"foo",
    b"key:1",
    b"key:2",
    b"user:42",
    b"hello world",
    b"image:cat.jpg",
    "ключ-😀".encode("utf-8"),
    b"\x00\xff\x7f\x80\r\n \x00",
    b"session:0123456789abcdef0123456789abcdef",
    (b"abcdefghijklmnopqrstuvwxyz" * 8)[:200],
    b"0123456789" * 25,
]
SIZES = [1, 2, 3, 8, 100]

if __name__ == "__main__":
    for key in KEYS:
        h = xxh3_64(key)
        owners = ", ".join(str(jump(h, n)) for n in SIZES)
        print(f"len {len(key):3}  0x{h:016x}  [{owners}]  {key[:24]!r}")
    for key, n in [(0, 60), (1, 60), (2, 60), (MASK64, 1000), (0xDEADBEEF, 2**32 - 1)]:
        print(f"jump(0x{key:x}, {n}) = {jump(key, n)}")
