"""Which GPU architectures a built extension carries, read from its ``.nv_fatbin`` ELF section (a test and CI
helper: not part of the wheel).

``cuobjdump --list-elf`` answers the same question but ships only with a full toolkit (or the
``nvidia-cuda-cuobjdump`` wheel); this reader needs nothing, so tests and ``.ci/build_ext.sh`` can always check
that the sm_80 and sm_90 cubins and the PTX are really there. Layout (stable since CUDA 4): the section holds
fatbins, each a 16-byte header ``(u32 magic 0xBA55ED50, u16 version, u16 header_size, u64 payload_size)``
followed by entries ``(u16 kind: 1 PTX / 2 ELF, u16 version, u32 header_size, u64 payload_size, …, u32 arch at
byte 28)``; payloads may be compressed, the entry headers never are.
"""

from __future__ import annotations

import struct
from pathlib import Path

_FATBIN_MAGIC = 0xBA55ED50
_KIND_PTX, _KIND_ELF = 1, 2


def _section(data: bytes, wanted: str) -> bytes:
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not a 64-bit ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_offset = headers[shstrndx][4]
    for name_index, _type, _flags, _addr, offset, size, *_ in headers:
        start = names_offset + name_index
        if data[start : data.index(b"\0", start)].decode() == wanted:
            return data[offset : offset + size]
    return b""


def list_archs(path: str | Path) -> dict[str, list[int]]:
    """{"elf": sorted cubin archs (e.g. [80, 90]), "ptx": sorted PTX archs (e.g. [90])} of a shared object."""
    section = _section(Path(path).read_bytes(), ".nv_fatbin")
    found = {_KIND_ELF: set(), _KIND_PTX: set()}
    offset = 0
    while offset + 16 <= len(section):
        magic, _version, header_size, size = struct.unpack_from("<IHHQ", section, offset)
        if magic != _FATBIN_MAGIC:  # fatbins are 8-byte aligned; skip padding between them
            offset += 8
            continue
        entry, end = offset + header_size, offset + header_size + size
        while entry < end:
            kind, _entry_version, entry_header_size, payload_size = struct.unpack_from("<HHIQ", section, entry)
            (arch,) = struct.unpack_from("<I", section, entry + 28)
            if kind in found:
                found[kind].add(arch)
            entry += entry_header_size + payload_size
        offset = end
    return {"elf": sorted(found[_KIND_ELF]), "ptx": sorted(found[_KIND_PTX])}
