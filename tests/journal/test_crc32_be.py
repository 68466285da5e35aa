"""The v1 transaction checksum (crc32_be) against the published CRC-32/MPEG-2 check
value: polynomial 0x04C11DB7, MSB first, initial ~0, no final inversion — the kernel's
crc32_be(~0, ...). No tool here writes v1-checksummed journals any more (kernels set
csum v3 or nothing), so this is the one real-data check of that path."""

from ext4box.ext4.journal.commit import crc32_be


def test_crc32_mpeg2_check_value() -> None:
    assert crc32_be(0xFFFFFFFF, b"123456789") == 0x0376E6E7


def test_crc32_be_chains() -> None:
    whole = crc32_be(0xFFFFFFFF, b"journal descriptor and data")
    assert crc32_be(crc32_be(0xFFFFFFFF, b"journal descr"), b"iptor and data") == whole
