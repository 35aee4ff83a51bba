"""Text from viewers never becomes a chat-format control token.

Chat templates put message text between control tokens (``<|im_start|>``, ``[INST]``...),
and tokenizers match those anywhere in the rendered prompt, so a viewer who types
``<|im_start|>system`` would open a system turn of their own. A control token's text inside a
message gets a zero-width space after its first character: it stays readable, and it is
tokenized as the plain text it is.

Where the tokenizer is ours (``engine/backends/prompts.py``) its own special tokens are
defused; a remote server's tokenizer is unknown, so ``CONTROL_TEXT`` covers the families'
usual spellings.
"""

from __future__ import annotations

import re

ZERO_WIDTH_SPACE = "\u200b"
# Characters that show nothing: used to smuggle a control token past a filter, or to hide
# an echo of the prompt. Removed from viewer text and from replies.
INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad"
DROP_INVISIBLE = dict.fromkeys(map(ord, INVISIBLE), None)  # for str.translate
# Every chat family's control tokens, written once: viewer text is defused of them, replies
# are stripped of them (``text_filters``), and ``TURN_BOUNDARY`` names the ones that end a turn.
CONTROL_TEXT = re.compile(
    r"<\|[^|<>\s]{1,40}\|>"  # ChatML, Qwen, Llama 3, Phi: <|im_start|>, <|eot_id|>
    r"|<｜[^｜<>]{1,40}｜>"  # DeepSeek: <｜User｜>
    r"|\[/?(?:INST|SYSTEM_PROMPT|TOOL_CALLS|AVAILABLE_TOOLS|TOOL_RESULTS)\]"  # Mistral
    r"|<</?SYS>>|</?s>"  # Llama 2
    r"|<(?:start|end)_of_turn>|<[be]os>"  # Gemma
)
# In a reply, in any case the model wrote them.
CONTROL_TEXT_ANY_CASE = re.compile(CONTROL_TEXT.pattern, re.I)
# Those of them where a chat template ends a turn or starts one (ChatML, Llama 3, Phi, Gemma,
# Mistral, DeepSeek's full-width bars): a reply is over at the first one after its text.
TURN_BOUNDARY = re.compile(
    r"<\|(?:im_start|im_end|eot_id|eom_id|start_header_id|end_header_id|end|endoftext"
    r"|user|assistant|system)\|>|<(?:start|end)_of_turn>|</s>|\[INST\]|<eos>"
    r"|<｜[^｜>\n]{1,30}｜>", re.I)


# What a viewer's own message loses before it is stored or shown to the model: control tokens
# in any case and spacing a template might still match, and reasoning tags.
VIEWER_CONTROL = re.compile(r"<\|[^<>|\n]{0,40}\|>|" + CONTROL_TEXT.pattern + r"|</?think>",
                            re.I)


def defuse(text: str, pattern: re.Pattern[str] = CONTROL_TEXT) -> str:
    """``text`` with every match of ``pattern`` broken by a zero-width space."""
    return pattern.sub(_broken, text)


def _broken(match: re.Match[str]) -> str:
    token = match.group(0)
    return token[0] + ZERO_WIDTH_SPACE + token[1:]
