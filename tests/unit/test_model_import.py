"""The pure parts of the HuggingFace import: file name checks and pattern selection."""

from __future__ import annotations

import pytest

from aiwm.errors import ValidationFailed
from aiwm.model_import import STATE_DIR, RepoFile, check_name, select_files


@pytest.mark.parametrize("name", [
    "config.json", "README.md", ".gitattributes", "onnx/model.onnx", "a/b/c.bin", "weird name (1).txt",
    "..hidden", "dir/..x",
])
def test_safe_names_pass(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", [
    "", "/etc/passwd", "../escape", "a/../../b", "a/./b", "a//b", "a/", ".", "..", "a\\b", "C:\\x",
    "nul\0byte", "new\nline", f"{STATE_DIR}/manifest.json", STATE_DIR,
])
def test_unsafe_names_fail(name: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        check_name(name)
    assert info.value.extra["file"] == name


FILES = [RepoFile(name=n, size=1, sha256=None) for n in (
    "README.md", "config.json", "tokenizer.json", "model.safetensors", "onnx/model.onnx", "onnx/config.json",
    "original/consolidated.pth")]


def names(patterns: list[str] | None) -> list[str]:
    return [f.name for f in select_files(FILES, patterns)]


def test_no_patterns_keep_everything() -> None:
    assert names(None) == [f.name for f in FILES]
    assert names([]) == [f.name for f in FILES]


def test_star_crosses_folders_like_huggingface_hub() -> None:
    assert names(["*.json"]) == ["config.json", "tokenizer.json", "onnx/config.json"]


def test_several_patterns_are_a_union() -> None:
    assert names(["*.safetensors", "config.json"]) == ["config.json", "model.safetensors"]


def test_a_folder_pattern_takes_everything_under_it() -> None:
    assert names(["onnx/"]) == ["onnx/model.onnx", "onnx/config.json"]
    assert names(["onnx/*"]) == ["onnx/model.onnx", "onnx/config.json"]


def test_character_classes_and_no_match() -> None:
    assert names(["[Rr]EADME.md"]) == ["README.md"]
    assert names(["*.gguf"]) == []
