"""Incremental detokenisation with stop strings.

The output processor owns one `IncrementalDetokenizer` per request:

    d = IncrementalDetokenizer(tokenizer, prompt_token_ids, params)
    stop = d.update(new_token_ids)   # matched stop string (the request must finish) or None
    delta = d.get_delta_text()       # text that became final since the last call
    ...
    d.finish()                       # request ended for another reason (EOS, length, abort):
                                     # releases the text held back, then get_delta_text() once more

Text goes through three stages, each of which only ever appends:

1. Decoding (`_decode_step`): a small window of token ids is decoded with the tokenizer's own
   `decode`, so that every tokenizer quirk (byte-level BPE, SentencePiece "▁" and byte
   fallback, skipped special tokens) is reproduced exactly. The window starts a few tokens
   before the text not yet consumed (prefix/read offsets), which gives both O(few tokens)
   work per step and the right leading space on the first output token of SentencePiece-style
   tokenizers (their decoders strip the space of the first token of whatever they decode).
   Text ending in U+FFFD may be an incomplete multi-byte character and is held back.
2. Space clean-up (`_SpaceCleanup`): only for tokenizers whose `decode` runs transformers'
   `clean_up_tokenization` (non-BPE models with `clean_up_tokenization_spaces=True`).
3. Stop strings: searched in the generated text only; a tail that could still become a stop
   string is held back from the stream until it can't, or until the request finishes.

Invariant: `output_text` == concatenation of everything `get_delta_text()` returned plus
what it will return next; after `finish()` (with no stop string matched) it equals
`tokenizer.decode(output_token_ids, skip_special_tokens=...)` for tokenizers whose decoding
does not depend on what precedes the output (byte-level BPE: GPT-2, Llama 3, Qwen, SmolLM2).
For SentencePiece-style tokenizers it equals the text that the output adds to the decoded
prompt, i.e. the first token keeps its leading space (as in vLLM), where a stand-alone
`decode(output_token_ids)` would strip it.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from kvflow.sampling_params import SamplingParams

# U+FFFD: what decoders produce for bytes that are not (yet) a complete UTF-8 character.
_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded ahead of the first output token. One is enough for the leading-space
# rule; a few more cover a character split over several byte tokens right before the output.
_PROMPT_CONTEXT_TOKENS = 6
_FORCE_BPE_CLEANUP_ATTR = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
# A UTF-8 character has at most 4 bytes, so a partial one spans at most 3 byte tokens.
_MAX_PARTIAL_CHAR_TOKENS = 3


class IncrementalDetokenizer:
    """Turns a request's generated token ids into streamed text and detects stop strings.

    Public state:
      output_token_ids  every id passed to update(), up to the one that completed a stop string
      output_text       the final text so far (never shrinks, never contains held-back text)
      finished          True after a stop string matched or finish() was called
      stop_str          the stop string that matched, else None

    `finish()` (not a flag on get_delta_text) ends the request: it releases the text held back
    for a possible stop string or an incomplete character. update() after that raises.
    """

    def __init__(self, tokenizer, prompt_token_ids: Optional[Sequence[int]],
                 params: SamplingParams):
        self.output_token_ids: list[int] = []
        self.finished = False
        self.stop_str: Optional[str] = None
        # Generated text (after stop-string truncation) = "".join(_released) + _held.
        # _released is final; _held is the tail that could still start a stop string
        # (at most len(longest stop) - 1 characters). Chunks are kept in lists so that a
        # step costs O(new text), not O(output length).
        self._released: list[str] = []
        self._unreturned: list[str] = []  # released chunks not yet given by get_delta_text()
        self._held = ""
        self._enabled = params.detokenize
        if not self._enabled:
            return

        self._stops: tuple[str, ...] = tuple(params.stop or ())
        self._include_stop = params.include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        self._decode, cleanup_fn = _make_decode(tokenizer, params)
        self._cleanup = None
        if cleanup_fn is not None:
            self._cleanup = _SpaceCleanup(cleanup_fn, _has_standard_cleanup(tokenizer))

        # Decode window over _ids (prompt context + output ids):
        #   _ids[_prefix:_read] is already-consumed text kept only as context,
        #   _ids[_read:] holds the tokens whose text is not fully consumed yet, and
        #   _consumed = number of characters of decode(_ids[_prefix:]) already handed on.
        # _ids[:_prefix] is dead and trimmed now and then so memory stays O(window).
        self._ids = self._prompt_context(list(prompt_token_ids or ()))
        self._prefix = 0
        self._read = len(self._ids)
        self._consumed = len(self._decode(self._ids))

    # ------------------------------------------------------------------ public API
    @property
    def output_text(self) -> str:
        if len(self._released) > 1:
            self._released[:] = ["".join(self._released)]
        return self._released[0] if self._released else ""

    def update(self, new_token_ids: Sequence[int]) -> Optional[str]:
        """Appends generated ids; returns the matched stop string, or None.

        Ids are processed one at a time, so with several new ids (speculative decoding) the
        first one that completes a stop string ends the request and the ids after it are
        dropped (not added to output_token_ids).
        """
        if self.finished:
            raise RuntimeError("update() on a finished IncrementalDetokenizer")
        if not self._enabled:
            self.output_token_ids.extend(new_token_ids)
            return None
        for token_id in new_token_ids:
            token_id = int(token_id)  # numpy / torch scalars would upset the Rust decoder
            self.output_token_ids.append(token_id)
            self._ids.append(token_id)
            text = self._decode_step()
            if self._cleanup is not None:
                text = self._cleanup.push(text)
            if text and self._append_text(text) is not None:
                return self.stop_str
        return None

    def get_delta_text(self) -> str:
        """The text that became final since the previous call ("" if none)."""
        delta = "".join(self._unreturned)
        self._unreturned.clear()
        return delta

    def finish(self) -> Optional[str]:
        """Ends the request: releases held-back text (for the next get_delta_text()).

        The held-back text is an incomplete character (emitted as U+FFFD, exactly as
        tokenizer.decode would) and/or a tail that could have started a stop string. In the
        rare case that this flushed text completes a stop string (the space clean-up stage
        held it back), the text is truncated as usual and the stop string is returned;
        otherwise returns None. Idempotent.
        """
        if self.finished:
            return None
        stop = None
        if self._enabled:
            # Everything the window decodes to, including a trailing partial character.
            text = self._decode(self._ids[self._prefix:])[self._consumed:]
            if self._cleanup is not None:
                text = self._cleanup.push(text) + self._cleanup.flush()
            if text:
                stop = self._append_text(text)
        if stop is None:
            self._release(self._held)
            self._held = ""
        self.finished = True
        return stop

    # ------------------------------------------------------------------ stage 1: decoding
    def _prompt_context(self, prompt: list[int]) -> list[int]:
        """The trailing prompt ids decoded ahead of the output (the window's first prefix).

        They must decode cleanly at both ends, otherwise the offsets into the window text
        would not line up with the output: a trailing incomplete character (a truncated
        prompt) is dropped, so that output bytes continuing it decode to U+FFFD as they do in
        decode(output_token_ids); a leading one (the window cut a character in two) is widened
        backwards, which matters for byte-fallback decoders that turn a whole run of byte
        tokens into U+FFFD when any of it is invalid.
        """
        start, end = max(0, len(prompt) - _PROMPT_CONTEXT_TOKENS), len(prompt)
        for _ in range(_MAX_PARTIAL_CHAR_TOKENS):
            if end > start and self._decode(prompt[start:end]).endswith(_REPLACEMENT_CHAR):
                end -= 1
        for _ in range(_MAX_PARTIAL_CHAR_TOKENS):
            if start > 0 and self._decode(prompt[start:end]).startswith(_REPLACEMENT_CHAR):
                start -= 1
        # Context that decodes to nothing (e.g. only skipped special tokens) gives no leading
        # space to the first output token; look a little further back for some text.
        for _ in range(_PROMPT_CONTEXT_TOKENS):
            if start > 0 and not self._decode(prompt[start:end]):
                start -= 1
        return prompt[start:end]

    def _decode_step(self) -> str:
        """Decodes the window after one id was appended; returns the newly final text."""
        window_text = self._decode(self._ids[self._prefix:])
        if window_text.endswith(_REPLACEMENT_CHAR):
            # Possibly a character whose remaining bytes are still to come: hand on what
            # precedes it and keep the window where it is. (A genuine U+FFFD just waits one
            # more token, or for finish().) _consumed can exceed the stable length when a
            # byte-fallback decoder re-renders an invalid byte run; emit nothing then.
            stable = len(window_text.rstrip(_REPLACEMENT_CHAR))
            if stable <= self._consumed:
                return ""
            new_text = window_text[self._consumed:stable]
            self._consumed = stable
            return new_text
        new_text = window_text[self._consumed:]
        # The whole window decoded cleanly. Slide it: the tokens consumed before this step
        # fall out, those of this step become the context for the next (so the next token's
        # leading space is decoded as in the full sequence). Context that decodes to nothing
        # (skipped special tokens, a lone stripped space) would leave the next token first
        # in the window, where SentencePiece decoders strip its space: keep the old start then.
        context_text = self._decode(self._ids[self._read:])
        if context_text:
            self._prefix = self._read
            self._consumed = len(context_text)
        else:
            self._consumed = len(window_text)
        self._read = len(self._ids)
        if self._prefix > 64:  # amortised O(1): drop ids that can never be decoded again
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return new_text

    # ------------------------------------------------------------------ stage 3: stop strings
    def _release(self, text: str) -> None:
        if text:
            self._released.append(text)
            self._unreturned.append(text)

    def _append_text(self, text: str) -> Optional[str]:
        """Appends final decoded text, checks stop strings, updates what may be streamed."""
        if not self._stops:
            self._release(text)
            return None
        # A stop string that completes in the new text starts either in it or in the held
        # tail (see _hold_back), so searching held + new finds every new match, including
        # ones straddling the old and new text, and never one that lies in the prompt.
        region = self._held + text
        # The earliest-*ending* match wins (ties: the longer one): that is where a
        # character-by-character scan would have stopped, so the result does not depend on
        # how the text happened to be split into tokens.
        best: Optional[tuple[int, int, str]] = None  # (end, start, stop)
        for stop in self._stops:
            start = region.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if best is not None:
            # Truncation happens inside region, i.e. after all released text: nothing that
            # was streamed is ever taken back.
            end, start, stop = best
            self._release(region[:end if self._include_stop else start])
            self._held = ""
            self.stop_str = stop
            self.finished = True
            return stop
        keep = self._hold_back(region)
        self._release(region[:len(region) - keep])
        self._held = region[len(region) - keep:]
        return None

    def _hold_back(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string.

        A stop string that completes later must start inside that tail (if it started
        earlier, a longer tail would be such a prefix), so everything before it is final.
        At most len(longest stop) - 1 characters.
        """
        window = text[len(text) - min(len(text), self._max_stop_len - 1):]
        longest = 0
        for stop in self._stops:
            # Candidate starts: where the stop's first character occurs, leaving a tail
            # shorter than the stop and longer than the best so far; the first hit is the
            # longest tail for this stop.
            i = window.find(stop[0], max(0, len(window) - len(stop) + 1))
            while 0 <= i < len(window) - longest:
                if stop.startswith(window[i:]):
                    longest = len(window) - i
                    break
                i = window.find(stop[0], i + 1)
        return longest


# ---------------------------------------------------------------------- stage 2: clean-up
class _SpaceCleanup:
    """Streams transformers' `clean_up_tokenization` (" ." -> ".", " n't" -> "n't", ...).

    That function is a chain of str.replace calls on the whole text, which in general is not
    the same as applying it piece by piece. It is when the text is cut at a position p that no
    pattern can straddle at any link of the chain. Two kinds of cut are safe:
      (a) text[p-1] not in " '",  text[p] == " ",  text[p+1] not in " .?!,'n".
          Every pattern is a space followed by one of . ? ! , ' n, so none starts at p; one
          spanning the cut would contain text[p-1] followed by a space, and only " ' " has a
          character other than its leading space followed by a space ("'").
      (b) neither text[p-1] nor text[p] occurs in any pattern (e.g. between two CJK
          characters or most letters): a straddling pattern would contain both.
    A replacement only deletes a pattern's leading space (" ' " also turns its trailing
    space into "'", which needs the left part to end in a space, excluded by both kinds), so
    the characters around a cut that the conditions look at survive every replacement and
    the cut stays safe for every later pattern of the chain. Text is therefore held back to
    the last safe cut (usually the last word boundary) and cleaned up cut by cut.
    """

    _BAD_BEFORE = frozenset(" '")
    _BAD_AFTER = frozenset(" .?!,'n")
    _IN_PATTERNS = frozenset(" .?!,'ntmsvre")  # every character of every pattern

    def __init__(self, cleanup: Callable[[str], str], streamable: bool):
        self._cleanup = cleanup
        # A tokenizer class may override the clean-up with unknown patterns: then no cut is
        # known to be safe and everything waits for flush() (correct, but not streamed).
        self._streamable = streamable
        self._pending = ""  # raw text after the last cut

    def push(self, text: str) -> str:
        if not text:
            return ""
        self._pending += text
        if not self._streamable:
            return ""
        s = self._pending
        for p in range(len(s) - 1, 0, -1):
            before, at = s[p - 1], s[p]
            if (before not in self._IN_PATTERNS and at not in self._IN_PATTERNS) or (
                    at == " " and p + 1 < len(s) and before not in self._BAD_BEFORE
                    and s[p + 1] not in self._BAD_AFTER):
                self._pending = s[p:]
                return self._cleanup(s[:p])
        return ""

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return self._cleanup(text) if text else ""


# ---------------------------------------------------------------------- tokenizer glue
def _make_decode(tokenizer, params: SamplingParams
                 ) -> tuple[Callable[[list[int]], str], Optional[Callable[[str], str]]]:
    """Returns (decode ids without clean-up, clean-up function or None), mirroring
    `tokenizer.decode(ids, skip_special_tokens=..., spaces_between_special_tokens=...)`."""
    skip = params.skip_special_tokens
    try:
        from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
        plain_fast = (type(tokenizer).decode is PreTrainedTokenizerBase.decode
                      and type(tokenizer)._decode is PreTrainedTokenizerFast._decode)
    except ImportError:  # pragma: no cover - transformers is a dependency
        plain_fast = False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and plain_fast:
        # transformers' fast decode is exactly: backend decode, then the optional clean-up.
        # spaces_between_special_tokens is ignored by it, so it is ignored here too. Calling
        # the Rust backend directly saves the Python argument handling on every step.
        def decode(ids: list[int]) -> str:
            return backend.decode(ids, skip_special_tokens=skip)

        # transformers 5 skips the clean-up for BPE models unless this flag forces it; the
        # flag does not exist (None) in the versions that clean up every model.
        force_bpe = getattr(tokenizer, _FORCE_BPE_CLEANUP_ATTR, None)
        skips_bpe = force_bpe is not None and not force_bpe
        cleanup = None
        if getattr(tokenizer, "clean_up_tokenization_spaces", False) and not (
                skips_bpe and type(backend.model).__name__ == "BPE"):
            cleanup = tokenizer.clean_up_tokenization
        return decode, cleanup

    # Any other tokenizer (slow, or a class with its own decode): its decode, without its
    # clean-up, which stage 2 does instead.
    sbst = params.spaces_between_special_tokens

    def generic_decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip, spaces_between_special_tokens=sbst,
                                clean_up_tokenization_spaces=False)

    cleanup = tokenizer.clean_up_tokenization if getattr(
        tokenizer, "clean_up_tokenization_spaces", False) else None
    return generic_decode, cleanup


def _has_standard_cleanup(tokenizer) -> bool:
    """Whether the tokenizer's clean-up is transformers' own, whose patterns _SpaceCleanup knows."""
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover
        return False
    return getattr(type(tokenizer), "clean_up_tokenization", None) is \
        PreTrainedTokenizerBase.clean_up_tokenization
