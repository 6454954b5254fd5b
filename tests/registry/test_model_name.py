import pytest

from tunelab.errors import StoreError
from tunelab.registry.model_name import ModelName, parse_model_name


@pytest.mark.parametrize("text, parts, display", [
    ("qwen3", ("registry.ollama.ai", "library", "qwen3", "latest"), "qwen3:latest"),
    ("qwen3:14b", ("registry.ollama.ai", "library", "qwen3", "14b"), "qwen3:14b"),
    ("Qwen3:Q4_K_M", ("registry.ollama.ai", "library", "qwen3", "Q4_K_M"), "qwen3:Q4_K_M"),
    ("me/qwen3-dev", ("registry.ollama.ai", "me", "qwen3-dev", "latest"), "me/qwen3-dev:latest"),
    ("example.com:5000/team/qwen2.5-coder:0.5b",
     ("example.com:5000", "team", "qwen2.5-coder", "0.5b"), "example.com:5000/team/qwen2.5-coder:0.5b"),
])
def test_names_fill_ollama_defaults_and_display_like_ollama_list(text, parts, display):
    name = parse_model_name(text)
    assert name.path_parts == parts
    assert name.display == display
    assert parse_model_name(display) == name  # the display form names the same model


def test_host_namespace_and_model_compare_case_insensitively_but_tag_keeps_case():
    assert parse_model_name("ME/Qwen3:Dev") == parse_model_name("me/qwen3:Dev")
    assert parse_model_name("qwen3:Dev") != parse_model_name("qwen3:dev")


@pytest.mark.parametrize("text, rule", [
    ("../etc/passwd", "'..'"),
    ("qwen3:..", "'..'"),
    ("a/b/c/d", "at most two '/'"),
    ("a//b", "namespace part is empty"),
    ("/qwen3", "namespace part is empty"),
    ("qwen3:", "tag after ':' is empty"),
    ("", "empty"),
    ("dir\\qwen3", "'\\'"),
    (".hidden", "model part '.hidden'"),
    ("-rf", "model part '-rf'"),
    ("qwen 3", "model part 'qwen 3'"),
    ("ns.with.dots/m", "namespace part 'ns.with.dots'"),
    ("m:tag/x", "namespace part 'm:tag'"),
    ("x" * 129, "longer than 128"),
])
def test_unsafe_or_malformed_names_raise_store_error_naming_the_rule(text, rule):
    with pytest.raises(StoreError) as info:
        parse_model_name(text)
    assert rule in str(info.value)
    assert repr(text)[:20] in str(info.value)


def test_a_parsed_name_passes_through_unchanged():
    name = ModelName("registry.ollama.ai", "library", "qwen3", "8b")
    assert parse_model_name(name) is name
