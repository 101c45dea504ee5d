"""Shared buffers for colocated transfers: memory both sides map, described without pickle.

The trainer makes the buffers; every worker on the same host (CPU) or the
same GPU (CUDA) maps them once per group and reads its weights from them.
A buffer travels as a small JSON-able description (:meth:`SharedBuffers.describe`),
never as a pickled object or a ``multiprocessing`` reduction.

* **CPU**: anonymous shared memory (``os.memfd_create``). A worker opens the
  trainer's descriptor through ``/proc/<pid>/fd/<fd>`` and maps it; once
  every worker has mapped it, the trainer closes the descriptor
  (:meth:`SharedBuffers.seal`), after which nobody else can open it. Nothing
  ever has a name in ``/dev/shm``, so nothing is left there whichever side
  dies, and the memory is freed when the last mapping goes.
* **CUDA**: device memory from ``cudaMalloc`` (outside torch's caching
  allocator, so the handle covers exactly the buffer), exported with
  ``cudaIpcGetMemHandle`` and opened once per group with
  ``cudaIpcOpenMemHandle``; the CUDA runtime is called through ``ctypes``.
  Reuse is ordered by interprocess CUDA events (``torch.cuda.Event``).

Every check that the other side is where it claims (a host secret read back
from the shared memory, the GPU's UUID) raises TransferError.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import mmap
import os
import secrets
import stat
import struct
import warnings
from typing import Any

import torch

from .errors import TransferError
from .group import gpu_uuid, shared_fd

__all__ = ["SharedBuffers", "HostProbe", "check_host_probe", "device_uuid", "open_buffers", "open_memory", "locate",
           "allocation_id", "mapped_size", "NoAllocation", "open_shared", "same_shared", "shared_segment"]

_PROBE_BYTES = 32


def device_uuid(device: torch.device) -> str:
    """The GPU's UUID (CUDA), or "cpu"."""
    return gpu_uuid(device) or "cpu"


# -- CPU: memfd -----------------------------------------------------------------------------


_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
"""A buffer's size is sealed before any worker maps it: a trainer that shrank it afterwards would
kill every worker reading past the new end with SIGBUS."""


def _memfd(nbytes: int, name: str) -> tuple[int, torch.Tensor]:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, max(nbytes, 1))
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        # torch.from_file maps the file MAP_SHARED into a storage torch owns (freed with it).
        tensor = torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=max(nbytes, 1), dtype=torch.uint8)
    except BaseException:
        os.close(fd)
        raise
    return fd, tensor[:nbytes]


_OPEN_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
"""How a worker opens a file the trainer names: never waiting (a FIFO with no writer, a file
under a lease would block the open itself, past every timeout) and never taking a terminal."""


def _open_memfd(pid: int, fd: int, nbytes: int, what: str) -> torch.Tensor:
    path = f"/proc/{pid}/fd/{fd}"
    try:
        mine = os.open(path, os.O_RDWR | _OPEN_FLAGS)
    except OSError as e:
        raise TransferError(f"cannot open the trainer's shared memory for {what} ({path}: {e.strerror}); "
                            "colocated mode needs the trainer on the same host, in the same PID namespace, "
                            "as the same user") from None  # fmt: skip
    try:
        size = os.fstat(mine).st_size
        try:
            sealed = fcntl.fcntl(mine, fcntl.F_GET_SEALS) & _SEALS == _SEALS
        except OSError:
            sealed = False
        if not sealed:
            raise TransferError(f"the trainer's shared memory for {what} ({path}) is not sealed at its size: "
                                "it could shrink under this worker")  # fmt: skip
        if size != max(nbytes, 1):
            raise TransferError(f"the trainer's shared memory for {what} has {size} bytes, expected {nbytes}: "
                                f"{path} is not the trainer's buffer (another host or PID namespace?)")  # fmt: skip
        return torch.from_file(f"/proc/self/fd/{mine}", shared=True, size=size, dtype=torch.uint8)[:nbytes]
    finally:
        os.close(mine)


_SHARED_MAGIC = b"TXFD"


