"""A fuzz input as bytes: which seed image, whether to re-seal checksums, which edits.

Layout (little endian): byte 0 picks the seed image, byte 1 bit 0 asks for
checksums to be recomputed after the edits, then 13-byte records
(u16 region, u16 offset, u8 op, u64 value) — see regions.Mutation. Any byte
string decodes to a valid program, so a coverage-guided fuzzer can mutate it
freely, and a reproducer is a few dozen bytes instead of a whole image.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from fuzz.journal_walk import journal_device_blocks
from fuzz.regions import Mutation, Region, apply_mutations, metadata_regions, reseal

_RECORD = struct.Struct("<HHBQ")
MAX_MUTATIONS = 16


@dataclass(frozen=True, slots=True)
class Program:
    seed: int
    reseal: bool
    mutations: tuple[Mutation, ...]

    def encode(self) -> bytes:
        out = bytearray([self.seed & 0xFF, int(self.reseal)])
        for m in self.mutations:
            out += _RECORD.pack(m.region & 0xFFFF, m.offset & 0xFFFF, m.op & 0xFF,
                                m.value & 0xFFFFFFFFFFFFFFFF)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> Program:
        if len(data) < 2:
            return cls(data[0] if data else 0, False, ())
        mutations = []
        for start in range(2, len(data) - _RECORD.size + 1, _RECORD.size):
            region, offset, op, value = _RECORD.unpack_from(data, start)
            mutations.append(Mutation(region, offset, op, value))
            if len(mutations) == MAX_MUTATIONS:
                break
        return cls(data[0], bool(data[1] & 1), tuple(mutations))


@dataclass(frozen=True, slots=True)
class Seed:
    name: str
    image: bytes
    block_size: int
    regions: list[Region]
    journal: tuple[int, ...] = ()  # device block of each journal block (for resealing)


def load_seeds(paths: dict[str, Path]) -> list[Seed]:
    seeds = []
    for name, path in sorted(paths.items()):
        image = path.read_bytes()
        block_size = 1024 << int.from_bytes(image[1024 + 24 : 1024 + 28], "little")
        seeds.append(Seed(name, image, block_size, metadata_regions(image),
                          journal_device_blocks(image)))
    return seeds


def materialise(seeds: list[Seed], program: Program) -> bytearray:
    """The mutated image a program describes."""
    seed = seeds[program.seed % len(seeds)]
    image = bytearray(seed.image)
    touched = apply_mutations(image, seed.regions, list(program.mutations), seed.block_size)
    if program.reseal:
        reseal(image, touched, seed.journal, seed.block_size)
    return image
