"""/dev/shm arithmetic: the room in batches and a configuration cut to fit it."""

from __future__ import annotations

import os

from loadertune import shm
from loadertune.config import LoaderConfig

MIB = 2**20


def test_fit_cuts_prefetch_first_then_workers_then_loads_inline() -> None:
    c = LoaderConfig(num_workers=4, batch_size=8, prefetch_factor=2)
    assert shm.fit(c, 8) == c
    assert shm.fit(c, 5) == c.replace(prefetch_factor=1)
    assert shm.fit(c, 3) == c.replace(num_workers=3, prefetch_factor=1)
    assert shm.fit(c, 0) == c.replace(num_workers=0)
    assert shm.fit(LoaderConfig(num_workers=0, batch_size=8), 0).num_workers == 0


def test_room_counts_free_space_with_a_margin_less_the_loops_batch(tmp_path) -> None:
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    batch = 64 * MIB
    room, total = shm.room(str(tmp_path), batch, [], 0)
    assert total == st.f_blocks * st.f_frsize
    # Nothing of ours is in tmp_path: the room is the free space alone.
    assert room == int(shm.SHM_MARGIN * free // batch) - shm.SHM_HELD_BATCHES


def test_room_is_unknown_where_the_mount_cannot_be_read(tmp_path) -> None:
    assert shm.room(str(tmp_path / "missing"), MIB, [], 0) is None


def test_own_bytes_counts_an_open_file_of_this_process(tmp_path) -> None:
    path = tmp_path / "torch_segment"
    with open(path, "wb") as fh:
        fh.write(b"\0" * MIB)
        fh.flush()
        assert shm.own_bytes(str(tmp_path), []) == MIB
    assert shm.own_bytes(str(tmp_path), []) == 0


def test_room_reads_proc_only_when_the_free_space_alone_falls_short(tmp_path, monkeypatch) -> None:
    # Reading every worker's /proc took ~12 ms of the training thread a window (8 workers): a
    # caller that only needs "enough" gets the free space's count without it.
    st = os.statvfs(tmp_path)
    batch = MIB
    free_only = int(shm.SHM_MARGIN * st.f_bavail * st.f_frsize // batch) - shm.SHM_HELD_BATCHES
    looked: list[str] = []

    def own(path, pids):
        looked.append(path)
        return 0

    monkeypatch.setattr(shm, "own_bytes", own)
    assert shm.room(str(tmp_path), batch, [], 0, enough=free_only)[0] == free_only
    assert looked == []
    assert shm.room(str(tmp_path), batch, [], 0, enough=free_only + 1)[0] == free_only
    assert looked == [str(tmp_path)]