def shared_segment(tensor: torch.Tensor) -> tuple[int, int, bytes, int] | None:
    """Where a CPU tensor lies when its storage is shared memory torch holds a descriptor of
    (``share_memory_()``): ``(storage base, storage bytes, 64-byte handle, inode)``; None otherwise.
    The handle names this process, the descriptor and the file (device and inode), so a worker
    can open it through ``/proc`` and check it is still the same memory."""
    storage = tensor.untyped_storage()
    fd = shared_fd(storage)
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    handle = _SHARED_MAGIC + struct.pack("<qqqq", os.getpid(), fd, st.st_dev, st.st_ino)
    return storage.data_ptr(), storage.nbytes(), handle.ljust(64, b"\0"), st.st_ino


def same_shared(handle: bytes, inode: int) -> bool:
    """Whether the descriptor a :func:`shared_segment` handle names (in this process) still holds
    that memory."""
    fd = struct.unpack_from("<qqqq", handle, len(_SHARED_MAGIC))[1]
    try:
        return os.fstat(fd).st_ino == inode
    except OSError:
        return False


def open_shared(handle: bytes, size: int, inode: int, trainer_pid: int | None) -> torch.Tensor:
    """A worker maps the trainer's shared memory a :func:`shared_segment` handle names, read-only:
    a uint8 tensor of its first ``size`` bytes. TransferError unless the handle names the process
    whose probe read back at init (``trainer_pid``: the trainer, or a process it handed its probe
    to), the descriptor there still holds that very file (device and inode), and the file holds
    ``size`` bytes."""
    if len(handle) != 64 or not handle.startswith(_SHARED_MAGIC) or any(handle[4 + 32 :]):
        raise TransferError("the direct-read map names a malformed shared-memory handle")
    pid, fd, dev, ino = struct.unpack_from("<qqqq", handle, len(_SHARED_MAGIC))
    if trainer_pid is None or pid != trainer_pid or ino != inode:
        raise TransferError(f"the direct-read map names memory of pid {pid}, not of the trainer")
    path = f"/proc/{pid}/fd/{fd}"
    try:
        mine = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    except (OSError, ValueError, OverflowError) as e:
        raise TransferError(f"cannot open the trainer's tensor memory ({path}: {e})") from None
    try:
        st = os.fstat(mine)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (dev, ino) or not 0 < size <= st.st_size:
            raise TransferError(f"the trainer's tensor memory at {path} is not the file its map names, or holds "
                                f"fewer than {size} bytes")  # fmt: skip
        try:
            # Read-only (PROT_READ): a worker, or a load_weights that writes into its input, can
            # never change the trainer's parameters (such a write faults in the worker instead).
            view = mmap.mmap(mine, size, access=mmap.ACCESS_READ)
        except (OSError, ValueError, OverflowError) as e:  # not a file that can be mapped
            raise TransferError(f"cannot map the trainer's tensor memory at {path}: {e}") from None
    finally:
        os.close(mine)
    with warnings.catch_warnings():  # torch warns that the buffer is not writable: that is the point
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=torch.uint8)  # holds the mapping until its last view goes


class HostProbe:
    """A few random bytes in shared memory: a worker that reads them back shares the trainer's host.

    Made by the trainer at init; :meth:`describe` goes to the workers, which
    call :func:`check_host_probe`; :meth:`close` once they all answered.
    """

    def __init__(self) -> None:
        self.secret = secrets.token_bytes(_PROBE_BYTES)
        self.fd, tensor = _memfd(_PROBE_BYTES, "torchxfer-probe")
        tensor.copy_(torch.frombuffer(bytearray(self.secret), dtype=torch.uint8))

    def describe(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "fd": self.fd, "secret": self.secret.hex()}

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def check_host_probe(desc: Any) -> None:
    """Raise TransferError unless the trainer's probe reads back here as described."""
    if not isinstance(desc, dict):
        raise TransferError("the trainer's host probe is malformed")
    pid, fd, secret = desc.get("pid"), desc.get("fd"), desc.get("secret")
    if not (_is_int(pid) and _is_int(fd) and isinstance(secret, str) and len(secret) == 2 * _PROBE_BYTES):
        raise TransferError("the trainer's host probe is malformed")
    try:
        expected = bytes.fromhex(secret)
    except ValueError:
        raise TransferError("the trainer's host probe is malformed") from None
    probe = _open_memfd(pid, fd, _PROBE_BYTES, "the host check")
    got = bytes(probe.tolist())
    if got != expected:
        raise TransferError(f"the trainer (pid {pid}) is not on this host: its shared-memory probe does not read back "
                            "here (another host or PID namespace); use the NCCL or Gloo backend")  # fmt: skip


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


