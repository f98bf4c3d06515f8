"""The disk tier (`host=disk` in a hardware spec): every expert in one file on local disk instead of host memory,
as the paper's SSD experiment. The file is laid out expert by expert (all of one expert's tensors in one range),
so serving a copy is one read. Reads bypass the page cache: the file is dropped from it once written, and each
expert's range after each read (posix_fadvise DONTNEED), so every copy comes from the disk, not from memory.

The read is synchronous on the host: a copy costs the disk read, then the host-to-device copy from a pinned
staging buffer (a ring, so a buffer is reused only once its copy has run). The file is unlinked as soon as it is
open, so it leaves nothing behind, whatever ends the process. The host keeps a private memory map of it: the
tensors' shapes, and the one-off reads of setup (affinity distances), after which `drop_cache` empties the cache.
"""
from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path

import torch

from .errors import BadInput
from .paths import cache_dir

STAGING_BUFFERS = 4  # copies that may be in flight from the staging ring at once


def check_dir(spec: str, directory: str | None) -> str:
    """The directory of `host=disk[@DIR]`, checked before anything runs: BadInput naming it unless it is a
    directory this process can write (the default one is created)."""
    path = Path(directory).expanduser() if directory else cache_dir() / "disk-tier"
    if not directory:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInput(f"hardware {spec!r}: cannot create the disk tier's directory {str(path)!r} "
                           f"({exc.strerror}); name a writable one with host=disk@DIR") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise BadInput(f"hardware {spec!r}: the disk tier's directory {str(path)!r} is not a writable directory; "
                       "name an existing directory on local disk that you can write, like host=disk@/mnt/nvme/tmp")
    return str(path)


def _drop(fd: int, offset: int = 0, length: int = 0) -> None:
    if hasattr(os, "posix_fadvise"):  # Linux; elsewhere the page cache may serve reads (said in the README)
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class DiskTier:
    def __init__(self, host: list[dict[str, torch.Tensor]], directory: str, pin: bool):
        first = host[0]
        self.shapes = {n: tuple(t.shape[1:]) for n, t in first.items()}
        self.dtypes = {n: t.dtype for n, t in first.items()}
        self.part = {}  # name -> (offset in an expert's range, bytes)
        offset = 0
        for n, t in first.items():
            self.part[n] = (offset, t[0].nbytes)
            offset += t[0].nbytes
        self.expert_bytes = offset
        self.num_experts = next(iter(first.values())).shape[0]
        self.size = self.expert_bytes * self.num_experts * len(host)
        fd, path = tempfile.mkstemp(prefix="smb-experts-", suffix=".bin", dir=directory)
        os.unlink(path)
        self.fd = fd
        try:
            self._write(host)
        except OSError as exc:
            os.close(fd)
            raise BadInput(f"the disk tier could not write {self.size / 2**30:.2f} GiB of experts to {directory!r} "
                           f"({exc.strerror})") from None
        self.bytes_read = 0
        self._map = mmap.mmap(fd, self.size, access=mmap.ACCESS_COPY)  # private, lazy
        raw = torch.frombuffer(self._map, dtype=torch.uint8)
        self.host = [self._views(raw, layer) for layer in range(len(host))]
        self._ring = [(torch.empty(self.expert_bytes, dtype=torch.uint8, pin_memory=pin), None)
                      for _ in range(STAGING_BUFFERS)]
        self._next = 0

    def _write(self, host) -> None:
        with open(self.fd, "wb", closefd=False, buffering=1 << 24) as f:
            for params in host:
                for e in range(self.num_experts):
                    for n in self.part:
                        f.write(params[n][e].contiguous().view(torch.uint8).reshape(-1).numpy().data)
        os.fsync(self.fd)
        _drop(self.fd)

    def _views(self, raw: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
        """[E, ...] views of one layer's tensors in the memory map (strided: expert e of each is in e's range)."""
        base = layer * self.num_experts * self.expert_bytes
        out = {}
        for n, (start, nbytes) in self.part.items():
            rows = raw[base + start:].as_strided((self.num_experts, nbytes), (self.expert_bytes, 1))
            out[n] = rows.view(self.dtypes[n]).view(self.num_experts, *self.shapes[n])
        return out

    def read(self, layer: int, expert: int) -> tuple[dict[str, torch.Tensor], int]:
        """One expert read from the disk into a staging buffer: ({name: tensor}, the buffer's index for `used`)."""
        i = self._next
        self._next = (i + 1) % len(self._ring)
        buf, event = self._ring[i]
        if event is not None:
            event.synchronize()  # its last copy has run: the buffer may be overwritten
        offset = (layer * self.num_experts + expert) * self.expert_bytes
        view, done = memoryview(buf.numpy()), 0
        while done < self.expert_bytes:
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"short read of the disk tier at byte {offset + done}")
            done += n
        _drop(self.fd, offset, self.expert_bytes)
        self.bytes_read += self.expert_bytes
        parts = {n: buf[s:s + b].view(self.dtypes[n]).view(self.shapes[n]) for n, (s, b) in self.part.items()}
        return parts, i

    def used(self, index: int, event) -> None:
        """The copies out of staging buffer `index` were queued up to `event` (None: they have already run)."""
        self._ring[index] = (self._ring[index][0], event)

    def drop_cache(self) -> None:
        """Empty the page cache of the file (after setup read it through the memory map)."""
        _drop(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            self.host = []
            try:
                self._map.close()
            except BufferError:  # a tensor still views it; the mapping goes with the process
                pass
            os.close(self.fd)
            self.fd = -1
