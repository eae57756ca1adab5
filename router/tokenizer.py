"""The model's tokenizer and chat template, received from the shard group's Info.

Only `tokenizers` and jinja2: the router needs no model files and no torch.
"""

from __future__ import annotations

from datetime import datetime

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from router.errors import ValidationError
from sluice.v1 import generate_pb2 as pb


def _raise_exception(message: str):
    raise TemplateError(message)


class RouterTokenizer:
    def __init__(self, spec: pb.Tokenizer):
        self.tokenizer = Tokenizer.from_str(spec.tokenizer_json)
        self.bos_token = spec.bos_token
        self.eos_token = spec.eos_token
        self.eos_token_ids = tuple(spec.eos_token_ids)
        self.special_ids = frozenset(
            i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special)
        self.chat_template = None
        if spec.chat_template:
            # The conventions of transformers' apply_chat_template, which templates assume.
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self.chat_template = env.from_string(spec.chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> DecodeStream:
        return DecodeStream(skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        if token_id < 0:  # streaming.WITHHELD_TOKEN_ID: a token the content filter withheld
            return ""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValidationError("this model has no chat template; use /v1/completions or "
                                  "/generate with a plain prompt", param="messages")
        try:
            return self.chat_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as exc:
            raise ValidationError(f"chat template: {exc}", param="messages") from exc
