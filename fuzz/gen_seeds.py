#!/usr/bin/env python3
"""Write the seed corpora in fuzz/seeds/<target>/ (small, valid inputs).

Run from anywhere: python3 fuzz/gen_seeds.py. Output is deterministic, so the
committed seeds can be regenerated and diffed. Layouts follow the NBD protocol
(src/nbd/wire.rs) and the block map header (src/store/map.rs); the first byte
of a handshake / map_header input is the target's mode byte (see the targets).
"""

import os
import struct
import zlib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
STRUCTURED_REPLY_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 6, 7, 8
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_EXTENDED_HEADERS = 9, 10, 11
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3
FIXED_NEWSTYLE, NO_ZEROES = 1, 2


def string(s: bytes) -> bytes:
    return struct.pack(">I", len(s)) + s


def info_payload(name: bytes, requests) -> bytes:
    return string(name) + struct.pack(">H", len(requests)) + b"".join(
        struct.pack(">H", r) for r in requests
    )


def meta_payload(name: bytes, queries) -> bytes:
    return string(name) + struct.pack(">I", len(queries)) + b"".join(
        string(q) for q in queries
    )


def option(num: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, num, len(data)) + data


def client(flags: int, *options: bytes) -> bytes:
    return struct.pack(">I", flags) + b"".join(options)


