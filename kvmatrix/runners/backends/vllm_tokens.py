"""vLLM's OpenAI server, token ids (phase 1t): every timed request is ``/v1/completions`` with token ids.

The same server, flags, read-back, counters and cache isolation as ``vllm_http`` (phase 1: this class
inherits render, start, effective and ``VllmHttp.measure``'s ``Request.prompt_ids`` path); only the
prompt differs (``token_ids.TokenIdPrompt``): no chat template and no tokenizer in the timed path, so 1t
beside 3t compares the engines on the same ids.

prompt ids: the messages' contents joined, tokenized by the server's ``/tokenize`` with
            ``add_special_tokens`` on (BOS where the tokenizer adds one to plain text, as vLLM does for a
            string prompt), before the request; recorded in the effective settings. The expected reuse
            (whole blocks of LCP(held, prompt)) is exact.
cached:     ``usage.prompt_tokens_details.cached_tokens``, cross-checked with the
            ``vllm:prefix_cache_queries/hits`` counters, as ``vllm_http``.
control:    the reference client (stdlib ``http.client`` on the same bytes); no separate token-id
            control: this IS the token-id path (``token_control`` not declared).
prefix:     the prefix benchmark's raw prompts are tokenized the same way, before the batch's clock.
"""

from __future__ import annotations

from kvmatrix.runners.backends.token_ids import TokenIdPrompt
from kvmatrix.runners.backends.vllm_http import VllmHttp


class VllmTokens(TokenIdPrompt, VllmHttp):
    name = "vllm_tokens"
    token_prompt = ("the messages' contents joined, tokenized by /tokenize with add_special_tokens on (BOS where "
                    "the tokenizer adds one to plain text), before the request")

    def text_ids(self, text: str) -> list[int]:
        body = self.client.post_json("/tokenize", {"model": self.model_name, "prompt": text,
                                                   "add_special_tokens": True})
        return list(body["tokens"])

    # -- raw-prompt completions (the prefix_reuse client) ----------------------
    def completion_request(self, prompt: str, max_tokens: int, slot: int | None = None) -> tuple[str, dict]:
        """Streaming ``/v1/completions`` for a raw prompt as token ids (tokenized here, before the batch's clock)."""
        path, payload = super().completion_request(prompt, max_tokens, slot)
        return path, {**payload, "prompt": self.text_ids(prompt)}