# -- CUDA: the runtime through ctypes ---------------------------------------------------------


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


_CUDART: Any = None


def _handle(raw: bytes) -> _IpcHandle:
    if len(raw) != 64:
        raise TransferError(f"a CUDA IPC handle has 64 bytes, got {len(raw)}")
    handle = _IpcHandle()
    ctypes.memmove(ctypes.addressof(handle), raw, 64)
    return handle


def _cudart() -> Any:
    """The CUDA runtime torch loaded (found in this process's maps), else one by name."""
    global _CUDART
    if _CUDART is not None:
        return _CUDART
    torch.cuda.init()
    candidates = []
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            if "libcudart" in os.path.basename(path) and path not in candidates:
                candidates.append(path)
    found = ctypes.util.find_library("cudart")
    candidates += [c for c in (found, "libcudart.so.13", "libcudart.so.12", "libcudart.so") if c]
    for name in candidates:
        try:
            lib = ctypes.CDLL(name)
            lib.cudaIpcOpenMemHandle.argtypes = [ctypes.POINTER(ctypes.c_void_p), _IpcHandle, ctypes.c_uint]
            lib.cudaIpcGetMemHandle.argtypes = [ctypes.POINTER(_IpcHandle), ctypes.c_void_p]
            lib.cudaIpcCloseMemHandle.argtypes = [ctypes.c_void_p]
            lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
            lib.cudaFree.argtypes = [ctypes.c_void_p]
            lib.cudaGetErrorString.restype = ctypes.c_char_p
            _CUDART = lib
            return lib
        except (OSError, AttributeError):
            continue
    raise TransferError("colocated mode on CUDA needs the CUDA runtime library (libcudart), which was not found")


def _check(code: int, what: str) -> None:
    if code != 0:
        text = _cudart().cudaGetErrorString(code)
        raise TransferError(f"{what} failed: CUDA error {code} ({text.decode() if text else '?'})")


_DRIVER: Any = None
_BUFFER_ID = 7  # CU_POINTER_ATTRIBUTE_BUFFER_ID


def _driver() -> Any:
    """The CUDA driver library: the allocation a pointer lies in (``cuMemGetAddressRange``) and
    its id (``cuPointerGetAttribute``)."""
    global _DRIVER
    if _DRIVER is None:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuMemGetAddressRange_v2
        fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
        fn.restype = ctypes.c_int
        fn = lib.cuPointerGetAttribute
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
        fn.restype = ctypes.c_int
        _DRIVER = lib
    return _DRIVER


class NoAllocation(RuntimeError):
    """The driver knows no allocation at a pointer."""


def locate(ptr: int) -> tuple[int, int, int]:
    """The device allocation holding pointer ``ptr``, as the driver sees it: (base, size,
    allocation id). NoAllocation if it knows none."""
    drv = _driver()
    base, size, buffer_id = ctypes.c_uint64(), ctypes.c_size_t(), ctypes.c_uint64()
    if drv.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)) != 0 \
            or drv.cuPointerGetAttribute(ctypes.byref(buffer_id), _BUFFER_ID, ctypes.c_uint64(ptr)) != 0:  # fmt: skip
        raise NoAllocation(f"no allocation found at {ptr:#x}")
    return int(base.value), int(size.value), int(buffer_id.value)


def allocation_id(ptr: int) -> int:
    """The driver's id of the allocation holding ``ptr`` (-1: none)."""
    value = ctypes.c_uint64()
    if _driver().cuPointerGetAttribute(ctypes.byref(value), _BUFFER_ID, ctypes.c_uint64(ptr)) != 0:
        return -1
    return value.value


def mapped_size(ptr: int) -> int:
    """How many bytes from ``ptr`` (a base an IPC handle was opened at) the driver maps: 0 if it
    knows no allocation starting there. A peer's claimed size is checked against this before
    any byte is read, since a read past the mapping corrupts this process's CUDA context."""
    try:
        base, size, _ = locate(ptr)
    except (NoAllocation, OSError):
        return 0
    return size if base == ptr else 0


