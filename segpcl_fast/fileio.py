"""Atomic file writes: every file the library writes goes through `atomic_path`.

    with atomic_path("run/results.json") as tmp:   # a temp file in the same folder
        tmp.write_text(...)                        # or torch.save(obj, tmp), prof.export_chrome_trace(tmp)
    # on normal exit: fsync, the mode open() would give (the temp file is made 0600), os.replace onto the
    # target; on an exception: the temp file is removed and the target is untouched

A reader sees the old file or the whole new one, never a half-written file; a write that fails (a full
disk, a file-size limit; torch.save's zip writer too, through `save_torch_file`) is an OSError naming
the target; an interrupt at any point leaves no temp file. `durable=True` also
fsyncs the folder, so the rename itself survives a crash (checkpoints and their pointer). A process
killed outright (SIGKILL, power loss) leaves its temp file behind: `remove_stale_temps` clears a
run's folders when the run starts or resumes.

Torch files (checkpoints, exports, weights) are read with `load_torch_file`: torch.load with
weights_only=True, so a file from elsewhere can hold tensors and plain values but never run code.
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import secrets
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional


def _umask() -> int:
    umask = os.umask(0)  # the only way to read the umask: set it, then restore at once
    os.umask(umask)
    return umask


def chmod_like_open(path: str | os.PathLike) -> None:
    """Give `path` the mode open() would create it with (0o666 minus the umask)."""
    os.chmod(path, 0o666 & ~_umask())


def chmod_tree_like_made(folder: str | os.PathLike) -> None:
    """Give `folder`, its subfolders and files the modes mkdir() and open() would make them with (0o777 /
    0o666 minus the umask): tempfile.mkdtemp's folders are 0o700, some writers' files 0o600.
    A symlink inside is left alone: its target may lie outside `folder` (os.walk does not descend into
    linked folders either)."""
    umask = _umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def _fsync(path: str | os.PathLike) -> None:
    """fsync a file or folder by path (no-op where it cannot be opened for that, e.g. folders on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_TEMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"  # mkstemp's alphabet (remove_stale_temps' pattern)


def _create_temp(candidate: str) -> None:
    """Create `candidate` exclusively, mode 0600 (as mkstemp does); FileExistsError when it exists."""
    os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600))


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path`; replace `path` with it when the block ends without error.
    An OSError while writing (a full disk, a file-size limit) names `path`, not the temp file or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        # the temp name is recorded before the file is made, so an interrupt (Ctrl-C, SIGTERM) at any point
        # leaves nothing behind: with mkstemp, one right after it returned left its file (1 in 37 SIGTERMs)
        for _ in range(100):
            tmp = str(path.parent / f".{path.name}.{''.join(secrets.choice(_TEMP_CHARS) for _ in range(8))}.tmp")
            try:
                _create_temp(tmp)
                break
            except FileExistsError:
                tmp = None  # another's temp file: never removed here
            except OSError as e:  # name the file being written, not the temp name beside it
                tmp = None
                raise _naming(e, e.strerror, path) from e
        else:
            raise FileExistsError(errno.EEXIST, "no free temporary name beside it", str(path))
        try:
            yield Path(tmp)
            _fsync(tmp)
            chmod_like_open(tmp)
            os.replace(tmp, path)
        except OSError as e:  # the OS's error writing the temp file (no name, or the temp's): name the target
            if e.errno is None or (e.filename is not None and str(e.filename) != str(tmp)):
                raise  # the caller's own error (another file, a network error): as it was raised
            raise _naming(e, f"{e.strerror or e} while writing it{_space_hint(e)}", path) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    if durable:
        _fsync(path.parent)


def save_torch_file(obj, path: str | os.PathLike, durable: bool = False) -> Path:
    """torch.save(obj) to `path` atomically. torch reports a failed write (a full disk, a file-size
    limit) as a RuntimeError from its zip writer ("enforce fail at inline_container.cc ... unexpected
    pos"), naming no file: here it is an OSError naming `path`."""
    import torch

    with atomic_path(path, durable) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            if not any(k in str(e) for k in ("inline_container", "PytorchStreamWriter", "unexpected pos")):
                raise
            first = str(e).strip().splitlines()[0][:200]
            raise OSError(errno.EIO, f"torch.save could not write it ({first}): the disk may be full, or a "
                                     "file-size limit (`ulimit -f`) reached", str(path)) from e
    return Path(path)


def _naming(e: OSError, message: str, path: Path) -> OSError:
    """`e` again, of its own type where its constructor allows, with `message` and the target's name."""
    try:
        return type(e)(e.errno, message, str(path))
    except TypeError:  # a subclass with another constructor
        return OSError(e.errno, message, str(path))


def _space_hint(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return " (the disk is full: free space there, or write elsewhere)"
    if e.errno == errno.EFBIG:
        return " (a file-size limit: `ulimit -f` in this shell, or the file system's own)"
    return ""


# temp names here: "." + target name + "." + 8 random characters + ".tmp" (mkstemp's form)
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def remove_stale_temps(folder: str | os.PathLike, is_target: Callable[[str], bool]) -> list[Path]:
    """Remove the temp files that atomic_path left in `folder` when its process was killed mid-write, for
    the targets `is_target` accepts (the files the caller writes there; other tools' temp files in a shared
    folder stay). Not recursive. Call it only where no other process writes those targets."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        m = _TEMP_NAME.match(entry.name)
        if m and is_target(m.group("target")) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


class UnsafeFileError(ValueError):
    """A torch file holding Python objects that torch.load(weights_only=True) refuses to unpickle."""


class DamagedFileError(ValueError):
    """A torch file whose bytes changed after it was written (a record fails its CRC-32 check)."""


CRC_CHUNK = 16 << 20


def check_torch_zip(path: str | os.PathLike) -> None:
    """Every record of a torch zip file against the CRC-32 torch.save stored for it: torch.load reads
    a record with changed bytes as if nothing were wrong (a damaged copy or disk gave NaN losses and
    wrong predictions, or silently other weights). Records saved without a CRC (torch.utils.serialization
    config save.compute_crc32=False stores 0) and legacy non-zip files are not checked. Raises
    DamagedFileError naming the first bad record (without the archive folder torch names after the file as
    it was saved: under atomic writes a temp name such as '.r1_model.pt.5tk6jx1f')."""
    name = None
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename
                # torch writes neither folders nor encrypted records; its reader takes a record flagged
                # as a folder for an empty one (a one-bit change gave uninitialised tensor memory)
                if info.is_dir() or info.external_attr & 0x10 or info.flag_bits & 0x1:
                    raise zipfile.BadZipFile(f"record {info.filename!r} is flagged as a folder or encrypted")
                if info.CRC == 0 and info.file_size > 0:  # no CRC stored: nothing to check against
                    continue
                with archive.open(info) as record:  # reading to the end checks the CRC-32
                    while record.read(CRC_CHUNK):
                        pass
    except (PermissionError, FileNotFoundError, IsADirectoryError):
        raise  # not damage: the caller's own error for an unreadable path
    # damaged headers fail in many ways inside zipfile: a name that does not decode, an unknown
    # compression method, a seek before the start, a bad magic number
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError, RuntimeError,
            OSError) as e:
        detail = str(e).replace(name, name.split("/", 1)[-1]) if name else str(e)
        raise DamagedFileError(f"its bytes changed after it was written ({type(e).__name__}: {detail}): a damaged "
                               "copy or disk") from None


def load_torch_file(path: str | os.PathLike, map_location="cpu"):
    """torch.load(path, weights_only=True): tensors, numbers, strings, lists, tuples and dicts only.

    Anything else (pickled classes, functions: what a crafted file uses to run code on load) raises
    UnsafeFileError; a record that fails its CRC-32 check raises DamagedFileError (check_torch_zip);
    other failures (truncated, not a torch file) propagate as torch raises them."""
    import torch  # here, not at module load: config and data import fileio without needing torch

    check_torch_zip(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the class or function it refused ("unsupported GLOBAL posix.system"); any other
        # unpickling failure is a damaged file or no torch file at all, for the caller to report as such
        if "global" not in str(e).lower():  # torch's text advises weights_only=False: not ours to repeat
            after = str(e).split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in str(e) else ""
            detail = next((line.strip() for line in after.splitlines() if line.strip()), "")
            raise pickle.UnpicklingError("not a torch file" + (f" ({detail})" if detail else "")) from None
        first = next((line for line in str(e).splitlines() if "global" in line.lower()), "")
        first = first.split(". Please")[0].replace("WeightsUnpickler error: ", "").strip().rstrip(".")
        raise UnsafeFileError(f"{path} holds Python objects besides tensors and plain values"
                              + (f" ({first})" if first else "") + "; segpcl_fast loads torch files with "
                              "weights_only=True and never unpickles code from them") from None


def unwritable_dir_reason(path: str | os.PathLike) -> Optional[str]:
    """Why files cannot be written in the folder `path` (made when missing), or None when they can.

    Asked before a run indexes data or loads weights, so a bad output path fails first. Leaves nothing:
    a temp file is made and removed in the nearest existing folder, since access() passes root, and a
    pseudo file system (/proc, /sys) refuses what access() allows.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a folder"
    existing = path
    while not existing.exists():  # the nearest existing folder above: where the first mkdir happens
        if existing.is_symlink():
            return f"{existing} is a broken symbolic link (its target {os.readlink(existing)} does not exist)"
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing}, a parent of {path}, is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):  # also false on a read-only or immutable folder
        return f"{existing} is not writable" + ("" if existing == path else f" (to make {path} in it)")
    # a temp file made and removed there, as atomic_path's are: what a run does in it
    probe = existing / f".segpcl-write-probe.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        return f"{existing} refuses new files ({e.strerror or e})" + ("" if existing == path else f", so {path} "
                                                                      "cannot be made")
    kept = None
    try:
        os.close(fd)
    finally:  # also on Ctrl-C
        try:
            probe.unlink()
        except OSError as e:  # an append-only folder (chattr +a): a run's temp files could not be renamed or removed
            kept = e
    if kept is not None:
        return f"{existing} lets files be made but not removed or renamed ({kept.strerror or kept}; {probe.name} is left there)"
    return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = False) -> Path:
    with atomic_path(path, durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, durable: bool = False) -> Path:
    with atomic_path(path, durable) as tmp:
        tmp.write_text(text)
    return Path(path)
