"""A disk cache of compiled kernels as native object code, loadable without importing numba.

numba's own ``cache=True`` still costs ~0.4 s in a fresh process (``import numba`` and the set-up of
its typing and lowering registries) before the cached code can run. This module keeps, per key, the
object code numba produced for a ``numba.cfunc`` and its C entry symbol. A later process hands that
object to an llvmlite MCJIT engine (about 50 ms to import llvmlite, ~1 ms to build the engine) and
calls the entry point through ctypes.

- :func:`store` runs where numba is imported: it saves a compiled ``cfunc`` under a key.
- :func:`load` never imports numba: it links the saved object into an MCJIT engine of its own and
  returns a ``ctypes`` function, or ``None`` so that the caller compiles with numba instead.
- :func:`key` folds in everything that makes object code unportable (CPU, llvmlite, numba and
  Python versions, ``NUMBA_*`` settings), so a stale entry is a miss, never a wrong load.

Symbols the object leaves undefined are resolved in this order: the few numba runtime helpers a
kernel without allocations or exceptions references (:data:`_HELPERS`, defined here as LLVM IR in
our own engine, so nothing is registered process-wide), then the running process (the Python C API,
libc, libm). A numba-private symbol we do not define (``numba_*``, ``NRT_*``: e.g. the exception
machinery of ``error_model='python'`` or NRT allocation) makes :func:`store` and :func:`load` refuse,
as does any name the process cannot resolve: MCJIT would abort the process on it.

Only ELF64 objects (Linux) are handled; elsewhere :func:`store` returns ``False``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import re
import struct
import sys
import tempfile
import threading

FORMAT_VERSION = 1
_MAGIC = b"BCEOBJ\x00\x01"
_SUFFIX = ".obj"
_KEY_RE = re.compile(r"[0-9a-f]{16,64}\Z")

# numba runtime helpers we define ourselves, with the same C signatures as numba's:
#   void numba_gil_ensure(PyGILState_STATE *)  -> *state = PyGILState_Ensure()
#   void numba_gil_release(PyGILState_STATE *) -> PyGILState_Release(*state)
#   void NRT_MemInfo_call_dtor(NRT_MemInfo *)  -> nothing (see below)
# The GIL pair is only reached on the error path of a cfunc wrapper. NRT_MemInfo_call_dtor runs when
# an NRT-managed array's refcount drops to zero; arrays made from raw pointers (numba.carray) have no
# meminfo, and a kernel that could create one references NRT allocation symbols, which we refuse, so
# it is unreachable. If it ever ran it would leak instead of freeing, never crash.
_HELPERS = frozenset({"numba_gil_ensure", "numba_gil_release", "NRT_MemInfo_call_dtor"})
_HELPERS_IR = r"""
declare i32 @PyGILState_Ensure()
declare void @PyGILState_Release(i32)

define void @numba_gil_ensure(i32* %state) {
  %s = call i32 @PyGILState_Ensure()
  store i32 %s, i32* %state
  ret void
}

define void @numba_gil_release(i32* %state) {
  %s = load i32, i32* %state
  call void @PyGILState_Release(i32 %s)
  ret void
}

