"""The model name rule (``reconciler/core/model_names.py``): what real names look like passes, paths and
commands do not, and every refusal names the rule."""

from __future__ import annotations

import pytest

from reconciler.core.model_names import MAX_MODEL_NAME, MODEL_NAME, check_model_name

REAL = [
    "llama3.2:3b", "qwen2.5-coder:7b-instruct-q4_K_M", "nomic-embed-text", "library/llama3:latest",  # Ollama
    "registry.ollama.ai/library/llama3:latest", "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
    "Qwen/Qwen2.5-7B-Instruct-AWQ", "meta-llama/Llama-3.1-8B-Instruct", "BAAI/bge-m3",  # Hugging Face
    "openai/whisper-large-v3", "stabilityai/stable-diffusion-xl-base-1.0", "mistralai/Mixtral-8x7B-v0.1",
    "Meta-Llama-3-8B-Instruct.Q4_K_M.gguf", "qwen2.5-3b-instruct-q4_k_m.gguf",  # GGUF files
    "sd_xl_base_1.0+refiner", "7b", "x" * MAX_MODEL_NAME,
]
REFUSED = {
    "../../../../etc/passwd": "'.' or '..'",
    "models/../secret": "'.' or '..'",
    "./model": "start with a letter or digit",
    ".": "start with a letter or digit",
    "/etc/passwd": "start with a letter or digit",
    "-rf": "start with a letter or digit",
    "--help": "start with a letter or digit",
    ":latest": "start with a letter or digit",
    "org//name": "empty path segment",
    "org/name/": "empty path segment",
    "a\x00b": "'\\x00'",
    "qwen\n2": "'\\n'",
    "llama3 7b": "' '",
    "name;id": "';'",
    "$(id)": "'$'",
    "a`b`": "'`'",
    "ünïcode": "'ü'",
    "": "empty",
    "x" * (MAX_MODEL_NAME + 1): f"at most {MAX_MODEL_NAME}",
}


@pytest.mark.parametrize("name", REAL)
def test_real_model_names_pass(name: str) -> None:
    assert check_model_name(name) is None
    assert MODEL_NAME.match(name)


@pytest.mark.parametrize("name", sorted(REFUSED), ids=repr)
def test_paths_commands_and_control_characters_are_refused_naming_the_rule(name: str) -> None:
    reason = check_model_name(name)
    assert reason is not None
    assert REFUSED[name] in reason, reason
    assert "letters, digits" in reason  # every refusal states the whole rule
    assert not MODEL_NAME.match(name)  # the regular expression agrees
