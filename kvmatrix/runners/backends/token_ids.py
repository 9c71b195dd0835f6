"""What the token-id interfaces share (phases 1t, 3t): chat requests in, token ids on the wire.

The experiments send chat requests (``Request.messages``); a token-id interface sends every request
(harness and reference client alike) on its engine's token-id path instead, with no chat template and
no tokenizer in the timed path:

* the ids of a request: the messages' contents joined in order (no roles, no separators: the
  workload's one user message is its text), tokenized by the engine's own tokenizer as a plain-text
  prompt (``text_ids``: special tokens added, so BOS exactly where the tokenizer adds one to plain
  text, which is what the engine evaluates for the same text sent as a string), once per messages
  (cached), BEFORE the request is rendered and its connection opened;
* ``prompt_tokens(messages)`` returns exactly those ids, which is what the engine holds afterwards, so
  the experiments' expected reuse LCP(held, prompt) is exact;
* the effective settings record what the tokenizer adds (``token_prompt``, ``token_prompt_bos``,
  ``token_prompt_special``), read back from the engine at start.

The engine's part (``text_ids``, the endpoint, the counters) stays in the adapter, which lists this
mixin before its server class: ``class LlamaCppTokens(TokenIdPrompt, LlamaCppHttp)``.
"""

from __future__ import annotations

from dataclasses import replace

from kvmatrix.runners.backends.base import Measurement, Request, added_special_tokens


class TokenIdPrompt:
    """Mixin of a token-id interface over a server adapter (see the module docstring)."""

    #: how the ids are made, recorded as ``effective.token_prompt``
    token_prompt: str = ""

    def __init__(self, cell, log_dir):
        super().__init__(cell, log_dir)
        self._token_ids: dict[str, list[int]] = {}

    def text_ids(self, text: str) -> list[int]:
        """The ids the engine evaluates for ``text`` as a plain-text prompt (special tokens added)."""
        raise NotImplementedError

    def prompt_tokens(self, messages: list[dict]) -> list[int]:
        """The ids sent (and so held by the engine) for ``messages``: their contents joined, as plain text."""
        key = repr(messages)
        if key not in self._token_ids:
            self._token_ids[key] = self.text_ids("".join(str(m.get("content") or "") for m in messages))
        return self._token_ids[key]

    def effective(self) -> dict:
        return {**super().effective(), "token_prompt": self.token_prompt,
                **added_special_tokens(self.tokenize(" the"), self.text_ids(" the"))}

    def measure(self, request: Request) -> Measurement:
        if request.prompt_ids is None:
            request = replace(request, prompt_ids=self.prompt_tokens(request.messages))
        m = super().measure(request)
        m.prompt_token_ids = list(request.prompt_ids)  # what the engine evaluated: exactly the ids sent
        return m
