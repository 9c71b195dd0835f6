"""Shapes of the embedded default models (Llama architecture, random weights)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kvmatrix.plumbing.console import fail

#: Special tokens of the generated tokenizer, in id order (0, 1, 2).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"  # chat turns end here
#: ChatML, stored inline in tokenizer_config.json and in chat_template.jinja.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ModelPreset:
    """One generated model: Llama shape, vocabulary size and weight seed."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def params(self) -> int:
        """Parameter count (untied embeddings and lm_head)."""
        return param_count(self)

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset("tiny", 256, 4, 4, 4, 704, 2048, 4096, 10000.0, 1234),
        ModelPreset("gpt2-small", 768, 12, 12, 12, 3072, 8192, 4096, 10000.0, 1235),
        ModelPreset("llama-1b", 2048, 24, 16, 16, 5632, 8192, 4096, 10000.0, 1236),
    )
}


def param_count(p: ModelPreset) -> int:
    """Parameters of a Llama model of shape ``p``."""
    h, kv = p.hidden_size, p.num_kv_heads * p.head_dim
    attn = 2 * h * h + 2 * h * kv
    mlp = 3 * h * p.intermediate_size
    layer = attn + mlp + 2 * h
    return 2 * p.vocab_size * h + p.num_layers * layer + h


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name``, or a one-line UserError."""
    if name not in PRESETS:
        fail(
            f"unknown model preset {name!r}; use one of {', '.join(PRESETS)} "
            "or a path to an HF directory / .gguf file"
        )
    return PRESETS[name]
