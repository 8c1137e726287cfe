"""The native core's library, its argument layout and its enums, loaded once per process.

The library (``libbce_core``, built by CMake from ``native/*.c`` when the package is installed) sits
next to this file. Its argument block ``bce_args`` and its enums are declared once, in
``native/bce_core.h``, as X-macro lists; this module reads the same lines to build the
:class:`ctypes.Structure` mirror and the :class:`enum.IntEnum` / :class:`enum.IntFlag` classes, then
checks the mirror's size and every field offset against the library's own (``bce_args_size``,
``bce_args_offset``): a header and a library that disagree are refused, never run.

Dispatch targets: the kernel is compiled for several instruction sets into the one library; the best
one this CPU *and* its OS support (CPUID, and XCR0 for the AVX / AVX-512 register state) is chosen at
load. ``BCELOGITS_CPU_TARGET=baseline|x86-64-v3|x86-64-v4`` forces a lower one (every target gives the
same bits; the variable is for tests and for matching an older machine's speed); a target this machine
cannot run is refused with a warning that names the ones it can.
"""

from __future__ import annotations

import ctypes
import enum
import os
import re
import struct
import sys
import warnings

_HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(_HERE, "native", "bce_core.h")
#: The environment variable that forces a dispatch target.
TARGET_ENV = "BCELOGITS_CPU_TARGET"


def library_name() -> str:
    """The file name of the core library on this platform."""
    if sys.platform == "win32":
        return "libbce_core.dll"
    if sys.platform == "darwin":
        return "libbce_core.dylib"
    return "libbce_core.so"


def _parse_header(path: str):
    """``(fields, enums)`` from the header's X-macro lists: fields as ``[(kind, name)]`` in struct order,
    enums as ``{list name: [(item, value)]}``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lists: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"#define (BCE_[A-Z_]+)\((F|E)\)", line)
        if m:
            current = m.group(1)
            lists[current] = []
        if current is not None:
            lists[current].append(line)
            if not line.rstrip().endswith("\\"):
                current = None
    fields = [
        (k, n) for line in lists["BCE_ARGS_FIELDS"] for k, n in re.findall(r"F\((PTR|I64|F64), (\w+)\)", line)
    ]
    enums = {
        name: [(item, int(v)) for line in lines for item, v in re.findall(r"E\((\w+), (-?\d+)\)", line)]
        for name, lines in lists.items()
        if name != "BCE_ARGS_FIELDS"
    }
    return fields, enums


FIELDS, _ENUMS = _parse_header(HEADER)
_CTYPES = {"PTR": ctypes.c_uint64, "I64": ctypes.c_int64, "F64": ctypes.c_double}
_STRUCT_CODES = {"PTR": "Q", "I64": "q", "F64": "d"}


class Args(ctypes.Structure):
    """Mirror of ``bce_args`` (native/bce_core.h): one call's arguments and results."""

    _fields_ = [(name, _CTYPES[kind]) for kind, name in FIELDS]


#: Packs every field of :class:`Args` at once (one call instead of one attribute store per field).
PACK = struct.Struct("<" + "".join(_STRUCT_CODES[kind] for kind, _ in FIELDS))
#: The three results (out_total, out_count, out_wsum), read back at once.
RESULTS = struct.Struct("<3d")
RESULTS_OFFSET = Args.out_total.offset
assert [n for _, n in FIELDS[-3:]] == ["out_total", "out_count", "out_wsum"]


def _enum(name, base):
    return base(name.title().replace("_", ""), {k: v for k, v in _ENUMS["BCE_" + name]})


DType = _enum("DTYPE", enum.IntEnum)
Mode = _enum("MODE", enum.IntEnum)
Uses = _enum("USES", enum.IntFlag)
Flags = _enum("FLAGS", enum.IntFlag)
Target = _enum("TARGET", enum.IntEnum)
Error = _enum("ERROR", enum.IntEnum)

#: The names users write for the targets (BCELOGITS_CPU_TARGET), in order.
TARGET_NAMES = {Target.TARGET_BASELINE: "baseline", Target.TARGET_X86_64_V3: "x86-64-v3",
                Target.TARGET_X86_64_V4: "x86-64-v4"}  # fmt: skip


