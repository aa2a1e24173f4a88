"""Text to token ids and back, exactly as transformers does it for the same files.

The tokenizer and the chat template are the model's own: ``tokenizer.json`` and
``tokenizer_config.json`` of a Hugging Face directory, or the ``tokenizer.*`` metadata of a
GGUF file. Only the first and last stage of a pipeline need one.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import TemplateError

from p2pserve.engine.config import ModelConfig
from p2pserve.errors import ConfigError, WeightsError


class Tokenizer:
    def __init__(self, hf, name: str, eos_token_ids: tuple[int, ...], bos_token_id: int | None):
        self._hf = hf  # a transformers fast tokenizer
        self.name = name
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id

    @classmethod
    def load(cls, path: Path, config: ModelConfig) -> Tokenizer:
        """The tokenizer of a Hugging Face model directory or of a GGUF file."""
        # Imported here: transformers takes seconds to import, and middle stages never need it.
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        path = Path(path)
        if path.is_dir() and not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            raise WeightsError(
                f"{path} has no tokenizer.json (nor tokenizer.model): copy the model's tokenizer files there"
            )
        try:
            if path.is_dir():
                hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            else:
                # What AutoTokenizer builds for a GGUF too, without its slow second pass over the header.
                hf = PreTrainedTokenizerFast.from_pretrained(
                    str(path.parent), gguf_file=path.name, local_files_only=True
                )
        except (OSError, ValueError) as e:
            detail = " ".join(str(e).split())  # the CLI prints errors on one line
            raise WeightsError(f"{path}: cannot load the tokenizer ({detail})") from e
        eos = config.eos_token_ids + ((hf.eos_token_id,) if hf.eos_token_id is not None else ())
        bos = config.bos_token_id if config.bos_token_id is not None else hf.bos_token_id
        return cls(hf, config.name, tuple(dict.fromkeys(eos)), bos)

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text, with a BOS token if and only if the model adds one."""
        return self._hf.encode(text)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation ([{"role": ..., "content": ...}]) in the model's chat template."""
        if not self._hf.chat_template:
            raise ConfigError(
                f"{self.name} has no chat template: send the prompt as plain text with --no-chat"
            )
        try:
            text = self._hf.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except TemplateError as e:
            raise ConfigError(f"the chat template of {self.name} refused the messages: {e}") from e
        # The template writes any BOS itself, as transformers' own apply_chat_template assumes.
        return self._hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids)

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns generated tokens into text as they arrive.

    A token can end in the middle of a UTF-8 character (byte-level BPE splits emoji), and
    some tokenizers only know a token's leading space from the one before it. So each
    push decodes a short window that starts one emission back, and holds text that ends
    in an incomplete character (U+FFFD) until the next token completes it. The pieces
    joined equal ``decode`` of all the tokens.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._decode = tokenizer.decode
        self._ids: list[int] = []
        self._start = 0  # window start: the tokens of the previous emission, for context
        self._done = 0  # tokens already emitted as text

    def push(self, token_id: int) -> str:
        """The new text this token completes; "" while a character is still incomplete."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is held back, complete or not."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._done == len(self._ids):
            return ""
        before = self._decode(self._ids[self._start : self._done])
        after = self._decode(self._ids[self._start :])
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return ""
        self._start, self._done = self._done, len(self._ids)
        return after[len(before) :]