define void @NRT_MemInfo_call_dtor(i8* %meminfo) {
  ret void
}
"""
_PRIVATE_PREFIXES = ("numba_", "NRT_", "_ZN")  # numba's own code: only what _HELPERS defines


# ------------------------------------------------------------------------------------------ location
def cache_dir() -> pathlib.Path | None:
    """The cache folder (created if needed), or ``None`` when it cannot be created or written.

    ``$BCELOGITS_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/bcelogits``, else ``~/.cache/bcelogits``.
    """
    try:
        explicit = os.environ.get("BCELOGITS_CACHE_DIR")
        if explicit:
            path = pathlib.Path(explicit)
        else:
            base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            path = pathlib.Path(base) / "bcelogits"
        path.mkdir(parents=True, exist_ok=True)
        if not (path.is_dir() and os.access(path, os.W_OK | os.X_OK)):
            return None
        return path
    except (OSError, ValueError, RuntimeError):
        return None


def _path(k: str) -> pathlib.Path | None:
    if not isinstance(k, str) or not _KEY_RE.match(k):
        return None
    d = cache_dir()
    return None if d is None else d / (k + _SUFFIX)


# ----------------------------------------------------------------------------------------------- key
def _encode(part, out: list) -> None:
    """Append an unambiguous (type-tagged, length-prefixed) encoding of ``part`` to ``out``."""
    if isinstance(part, (tuple, list)):
        out.append(b"T%d:" % len(part))
        for p in part:
            _encode(p, out)
        return
    if isinstance(part, bytes):
        tag, data = b"b", part
    elif isinstance(part, str):
        tag, data = b"s", part.encode("utf-8", "surrogatepass")
    elif part is None or isinstance(part, (bool, int, float)):
        tag, data = b"r", repr(part).encode()
    else:
        raise TypeError(f"key parts must be str, bytes, numbers or tuples of them, not {type(part)!r}")
    out.append(tag + b"%d:" % len(data) + data)


@functools.lru_cache(maxsize=1)
def _platform_parts() -> tuple:
    """What makes object code unportable and is fixed for the life of the process."""
    import llvmlite
    import llvmlite.binding as ll

    try:
        numba_version = importlib.metadata.version("numba")  # reads metadata; does not import numba
    except importlib.metadata.PackageNotFoundError:
        numba_version = ""
    try:
        features = ll.get_host_cpu_features().flatten()
    except RuntimeError:
        features = ""
    return (
        FORMAT_VERSION,
        llvmlite.__version__,
        ".".join(map(str, ll.llvm_version_info)),
        numba_version,
        ll.get_process_triple(),
        ll.get_host_cpu_name(),
        features,
        sys.version,
        sys.platform,
        platform.machine(),
    )


def key(*parts) -> str:
    """A 32-hex-digit key for ``parts`` on this machine and software stack.

    ``parts`` (str, bytes, numbers, tuples of them) should name what was compiled: typically the
    kernel module's source text and the specialisation. The CPU name and features, llvmlite/LLVM,
    numba (from its metadata; numba is not imported), Python, the platform, this module's format
    version and every ``NUMBA_*`` environment variable are added.
    """
    numba_env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("NUMBA_")))
    out: list = []
    _encode((parts, _platform_parts(), numba_env), out)
    return hashlib.sha256(b"".join(out)).hexdigest()[:32]


# -------------------------------------------------------------------------------------------- format
# file   = MAGIC | sha256(payload) | payload
# payload = u32 len | key | u32 len | entry symbol | u64 len | object code      (little-endian)
def _pack(k: str, symbol: str, obj: bytes) -> bytes:
    kb, sb = k.encode(), symbol.encode()
    payload = b"".join(
        (struct.pack("<I", len(kb)), kb, struct.pack("<I", len(sb)), sb, struct.pack("<Q", len(obj)), obj)
    )
    return _MAGIC + hashlib.sha256(payload).digest() + payload


def _unpack(k: str, blob: bytes) -> tuple[str, bytes] | None:
    """``(entry symbol, object code)`` from a file's bytes, or ``None`` if damaged or not for ``k``."""
    head = len(_MAGIC) + 32
    if len(blob) < head or blob[: len(_MAGIC)] != _MAGIC:
        return None
    payload = blob[head:]
    if hashlib.sha256(payload).digest() != blob[len(_MAGIC) : head]:
        return None
    try:
        pos, fields = 0, []
        for fmt in ("<I", "<I", "<Q"):
            (n,) = struct.unpack_from(fmt, payload, pos)
            pos += struct.calcsize(fmt)
            fields.append(payload[pos : pos + n])
            pos += n
        if pos != len(payload) or fields[0].decode() != k:
            return None
        return fields[1].decode(), bytes(fields[2])
    except (struct.error, UnicodeDecodeError):
        return None


