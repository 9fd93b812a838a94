"""Chat templates: conversation -> prompt, with the model's own template."""
from __future__ import annotations

from typing import Any, Optional

Conversation = list[dict[str, Any]]


def render_chat(tokenizer, conversation: Conversation, add_generation_prompt: bool = True,
                chat_template: Optional[str] = None,
                chat_template_kwargs: Optional[dict] = None) -> dict:
    """{"prompt": text, "prompt_token_ids": ids}. The template writes BOS and other special
    tokens itself, so the text is tokenized without adding them again."""
    if tokenizer is None:
        raise ValueError("messages: chat needs a tokenizer")
    text = tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=chat_template,
                                         add_generation_prompt=add_generation_prompt,
                                         **(chat_template_kwargs or {}))
    return {"prompt": text, "prompt_token_ids": tokenizer(text, add_special_tokens=False).input_ids}
