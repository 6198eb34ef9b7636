"""store.fsutil: the one durable-write helper."""

import os
import stat

import pytest

from pop3proxy.store.fsutil import replace_file, write_new_file


def test_replace_file_replaces_with_mode_0600_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "meta.json"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    replace_file(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["meta.json"]


def test_replace_file_takes_chunks(tmp_path):
    path = tmp_path / "journal"
    replace_file(path, (line for line in [b"a\n", b"", b"b\n"]))
    assert path.read_bytes() == b"a\nb\n"


def test_failed_replace_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "users"
    path.write_bytes(b"old")

    def chunks():
        yield b"partial"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_file(path, chunks())
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["users"]


def test_write_new_file_refuses_an_existing_file(tmp_path):
    path = tmp_path / "message"
    write_new_file(path, b"one")
    with pytest.raises(FileExistsError):
        write_new_file(path, b"two")
    assert path.read_bytes() == b"one"


def test_a_batch_is_made_durable_through_the_descriptors_it_was_written_with(tmp_path):
    from pop3proxy.store.fsutil import create_file, make_durable

    fds = [create_file(tmp_path / f"m{i}", [b"message ", str(i).encode()]) for i in range(5)]
    try:
        make_durable(fds)  # the writeback hint and an fsync on each: no reopening by name
        assert all(os.fstat(fd).st_size == len(b"message 0") for fd in fds)
    finally:
        for fd in fds:
            os.close(fd)
    assert sorted(p.read_bytes() for p in tmp_path.iterdir()) == [f"message {i}".encode() for i in range(5)]
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o600}


def test_a_file_that_cannot_be_written_whole_is_removed(tmp_path):
    from pop3proxy.store.fsutil import create_file

    def chunks():
        yield b"part"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        create_file(tmp_path / "m", chunks())
    assert list(tmp_path.iterdir()) == []