# ----------------------------------------------------------------------------------------------- ELF
_SHT_SYMTAB = 2
_SHN_UNDEF, _SHN_LORESERVE, _SHN_COMMON = 0, 0xFF00, 0xFFF2
_STB_GLOBAL, _STB_WEAK = 1, 2
_STT_FUNC = 2


def _elf_symbols(obj: bytes) -> tuple[set, set, set] | None:
    """``(undefined, strong_defined, functions)`` global symbol names of an ELF64 relocatable object,
    or ``None`` if ``obj`` is not one we can read. ``functions`` are the defined global/weak FUNCs."""
    try:
        if obj[:4] != b"\x7fELF" or obj[4] != 2 or obj[5] not in (1, 2):  # ELF64, LSB or MSB
            return None
        e = "<" if obj[5] == 1 else ">"
        e_type = struct.unpack_from(e + "H", obj, 16)[0]
        shoff = struct.unpack_from(e + "Q", obj, 0x28)[0]
        shentsize, shnum = struct.unpack_from(e + "HH", obj, 0x3A)
        if e_type != 1 or shentsize != 64 or shnum == 0:  # ET_REL, classic section header table
            return None

        def section(i):  # (type, offset, size, link, entsize)
            f = struct.unpack_from(e + "IIQQQQIIQQ", obj, shoff + 64 * i)
            return f[1], f[4], f[5], f[6], f[9]

        undefined, strong, functions = set(), set(), set()
        for i in range(shnum):
            sh_type, off, size, link, entsize = section(i)
            if sh_type != _SHT_SYMTAB:
                continue
            if entsize != 24 or off + size > len(obj):
                return None
            _, str_off, str_size, _, _ = section(link)
            if str_off + str_size > len(obj):
                return None
            strtab = obj[str_off : str_off + str_size]
            for pos in range(off + 24, off + size - size % 24, 24):  # entry 0 is the null symbol
                name_off, info, _, shndx = struct.unpack_from(e + "IBBH", obj, pos)
                bind, kind = info >> 4, info & 0xF
                if bind not in (_STB_GLOBAL, _STB_WEAK) or name_off == 0:
                    continue
                end = strtab.index(b"\x00", name_off)
                name = strtab[name_off:end].decode("utf-8")
                if shndx == _SHN_UNDEF:
                    undefined.add(name)
                    continue
                if bind == _STB_GLOBAL and shndx != _SHN_COMMON:
                    strong.add(name)
                if kind == _STT_FUNC and (shndx < _SHN_LORESERVE):
                    functions.add(name)
        return undefined, strong, functions
    except (IndexError, ValueError, struct.error, UnicodeDecodeError):
        return None


def _unsupported(undefined: set) -> list:
    """Undefined names we will not resolve: numba-private ones outside :data:`_HELPERS`."""
    return sorted(n for n in undefined if n not in _HELPERS and n.startswith(_PRIVATE_PREFIXES))


# --------------------------------------------------------------------------------------------- store
def store(k: str, cfunc) -> bool:
    """Save the object code and C entry symbol of the compiled ``numba.cfunc`` under key ``k``.

    Written atomically (temporary file and ``os.replace``). Returns ``False``, without raising, when
    caching is off, the object cannot be loaded later (see the module docstring) or anything fails.
    """
    tmp = None
    try:
        path = _path(k)
        if path is None:
            return False
        name, kind, data = cfunc._library.serialize_using_object_code()
        symbol = cfunc.native_name
        if kind != "object" or not isinstance(symbol, str):
            return False
        obj = bytes(data[0])
        syms = _elf_symbols(obj)
        if syms is None or symbol not in syms[2] or _unsupported(syms[0]):
            return False
        import llvmlite.binding as ll  # numba's engine has made the process searchable by now

        if any(n not in _HELPERS and not ll.address_of_symbol(n) for n in syms[0]):
            return False
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(_pack(k, symbol, obj))
        os.replace(tmp, path)
        tmp = None
        return True
    except Exception:
        return False
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------- load
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A fresh lock in a forked child: one held by another thread at the fork would stay held there."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
_state: dict = {}  # "ll", "engines" (list, kept alive): created on the first load
_addresses: dict = {}  # key -> entry address of a linked object
_functions: dict = {}  # (key, restype, argtypes) -> ctypes function


