"""A real model server for the tests: llama.cpp's ``llama-server``, built once, and tiny models for it.

    python -m reconciler.testing.llama build [--version V] [--jobs N] [--sdist FILE]
    python -m reconciler.testing.llama path  [--version V]
    python -m reconciler.testing.llama models DIR

The fake services of :mod:`.service` answer health checks and nothing else.
To know that a lease's URL really serves a model, that a model switch really
restarts a server with the other file, and that an adopted server keeps
answering, the end-to-end tests (``tests/test_e2e_llama.py``) run the real
thing — a llama.cpp server on the CPU, with models small enough to load in
milliseconds.

**Where the server comes from.** The ``llama-cpp-python`` source
distribution on PyPI carries the full llama.cpp sources (``vendor/llama.cpp``)
at a known commit, so one pinned version of it names one llama.cpp, fetched
with the pip that is already here (and its configured index) — no git, no
second download tool. :func:`build` downloads it, extracts llama.cpp alone,
configures it with cmake for the CPU only (:data:`CMAKE_FLAGS`: no OpenSSL,
no web UI download, no OpenMP, no machine-specific instructions, static
libraries — the binary needs only the C and C++ runtimes, and runs on any
host of the same architecture with the same or a newer glibc) and compiles
the one target ``llama-server``: about eight minutes of two cores. The
binary goes into a cache **outside** the repository::

    ${RECONCILER_CACHE:-${XDG_CACHE_HOME:-~/.cache}/reconciler}/llama-server/<version>/bin/llama-server

with ``build.json`` (flags, durations) beside ``bin/``, written last, so an
interrupted build is never mistaken for a finished one. A second call finds
it and returns at once; a lock file serialises two builds of one version.
:func:`find_server` only looks, never builds: that is what the tests call.
A missing cmake or compiler is :class:`LlamaUnavailable` saying what to
install; so is a failed download or compile, with the log's path and its
last lines (the log stays beside the cache until a build succeeds).

**Tiny models.** :func:`write_tiny_models` writes two llama-architecture GGUF
files with random weights through the ``gguf`` package (a test extra,
imported only there). The completions are gibberish, which is fine: the
tests check that a real model answers, not what it says. Each file has a
working byte-level BPE tokenizer in its metadata — GPT-2's byte alphabet,
32 merges, three special tokens, a ChatML template — so llama.cpp tokenizes
any prompt and detokenizes whatever it samples; the special tokens' output
rows are zero, so greedy decoding never ends a completion early. Two
layers, a 64-wide embedding, 32-bit floats: 0.45 MB each, written in a few
milliseconds and loaded as fast. The two differ in name and weights (another
seed), so the same prompt gets another answer from each.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

#: The ``llama-cpp-python`` release whose bundled llama.cpp we build (its ``vendor/llama.cpp``: llama.cpp
#: 0.5.0-dev, where ``LLAMA_CURL`` is gone — downloads are off unless ``LLAMA_OPENSSL`` — and the web UI is
#: fetched at build time unless told not to). Another version may need other flags: check its CMakeLists.txt.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
#: Parallel compile jobs: the CI machine (and the shared development machine) has two cores.
DEFAULT_JOBS = 2

CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",        # one self-contained binary, no libllama.so beside it
    "-DGGML_NATIVE=OFF",              # portable: no -march=native, the cache may move to another CPU
    "-DGGML_OPENMP=OFF",              # ggml's own thread pool: no libgomp at run time
    "-DGGML_CCACHE=OFF",              # a one-off build: nothing for ccache to reuse
    "-DLLAMA_BUILD_COMMON=ON",        # the server needs the common library
    "-DLLAMA_BUILD_TOOLS=ON",         # the server lives in tools/; only its target is compiled
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",            # no HTTPS: the tests talk to it on loopback
    "-DLLAMA_BUILD_UI=OFF",           # no npm build of the web UI …
    "-DLLAMA_USE_PREBUILT_UI=OFF",    # … and no download of it: the server runs without one
)
TARGET = "llama-server"


class LlamaUnavailable(RuntimeError):
    """llama-server cannot be built or found here; the message says why and what to do."""


@dataclass(frozen=True)
class Built:
    """A llama-server binary in the cache, and what it cost to get it."""

    path: Path
    version: str
    seconds: float
    cached: bool
    build_seconds: float | None = None  # the recorded cold build's duration, when known


def cache_root() -> Path:
    """``$RECONCILER_CACHE``, else ``$XDG_CACHE_HOME/reconciler``, else ``~/.cache/reconciler``."""
    explicit = os.environ.get("RECONCILER_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "reconciler"


def install_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return cache_root() / "llama-server" / version


def binary_path(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return install_dir(version) / "bin" / TARGET


def _stamp(version: str) -> Path:
    return install_dir(version) / "build.json"


def find_server(version: str = LLAMA_CPP_PYTHON_VERSION) -> Built | None:
    """The cached binary of a finished build, or None; never builds."""
    binary, stamp = binary_path(version), _stamp(version)
    if not (stamp.is_file() and binary.is_file() and os.access(binary, os.X_OK)):
        return None
    seconds: float | None = None
    with contextlib.suppress(OSError, ValueError, TypeError):
        seconds = float(json.loads(stamp.read_text())["build_seconds"])
    return Built(binary, version, 0.0, cached=True, build_seconds=seconds)


def missing_tools() -> list[str]:
    """What a build needs and this host lacks, each with what to install (empty: all there)."""
    missing = []
    if shutil.which("cmake") is None:
        missing.append("cmake (apt-get install cmake, or pip install cmake)")
    if not any(shutil.which(cc) for cc in (os.environ.get("CC", ""), "cc", "gcc", "clang") if cc):
        missing.append("a C compiler (apt-get install build-essential)")
    if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if cxx):
        missing.append("a C++ compiler (apt-get install g++)")
    if not (shutil.which("ninja") or shutil.which("make")):
        missing.append("a build tool: ninja or make (apt-get install ninja-build)")
    return missing


def unavailable_reason(version: str = LLAMA_CPP_PYTHON_VERSION) -> str:
    """Why there is no cached llama-server, and the command that makes one."""
    where = binary_path(version)
    command = "python -m reconciler.testing.llama build"
    command = f".venv/bin/{command}" + ("" if version == LLAMA_CPP_PYTHON_VERSION else f" --version {version}")
    tools = missing_tools()
    if tools:
        return (f"llama-server is not built ({where} missing) and cannot be here: missing {', '.join(tools)}; "
                f"install them, then run `{command}` (~8 min on 2 cores)")
    log = install_dir(version).parent / f"{version}-build.log"
    last = ""
    if _building(version):
        last = f"; a build is running now, its log is {log}"
    elif log.exists():
        last = f"; the last build failed, its log is {log}"
    return (f"llama-server is not built ({where} missing{last}): run `{command}` (~8 min on 2 cores, once;"
            " .ci/run does it) or set RECONCILER_CACHE to a cache that has it")


def _building(version: str) -> bool:
    """Whether some process holds the build lock of ``version`` right now."""
    lock = install_dir(version).parent / f"{version}.lock"
    if not lock.exists():
        return False
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build(version: str = LLAMA_CPP_PYTHON_VERSION, *, jobs: int = DEFAULT_JOBS, sdist: Path | None = None,
          say: Callable[[str], None] = print) -> Built:
    """The cached llama-server of ``version``, built first if it is not there yet (see the module docstring)."""
    started = time.monotonic()
    found = find_server(version)
    if found is not None:
        return Built(found.path, version, time.monotonic() - started, cached=True, build_seconds=found.build_seconds)
    tools = missing_tools()
    if tools:
        raise LlamaUnavailable(f"cannot build llama-server: missing {', '.join(tools)}; install them and run again")
    target = install_dir(version)
    with _locked(target.parent / f"{version}.lock"):
        found = find_server(version)  # built by whoever held the lock before us
        if found is not None:
            return Built(found.path, version, time.monotonic() - started, cached=True,
                         build_seconds=found.build_seconds)
        for stale in target.parent.glob(f"{version}-build-*"):  # left by a build that was killed: we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        log = target.parent / f"{version}-build.log"
        with tempfile.TemporaryDirectory(prefix=f"{version}-build-", dir=target.parent) as work, \
                open(log, "w") as out:
            timings = _build_in(Path(work), version, jobs, sdist, out, log, say)
            shutil.rmtree(target, ignore_errors=True)
            (target / "bin").mkdir(parents=True)
            temporary = target / "bin" / f".{TARGET}.tmp"
            shutil.copy2(Path(work) / "build" / "bin" / TARGET, temporary)
            temporary.chmod(0o755)
            temporary.rename(binary_path(version))
        _check_runs(binary_path(version), log)
        seconds = time.monotonic() - started
        shutil.copy2(log, target / "build.log")
        _stamp(version).write_text(json.dumps({
            "llama_cpp_python": version, "build_seconds": round(seconds, 1), "jobs": jobs,
            "cmake_flags": list(CMAKE_FLAGS), "timings_s": timings,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }, indent=2) + "\n")
        log.unlink(missing_ok=True)
    return Built(binary_path(version), version, seconds, cached=False, build_seconds=seconds)


def _build_in(work: Path, version: str, jobs: int, sdist: Path | None, out: TextIO, log: Path,
              say: Callable[[str], None]) -> dict[str, float]:
    timings: dict[str, float] = {}

    def step(name: str, argv: Sequence[str]) -> None:
        t0 = time.monotonic()
        say(f"llama-server: {name}: {' '.join(argv)}")
        print(f"$ {' '.join(argv)}", file=out, flush=True)
        result = subprocess.run(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, check=False)
        timings[name] = round(time.monotonic() - t0, 1)
        if result.returncode != 0:
            tail = "\n".join(line[:300] for line in log.read_text(errors="replace").splitlines()[-25:])
            raise LlamaUnavailable(
                f"`{name}` failed with exit status {result.returncode} (log: {log}); its last lines:\n{tail}\n"
                "fix the cause (a missing tool or library, no route to the package index) and run the build again")

    if sdist is None:
        step("download", [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-binary",
                          ":all:", "--no-deps", "--dest", str(work), f"llama-cpp-python=={version}"])
        found = sorted(work.glob("llama_cpp_python-*.tar.gz"))
        if not found:
            raise LlamaUnavailable(f"pip download left no llama_cpp_python-{version}.tar.gz in {work} (log: {log});"
                                   " download it by hand and pass it with --sdist FILE")
        sdist = found[0]
    t0 = time.monotonic()
    source = _extract_llama_cpp(sdist, work / "src")
    timings["extract"] = round(time.monotonic() - t0, 1)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    step("configure", ["cmake", "-S", str(source), "-B", str(work / "build"), *generator, *CMAKE_FLAGS])
    say(f"llama-server: compiling with {jobs} jobs (about 8 minutes on 2 cores)")
    step("compile", ["cmake", "--build", str(work / "build"), "--target", TARGET, "-j", str(jobs)])
    return timings


def _extract_llama_cpp(sdist: Path, into: Path) -> Path:
    """Extract ``vendor/llama.cpp`` of a llama-cpp-python sdist (without its git link) into ``into``."""
    marker = "/vendor/llama.cpp/"
    try:
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers()
                       if marker in m.name + "/" and not m.name.endswith(marker + ".git")]
            if not members:
                raise LlamaUnavailable(f"{sdist} holds no vendor/llama.cpp: is it a llama-cpp-python source release?")
            archive.extractall(into, members=members, filter="data")
    except (tarfile.TarError, OSError) as error:
        detail = " ".join(str(error).split())
        raise LlamaUnavailable(f"cannot extract {sdist} ({detail}): is it a whole llama-cpp-python source release?"
                               " delete it and download it again") from error
    roots = sorted({m.name.split(marker, 1)[0] for m in members})
    return into / roots[0] / "vendor" / "llama.cpp"


def _check_runs(binary: Path, log: Path) -> None:
    try:
        result = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise LlamaUnavailable(f"the built {binary} does not run: {error} (build log: {log})") from error
    if result.returncode != 0:
        raise LlamaUnavailable(f"the built {binary} does not run (`--version` exit status {result.returncode}):"
                               f" {(result.stdout + result.stderr)[-1500:]} (build log: {log})")


# --- tiny models ----------------------------------------------------------------------------------------------------

#: The two models' file names; the tests use their absolute paths as model names.
TINY_MODELS = ("tiny-llama-a.gguf", "tiny-llama-b.gguf")
N_EMBD, N_LAYER, N_HEAD, N_HEAD_KV, N_FF, N_CTX = 64, 2, 4, 2, 128, 512
#: Pairs merged by the tokenizer, in rank order (GPT-2's byte alphabet: "Ġ" is a space); each merge is a token.
MERGES = (
    ("Ġ", "t"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"), ("Ġt", "he"), ("Ġ", "a"),
    ("r", "e"), ("e", "n"), ("Ġ", "s"), ("o", "u"), ("Ġ", "w"), ("Ġ", "c"), ("i", "s"), ("Ġ", "o"),
    ("a", "t"), ("e", "s"), ("o", "r"), ("i", "t"), ("Ġ", "b"), ("e", "d"), ("Ġ", "m"), ("in", "g"),
    ("Ġ", "p"), ("Ġ", "f"), ("Ġ", "h"), ("a", "l"), ("Ġa", "n"), ("Ġ", "d"), ("l", "l"), ("Ġ", "l"),
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: byte ``i`` is the one-character token ``byte_alphabet()[i]``."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_vocabulary() -> tuple[list[str], list[int], list[str]]:
    """Tokens, their GGUF token types and the merges of the tiny models' byte-level BPE tokenizer."""
    normal, control = 1, 3  # gguf.TokenType.NORMAL, .CONTROL
    tokens = byte_alphabet()
    for left, right in MERGES:
        if left not in tokens or right not in tokens:
            raise ValueError(f"merge {left!r} + {right!r}: both sides must be tokens by then (reorder MERGES)")
        tokens.append(left + right)
    types = [normal] * len(tokens) + [control] * len(SPECIAL_TOKENS)
    tokens.extend(SPECIAL_TOKENS)
    if len(set(tokens)) != len(tokens):
        raise ValueError("the tiny vocabulary has a duplicate token; llama.cpp refuses such a model")
    return tokens, types, [f"{left} {right}" for left, right in MERGES]


