"""The word-level chat tokenizer of the TRL and generation tests: 29 words (under ``tiny_llama``'s vocabulary of 100)
and a chat template whose assistant turns are marked for assistant-only losses."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "[USER]", "[ASSISTANT]"]  # ids 0, 1, 2 as in tiny_llama's config
WORDS = ("colour of the grass sky snow in winter animal that barks meows moos field ? "
         "green blue white dog cat cow").split()
# one user turn, one assistant turn ending in [EOS]; the assistant text and its [EOS] inside {% generation %}
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}[USER] {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}[ASSISTANT] {% generation %}{{ m['content'] }} [EOS]{% endgeneration %} "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with :data:`CHAT_TEMPLATE`."""
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                  unk_token="[UNK]", additional_special_tokens=["[USER]", "[ASSISTANT]"])
    tok.chat_template = CHAT_TEMPLATE
    return tok