def _new_engine():
    """A new MCJIT engine (under ``_lock``), configured as numba's JIT codegen, for one object.

    One engine per object: numba names a compiled function after its Python name and a per-process
    counter, so two kernels compiled first in two different processes can define the same symbol (the
    first function each process compiled, e.g. the entry points of a float32 and a float64 kernel). In
    one shared engine the second of them could not be linked, and was compiled again in every process;
    each engine resolves its object's own symbols first, then the process's. (An engine owns its target
    machine, so each gets its own.)"""
    if "ll" not in _state:
        import llvmlite.binding as ll

        ll.initialize_native_target()
        ll.initialize_native_asmprinter()
        _state.update(ll=ll, engines=[])
    ll = _state["ll"]
    target = ll.Target.from_default_triple()
    arch = target.name
    reloc = "static" if arch.startswith("x86") else "pic" if arch.startswith("ppc") else "default"
    try:
        features = ll.get_host_cpu_features().flatten()
    except RuntimeError:
        features = ""
    # opt=0: an engine only ever compiles _HELPERS_IR; kernels arrive as finished object code.
    tm = target.create_target_machine(
        cpu=ll.get_host_cpu_name(),
        features=features,
        opt=0,
        reloc=reloc,
        codemodel="jitdefault",
        jit=True,
    )
    module = ll.parse_assembly("")
    module.triple = ll.get_process_triple()
    # Creating an MCJIT engine also makes the process's own symbols searchable (address_of_symbol).
    engine = ll.create_mcjit_compiler(module, tm)
    _state["engines"].append(engine)
    return engine, ll


def _add_helpers(engine, ll) -> None:
    module = ll.parse_assembly(_HELPERS_IR)
    module.triple = ll.get_process_triple()
    module.verify()
    engine.add_module(module)
    engine.finalize_object()


def _link(k: str):
    """The entry address of key ``k`` after linking its object into an engine of its own, or ``None``."""
    path = _path(k)
    if path is None:
        return None
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    unpacked = _unpack(k, blob)
    if unpacked is None:
        return None
    symbol, obj = unpacked
    syms = _elf_symbols(obj)
    if syms is None:
        return None
    undefined, _strong, functions = syms
    if symbol not in functions or _unsupported(undefined):
        return None
    engine, ll = _new_engine()
    if any(n not in _HELPERS and not ll.address_of_symbol(n) for n in undefined):
        return None  # MCJIT would abort the process on an unresolvable symbol
    if undefined & _HELPERS:
        _add_helpers(engine, ll)
    engine.add_object_file(ll.ObjectFileRef.from_data(obj))  # the engine takes ownership
    engine.finalize_object()
    return engine.get_function_address(symbol) or None


def load(k: str, restype, argtypes):
    """The kernel stored under ``k`` as ``ctypes.CFUNCTYPE(restype, *argtypes)``, or ``None``.

    Does not import numba. ``None`` (never an exception) when there is no entry, it is damaged or
    for another key, or it needs a symbol we cannot provide. Calls release the GIL while running.
    The same key loaded again returns the same function.
    """
    try:
        sig = (k, restype, tuple(argtypes))
        with _lock:
            fn = _functions.get(sig)
            if fn is not None:
                return fn
            address = _addresses.get(k)
            if address is None:
                address = _link(k)
                if address is None:
                    return None
                _addresses[k] = address
            fn = _functions[sig] = ctypes.CFUNCTYPE(restype, *argtypes)(address)
            return fn
    except Exception:
        return None
