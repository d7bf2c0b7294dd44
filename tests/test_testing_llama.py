"""The llama-server helper without llama-server: tiny models, the cache, the refusals (fast, no build).

:mod:`reconciler.testing.llama` is what ``tests/test_e2e_llama.py`` and
``.ci/run`` rely on; what it can show without a compiler runs in the fast
suite: the two tiny models are valid GGUF files of the llama architecture
with a byte-level BPE tokenizer, small and different from each other; the
cache is found where the README says, a build that did not finish never
counts, a cached binary is returned at once (no tool needed), a host without
cmake or a compiler is told what to install, and only ``vendor/llama.cpp``
of a source release is extracted (its dangling git link left behind).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import gguf
import numpy as np
import pytest

from reconciler.testing import llama


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RECONCILER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


def test_the_two_tiny_models_are_small_llama_ggufs_with_a_tokenizer(tmp_path: Path) -> None:
    first, second = llama.write_tiny_models(tmp_path / "models")
    assert [first.name, second.name] == list(llama.TINY_MODELS)
    readers = [gguf.GGUFReader(path) for path in (first, second)]
    tokens, types, merges = llama.tiny_vocabulary()
    for path, reader in zip((first, second), readers, strict=True):
        assert path.stat().st_size < 1_000_000
        assert field(reader, "general.architecture") == "llama"
        assert field(reader, "tokenizer.ggml.model") == "gpt2"
        assert field(reader, "tokenizer.ggml.tokens") == tokens
        assert field(reader, "tokenizer.ggml.merges") == merges
        assert field(reader, "tokenizer.ggml.token_type") == types
        assert field(reader, "llama.block_count") == llama.N_LAYER
        assert field(reader, "tokenizer.ggml.eos_token_id") == tokens.index("<|endoftext|>")
        assert len(reader.tensors) == 3 + 9 * llama.N_LAYER
        embeddings = next(t for t in reader.tensors if t.name == "token_embd.weight")
        assert list(embeddings.shape) == [llama.N_EMBD, len(tokens)]  # ggml's order: {n_embd, n_vocab}
    assert [field(r, "general.name") for r in readers] == ["tiny-llama-a", "tiny-llama-b"]
    weights = [next(t for t in r.tensors if t.name == "blk.0.attn_q.weight").data for r in readers]
    assert not np.array_equal(weights[0], weights[1])
    assert not list(tmp_path.glob("models/.*.tmp"))


def test_the_tiny_vocabulary_is_byte_level_bpe_without_duplicates() -> None:
    tokens, types, merges = llama.tiny_vocabulary()
    assert len(set(tokens)) == len(tokens) == len(types)
    alphabet = llama.byte_alphabet()
    assert len(set(alphabet)) == 256 and alphabet[ord("A")] == "A" and alphabet[ord(" ")] == "Ġ"
    assert tokens[:256] == alphabet
    for merge in merges:
        left, right = merge.split(" ")
        assert left in tokens and right in tokens and left + right in tokens
    assert [types[tokens.index(t)] for t in llama.SPECIAL_TOKENS] == [gguf.TokenType.CONTROL] * 3


def test_the_cache_lives_where_the_readme_says(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RECONCILER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert llama.cache_root() == tmp_path / "xdg" / "reconciler"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert llama.cache_root() == tmp_path / "home" / ".cache" / "reconciler"
    monkeypatch.setenv("RECONCILER_CACHE", str(tmp_path / "mine"))
    assert llama.binary_path("1.2.3") == tmp_path / "mine" / "llama-server" / "1.2.3" / "bin" / "llama-server"


def fake_install(version: str, *, finished: bool) -> Path:
    binary = llama.binary_path(version)
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\necho fake\n")
    binary.chmod(0o755)
    if finished:
        (binary.parent.parent / "build.json").write_text(json.dumps({"build_seconds": 600.5}))
    return binary


def test_an_interrupted_build_never_counts(cache: Path) -> None:
    fake_install("1.0.0", finished=False)  # the binary is there, build.json is not
    assert llama.find_server("1.0.0") is None
    reason = llama.unavailable_reason("1.0.0")
    assert "llama-server is not built" in reason and "--version 1.0.0" in reason


def test_a_cached_binary_is_returned_at_once_without_any_tool(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = fake_install("1.0.0", finished=True)
    monkeypatch.setenv("PATH", "/nonexistent")
    built = llama.build("1.0.0", say=pytest.fail)
    assert built.cached and built.path == binary and built.build_seconds == 600.5 and built.seconds < 1


def test_a_host_without_the_tools_is_told_what_to_install(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    for variable in ("CC", "CXX"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(llama.LlamaUnavailable, match=r"missing cmake \(apt-get install cmake"):
        llama.build("1.0.0", say=pytest.fail)
    assert "a C++ compiler" in llama.unavailable_reason("1.0.0")
    assert not cache.exists()  # nothing was started


def test_only_vendor_llama_cpp_is_extracted(tmp_path: Path) -> None:
    sdist = tmp_path / "llama_cpp_python-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        for name, text in {
            "llama_cpp_python-1.0.0/pyproject.toml": "[project]\n",
            "llama_cpp_python-1.0.0/vendor/llama.cpp/CMakeLists.txt": "project(llama.cpp)\n",
            "llama_cpp_python-1.0.0/vendor/llama.cpp/.git": "gitdir: ../../.git/modules/vendor/llama.cpp\n",
            "llama_cpp_python-1.0.0/vendor/llama.cpp/tools/server/main.cpp": "int main() {}\n",
        }.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    source = llama._extract_llama_cpp(sdist, tmp_path / "src")
    assert source == tmp_path / "src" / "llama_cpp_python-1.0.0" / "vendor" / "llama.cpp"
    assert (source / "CMakeLists.txt").is_file() and (source / "tools" / "server" / "main.cpp").is_file()
    assert not (source / ".git").exists()
    assert not (tmp_path / "src" / "llama_cpp_python-1.0.0" / "pyproject.toml").exists()
    with pytest.raises(llama.LlamaUnavailable, match=r"cannot extract .*CMakeLists.txt \(.*\): .* delete it"):
        llama._extract_llama_cpp(source / "CMakeLists.txt", tmp_path / "other")  # not an archive
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(llama.LlamaUnavailable, match=r"holds no vendor/llama\.cpp"):
        llama._extract_llama_cpp(empty, tmp_path / "other")
