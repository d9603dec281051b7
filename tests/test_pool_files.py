"""Pool files (issue 13): value checks on load, atomic saves racing loads, temp files and
the saved file's permission mode."""

from __future__ import annotations

import os
import random
import re
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch

from ouroboros_kernels import CandidatePool, PoolFileError
from ouroboros_kernels import pool as pool_module


def filled_pool(V=50, W=4, L=3, seed=0) -> CandidatePool:
    rng = random.Random(seed)
    pool = CandidatePool(V, W, L)
    pool.insert_ngrams(torch.tensor([rng.randrange(V) for _ in range(2000)]))
    return pool


def write_state(path, state, V=50, W=4, L=3) -> None:
    """A pool file with a correct checksum for ``state`` (whatever its values)."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in state.items()}
    metadata = {"format": "ouroboros-candidate-pool", "format_version": "1",
                "vocab_size": str(V), "capacity": str(W), "phrase_len": str(L),
                "crc32": str(pool_module._crc32(state))}
    save_file(state, str(path), metadata=metadata)


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("token", [50, 51, 10**6, 2**31 - 1])
def test_load_rejects_phrase_tokens_outside_the_vocabulary(tmp_path, token):
    pool = filled_pool()
    state = {k: v.clone() for k, v in pool.state_dict().items()}
    key, slot = (state["stamps"] != 0).nonzero()[0].tolist()
    state["phrases"][key, slot, 1] = token
    path = tmp_path / "bad.safetensors"
    write_state(path, state)
    message = (rf"bad\.safetensors: phrase of key {key} \(slot {slot}\) holds token {token}, "
               rf"outside the vocabulary \[0, 50\)")
    with pytest.raises(PoolFileError, match=message):
        CandidatePool.load(path)


def test_load_rejects_tokens_below_minus_one(tmp_path):
    pool = filled_pool()
    state = {k: v.clone() for k, v in pool.state_dict().items()}
    occupied = (state["stamps"] != 0).nonzero()
    empty = (state["stamps"] == 0).nonzero()
    path = tmp_path / "bad.safetensors"
    key, slot = occupied[0].tolist()
    state["phrases"][key, slot, 0] = -2
    write_state(path, state)
    with pytest.raises(PoolFileError, match="bad.safetensors: .*negative token"):
        CandidatePool.load(path)
    if len(empty):
        state = {k: v.clone() for k, v in pool.state_dict().items()}
        key, slot = empty[0].tolist()
        state["phrases"][key, slot] = -2
        write_state(path, state)
        with pytest.raises(PoolFileError, match="bad.safetensors: .*empty slot"):
            CandidatePool.load(path)


def test_valid_file_with_the_largest_token_loads(tmp_path):
    pool = CandidatePool(50, 4, 3)
    pool.insert(torch.tensor([49]), torch.tensor([[49, 0, 49]]))
    path = tmp_path / "pool.safetensors"
    pool.save(path)
    loaded = CandidatePool.load(path, vocab_size=50)
    assert loaded.lookup(torch.tensor([49]), 1).phrases.tolist() == [[[49, 0, 49]]]


# ----------------------------------------------------------------------------- races


def test_load_reads_the_file_once(tmp_path, monkeypatch):
    """A save that lands while a load is parsing does not affect that load."""
    old, new = filled_pool(seed=1), filled_pool(seed=2)
    path = tmp_path / "pool.safetensors"
    old.save(path)
    parse = pool_module._parse_safetensors

    def parse_then_replace(data):
        new.save(path)  # the file changes after the load read it
        return parse(data)

    monkeypatch.setattr(pool_module, "_parse_safetensors", parse_then_replace)
    loaded = CandidatePool.load(path)
    monkeypatch.undo()
    assert torch.equal(loaded.state_dict()["stamps"], old.state_dict()["stamps"])
    assert torch.equal(CandidatePool.load(path).state_dict()["stamps"],
                       new.state_dict()["stamps"])


def test_load_racing_saves_sees_a_whole_file(tmp_path):
    pools = [filled_pool(seed=1), filled_pool(seed=2)]
    stamps = [p.state_dict()["stamps"].clone() for p in pools]
    path = tmp_path / "pool.safetensors"
    pools[0].save(path)
    errors: list[BaseException] = []
    done = threading.Event()

    def saver():
        try:
            for i in range(200):
                pools[i % 2].save(path)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)
        finally:
            done.set()

    thread = threading.Thread(target=saver)
    thread.start()
    loads = 0
    deadline = time.monotonic() + 30
    try:
        while (not done.is_set() or loads < 20) and time.monotonic() < deadline:
            got = CandidatePool.load(path).state_dict()["stamps"]
            assert any(torch.equal(got, s) for s in stamps)
            loads += 1
    finally:
        thread.join()
    assert not errors, errors
    assert loads >= 20
    assert [p.name for p in tmp_path.iterdir()] == ["pool.safetensors"]


def test_load_racing_saves_of_another_process(tmp_path):
    path = tmp_path / "pool.safetensors"
    pool = filled_pool(seed=1)
    pool.save(path)
    script = (
        "import random, sys, torch\n"
        "from ouroboros_kernels import CandidatePool\n"
        "pools = []\n"
        "for seed in (1, 2):\n"
        "    rng = random.Random(seed)\n"
        "    p = CandidatePool(50, 4, 3)\n"
        "    p.insert_ngrams(torch.tensor([rng.randrange(50) for _ in range(2000)]))\n"
        "    pools.append(p)\n"
        "print('ready', flush=True)\n"
        "for i in range(200):\n"
        "    pools[i % 2].save(sys.argv[1])\n"
    )
    saver = subprocess.Popen([sys.executable, "-c", script, str(path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert saver.stdout.readline().strip() == "ready"
        stamps = [pool.state_dict()["stamps"], filled_pool(seed=2).state_dict()["stamps"]]
        loads = 0
        deadline = time.monotonic() + 60
        while (saver.poll() is None or loads < 20) and time.monotonic() < deadline:
            got = CandidatePool.load(path).state_dict()["stamps"]
            assert any(torch.equal(got, s) for s in stamps)
            loads += 1
    finally:
        if saver.poll() is None:
            saver.kill()
        saver.wait(timeout=30)
    assert saver.returncode == 0
    assert loads >= 20


# ----------------------------------------------------------------------------- temp files


def test_temp_file_name_and_removal_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "pool.safetensors"
    pool = filled_pool()
    seen: list[str] = []
    real_replace = os.replace

    def spy_replace(src, dst):
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy_replace)
    pool.save(path)
    monkeypatch.undo()
    assert re.fullmatch(rf"\.pool\.safetensors\.{os.getpid()}\.[A-Za-z0-9_]+\.tmp", seen[0])

    for name in ("fsync", "chmod", "replace"):
        def broken(*args, **kwargs):
            raise OSError(f"{name} failed")

        monkeypatch.setattr(os, name, broken)
        with pytest.raises(OSError, match=f"{name} failed"):
            pool.save(path)
        monkeypatch.undo()
        assert [p.name for p in tmp_path.iterdir()] == ["pool.safetensors"], name


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_ignored_by_load_and_removed_by_save(tmp_path):
    path = tmp_path / "pool.safetensors"
    pool = filled_pool()
    pool.save(path)
    dead = tmp_path / f".pool.safetensors.{_dead_pid()}.abc123.tmp"
    old = tmp_path / f".pool.safetensors.{os.getppid()}.old_01.tmp"  # live pid, but old
    live = tmp_path / f".pool.safetensors.{os.getppid()}.live01.tmp"  # a save in progress
    other = tmp_path / f".other.safetensors.{_dead_pid()}.abc123.tmp"  # another file's
    for p in (dead, old, live, other):
        p.write_bytes(b"partial")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))

    loaded = CandidatePool.load(path)  # the temp files change nothing
    assert torch.equal(loaded.state_dict()["stamps"], pool.state_dict()["stamps"])
    pool.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["pool.safetensors", live.name, other.name])


# ----------------------------------------------------------------------------- mode


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o664])
def test_save_keeps_the_mode_of_the_file_it_replaces(tmp_path, mode):
    path = tmp_path / "pool.safetensors"
    filled_pool(seed=1).save(path)
    os.chmod(path, mode)
    filled_pool(seed=2).save(path)
    assert mode_of(path) == mode


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002, 0o077])
def test_new_file_gets_the_umask_mode(tmp_path, umask):
    path = tmp_path / "pool.safetensors"
    previous = os.umask(umask)
    try:
        filled_pool().save(path)
    finally:
        os.umask(previous)
    assert mode_of(path) == 0o666 & ~umask