def write_tiny_model(path: Path, *, seed: int, name: str) -> Path:
    """One llama-architecture GGUF with random weights and a working tokenizer at ``path`` (~0.5 MB)."""
    try:
        import gguf
        import numpy as np
    except ImportError as error:
        raise LlamaUnavailable(f"cannot write {path}: {error}; install the test extras (pip install -e '.[test]',"
                               " or ./dev test once), which include gguf and numpy") from error
    tokens, types, merges = tiny_vocabulary()
    n_vocab, head_dim = len(tokens), N_EMBD // N_HEAD
    eos = tokens.index("<|endoftext|>")
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int) -> np.ndarray:  # numpy (rows, cols) is ggml's {cols, rows}
        return (rng.standard_normal((rows, cols)) * 0.5).astype(np.float32)

    temporary = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(temporary, "llama")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    embeddings = matrix(n_vocab, N_EMBD)
    output = matrix(n_vocab, N_EMBD)
    output[len(tokens) - len(SPECIAL_TOKENS):] = 0.0  # logit 0 for the special tokens: never the likeliest
    writer.add_tensor("token_embd.weight", embeddings)
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    for i in range(N_LAYER):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", matrix(N_HEAD * head_dim, N_EMBD))
        writer.add_tensor(f"blk.{i}.attn_k.weight", matrix(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(f"blk.{i}.attn_v.weight", matrix(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(f"blk.{i}.attn_output.weight", matrix(N_EMBD, N_HEAD * head_dim))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", matrix(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", matrix(N_EMBD, N_FF))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    temporary.rename(path)
    return path


def write_tiny_models(directory: Path) -> tuple[Path, Path]:
    """The two tiny models (:data:`TINY_MODELS`) in ``directory``: same shape, other weights, other names."""
    directory.mkdir(parents=True, exist_ok=True)
    first, second = (write_tiny_model(directory / file, seed=seed, name=file.removesuffix(".gguf"))
                     for seed, file in enumerate(TINY_MODELS, start=1))
    return first, second


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reconciler.testing.llama", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    do_build = commands.add_parser("build", help="build llama-server into the cache (at once when it is there)")
    do_build.add_argument("--version", default=LLAMA_CPP_PYTHON_VERSION, help="llama-cpp-python release to build")
    do_build.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="parallel compile jobs (default 2)")
    do_build.add_argument("--sdist", type=Path, default=None, help="a downloaded llama-cpp-python sdist (offline)")
    do_path = commands.add_parser("path", help="print the cached binary's path (exit 1 when not built)")
    do_path.add_argument("--version", default=LLAMA_CPP_PYTHON_VERSION)
    do_models = commands.add_parser("models", help="write the two tiny models into a directory")
    do_models.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    if args.command == "models":
        try:
            for model in write_tiny_models(args.directory):
                print(f"{model} ({model.stat().st_size} bytes)")
        except (LlamaUnavailable, OSError) as error:
            print(f"llama models: {error}", file=sys.stderr)
            return 1
        return 0
    if args.command == "path":
        found = find_server(args.version)
        if found is None:
            print(unavailable_reason(args.version), file=sys.stderr)
            return 1
        print(found.path)
        return 0
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give at least 1 parallel compile job")
    try:
        built = build(args.version, jobs=args.jobs, sdist=args.sdist,
                      say=lambda line: print(line, file=sys.stderr, flush=True))
    except LlamaUnavailable as error:
        print(f"llama-server: {error}", file=sys.stderr)
        return 1
    if built.cached:
        recorded = f"; its build took {built.build_seconds:.0f} s" if built.build_seconds is not None else ""
        print(f"llama-server {built.version}: cached at {built.path} (found in {built.seconds:.2f} s{recorded})")
    else:
        print(f"llama-server {built.version}: built in {built.seconds:.0f} s → {built.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