def map_header(block_size: int, image_size: int, identity: int, version=2, slots=1) -> bytes:
    """The header of src/store/map.rs (little endian): 44 bytes, and from
    version 2 a crc32 of them."""
    blocks = -(-image_size // block_size)
    h = b"LAZYBDM1" + struct.pack(
        "<IIQQQI", version, block_size, image_size, identity, blocks, slots
    )
    if version >= 2:
        h += struct.pack("<I", zlib.crc32(h))
    return h


def map_file_len(block_size: int, image_size: int, slots=1) -> int:
    blocks = -(-image_size // block_size)
    pages = -(-image_size // 4096)
    crc_offset = -(-(4096 + blocks) // 4096) * 4096
    return crc_offset + pages * 4 * slots


def write(target: str, name: str, data: bytes) -> None:
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def wire_decode() -> None:
    t = "wire_decode"
    write(t, "request-read", struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, 7, 4096, 65536))
    write(t, "request-block-status", struct.pack(">IHHQQI", REQUEST_MAGIC, 8, 7, 8, 0, 1 << 20))
    write(t, "option-header-go", struct.pack(">QII", IHAVEOPT, OPT_GO, 10) + b"\0" * 12)
    write(t, "chunk-header", struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, 1, 1, 7, 4096))
    write(t, "info-request", info_payload(b"disk", [INFO_NAME, INFO_BLOCK_SIZE]))
    write(t, "info-request-empty", info_payload(b"", []))
    write(t, "meta-request", meta_payload(b"disk", [b"base:allocation"]))
    write(t, "meta-request-list", meta_payload(b"", [b"base:", b"qemu:dirty-bitmap:x"]))
    write(t, "string", "export/\u00e9t\u00e9".encode())


def handshake() -> None:
    t = "handshake"
    # Mode byte 0x00: the rest is the client's raw stream, unlimited reads.
    qemu = client(
        FIXED_NEWSTYLE | NO_ZEROES,
        option(OPT_STRUCTURED_REPLY),
        option(OPT_SET_META_CONTEXT, meta_payload(b"disk", [b"base:allocation"])),
        option(OPT_GO, info_payload(b"disk", [INFO_BLOCK_SIZE])),
    )
    write(t, "qemu-go", b"\x00" + qemu)
    # Same stream, served 3 bytes per read, export with a description.
    write(t, "qemu-go-short-reads", b"\x32" + qemu)
    write(
        t,
        "nbdinfo-list",
        b"\x02"
        + client(
            FIXED_NEWSTYLE | NO_ZEROES,
            option(OPT_EXTENDED_HEADERS),
            option(OPT_STRUCTURED_REPLY),
            option(OPT_LIST),
            option(OPT_LIST_META_CONTEXT, meta_payload(b"disk", [])),
            option(OPT_INFO, info_payload(b"disk", [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE])),
            option(OPT_ABORT),
        ),
    )
    write(
        t,
        "old-client-export-name",
        b"\x00" + client(FIXED_NEWSTYLE, option(OPT_EXPORT_NAME, b"disk")),
    )
    write(
        t,
        "refusals-then-default-go",
        b"\x04"
        + client(
            FIXED_NEWSTYLE | NO_ZEROES,
            option(OPT_STARTTLS),
            option(OPT_SET_META_CONTEXT, meta_payload(b"disk", [b"base:allocation"])),
            option(OPT_GO, info_payload(b"nope", [])),
            option(OPT_LIST, b"junk"),
            option(0x1234, b"x"),
            option(OPT_GO, info_payload(b"", [INFO_NAME])),
        ),
    )


def map_header_seeds() -> None:
    t = "map_header"
    # Mode 0x01: pad the file to the length its header asks for.
    write(t, "empty-image-padded", b"\x01" + map_header(4096, 0, 1))
    write(t, "1m-64k-padded", b"\x01" + map_header(64 << 10, 1 << 20, 42))
    # Mode 0x00: the whole file, a 4 KiB image in one 4 KiB block, present.
    g = map_header(4096, 4096, 7)
    n = map_file_len(4096, 4096)
    body = bytearray(n)
    body[: len(g)] = g
    body[4096] = 1  # state of block 0: present
    body[8192:8196] = struct.pack("<I", 0xC71C0011)  # some CRC
    write(t, "4k-full-file", b"\x00" + bytes(body))
    write(t, "overlay-2-slots-padded", b"\x01" + map_header(64 << 10, 3 << 20, 9, slots=2))
    write(t, "version-1-overlay-padded", b"\x01" + map_header(4096, 1 << 20, 9, version=1, slots=2))
    write(t, "bad-version", b"\x01" + map_header(4096, 4096, 7, version=3))
    write(t, "huge-image-padded", b"\x01" + map_header(16 << 20, (1 << 64) - 1, 3))


def overlay_header(magic: bytes, generation: int, image_size: int, identity: int) -> bytes:
    """A 4 KiB header page of src/overlay/format.rs."""
    h = bytearray(4096)
    h[:60] = magic + struct.pack("<IIQQII", 2, 64, generation, image_size, 4096, 0) + struct.pack(
        "<Q", identity) + bytes(12)
    h[60:64] = struct.pack("<I", zlib.crc32(bytes(h[:60])))
    return bytes(h)


def overlay_record(kind: int, generation: int, page: int, arg: int, crc: int = 0) -> bytes:
    r = struct.pack("<B3xIQQI", kind, generation & 0xFFFFFFFF, page, arg, crc)
    return r + struct.pack("<I", zlib.crc32(r))


def overlay_journal_seeds() -> None:
    """Inputs of fuzz_targets/overlay_journal.rs: mode byte, cut byte (where
    the rest splits into journal and pages), then the bytes. Mode bit 1/2:
    prepend a valid journal/pages header; bit 4: records from the journal
    bytes; bit 8: leave an empty file out."""
    t = "overlay_journal"
    image, ident = 64 * 4096 - 100, 7
    page = bytes(range(256)) * 16
    recs = (overlay_record(1, 1, 0, 1, zlib.crc32(page)) + overlay_record(2, 1, 5, 3)
            + overlay_record(3, 1, 0, 4096 + 64) + overlay_record(1, 1, 9, 2, 12345))
    # Headers supplied by the target (mode 3): records, then one page.
    write(t, "records-and-a-page", b"\x03" + bytes([128]) + recs + page)
    write(t, "valid-records-mode", b"\x07" + bytes([200]) + bytes(range(170)) + page)
    # Whole files in the input (mode 0): a journal with its own header.
    j = overlay_header(b"LAZYBDOJ", 1, image, ident) + recs
    write(t, "own-headers", b"\x02" + bytes([255]) + j)
    write(t, "empty", b"\x00\x00")
    write(t, "journal-missing", b"\x0a\x00" + page)


def manifest(block_size: int, data: bytes, validator: bytes, locator: bytes, version=1) -> bytes:
    """A manifest file (src/manifest.rs) of `data` at `block_size`."""
    import hashlib
    out = b"LZBDMNF\0" + struct.pack("<I", version) + bytes([1, 0, 0, 0])
    out += struct.pack("<IQ", block_size, len(data))
    for s in (validator, locator):
        out += struct.pack("<I", len(s)) + s
    for i in range(0, len(data), block_size):
        out += hashlib.sha256(data[i:i + block_size]).digest()
    return out + hashlib.sha256(out).digest()


def manifest_seeds() -> None:
    t = "manifest"
    data = bytes(range(256)) * 40
    write(t, "three-blocks-and-a-tail", manifest(4096, data, b'"5f2c-28000"', b"http://h/base.raw"))
    write(t, "no-validator", manifest(4096, data[:4096], b"", b"file:///srv/a.raw"))
    write(t, "empty-image", manifest(65536, b"", b"etag", b"s3://b/k"))
    write(t, "newer-version", manifest(4096, data[:100], b"v", b"x", version=2))


if __name__ == "__main__":
    manifest_seeds()
    wire_decode()
    handshake()
    map_header_seeds()
    overlay_journal_seeds()
