"""A tiny read-only passthrough FUSE file system that fails reads at chosen offsets.

Why: the kernel's page cache, readahead and mmap page faults sit between a loader and the disk;
only a real file system can make *those* fail (an mmap'ed page that cannot be read becomes SIGBUS
or, with ``MADV_POPULATE_READ``, EFAULT). It speaks the FUSE protocol on ``/dev/fuse`` directly
(stdlib only, no libfuse), serves the files of one flat directory, and runs as its own process:
a server inside the process that faults pages in would deadlock on the GIL.

    with FaultFS(backing_dir, tmp_path / "mnt", [Fault("eio", 1 << 20, (1 << 20) + 1)]) as mnt:
        weightlift.load(mnt / "model.safetensors")   # the read covering 1 MiB fails with EIO

A fault hits every READ request overlapping ``[start, end)``: ``eio`` answers EIO; ``short``
answers only the bytes before ``start`` (a FUSE short read means end of file to the kernel, which
zero-fills the rest of the page and may later serve those zeros as data).
To check that a later load works, mount again without faults (the kernel retries a failed
readahead with a second request, so "fail once" would not fail reliably).

Requires root and ``/dev/fuse``; ``FaultFS.unavailable()`` says why not otherwise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import stat
import struct
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

# Opcodes (include/uapi/linux/fuse.h).
LOOKUP, FORGET, GETATTR, OPEN, READ, RELEASE, FLUSH = 1, 2, 3, 14, 15, 18, 25
INIT, OPENDIR, READDIR, RELEASEDIR, INTERRUPT, DESTROY, BATCH_FORGET = 26, 27, 28, 29, 36, 38, 42
NO_REPLY = {FORGET, BATCH_FORGET, INTERRUPT}
ROOT = 1

IN_HEADER = struct.Struct("<IIQQIIIHH")      # len, opcode, unique, nodeid, uid, gid, pid, ext, pad
OUT_HEADER = struct.Struct("<IiQ")           # len, error, unique
INIT_IN = struct.Struct("<IIII")             # major, minor, max_readahead, flags
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # 64 bytes, protocol 7.31 fields + padding
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")    # ino size blocks a/m/ctime, nsecs, mode nlink ...
ENTRY_OUT = struct.Struct("<QQQQII")         # nodeid, generation, entry/attr valid (+nsec)
ATTR_OUT = struct.Struct("<QII")             # attr_valid, attr_valid_nsec, dummy
OPEN_OUT = struct.Struct("<QII")             # fh, open_flags, padding
READ_IN = struct.Struct("<QQIIQII")          # fh, offset, size, read_flags, lock_owner, flags, pad
RELEASE_IN = struct.Struct("<QIIQ")          # fh, flags, release_flags, lock_owner
DIRENT = struct.Struct("<QQII")              # ino, off, namelen, type

MAX_WRITE = 1 << 17


@dataclass
class Fault:
    kind: str                 # "eio" or "short"
    start: int
    end: int


class FaultFS:
    """Mount ``backing`` at ``mountpoint`` with ``faults`` in a server process; unmount on exit."""

    def __init__(self, backing: Path, mountpoint: Path, faults: list[Fault]) -> None:
        self.backing, self.mountpoint, self.faults = backing, mountpoint, faults
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def unavailable() -> str | None:
        """Why no FUSE file system can be mounted here, or None if it can."""
        if not sys.platform.startswith("linux"):
            return "FUSE fault injection needs Linux"
        if os.geteuid() != 0:
            return "mounting a FUSE file system without fusermount needs root"
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse does not exist (no FUSE in this kernel or container)"
        try:
            os.close(os.open("/dev/fuse", os.O_RDWR))
        except OSError as exc:
            return f"/dev/fuse cannot be opened: {exc.strerror}"
        return None

    def __enter__(self) -> Path:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        spec = json.dumps([asdict(f) for f in self.faults])
        self.process = subprocess.Popen(
            [sys.executable, __file__, str(self.backing), str(self.mountpoint), spec],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != b"mounted":
            self.process.wait(5)
            raise OSError(f"faultfs did not mount: {self.process.stderr.read().decode()}")
        return self.mountpoint

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        subprocess.run(["umount", "-l", str(self.mountpoint)], check=False, capture_output=True)
        if self.process is not None:
            try:
                self.process.wait(10)  # the unmount ends its read loop
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            for pipe in (self.process.stdout, self.process.stderr):
                if pipe is not None:
                    pipe.close()


# ---------------------------------------------------------------------------------------------
# The server (runs in its own process)


def _mount(device: int, mountpoint: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    options = f"fd={device},rootmode=40000,user_id=0,group_id=0".encode()
    flags = 0x2 | 0x4  # MS_NOSUID | MS_NODEV
    if libc.mount(b"faultfs", mountpoint.encode(), b"fuse.faultfs", flags, options) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount: {os.strerror(err)}")


class Server:
    def __init__(self, backing: Path, faults: list[Fault]) -> None:
        self.backing = backing
        self.faults = faults
        self.nodes: dict[int, str] = {}      # nodeid → file name
        self.ids: dict[str, int] = {}
        self.handles: dict[int, int] = {}    # fh → our descriptor

    def attr(self, node: int) -> bytes:
        if node == ROOT:
            st = os.stat(self.backing)
            mode, size, nlink = stat.S_IFDIR | 0o755, 0, 2
        else:
            st = os.stat(self.backing / self.nodes[node])
            mode, size, nlink = stat.S_IFREG | 0o644, st.st_size, 1
        return ATTR.pack(node, size, (size + 511) // 512, int(st.st_atime), int(st.st_mtime),
                         int(st.st_ctime), st.st_atime_ns % 10**9, st.st_mtime_ns % 10**9,
                         st.st_ctime_ns % 10**9, mode, nlink, 0, 0, 0, 4096, 0)

    def node_of(self, name: str) -> int:
        if name not in self.ids:
            self.ids[name] = len(self.ids) + 2
            self.nodes[self.ids[name]] = name
        return self.ids[name]

    def handle(self, opcode: int, node: int, body: bytes) -> bytes:
        """The reply payload; raise OSError for an error reply."""
        if opcode == INIT:
            major, minor, readahead, _ = INIT_IN.unpack_from(body)
            return INIT_OUT.pack(7, 31, readahead, 0, 16, 12, MAX_WRITE, 1, 0, 0, 0, 0)
        if opcode == LOOKUP:
            name = body.rstrip(b"\0").decode()
            if node != ROOT or "/" in name or not (self.backing / name).is_file():
                raise OSError(errno.ENOENT, name)
            child = self.node_of(name)
            return ENTRY_OUT.pack(child, 0, 0, 0, 0, 0) + self.attr(child)
        if opcode == GETATTR:
            return ATTR_OUT.pack(0, 0, 0) + self.attr(node)
        if opcode == OPEN:
            fd = os.open(self.backing / self.nodes[node], os.O_RDONLY)
            self.handles[fd] = fd
            return OPEN_OUT.pack(fd, 0, 0)
        if opcode == READ:
            fh, offset, size, *_ = READ_IN.unpack_from(body)
            return self.read(fh, offset, size)
        if opcode == RELEASE:
            fh = RELEASE_IN.unpack_from(body)[0]
            os.close(self.handles.pop(fh))
            return b""
        if opcode in (FLUSH, RELEASEDIR, DESTROY):
            return b""
        if opcode == OPENDIR:
            return OPEN_OUT.pack(0, 0, 0)
        if opcode == READDIR:
            _, offset, size, *_ = READ_IN.unpack_from(body)
            return self.readdir(offset, size)
        raise OSError(errno.ENOSYS, f"opcode {opcode}")

    def read(self, fh: int, offset: int, size: int) -> bytes:
        for fault in self.faults:
            if not (offset < fault.end and fault.start < offset + size):
                continue
            if fault.kind == "eio":
                raise OSError(errno.EIO, "injected")
            size = max(0, fault.start - offset)  # "short": stop before the fault
        return os.pread(fh, size, offset)

    def readdir(self, offset: int, size: int) -> bytes:
        names = sorted(p.name for p in self.backing.iterdir() if p.is_file())
        out = b""
        for i, name in enumerate(names[offset:], start=offset):
            raw = name.encode()
            entry = DIRENT.pack(self.node_of(name), i + 1, len(raw), stat.S_IFREG >> 12) + raw
            entry += b"\0" * (-len(entry) % 8)
            if len(out) + len(entry) > size:
                break
            out += entry
        return out

    def serve(self, device: int) -> None:
        while True:
            try:
                request = os.read(device, MAX_WRITE + 4096)
            except OSError as exc:
                if exc.errno == errno.EINTR or exc.errno == errno.ENOENT:
                    continue  # ENOENT: the request was interrupted before we read it
                if exc.errno == errno.ENODEV:
                    return  # unmounted
                raise
            _, opcode, unique, node, *_ = IN_HEADER.unpack_from(request)
            body = request[IN_HEADER.size:]
            if opcode in NO_REPLY:
                continue
            try:
                payload, error = self.handle(opcode, node, body), 0
            except OSError as exc:
                payload, error = b"", -(exc.errno or errno.EIO)
            except Exception:  # a bug here must not take the mount down mid-test: say it, EIO
                traceback.print_exc()
                payload, error = b"", -errno.EIO
            try:
                os.write(device, OUT_HEADER.pack(OUT_HEADER.size + len(payload), error, unique)
                         + payload)
            except OSError as exc:
                if exc.errno != errno.ENOENT:  # the kernel gave up on an interrupted request
                    raise
            if opcode == DESTROY:
                return


def main(argv: list[str]) -> None:
    backing, mountpoint, spec = argv
    faults = [Fault(**f) for f in json.loads(spec)]
    device = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    _mount(device, mountpoint)
    print("mounted", flush=True)
    try:
        Server(Path(backing), faults).serve(device)
    finally:
        os.close(device)


if __name__ == "__main__":
    main(sys.argv[1:])
