#!/usr/bin/env python3
"""Seeds for the parser fuzz targets, cut from the committed fixtures.

Usage: seed-parsers.py FIXTURE... (writes corpus/<target>/ under the current directory).
Input layouts are the ones documented at the top of each fuzz_targets/<target>.rs.
"""
import os
import struct
import sys

MAX_L2_SEED = 4096  # bytes of one L2 table per l2_entries seed
MAX_COMPRESSED_PER_IMAGE = 40
EXT_BITMAPS = 0x23852875
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_EXTL2 = 1 << 4


def u32(b, at):
    return struct.unpack_from(">I", b, at)[0] if at + 4 <= len(b) else 0


def u64(b, at):
    return struct.unpack_from(">Q", b, at)[0] if at + 8 <= len(b) else 0


def write(target, name, data):
    os.makedirs(f"corpus/{target}", exist_ok=True)
    with open(f"corpus/{target}/{name}", "wb") as f:
        f.write(data)


def extensions(b, version, cluster_size):
    """(magic, data) of each header extension of a v3 image."""
    at = u32(b, 100) if version >= 3 else 72
    end = u64(b, 8) or cluster_size
    while at + 8 <= min(end, len(b)):
        magic, length = u32(b, at), u32(b, at + 4)
        if magic == 0:
            return
        yield magic, b[at + 8 : at + 8 + length]
        at += 8 + (length + 7) // 8 * 8


def l2_tables(b, cluster_bits, l1_offset, l1_size):
    """Host offsets of the allocated L2 tables."""
    for i in range(min(l1_size, 4096)):
        off = u64(b, l1_offset + 8 * i) & 0x00FF_FFFF_FFFF_FE00
        if off and off + 8 <= len(b):
            yield off


def seed(path):
    b = open(path, "rb").read()
    if len(b) < 72 or b[:4] != b"QFI\xfb":
        return
    name = os.path.basename(path)
    version, cluster_bits = u32(b, 4), u32(b, 20)
    if not 9 <= cluster_bits <= 21:
        write("header", name, b[:4096])
        return
    cluster_size = 1 << cluster_bits
    write("header", name, b[:cluster_size])

    nb_snapshots, snapshots_offset = u32(b, 60), u64(b, 64)
    if 0 < nb_snapshots and snapshots_offset < len(b):
        table = b[snapshots_offset : snapshots_offset + 65536]
        write("snapshot_table", name, bytes([min(nb_snapshots, 255)]) + table)

    incompat = u64(b, 72) if version >= 3 else 0
    for magic, data in extensions(b, version, cluster_size):
        if magic == EXT_BITMAPS and len(data) >= 24:
            nb, dir_size, dir_offset = u32(data, 0), u64(data, 8), u64(data, 16)
            head = struct.pack(
                ">BHQII",
                cluster_bits - 9,
                nb & 0xFFFF,
                u64(b, 24),
                dir_offset & 0xFFFF_FFFF,
                dir_size & 0xFFFF_FFFF,
            )
            write("bitmap_directory", name, head + b)

    extl2 = bool(incompat & INCOMPAT_EXTL2)
    flags = (1 if extl2 else 0) | (2 if incompat & INCOMPAT_DATA_FILE else 0)
    flags |= 4 if version == 2 else 0
    bits_byte = cluster_bits - (14 if extl2 else 9)
    compression = 0x80 if version >= 3 and u32(b, 100) > 104 and b[104] == 1 else 0
    entry_len = 16 if extl2 else 8
    shift = 62 - (cluster_bits - 8)
    found = 0
    for n, l2 in enumerate(l2_tables(b, cluster_bits, u64(b, 40), u32(b, 36))):
        table = b[l2 : l2 + cluster_size]
        if n < 8:
            write("l2_entries", f"{name}-{n}", bytes([bits_byte, flags]) + table[:MAX_L2_SEED])
        for at in range(0, len(table) - entry_len + 1, entry_len):
            entry = u64(table, at)
            if not entry & (1 << 62) or found >= MAX_COMPRESSED_PER_IMAGE:
                continue
            host = entry & ((1 << shift) - 1)
            sectors = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
            length = sectors * 512 - (host & 511)
            data = b[host : host + length]
            write("compressed_cluster", f"{name}-{found}", bytes([compression | (cluster_bits - 9)]) + data)
            found += 1


for p in sys.argv[1:]:
    seed(p)