class _DeviceMemory:
    """Device memory torch can wrap (``__cuda_array_interface__``); released when the last tensor goes."""

    def __init__(self, ptr: int, nbytes: int, release: str) -> None:
        self.ptr, self.nbytes, self.release = ptr, nbytes, release
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 2}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            lib = _cudart()
            (lib.cudaFree if self.release == "free" else lib.cudaIpcCloseMemHandle)(ctypes.c_void_p(self.ptr))


def _wrap(device: torch.device, ptr: int, nbytes: int, release: str) -> torch.Tensor:
    with torch.cuda.device(device):
        return torch.as_tensor(_DeviceMemory(ptr, nbytes, release), device=device)


# -- buffers ----------------------------------------------------------------------------------


class SharedBuffers:
    """The trainer's buffers: ``num_buffers`` of ``nbytes`` each, on ``device``.

    On CUDA, also one interprocess event per buffer, recorded by the trainer
    once a bucket is packed into it (workers wait for it on their stream).
    """

    def __init__(self, device: torch.device, nbytes: int, num_buffers: int) -> None:
        self.device, self.nbytes = device, nbytes
        self.fds: list[int] = []
        self.tensors: list[torch.Tensor] = []
        self.events: list[Any] = []
        try:
            for _ in range(num_buffers):
                if device.type == "cuda":
                    lib, ptr = _cudart(), ctypes.c_void_p()
                    with torch.cuda.device(device):
                        _check(lib.cudaMalloc(ctypes.byref(ptr), max(nbytes, 1)), f"cudaMalloc of {nbytes} bytes")
                        self.tensors.append(_wrap(device, ptr.value, nbytes, "free"))
                        self.events.append(torch.cuda.Event(interprocess=True))
                else:
                    try:
                        fd, tensor = _memfd(nbytes, "torchxfer-buffer")
                    except (OSError, RuntimeError) as e:  # the host cannot map that much shared memory
                        raise TransferError(f"cannot allocate {num_buffers} shared buffers of {nbytes} bytes on the "
                                            f"CPU ({type(e).__name__}: {str(e)[:200]}); pass a smaller "
                                            "packed_buffer_size_bytes") from None  # fmt: skip
                    self.fds.append(fd)
                    self.tensors.append(tensor)
        except BaseException:
            self.seal()
            raise

    def describe(self) -> dict[str, Any]:
        """What a worker needs to open the buffers (JSON-able; no pickle)."""
        desc: dict[str, Any] = {"device": self.device.type, "nbytes": self.nbytes, "uuid": device_uuid(self.device)}
        if self.device.type == "cuda":
            lib, handles = _cudart(), []
            for t in self.tensors:
                handle = _IpcHandle()
                with torch.cuda.device(self.device):
                    _check(lib.cudaIpcGetMemHandle(ctypes.byref(handle), ctypes.c_void_p(t.data_ptr())),
                           "cudaIpcGetMemHandle")  # fmt: skip
                # string_at, not .reserved: a c_char array field stops at its first NUL byte.
                handles.append(ctypes.string_at(ctypes.addressof(handle), 64).hex())
            with torch.cuda.device(self.device):
                desc["events"] = [bytes(e.ipc_handle()).hex() for e in self.events]
            desc["handles"] = handles
        else:
            desc["pid"], desc["fds"] = os.getpid(), list(self.fds)
        return desc

    def seal(self) -> None:
        """Once every worker mapped the buffers: close their descriptors, so no one else can open them."""
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def open_buffers(desc: Any, device: torch.device, num_buffers: int, nbytes: int,
                 trainer_pid: int | None) -> tuple[list[torch.Tensor], list[Any]]:  # fmt: skip
    """A worker maps the trainer's buffers (once per group); returns the tensors and, on CUDA, the events.

    Raises TransferError if the description does not match what the rows
    announced, or the buffers cannot be opened here (another host or GPU). On the CPU
    the buffers must be memory of ``trainer_pid``, the process whose probe read back at init.
    """
    if not isinstance(desc, dict) or desc.get("nbytes") != nbytes or desc.get("device") not in ("cpu", "cuda"):
        raise TransferError("the trainer's buffer description is malformed or disagrees with its rows")
    if desc["device"] != device.type:
        raise TransferError(f"the trainer's buffers are on {desc['device']}, this worker receives on {device}: "
                            "colocated workers use the trainer's device type")  # fmt: skip
    if desc.get("uuid") != device_uuid(device):
        raise TransferError(f"the trainer's buffers are on GPU {str(desc.get('uuid'))[:80]!r}, this worker is on "
                            f"{device} ({device_uuid(device)}): colocated mode needs the same GPU")  # fmt: skip
    if device.type == "cpu":
        pid, fds = desc.get("pid"), desc.get("fds")
        if not _is_int(pid) or not isinstance(fds, list) or len(fds) != num_buffers or not all(map(_is_int, fds)):
            raise TransferError("the trainer's buffer description is malformed")
        if pid != trainer_pid:
            raise TransferError(f"the trainer's buffer description names memory of pid {pid}, not of the trainer")
        return [_open_memfd(pid, fd, nbytes, f"buffer {i}") for i, fd in enumerate(fds)], []
    handles, events = desc.get("handles"), desc.get("events")
    if not (isinstance(handles, list) and isinstance(events, list) and len(handles) == len(events) == num_buffers
            and all(isinstance(h, str) and len(h) == 128 for h in handles + events)):  # fmt: skip
        raise TransferError("the trainer's buffer description is malformed")
    try:
        raw = [bytes.fromhex(h) for h in handles + events]
    except ValueError:
        raw = []
    if len(raw) != 2 * num_buffers or any(len(h) != 64 for h in raw):  # fromhex skips whitespace
        raise TransferError("the trainer's buffer description is malformed")
    tensors = [open_memory(device, h, nbytes, "the trainer's buffer") for h in raw[:num_buffers]]
    return tensors, open_events(device, b"".join(raw[num_buffers:]), num_buffers)