class Library:
    """The loaded core: ``run(address of an Args)``, the targets compiled in and supported here, and the
    target calls run on."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        self.path = path
        self.run = lib.bce_run
        self.run.argtypes = (ctypes.c_void_p,)
        self.run.restype = ctypes.c_int
        for fn in ("bce_compiled_targets", "bce_supported_targets"):
            getattr(lib, fn).restype = ctypes.c_uint
        lib.bce_args_size.restype = ctypes.c_int64
        lib.bce_args_offset.restype = ctypes.c_int64
        lib.bce_args_offset.argtypes = (ctypes.c_int64,)
        size = lib.bce_args_size()
        offsets = [lib.bce_args_offset(i) for i in range(len(FIELDS) + 1)]
        mine = [getattr(Args, name).offset for _, name in FIELDS]
        if size != ctypes.sizeof(Args) or offsets[:-1] != mine or offsets[-1] != -1:
            raise OSError(
                f"{path} does not match {HEADER} (struct bce_args: {size} bytes, offsets {offsets[:-1]}; "
                f"the header says {ctypes.sizeof(Args)} bytes, {mine}): rebuild the package (pip install "
                "--force-reinstall --no-binary bcelogits bcelogits, or pip install . in a checkout)"
            )
        self.compiled = {t for t in Target if lib.bce_compiled_targets() >> t & 1}
        self.supported = {t for t in Target if lib.bce_supported_targets() >> t & 1}
        self.target = choose_target(self.supported, os.environ.get(TARGET_ENV, ""))
        self._lib = lib


def choose_target(supported, request: str) -> Target:
    """The target calls run on: the best of ``supported``, or the one ``request`` names (the value of
    ``BCELOGITS_CPU_TARGET``). An unknown name raises ValueError; a target this machine cannot run warns
    and gives the best supported one."""
    best = max(supported)
    request = request.strip().lower()
    if request in ("", "auto", "best"):
        return best
    by_name = {v: k for k, v in TARGET_NAMES.items()}
    want = by_name.get(request.replace("_", "-"))
    if want is None:
        raise ValueError(
            f"{TARGET_ENV}={request!r} is not a CPU target: set it to one of "
            f"{', '.join(TARGET_NAMES.values())} (or auto), or unset it"
        )
    if want not in supported:
        warnings.warn(
            f"bcelogits: {TARGET_ENV}={request} asks for a target this CPU or OS cannot run (or this build "
            f"lacks); running {TARGET_NAMES[best]}, the best of those it can "
            f"({', '.join(TARGET_NAMES[t] for t in sorted(supported))}). Set {TARGET_ENV} to one of those, "
            "or unset it.",
            RuntimeWarning,
            stacklevel=2,
        )
        return best
    return want


def find_library() -> str | None:
    """The path of the core library: next to this file (a wheel install), in another directory of the
    package's ``__path__`` (an editable install keeps the built library in site-packages and the sources
    in the checkout), or where the installed distribution's record puts it (the sources imported from a
    checkout through PYTHONPATH, with the package installed editable). None if it is nowhere."""
    name = library_name()
    package = sys.modules.get(__package__)
    dirs = [_HERE, *getattr(package, "__path__", [])]
    for d in dirs:
        path = os.path.join(d, name)
        if os.path.exists(path):
            return path
    try:
        import importlib.metadata

        path = str(importlib.metadata.distribution("bcelogits").locate_file(f"bcelogits/kernels/{name}"))
    except Exception:  # noqa: BLE001 - no distribution, or an unreadable one: not found
        return None
    return path if os.path.exists(path) else None


def load() -> Library:
    """Load the core library (OSError with the reason and the fix if it is missing or unusable;
    ValueError for a bad BCELOGITS_CPU_TARGET)."""
    path = find_library()
    if path is None:
        raise OSError(
            f"the native core {library_name()} is not installed next to {_HERE} (the package was installed "
            "without building it?): reinstall with a C compiler and CMake available (pip install "
            "--force-reinstall --no-binary bcelogits bcelogits, or pip install . in a checkout)"
        )
    return Library(path)
