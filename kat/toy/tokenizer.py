"""A character-level tokenizer for the toy world, in Hugging Face format.

One character is one token, so position t of a completion is its t-th character: KL traces
line up with the text without any offset bookkeeping. The chat template renders a question as
``<bos>Q:37+48-19+25\\n``; the model answers after the newline and ends with ``<eos>``.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
CHARS = "0123456789+-=;,AQ:\n"

# The user turn is "Q:<question>\n"; an assistant turn is its text and EOS. The generation prompt
# adds nothing: the newline closing the question already hands over to the model.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'Q:' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('the toy chat template knows the roles user and assistant only') }}"
    "{% endif %}"
    "{% endfor %}"
)


def vocab() -> dict[str, int]:
    """Token -> id: the special tokens first, then one id per character."""
    return {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS))}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The toy tokenizer: WordLevel over single characters, special tokens matched whole."""
    tok = Tokenizer(models.WordLevel(vocab(), unk_token=UNK))
    # Split before every character; [\s\S] also matches the newline, which '.' would not.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",  # prompts are left-padded for generation
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
