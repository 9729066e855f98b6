"""The compressors on their own (zramfs.zcomp._zcomp), without a device: every algorithm reads back
what it wrote; zstd's frames are as small as a page allows (no magic, no content size) yet
name their dictionary, raw-content ones included; frames written the old way still read
back."""
from __future__ import annotations

import pytest
import zstandard

import corpus
from zramfs.zcomp._zcomp import (Compressor, CompressorError, check_algorithm, check_level,
                            dictionary_name)

PAGE = 4096
MAGIC = b"\x28\xb5\x2f\xfd"          # zstd's, little-endian


@pytest.fixture(scope="module")
def pages() -> list[bytes]:
    """512 pages of real files, without the same-filled ones (the device keeps those in the
    slot, never in a compressor)."""
    data = corpus.build(2 << 20)
    out = [data[i:i + PAGE] for i in range(0, len(data), PAGE)]
    return [p for p in out if p != p[:8] * (PAGE // 8)]


@pytest.fixture(scope="module")
def trained(pages: list[bytes]) -> bytes:
    return zstandard.train_dictionary(16 << 10, pages[::2]).as_bytes()


@pytest.mark.parametrize("name,level", [("lzo-rle", None), ("lzo", None), ("lz4", None),
                                        ("lz4hc", None), ("zstd", -5), ("zstd", 3),
                                        ("zstd", 19), ("deflate", 1), ("deflate", None),
                                        ("deflate", 9)])
def test_every_algorithm_reads_back(pages: list[bytes], name: str, level: int | None) -> None:
    c = Compressor(name, level, streams=1)
    try:
        for page in pages:
            out = c.compress(page)
            if out is not None:
                assert c.decompress(out) == page
    finally:
        c.destroy()


def unnamed(frame: bytes) -> bytes:
    """A frame as zstd wrote it, its dictionary's name (4 bytes after the header descriptor
    and the window byte) taken out."""
    at = 1 if frame[0] & 0x20 else 2
    assert frame[0] & 3 == 3
    return bytes([frame[0] & ~3]) + frame[1:at] + frame[at + 4:]


@pytest.mark.parametrize("with_dict", [False, True])
def test_zstd_frames_have_no_magic_and_no_content_size(pages: list[bytes], trained: bytes,
                                                       with_dict: bool) -> None:
    """Objects land in 16-byte classes, so the 4 bytes of the magic and the content size (a
    page, always) are left out; a frame written with a dictionary names it, by zramfs's name
    for it in the dictionary id field. The same frame with the name taken out and the magic
    put back is a standard zstd frame that the zstandard package decodes."""
    c = Compressor("zstd", 3, streams=1, dictionary=trained if with_dict else None)
    dctx = zstandard.ZstdDecompressor(
        dict_data=zstandard.ZstdCompressionDict(trained) if with_dict else None)
    try:
        assert c.dict_id == (zstandard.ZstdCompressionDict(trained).dict_id() if with_dict else 0)
        assert c.dict_name == (dictionary_name(trained) if with_dict else 0)
        for page in pages[:64]:
            frame = c.compress(page)
            if frame is None:
                continue
            assert not frame.startswith(MAGIC)
            params = zstandard.get_frame_parameters(MAGIC + frame)
            assert params.content_size == zstandard.CONTENTSIZE_UNKNOWN
            assert params.dict_id == c.dict_name
            assert not params.has_checksum
            if with_dict:
                frame = unnamed(frame)
            assert dctx.decompressobj().decompress(MAGIC + frame) == page
    finally:
        c.destroy()


@pytest.mark.parametrize("with_dict", [False, True])
def test_zstd_reads_frames_with_the_magic(pages: list[bytes], trained: bytes,
                                          with_dict: bool) -> None:
    """Frames as zramfs wrote them before (magic, content size), e.g. objects kept by an older
    daemon across a live restart, still read back."""
    d = zstandard.ZstdCompressionDict(trained) if with_dict else None
    cctx = zstandard.ZstdCompressor(level=3, dict_data=d)
    c = Compressor("zstd", 3, streams=1, dictionary=trained if with_dict else None)
    try:
        for page in pages[:64]:
            old = cctx.compress(page)
            assert old.startswith(MAGIC)
            assert c.decompress(old) == page
            new = c.compress(page)             # and the two formats alternate on one stream
            if new is not None:
                assert c.decompress(new) == page
    finally:
        c.destroy()


def test_zstd_refuses_a_page_of_another_dictionary(pages: list[bytes], trained: bytes) -> None:
    """The dictionary's id in each frame: a page compressed with one dictionary is refused by
    a compressor holding another (or none), never decoded into a wrong page."""
    other = zstandard.train_dictionary(16 << 10, pages[1::2], dict_id=12345).as_bytes()
    a = Compressor("zstd", 3, streams=1, dictionary=trained)
    b = Compressor("zstd", 3, streams=1, dictionary=other)
    plain = Compressor("zstd", 3, streams=1)
    try:
        assert b.dict_id == 12345 != a.dict_id
        frames = [f for f in map(a.compress, pages[:64]) if f is not None]
        assert frames
        for frame in frames:
            for wrong in (b, plain):
                with pytest.raises(CompressorError):
                    wrong.decompress(frame)
    finally:
        for c in (a, b, plain):
            c.destroy()


def test_zstd_refuses_a_page_of_another_raw_dictionary_or_of_another_with_its_id(
        pages: list[bytes]) -> None:
    """Dictionaries zstd's id does not tell apart (raw content has none; two trained ones may
    share one) are told apart by the name each frame carries: a page written with one is
    refused by a compressor holding the other, never decoded into other bytes; a compressor
    that has the first among its older dictionaries reads it back."""
    raw, other_raw = b"".join(pages[:16]), b"".join(pages[16:32])
    trained = zstandard.train_dictionary(16 << 10, pages[::2], dict_id=777).as_bytes()
    retrained = zstandard.train_dictionary(16 << 10, pages[1::2], dict_id=777).as_bytes()
    for first, second in ((raw, other_raw), (trained, retrained), (b"garbage " * 512, raw)):
        a = Compressor("zstd", 3, streams=1, dictionary=first)
        b = Compressor("zstd", 3, streams=1, dictionary=second)
        b_older = Compressor("zstd", 3, streams=1, dictionary=second, older=(first,))
        try:
            assert a.dict_id == b.dict_id and a.dict_name != b.dict_name
            frames = [(p, f) for p in pages[32:96] if (f := a.compress(p)) is not None]
            assert frames
            for page, frame in frames:
                with pytest.raises(CompressorError):
                    b.decompress(frame)
                assert b_older.decompress(frame) == page
        finally:
            for c in (a, b, b_older):
                c.destroy()


def test_a_dictionary_only_for_zstd(trained: bytes) -> None:
    with pytest.raises(CompressorError, match="takes no dictionary"):
        Compressor("lz4", dictionary=trained)
    with pytest.raises(CompressorError, match="empty"):
        Compressor("zstd", dictionary=b"")


def test_a_dictionary_shrinks_small_pages(pages: list[bytes], trained: bytes) -> None:
    plain = Compressor("zstd", 3, streams=1)
    with_dict = Compressor("zstd", 3, streams=1, dictionary=trained)
    try:
        size = {c is with_dict: sum(len(c.compress(p) or p) for p in pages)
                for c in (plain, with_dict)}
        assert size[True] < size[False]
    finally:
        plain.destroy()
        with_dict.destroy()


def test_a_large_dictionary_in_tables_it_can_fill() -> None:
    """A 1 MiB dictionary at level 19: zstd sizes its tables for a 2 MiB window (a CDict of
    about 33 MiB); cut to what the dictionary and a page can fill, it takes less than half
    that, and the frames are within 0.3 % of those of zstd's own tables with the same parser
    (the zstandard package's, whose frames differ only by the 4-byte magic). Level 19 runs
    btopt's parser after a dictionary: its frames are at most 0.5 % larger than zstd's level
    19's.
    The tables refer to the dictionary, which the compressor keeps: here its only reference."""
    data = corpus.build(16 << 20)
    pages = [data[i:i + PAGE] for i in range(0, len(data), PAGE)]
    trained = zstandard.train_dictionary(1 << 20, pages).as_bytes()
    c = Compressor("zstd", 19, streams=1, dictionary=bytes(bytearray(trained)))
    level = zstandard.ZstdCompressionParameters.from_level(19, source_size=PAGE,
                                                           dict_size=len(trained))
    btopt = zstandard.ZstdCompressionParameters(
        window_log=level.window_log, chain_log=level.chain_log, hash_log=level.hash_log,
        search_log=level.search_log, min_match=level.min_match,
        target_length=level.target_length, strategy=zstandard.STRATEGY_BTOPT,
        write_content_size=0)
    theirs = [zstandard.ZstdCompressor(dict_data=zstandard.ZstdCompressionDict(trained), **kw)
              for kw in ({"compression_params": btopt},
                         {"level": 19, "write_content_size": False})]
    try:
        assert 0 < c.dictionary_memory < 16 << 20
        ours, same, level19 = 0, 0, 0
        for page in pages[1::32]:
            frame = c.compress(page)
            if frame is not None:
                assert c.decompress(frame) == page
                ours += len(frame) + len(MAGIC)
                same += len(theirs[0].compress(page))
                level19 += len(theirs[1].compress(page))
        assert ours <= same * 1.003, (ours, same)
        assert ours <= level19 * 1.005, (ours, level19)
    finally:
        c.destroy()


def test_older_dictionaries_read_the_pages_written_with_them(pages: list[bytes],
                                                              trained: bytes) -> None:
    """A compressor given `older` dictionaries reads the frames written with any of them, by
    the id each names, and writes with its own; one without them refuses those frames."""
    other = zstandard.train_dictionary(16 << 10, pages[1::2], dict_id=4242).as_bytes()
    first = Compressor("zstd", 3, streams=1, dictionary=trained)
    now = Compressor("zstd", 3, streams=1, dictionary=other, older=(trained,))
    alone = Compressor("zstd", 3, streams=1, dictionary=other)
    try:
        from zramfs.zcomp._zcomp import dictionary_id
        assert dictionary_id(other) == 4242 == now.dict_id != first.dict_id
        for page in pages[:64]:
            old, new = first.compress(page), now.compress(page)
            if old is None:
                continue
            assert now.decompress(old) == page and now.decompress(new) == page
            with pytest.raises(CompressorError):
                alone.decompress(old)
    finally:
        for c in (first, now, alone):
            c.destroy()


@pytest.mark.parametrize("name", ["lzo-rle", "lzo", "deflate"])
def test_the_kernels_other_algorithms_pack_and_refuse_garbage(pages: list[bytes],
                                                             name: str) -> None:
    """lzo, lzo-rle and deflate pack real pages about as lz4 does (lzo) or tighter
    (deflate), and a cut or spoiled object is an error, never another page."""
    def stored(c: Compressor) -> int:
        return sum(len(o) if o else PAGE for o in map(c.compress, pages))
    lz4 = Compressor("lz4", streams=1)
    c = Compressor(name, streams=1)
    try:
        assert stored(c) < (lz4_size := stored(lz4)) * (1.0 if name == "deflate" else 1.02)
        assert lz4_size < len(pages) * PAGE
        out = [c.compress(p) for p in pages]
        obj = next(o for o in out if o and len(o) > 64)
        for bad in (obj[:len(obj) // 2], b"\xff" * len(obj), obj + b"\0" * 8):
            try:
                assert c.decompress(bad) != pages[out.index(obj)]
            except CompressorError:
                pass
    finally:
        c.destroy()
        lz4.destroy()


def test_levels_of_the_kernels_other_algorithms(pages: list[bytes]) -> None:
    """deflate's levels are zlib's 1..9 (a higher one packs real pages tighter); lzo has
    none; 842 is refused, naming why."""
    sizes = []
    for level in (1, 9):
        c = Compressor("deflate", level, streams=1)
        sizes.append(sum(len(o) if o else PAGE for o in map(c.compress, pages)))
        c.destroy()
    assert sizes[1] < sizes[0]
    check_level("deflate", 9)
    with pytest.raises(CompressorError, match="1..9"):
        check_level("deflate", 0)
    with pytest.raises(CompressorError, match="lzo-rle has no levels"):
        check_level("lzo-rle", 1)
    with pytest.raises(CompressorError, match="no maintained library"):
        check_algorithm("842")
    with pytest.raises(CompressorError, match="unknown"):
        check_algorithm("lzo-rl")
