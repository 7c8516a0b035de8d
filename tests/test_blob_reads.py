"""Where file:// blobs are read: on the event loop for local file systems, in the thread pool otherwise."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest

import imgstream.consumer.blob_readers as blob_readers_module
from imgstream.analysis.imaging import ImageError
from imgstream.consumer.blob_readers import FileBlobReader, mounts, roots_on_local_file_systems

needs_quick_route = pytest.mark.skipif(not blob_readers_module._QUICK_ROUTE,
                                       reason="inline reads take the quick route: O_PATH and /proc/self/fd (Linux)")

MOUNTINFO = "\n".join([
    "22 27 0:21 / /proc rw,relatime - proc proc rw",
    "27 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw",
    "30 27 0:40 / /mnt/photos rw,relatime shared:5 master:2 - nfs4 nas:/photos rw,vers=4.2",
    r"31 27 8:2 / /srv/my\040images rw,relatime - xfs /dev/sdb1 rw",
    "32 31 0:50 / /srv/my\\040images/remote rw,nosuid - fuse.sshfs me@host:/x rw",
    "33 27 0:51 / /data rw - tmpfs tmpfs rw",
    "34 33 0:52 / /data rw - cifs //server/data rw",  # mounted over the tmpfs: the later one wins
    "35 27 0:53 / /cache rw - nfs server:/cache rw",
    "36 35 8:3 / /cache rw - ext4 /dev/sdc1 rw",  # a local disk mounted over the nfs one
])


def test_mountinfo_is_read_with_its_optional_fields_and_escapes() -> None:
    table = mounts(MOUNTINFO + "\ngarbage line\n")
    assert ("/mnt/photos", "nfs4") in table
    assert ("/srv/my images", "xfs") in table
    assert ("/srv/my images/remote", "fuse.sshfs") in table
    assert len(table) == 9


@pytest.mark.parametrize(("roots", "local"), [
    (["/var/blobs"], True),  # on /, ext4
    (["/srv/my images/a"], True),  # xfs
    (["/mnt/photos"], False),  # nfs4
    (["/mnt/photos/2024"], False),  # beneath it
    (["/srv/my images"], False),  # a FUSE file system is mounted beneath the root
    (["/srv/my images/remote/x"], False),
    (["/data/x"], False),  # cifs over tmpfs
    (["/cache/x"], True),  # ext4 over nfs
    (["/var/blobs", "/mnt/photos"], False),  # every root must be local
    ([], True),
])
def test_roots_are_local_only_when_every_mount_they_reach_is(roots: list[str], local: bool) -> None:
    assert roots_on_local_file_systems(map(Path, roots), mounts(MOUNTINFO)) is local


def test_a_root_under_no_known_mount_is_not_known_to_be_local() -> None:
    assert roots_on_local_file_systems([Path("/anything")], []) is False
    assert roots_on_local_file_systems([Path("/anything")], [("/other", "ext4")]) is False


class CountingPool(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


async def _read(reader: FileBlobReader, reference: str, max_bytes: int) -> tuple[bytes | str, int]:
    """What `reader` returns (or the error's code and message), and how many reads went to the pool."""
    pool = CountingPool()
    asyncio.get_running_loop().set_default_executor(pool)
    try:
        return await reader.read(reference, max_bytes), pool.submitted
    except ImageError as exc:
        return f"{exc.code}: {exc.message}", pool.submitted


@needs_quick_route
async def test_inline_reads_take_no_thread_for_a_small_file(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8" + os.urandom(3000))
    reference = (tmp_path / "a.jpg").as_uri()
    inline = FileBlobReader([str(tmp_path)], reads="inline")
    threaded = FileBlobReader([str(tmp_path)], reads="thread")
    assert inline.inline and not threaded.inline
    data = (tmp_path / "a.jpg").read_bytes()
    assert await _read(inline, reference, 10_000) == (data, 0)
    assert await _read(threaded, reference, 10_000) == (data, 1)


@needs_quick_route
async def test_a_file_over_the_inline_size_is_read_in_the_pool(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blob_readers_module, "INLINE_READ_BYTES", 1000)
    (tmp_path / "small.bin").write_bytes(b"s" * 1000)
    (tmp_path / "big.bin").write_bytes(b"b" * 1001)
    reader = FileBlobReader([str(tmp_path)], reads="inline")
    assert await _read(reader, (tmp_path / "small.bin").as_uri(), 5000) == (b"s" * 1000, 0)
    assert await _read(reader, (tmp_path / "big.bin").as_uri(), 5000) == (b"b" * 1001, 1)
    # Over max_bytes is refused, by the pool's full route and in its words.
    assert await _read(reader, (tmp_path / "big.bin").as_uri(), 500) == (
        f"image_too_large: blob '{(tmp_path / 'big.bin').as_uri()}' is 1001 bytes, over the limit of 500", 1)


@needs_quick_route
async def test_inline_refusals_are_the_thread_routes_own(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (elsewhere / "c.png").write_bytes(b"c")
    (root / "outside-link.png").symlink_to(elsewhere / "c.png")
    (root / "null.png").symlink_to(os.devnull)
    os.mkfifo(root / "pipe.png")
    (root / "dir").mkdir()
    for name in ("missing.png", "outside-link.png", "null.png", "pipe.png", "dir"):
        reference = f"file://{root}/{name}"
        inline, pool_reads = await _read(FileBlobReader([str(root)], reads="inline"), reference, 100)
        threaded, _ = await _read(FileBlobReader([str(root)], reads="thread"), reference, 100)
        assert isinstance(inline, str) and inline.startswith("image_fetch_failed"), (name, inline)
        assert (inline, pool_reads) == (threaded, 1), name


@needs_quick_route
def test_auto_reads_inline_only_on_local_file_systems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "mountinfo"
    monkeypatch.setattr(blob_readers_module, "_MOUNTINFO", str(table))
    table.write_text("27 1 8:1 / / rw - ext4 /dev/sda1 rw\n")
    assert FileBlobReader(["/srv/blobs"]).inline
    table.write_text("27 1 8:1 / / rw - ext4 /dev/sda1 rw\n40 27 0:40 / /srv rw - nfs4 nas:/srv rw\n")
    assert not FileBlobReader(["/srv/blobs"]).inline
    assert FileBlobReader(["/srv/blobs"], reads="inline").inline  # the operator's word wins
    table.unlink()  # no mount table: not known to be local
    assert not FileBlobReader(["/srv/blobs"]).inline


@needs_quick_route
async def test_the_fetcher_reads_an_inline_blob_at_once(tmp_path: Path) -> None:
    from imgstream.consumer.fetch import ImageFetcher
    from imgstream.schemas.config import FetchConfig
    from imgstream.schemas.events import ImageRef

    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8" + b"x" * 500)
    pool = CountingPool()
    asyncio.get_running_loop().set_default_executor(pool)
    for reads, pool_reads in (("inline", 0), ("thread", 1)):
        async with ImageFetcher(FetchConfig(blob_roots=[str(tmp_path)], blob_reads=reads)) as fetcher:
            before = pool.submitted
            fetched = await fetcher.fetch(ImageRef(blob=(tmp_path / "a.jpg").as_uri()))
            assert (fetched.data, fetched.final_url, fetched.attempts) == (
                b"\xff\xd8" + b"x" * 500, (tmp_path / "a.jpg").as_uri(), 1)
            assert pool.submitted - before == pool_reads, reads
            # What the inline read leaves (here a missing file) still ends as the pool's error.
            with pytest.raises(ImageError, match="not found"):
                await fetcher.fetch(ImageRef(blob=(tmp_path / "missing.jpg").as_uri()))
            assert pool.submitted - before == pool_reads + 1, reads


@needs_quick_route
def test_the_blob_read_benchmark_compares_both_routes(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_blob_reads.py"
    out = tmp_path / "reads.json"
    done = subprocess.run([sys.executable, str(script), "--files", "30", "--rounds", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "thread / inline CPU per read:" in done.stdout
    report = json.loads(out.read_text())
    assert set(report["routes"]) == {"thread", "inline"}
    assert all(route["median_cpu_us_per_read"] > 0 for route in report["routes"].values())
    assert report["thread_over_inline"] > 0
