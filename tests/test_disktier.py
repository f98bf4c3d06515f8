"""The disk tier (`host=disk` in a hardware spec, engines/disktier.py): experts served from a file on local disk,
each read past the page cache, with the same tokens and counted bytes as from host memory."""
import os

import pytest
import torch

from engines import disktier, registry
from engines.errors import BadInput
from engines.hardware import HardwareProfile
from engines.runtime import SamplingSettings
from tests.test_bad_input import refused
from workloads.models import load_model

SETTINGS = SamplingSettings(max_new_tokens=6)
PROMPTS = [[1, 2, 3, 4], [5, 6, 7], [9, 8]]
OPTIONS = {"specmoe": dict(gamma=4, adaptive=False, prefetch="draft", draft_experts=2), "lru": dict(capacity="25%")}


def run(name, spec):
    engine = registry.create(name, **OPTIONS.get(name, {}))
    engine.load(load_model("tiny-mixtral-random", dtype=torch.float32), HardwareProfile.parse(spec))
    try:
        disk = engine.runtime.store.disk
        before = disk.bytes_read if disk else None
        gen = engine.generate(PROMPTS, SETTINGS)
        return gen, engine, (disk.bytes_read - before if disk else None)
    finally:
        engine.close()


@pytest.mark.parametrize("name", ["offload", "lru", "nospec", "specmoe"])
def test_experts_from_disk_give_the_same_tokens_and_bytes_and_every_copy_is_a_read(name, tmp_path):
    memory, _, _ = run(name, "cpu")
    disk, engine, read = run(name, f"cpu:host=disk@{tmp_path}")
    assert disk.tokens == memory.tokens
    assert disk.stats["h2d_bytes"] == memory.stats["h2d_bytes"] > 0
    assert read == disk.stats["h2d_bytes"]  # each copy was read from the file, none from host memory
    assert engine.setup_stats()["host_tier"] == "disk"
    assert not list(tmp_path.iterdir())  # the file was unlinked once open: nothing is left behind


def test_each_read_and_the_written_file_leave_the_page_cache(tmp_path, monkeypatch):
    advice = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, how: advice.append((offset, length, how)))
    host = [{"w": torch.arange(24, dtype=torch.float32).reshape(3, 2, 4)}, {"w": -torch.ones(3, 2, 4)}]
    tier = disktier.DiskTier(host, str(tmp_path), pin=False)
    assert advice == [(0, 0, os.POSIX_FADV_DONTNEED)]  # the whole file, once written
    parts, _ = tier.read(0, 2)
    assert torch.equal(parts["w"], host[0]["w"][2])
    assert advice[-1] == (2 * 32, 32, os.POSIX_FADV_DONTNEED)  # expert 2 of layer 0: 32 bytes at 64
    assert torch.equal(tier.host[1]["w"], host[1]["w"])  # the memory map's views, for setup's reads
    tier.close()


@pytest.mark.parametrize("spec, message", [
    ("cpu:host=ssd", "hardware 'cpu:host=ssd': unknown host tier 'ssd'; allowed: memory, disk"),
    ("cpu:host=disk@/no/such/dir", "the disk tier's directory '/no/such/dir' is not a writable directory"),
    ("cpu:host=memory@/tmp", "only host=disk takes a directory (host=disk@DIR)"),
    ("cpu:host=disk@", "host=disk@ names no directory"),
])
def test_bad_host_tier(spec, message):
    with pytest.raises(BadInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        HardwareProfile.parse(spec)


def test_a_file_is_not_a_disk_tier_directory(tmp_path):
    file = tmp_path / "f"
    file.write_text("x")
    with pytest.raises(BadInput, match="is not a writable directory"):
        HardwareProfile.parse(f"cpu:host=disk@{file}")


def test_an_engine_that_cannot_serve_the_disk_tier_is_refused_before_anything_runs(capsys, tmp_path):
    err = refused(["compare", "--engines", "offload,accelerate", "--model", "tiny-mixtral-random", "--workload",
                   "synthetic-ids", "--hardware", f"cpu:host=disk@{tmp_path}"], capsys, tmp_path)
    assert "engine 'accelerate' cannot serve experts from the disk tier" in err
