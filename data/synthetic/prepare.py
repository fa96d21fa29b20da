"""
Synthetic data for the tiny pipeline (design notes to follow with the generator).

This module also builds the tiny tokenizers, importable without side effects:
  train_llama_tokenizer(texts, out_dir, vocab_size) -> out_dir/tokenizer.model   (SentencePiece BPE, Llama rules)
  build_clip_vocab(texts, out_dir, num_merges) -> out_dir with vocab.json + merges.txt   (CLIP byte-level BPE)
"""
import collections
import io
import json
import os

# CLIP's pre-tokeniser (openai/CLIP simple_tokenizer.py without the special tokens); `regex` comes with transformers
CLIP_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def train_llama_tokenizer(texts, out_dir, vocab_size):
    """SentencePiece BPE with Llama-2's settings: <unk>=0, <s>=1, </s>=2, no pad, byte fallback, split digits."""
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    spm.set_random_generator_seed(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", character_coverage=1.0,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2,
    )
    path = os.path.join(out_dir, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def bytes_to_unicode():
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def build_clip_vocab(texts, out_dir, num_merges):
    """Learns up to num_merges byte-level BPE merges over CLIP's pre-tokenised words and writes a CLIP-format
    vocab.json (bytes, bytes+</w>, merges, <|startoftext|>, <|endoftext|> last) and merges.txt."""
    import regex

    byte_chars = bytes_to_unicode()
    word_counts = collections.Counter()
    for text in texts:
        for word in regex.findall(CLIP_WORD_PATTERN, " ".join(text.split()).lower()):
            symbols = [byte_chars[b] for b in word.encode("utf-8")]
            symbols[-1] += "</w>"
            word_counts[tuple(symbols)] += 1
    words = list(word_counts.items())
    tokens = list(byte_chars.values())
    tokens += [t + "</w>" for t in tokens]
    known = set(tokens)
    merges = []
    for _ in range(num_merges):
        pair_counts = collections.Counter()
        for symbols, count in words:
            for pair in zip(symbols, symbols[1:]):
                if pair[0] + pair[1] not in known:  # keeps every vocab entry unique, ids contiguous
                    pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))  # ties broken by the pair itself
        merges.append(best)
        known.add(best[0] + best[1])
        merged_words = []
        for symbols, count in words:
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged_words.append((tuple(out), count))
        words = merged_words

    tokens += ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    return out_dir