def open_memory(device: torch.device, handle: bytes, nbytes: int, what: str) -> torch.Tensor:
    """Map another process's device allocation from its 64-byte CUDA IPC handle: a uint8 tensor of
    its first ``nbytes`` bytes, unmapped when the last tensor viewing it goes. TransferError if
    the handle cannot be opened here, or maps fewer than ``nbytes`` bytes."""
    lib, ptr = _cudart(), ctypes.c_void_p()
    with torch.cuda.device(device):
        code = lib.cudaIpcOpenMemHandle(ctypes.byref(ptr), _handle(handle), 1)
    if code != 0 or not ptr.value:
        lib.cudaGetLastError()  # the runtime keeps the error for torch's next check otherwise
        text = lib.cudaGetErrorString(code)
        raise TransferError(f"opening {what} (cudaIpcOpenMemHandle) failed: CUDA error {code} "
                            f"({text.decode() if text else '?'})")  # fmt: skip
    tensor = _wrap(device, ptr.value, nbytes, "close")  # unmapped as it goes, if refused below
    real = mapped_size(ptr.value)
    if real < nbytes:
        raise TransferError(f"{what} is said to hold {nbytes} bytes, but the driver maps {real} there")
    return tensor


def new_events(device: torch.device, count: int) -> tuple[list[Any], bytes]:
    """A worker's release events (one per buffer) and their handles, 64 bytes each, concatenated."""
    if device.type != "cuda":
        return [], b""
    with torch.cuda.device(device):
        events = [torch.cuda.Event(interprocess=True) for _ in range(count)]
        return events, b"".join(bytes(e.ipc_handle()).ljust(64, b"\0")[:64] for e in events)


def open_events(device: torch.device, blob: bytes, count: int) -> list[Any]:
    """Open ``count`` interprocess events from their 64-byte handles, concatenated in ``blob``
    (the workers' release events, or the trainer's buffer events). TransferError if the runtime
    refuses one."""
    try:
        with torch.cuda.device(device):
            return [torch.cuda.Event.from_ipc_handle(device, blob[64 * i : 64 * (i + 1)]) for i in range(count)]
    except Exception as e:
        raise TransferError(f"a peer's CUDA event handle cannot be opened here: {type(e).__name__}: "
                            f"{str(e)[:200]}") from None  # fmt: skip
