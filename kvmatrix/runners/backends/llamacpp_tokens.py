"""llama-server, token ids (phase 3t): every timed request is ``/completion`` with the prompt as token ids.

The same server, flags, read-back and slots as ``llamacpp_http`` (phase 3a: this class inherits render,
start, effective, slots and the cached-token reading); only the prompt differs (``token_ids.TokenIdPrompt``):
no chat template and no tokenizer in the timed path, so 3t beside 1t compares the engines on the same ids.

prompt ids: the messages' contents joined, tokenized by ``/tokenize`` with ``add_special`` on (BOS where
            the vocabulary adds one to plain text, as llama-server does for a string prompt) and
            ``parse_special`` off, before the request's connection opens; recorded in the effective
            settings. The hit [A,B,Q] after [A,B] reuses [BOS,]A,B; the miss [B,Q] only the BOS, if any.
measure:    ``LlamaCppHttp.measure``'s ``/completion`` path (``id_slot`` pinned, ``cache_prompt``,
            ``n_predict``); cached = the engine's ``timings.cache_n`` (older servers:
            ``tokens_evaluated - timings.prompt_n``). ``/completion`` always carries ``timings``, so the
            chat path's prompt-token counter is never read.
control:    the reference client (stdlib ``http.client`` on the same bytes) as for every server; no
            separate token-id control: this IS the token-id path (``token_control`` not declared).
prefix:     the prefix benchmark's raw prompts are tokenized the same way, before the batch's clock, and
            streamed to ``/completion``.
"""

from __future__ import annotations

from kvmatrix.runners.backends.llamacpp_http import LlamaCppHttp
from kvmatrix.runners.backends.token_ids import TokenIdPrompt


class LlamaCppTokens(TokenIdPrompt, LlamaCppHttp):
    name = "llamacpp_tokens"
    token_prompt = ("the messages' contents joined, tokenized by /tokenize with add_special on (BOS where the "
                    "vocabulary adds one to plain text) and parse_special off, before the clock")

    def text_ids(self, text: str) -> list[int]:
        body = self.client.post_json("/tokenize", {"content": text, "add_special": True, "parse_special": False})
        return [t if isinstance(t, int) else t["id"] for t in body["tokens"]]

    def _counts_prompt_tokens(self) -> bool:
        return False  # /completion responses always carry timings

    # -- raw-prompt completions (the prefix_reuse client) ----------------------
    def completion_request(self, prompt: str, max_tokens: int, slot: int | None = None) -> tuple[str, dict]:
        """Streaming ``/completion`` for a raw prompt as token ids (tokenized here, before the batch's clock)."""
        payload = {
            "prompt": self.text_ids(prompt), "n_predict": max_tokens, "temperature": self.spec.temperature,
            "seed": self.spec.seed, "stream": True, "cache_prompt": self.spec.prefix_caching, "ignore_eos": True,
        }
        if slot is not None:
            payload["id_slot"] = slot % max(1, self.spec.n_parallel)
        return "/completion", payload
