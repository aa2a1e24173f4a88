"""The tokenizer gives the ids transformers gives for the same files, and streams text whole."""

from __future__ import annotations

import json

import pytest

from p2pserve.errors import ConfigError, WeightsError
from p2pserve.engine.weights import open_weights

from .tiny import make_tiny_llama

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = [
    "What is the capital of France?",
    "héllo wörld — naïve café, Ünïcödé ß ﬁ",
    "世界你好，こんにちは、안녕하세요",
    "emoji 🙂👍🏽🇫🇷 and a family 👨‍👩‍👧",
    "  leading spaces,\ttabs\nand\r\nnewlines  ",
    "<|im_start|>user\nspecial tokens in text<|im_end|>",
    "",
]


@pytest.fixture(scope="module")
def source():
    return open_weights()


@pytest.fixture(scope="module")
def tokenizer(source):
    return source.tokenizer()


@pytest.fixture(scope="module")
def reference(source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)


def test_chat_prompt_equals_transformers(tokenizer, reference):
    expected = reference.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ids = tokenizer.encode_chat(CHAT)
    assert ids == list(expected)
    assert tokenizer.decode(ids).endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_with_system_prompt_and_turns_equals_transformers(tokenizer, reference):
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan? 日本"},
    ]
    for add in (True, False):
        expected = reference.apply_chat_template(
            messages, add_generation_prompt=add, tokenize=True, return_dict=False
        )
        assert tokenizer.encode_chat(messages, add_generation_prompt=add) == list(expected)


@pytest.mark.parametrize("text", TEXTS)
def test_plain_text_equals_transformers(text, tokenizer, reference):
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text)
    assert tokenizer.decode(ids) == reference.decode(ids) == text


def test_special_ids_come_from_the_model(tokenizer):
    assert tokenizer.bos_token_id == 1  # <|im_start|>
    assert tokenizer.eos_token_ids == (2,)  # <|im_end|>
    assert tokenizer.encode("Hi")[0] != 1  # SmolLM2 adds no BOS to plain text


@pytest.mark.parametrize("text", TEXTS)
def test_stream_pieces_join_to_the_full_decode(text, tokenizer):
    ids = tokenizer.encode(text)
    stream = tokenizer.stream()
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_holds_back_half_a_character(tokenizer):
    ids = tokenizer.encode("🙂")
    assert len(ids) > 1  # byte-level BPE splits this emoji
    stream = tokenizer.stream()
    pieces = [stream.push(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🙂"
    assert stream.flush() == ""


# --- Hugging Face directories ------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
    """A tiny checkpoint with the SmolLM2 tokenizer saved the Hugging Face way."""
    path = make_tiny_llama(
        tmp_path_factory.mktemp("with-tokenizer"),
        vocab=49152,
        n_layers=1,
        hidden=32,
        n_heads=2,
        n_kv_heads=1,
        intermediate=32,
    )
    tokenizer._hf.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return path


def test_hf_directory_tokenizer_equals_transformers(hf_dir):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(hf_dir))
    tokenizer = open_weights(hf_dir).tokenizer()
    expected = reference.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert tokenizer.encode_chat(CHAT) == list(expected)
    for text in TEXTS:
        assert tokenizer.encode(text) == reference.encode(text)
    assert tokenizer.eos_token_ids == (2, 0)  # config.json's, then generation_config.json's


def test_model_without_chat_template_says_to_use_no_chat(hf_dir, tmp_path):
    import shutil

    path = tmp_path / "plain"
    shutil.copytree(hf_dir, path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer = open_weights(path).tokenizer()
    assert tokenizer.encode("Paris") == open_weights(hf_dir).tokenizer().encode("Paris")
    with pytest.raises(ConfigError, match="no chat template.*--no-chat"):
        tokenizer.encode_chat(CHAT)


def test_directory_without_tokenizer_is_refused(tmp_path):
    path = make_tiny_llama(tmp_path / "bare", n_layers=1)
    with pytest.raises(WeightsError, match="has no tokenizer.json"):
        open_weights(path).tokenizer()
