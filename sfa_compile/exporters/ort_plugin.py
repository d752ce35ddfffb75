"""The ONNX Runtime plugin: build ``csrc/flash_sfa_ort.cc`` into a custom-op library and open sessions with it.

ONNX Runtime's pip wheels carry no C/C++ headers, so building needs them from elsewhere, looked up in order:
the ``include_dir`` argument, ``$SFA_ORT_INCLUDE``, our cache (``fetch_headers`` puts Debian's
``libonnxruntime-dev`` there), then /usr/include/onnxruntime and /usr/local/include/onnxruntime. The C API is
backward compatible, so headers of an older release (Debian trixie ships 1.21) build a library that newer
runtimes load. The library is cached under ``$SFA_CACHE_DIR`` (default ~/.cache/sfa_compile), keyed by the
source, the headers' API version and the compiler flags, and written atomically.

``ort_session(path)`` builds the plugin on first use when a compiler and the headers are present; without
them it warns (saying what to install) and runs the model through the FlashSFA function body instead.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

SOURCE = Path(__file__).with_name("csrc") / "flash_sfa_ort.cc"
HEADER = "onnxruntime_cxx_api.h"
DEBIAN_PACKAGE = "libonnxruntime-dev"
DEBIAN_SUITE = "trixie"
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC", "-Wall"]
SYSTEM_INCLUDE_DIRS = ["/usr/include/onnxruntime", "/usr/local/include/onnxruntime"]

INSTALL_HINT = (
    "The FlashSFA ONNX Runtime plugin needs a C++ compiler (g++ or clang++; set $CXX to choose) and ONNX Runtime's "
    "C/C++ headers, which the onnxruntime pip wheel does not ship. Get the headers with "
    "`sfa-compile build-plugin --fetch-headers` (Debian's libonnxruntime-dev, unpacked privately, no system "
    "install), or unpack an official onnxruntime release archive and pass its include directory "
    "(`--include-dir DIR` or $SFA_ORT_INCLUDE)."
)


class PluginUnavailable(RuntimeError):
    """The plugin cannot be built or loaded here; the message says what to install."""


def cache_dir() -> Path:
    return Path(os.environ.get("SFA_CACHE_DIR") or Path.home() / ".cache" / "sfa_compile")


def _fetched_headers() -> Path:
    return cache_dir() / "onnxruntime-headers" / "usr" / "include" / "onnxruntime"


def find_include_dir(include_dir=None) -> Optional[Path]:
    """The directory holding onnxruntime_cxx_api.h: the one the caller named (``include_dir``, else
    ``$SFA_ORT_INCLUDE``), which must hold it, else the first of the places in the module docstring that does."""
    named_by_caller = ((include_dir, "the include directory"), (os.environ.get("SFA_ORT_INCLUDE"), "$SFA_ORT_INCLUDE"))
    for named, source in named_by_caller:
        if named:
            if not (Path(named) / HEADER).is_file():
                raise PluginUnavailable(f"{source} {named} has no {HEADER}; pass the directory that contains it")
            return Path(named)
    for candidate in (_fetched_headers(), *SYSTEM_INCLUDE_DIRS):
        if (Path(candidate) / HEADER).is_file():
            return Path(candidate)
    return None


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _api_version(include_dir: Path) -> str:
    text = (include_dir / "onnxruntime_c_api.h").read_text(errors="replace")
    match = re.search(r"#define ORT_API_VERSION (\d+)", text)
    return match.group(1) if match else "unknown"


def library_path(include_dir: Path, compiler: str) -> Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), _api_version(include_dir).encode(), " ".join([compiler, *FLAGS]).encode(),
                 platform.machine().encode(), _cpu_model().encode()):
        key.update(part)
    return cache_dir() / "ort_plugin" / key.hexdigest()[:16] / "libsfa_ort.so"


def _cpu_model() -> str:  # -march=native binaries must not be shared between different CPUs
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_plugin(include_dir=None, *, force: bool = False) -> Path:
    """Compile the plugin (or reuse the cached build) and return the library's path."""
    headers = find_include_dir(include_dir)
    compiler = _compiler()
    if headers is None or compiler is None:
        missing = "ONNX Runtime headers" if headers is None else "a C++ compiler"
        raise PluginUnavailable(f"cannot build the FlashSFA plugin: no {missing} found. {INSTALL_HINT}")
    target = library_path(headers, compiler)
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_lib = Path(tmp) / target.name
        cmd = [compiler, *FLAGS, f"-I{headers}", str(SOURCE), "-o", str(tmp_lib)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise PluginUnavailable(f"building the FlashSFA plugin failed ({' '.join(cmd)}):\n{result.stderr[-4000:]}")
        os.replace(tmp_lib, target)
    return target


def fetch_headers(dest=None) -> Path:
    """Download Debian trixie's libonnxruntime-dev with apt-get into a private directory and unpack it with
    dpkg -x (no system install, no root needed beyond network access to a Debian mirror). Returns the
    include directory."""
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise PluginUnavailable(f"fetching headers needs {tool} (Debian/Ubuntu); {INSTALL_HINT}")
    dest = Path(dest) if dest else _fetched_headers().parents[2]
    with tempfile.TemporaryDirectory(prefix="sfa-apt-") as tmp:
        apt = Path(tmp)
        for sub in ("lists/partial", "cache/archives/partial", "debs"):
            (apt / sub).mkdir(parents=True)
        sources = apt / "sources.list"
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        signed = f"[signed-by={keyring}] " if Path(keyring).is_file() else ""
        sources.write_text(f"deb {signed}http://deb.debian.org/debian {DEBIAN_SUITE} main\n")
        options = [f"-oDir::State={apt}", f"-oDir::State::Lists={apt / 'lists'}", f"-oDir::Cache={apt / 'cache'}",
                   f"-oDir::Etc::SourceList={sources}", "-oDir::Etc::SourceParts=/dev/null",
                   "-oDir::State::status=/dev/null", f"-oAPT::Sandbox::User={getpass.getuser()}"]
        steps = [(["apt-get", *options, "update"], None), (["apt-get", *options, "download", DEBIAN_PACKAGE],
                                                          apt / "debs")]
        for cmd, cwd in steps:
            result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
            if result.returncode != 0:
                raise PluginUnavailable(f"`{' '.join(cmd[:1] + cmd[-2:])}` failed:\n{result.stderr[-2000:]}\n"
                                        f"{INSTALL_HINT}")
        package = next((apt / "debs").glob("*.deb"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".onnxruntime-headers-", dir=dest.parent))
        subprocess.run(["dpkg", "-x", str(package), str(staging)], check=True, capture_output=True)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    include = dest / "usr" / "include" / "onnxruntime"
    if not (include / HEADER).is_file():
        raise PluginUnavailable(f"{package.name} did not contain {HEADER}; {INSTALL_HINT}")
    return include


def register_plugin(options, include_dir=None) -> Path:
    """Build (or reuse) the plugin and register it with ``onnxruntime.SessionOptions`` ``options``."""
    library = build_plugin(include_dir)
    try:
        options.register_custom_ops_library(str(library))
    except Exception as exc:  # onnxruntime raises its own error types here
        raise PluginUnavailable(f"ONNX Runtime could not load {library}: {exc}") from exc
    return library


def flash_sfa_input_types(path) -> set:
    """Element type names ("float32", "float16", ...) of the queries of the FlashSFA nodes in the ONNX file at
    ``path``, as the exporter recorded them (empty when not recorded)."""
    import onnx

    from .onnx_function import DOMAIN, OP_NAME

    graph = onnx.load(str(path), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    queries = [n.input[0] for n in graph.node if n.domain == DOMAIN and n.op_type == OP_NAME]
    return {onnx.helper.tensor_dtype_to_np_dtype(types[q]).name if types[q] != onnx.TensorProto.BFLOAT16
            else "bfloat16" for q in queries if types.get(q)}


def ort_session(path, *, plugin="auto", include_dir=None, sess_options=None, providers=None, **kwargs):
    """An onnxruntime.InferenceSession for an exported SFA model with the FlashSFA plugin registered.

    ``plugin``: "auto" (default) uses the plugin when it can be built and warns, then falls back to the
    FlashSFA function body, when it cannot; True raises ``PluginUnavailable`` instead; False never loads it.
    Other keyword arguments go to ``InferenceSession``.
    """
    import onnxruntime as ort

    if plugin not in ("auto", True, False):
        raise ValueError(f"ort_session: plugin must be 'auto', True or False, got {plugin!r}")
    options = sess_options if sess_options is not None else ort.SessionOptions()
    if plugin and not isinstance(path, (bytes, bytearray)):
        dtypes = flash_sfa_input_types(path)
        if dtypes - {"float32"}:
            message = (f"ort_session: the FlashSFA plugin computes float32 and this model's FlashSFA nodes take "
                       f"{', '.join(sorted(dtypes))}")
            if plugin is True:
                raise PluginUnavailable(f"{message}; export the model in float32 or pass plugin='auto'")
            warnings.warn(f"{message}: running FlashSFA through its ONNX function body (exact, slower).",
                          stacklevel=2)
            plugin = False
    if plugin:
        try:
            register_plugin(options, include_dir)
        except PluginUnavailable as exc:
            if plugin is True:
                raise
            warnings.warn(f"{exc} Running FlashSFA through its ONNX function body (exact, slower).", stacklevel=2)
    return ort.InferenceSession(str(path), sess_options=options,
                                providers=providers or ["CPUExecutionProvider"], **kwargs)
