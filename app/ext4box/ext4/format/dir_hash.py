"""The htree hash of a file name: which part of an indexed directory holds it.

ext4 hashes a name to a 32-bit *major* hash (bit 0 always clear: the index
uses it as the "collision continues in the next leaf" flag) and a 32-bit
*minor* hash. Three algorithms exist on disk: the original "legacy" mixer,
a half-round MD4 and TEA (siphash only for casefolded names, refused here).

Each comes in a signed and an unsigned flavour because early kernels fed the
name bytes through `char`, which is signed on x86 and unsigned on ARM/PPC.
Superblock flags record which one the filesystem was created with; hash
versions 0..2 are the signed ones and 3..5 the unsigned twins. Only names with
bytes >= 0x80 hash differently.

All arithmetic is modulo 2**32, written out with explicit masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

from ext4box.ext4.format.errors import Corrupt, Unsupported

DX_HASH_LEGACY = 0
DX_HASH_HALF_MD4 = 1
DX_HASH_TEA = 2
DX_HASH_LEGACY_UNSIGNED = 3
DX_HASH_HALF_MD4_UNSIGNED = 4
DX_HASH_TEA_UNSIGNED = 5
DX_HASH_SIPHASH = 6

# Offset between a signed hash version and its unsigned twin.
UNSIGNED_DELTA = 3

# Superblock s_flags bits saying which char signedness the hash uses.
EXT2_FLAGS_SIGNED_HASH = 0x0001
EXT2_FLAGS_UNSIGNED_HASH = 0x0002

HASH_NAMES = {
    DX_HASH_LEGACY: "legacy",
    DX_HASH_HALF_MD4: "half_md4",
    DX_HASH_TEA: "tea",
    DX_HASH_LEGACY_UNSIGNED: "legacy_unsigned",
    DX_HASH_HALF_MD4_UNSIGNED: "half_md4_unsigned",
    DX_HASH_TEA_UNSIGNED: "tea_unsigned",
    DX_HASH_SIPHASH: "siphash",
}

_M32 = 0xFFFFFFFF
# The MD4 initial state; also the state used when the superblock seed is all zero.
DEFAULT_SEED = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
# The largest major hash readdir may hand out; a name hashing to the
# end-of-directory marker is moved just below it.
_EOF_MAJOR = 0x7FFFFFFF << 1


def _char_values(name: bytes, signed: bool) -> Sequence[int]:
    """Name bytes as the C code sees them: -128..127 when `char` is signed."""
    if not signed:
        return name
    return [b - 256 if b >= 0x80 else b for b in name]


def _legacy(chars: Sequence[int]) -> int:
    """The original ext3 mixer; it has no seed and no minor hash."""
    cur, prev = 0x12A3FE2D, 0x37ABE8F9
    for c in chars:
        mixed = (prev + (cur ^ ((c * 7152373) & _M32))) & _M32
        if mixed & 0x80000000:
            mixed = (mixed - 0x7FFFFFFF) & _M32
        prev, cur = cur, mixed
    return (cur << 1) & _M32


def _hash_words(chars: Sequence[int], words: int) -> list[int]:
    """Pack up to `words`*4 chars big-endian-ish into words, padded with the length.

    The padding word repeats the low byte of the *remaining* length, so the
    same prefix at a different name length hashes differently.
    """
    length = len(chars)
    pad = (length | (length << 8)) & 0xFFFF
    pad |= pad << 16
    out: list[int] = []
    val = pad
    for i, c in enumerate(chars[: words * 4]):
        val = (c + (val << 8)) & _M32
        if i % 4 == 3:
            out.append(val)
            val = pad
    if len(out) < words and len(chars) < words * 4:
        out.append(val)
    out.extend([pad] * (words - len(out)))
    return out


def _rol32(x: int, s: int) -> int:
    return ((x << s) | (x >> (32 - s))) & _M32


# Half-MD4: the three MD4 rounds over 8 words instead of 16. Each step is
# (round function, word index, shift); the add constant depends on the round.
_MD4_K2 = 0x5A827999
_MD4_K3 = 0x6ED9EBA1
_MD4_ROUND1 = ((0, 3), (1, 7), (2, 11), (3, 19), (4, 3), (5, 7), (6, 11), (7, 19))
_MD4_ROUND2 = ((1, 3), (3, 5), (5, 9), (7, 13), (0, 3), (2, 5), (4, 9), (6, 13))
_MD4_ROUND3 = ((3, 3), (7, 9), (2, 11), (6, 15), (1, 3), (5, 9), (0, 11), (4, 15))


def _md4_f(x: int, y: int, z: int) -> int:
    return z ^ (x & (y ^ z))


def _md4_g(x: int, y: int, z: int) -> int:
    return ((x & y) + ((x ^ y) & z)) & _M32


def _md4_h(x: int, y: int, z: int) -> int:
    return x ^ y ^ z


_MD4_ROUNDS: tuple[tuple[Callable[[int, int, int], int], int, tuple[tuple[int, int], ...]], ...] = (
    (_md4_f, 0, _MD4_ROUND1),
    (_md4_g, _MD4_K2, _MD4_ROUND2),
    (_md4_h, _MD4_K3, _MD4_ROUND3),
)


def _half_md4_transform(state: list[int], block: list[int]) -> None:
    # Registers rotate roles every step: a, d, c, b, a, d, ...
    regs = list(state)
    for func, const, steps in _MD4_ROUNDS:
        for step, (word, shift) in enumerate(steps):
            t = (-step) % 4  # index of the register being updated
            a, b, c, d = regs[t], regs[(t + 1) % 4], regs[(t + 2) % 4], regs[(t + 3) % 4]
            a = (a + func(b, c, d) + block[word] + const) & _M32
            regs[t] = _rol32(a, shift)
    for i in range(4):
        state[i] = (state[i] + regs[i]) & _M32


_TEA_DELTA = 0x9E3779B9


def _tea_transform(state: list[int], block: list[int]) -> None:
    total = 0
    b0, b1 = state[0], state[1]
    a, b, c, d = block
    for _ in range(16):
        total = (total + _TEA_DELTA) & _M32
        b0 = (b0 + ((((b1 << 4) + a) & _M32) ^ ((b1 + total) & _M32) ^ ((b1 >> 5) + b))) & _M32
        b1 = (b1 + ((((b0 << 4) + c) & _M32) ^ ((b0 + total) & _M32) ^ ((b0 >> 5) + d))) & _M32
    state[0] = (state[0] + b0) & _M32
    state[1] = (state[1] + b1) & _M32


def _chunked(
    chars: Sequence[int],
    seed: tuple[int, int, int, int] | None,
    chunk: int,
    transform: Callable[[list[int], list[int]], None],
) -> list[int]:
    state = list(seed) if seed is not None and any(seed) else list(DEFAULT_SEED)
    # ext4 hashes the name in chunks; each chunk's padding uses the bytes still
    # left from that point, not the whole length.
    for start in range(0, len(chars), chunk):
        transform(state, _hash_words(chars[start:], chunk // 4))
    return state


# A create hashes its name three times or more (the EEXIST search, the insert,
# the FUSE lookup before it) and each half-MD4 costs tens of µs in Python.
# Entries are ~200 bytes; the hash is a pure function of the key, so a hit is
# exactly what computing it again would give (errors are never cached).
_HASH_MEMO_ENTRIES = 4096


def dx_hash(
    name: bytes,
    version: int,
    seed: tuple[int, int, int, int] | None,
    unsigned: bool = False,
) -> tuple[int, int]:
    """(major, minor) htree hash of `name`.

    `version` is 0..5 (3..5 = unsigned variants); `unsigned=True` maps a signed
    version 0..2 to its unsigned twin, the way the kernel applies the
    superblock's unsigned-hash flag to the version stored in a dx_root.
    """
    if type(name) is bytes and (seed is None or type(seed) is tuple):
        return _dx_hash_memo(name, version, seed, unsigned)
    return _dx_hash(name, version, seed, unsigned)


def _dx_hash(
    name: bytes,
    version: int,
    seed: tuple[int, int, int, int] | None,
    unsigned: bool,
) -> tuple[int, int]:
    if unsigned and version in (DX_HASH_LEGACY, DX_HASH_HALF_MD4, DX_HASH_TEA):
        version += UNSIGNED_DELTA
    if version == DX_HASH_SIPHASH:
        raise Unsupported("siphash directory hash", "", "casefolded directories")
    if version not in HASH_NAMES:
        raise Corrupt("directory hash version", "htree", f"unknown hash version {version}")
    signed = version < UNSIGNED_DELTA
    base = version % UNSIGNED_DELTA
    if len(name) == 0 or len(name) > 255:
        raise ValueError(f"name length {len(name)} out of 1..255")
    chars = _char_values(name, signed)
    if base == DX_HASH_LEGACY:
        major, minor = _legacy(chars), 0
    elif base == DX_HASH_HALF_MD4:
        state = _chunked(chars, seed, 32, _half_md4_transform)
        major, minor = state[1], state[2]
    else:
        state = _chunked(chars, seed, 16, _tea_transform)
        major, minor = state[0], state[1]
    major &= ~1 & _M32
    if major == _EOF_MAJOR:
        major = (0x7FFFFFFF - 1) << 1
    return major, minor


_dx_hash_memo = lru_cache(maxsize=_HASH_MEMO_ENTRIES)(_dx_hash)


def hash_seed_words(raw: bytes) -> tuple[int, int, int, int]:
    """s_hash_seed (16 bytes on disk) as the four little-endian words the hash uses."""
    if len(raw) != 16:
        raise ValueError("s_hash_seed is 16 bytes")
    return (
        int.from_bytes(raw[0:4], "little"),
        int.from_bytes(raw[4:8], "little"),
        int.from_bytes(raw[8:12], "little"),
        int.from_bytes(raw[12:16], "little"),
    )
