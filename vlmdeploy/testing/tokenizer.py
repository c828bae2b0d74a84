"""A synthetic Qwen3/InternVL3.5-compatible tokenizer, written as standard HF files.

Contract:
- ids 0..151642 are ordinary byte-level BPE tokens; ids 151643..151935 are added tokens with the
  Qwen3 specials and InternVL's `<img>` 151669, `</img>` 151670, `<IMG_CONTEXT>` 151671 (and the
  rest of that family) at their real ids, so every id a random model emits decodes.
- The BPE is trained here, deterministically, on a small built-in English word list, so ASCII
  English tokenizes into whole words; the rest of the regular ids are unreachable filler strings
  that still decode to bytes. Pre-tokenization uses Qwen2/3's split regex.
- `write_tokenizer(out_dir, fmt)` writes tokenizer.json, tokenizer_config.json,
  special_tokens_map.json, vocab.json, merges.txt and chat_template.jinja. The files load with
  `transformers.AutoTokenizer` and with `tokenizers.Tokenizer.from_file`.
- `chat_template(fmt)` is ChatML with no default system prompt (as InternVL3.5 renders it). An
  image content part becomes `<image>\\n` in the original format and `<IMG_CONTEXT>\\n` in the -HF
  formats (what transformers' InternVLProcessor expands), in place, in the order of the parts.
"""

from __future__ import annotations

import functools
import heapq
import json
from collections import defaultdict
from itertools import product
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

VOCAB_SIZE = 151936
N_REGULAR = 151643  # ids below are BPE tokens, as in Qwen2/Qwen3

# id -> (content, special). Qwen3 marks tool/think/fim tokens special=False (they print as text).
SPECIAL_TOKENS: dict[int, tuple[str, bool]] = {
    151643: ('<|endoftext|>', True), 151644: ('<|im_start|>', True),
    151645: ('<|im_end|>', True), 151646: ('<|object_ref_start|>', True),
    151647: ('<|object_ref_end|>', True), 151648: ('<|box_start|>', True),
    151649: ('<|box_end|>', True), 151650: ('<|quad_start|>', True),
    151651: ('<|quad_end|>', True), 151652: ('<|vision_start|>', True),
    151653: ('<|vision_end|>', True), 151654: ('<|vision_pad|>', True),
    151655: ('<|image_pad|>', True), 151656: ('<|video_pad|>', True),
    151657: ('<tool_call>', False), 151658: ('</tool_call>', False),
    151659: ('<|fim_prefix|>', False), 151660: ('<|fim_middle|>', False),
    151661: ('<|fim_suffix|>', False), 151662: ('<|fim_pad|>', False),
    151663: ('<|repo_name|>', False), 151664: ('<|file_sep|>', False),
    151665: ('<tool_response>', False), 151666: ('</tool_response>', False),
    151667: ('<think>', False), 151668: ('</think>', False),
    # InternVL additions
    151669: ('<img>', True), 151670: ('</img>', True), 151671: ('<IMG_CONTEXT>', True),
    151672: ('<quad>', True), 151673: ('</quad>', True), 151674: ('<ref>', True),
    151675: ('</ref>', True), 151676: ('<box>', True), 151677: ('</box>', True),
    # transformers' InternVLProcessor requires a video token; its id is our choice.
    151678: ('<video>', True),
}
INTERNVL_TOKENS = ['<img>', '</img>', '<IMG_CONTEXT>', '<quad>', '</quad>', '<ref>', '</ref>',
                   '<box>', '</box>', '<video>']
EOS_TOKEN, PAD_TOKEN = '<|im_end|>', '<|endoftext|>'

# Qwen2/Qwen3 pre-tokenizer split: contractions, letter runs with one leading non-letter,
# single digits, punctuation runs, newlines, spaces.
SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Common English words, most frequent first (rank sets the training weight).
_WORDS = """
the of and to a in is it you that he was for on are with as I his they be at one have this from
or had by not word but what some we can out other were all there when up use your how said an
each she which do their time if will way about many then them write would like so these her long
make thing see him two has look more day could go come did number sound no most people my over
know water than call first who may down side been now find any new work part take get place made
live where after back little only round man year came show every good me give our under name very
through just form sentence great think say help low line differ turn cause much mean before move
right boy old too same tell does set three want air well also play small end put home read hand
port large spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother world near build self earth father
head stand own page should country found answer school grow study still learn plant cover food
sun four between state keep eye never last let thought city tree cross farm hard start might story
saw far sea draw left late run don't while press close night real life few north open seem
together next white children begin got walk example ease paper group always music those both mark
often letter until mile river car feet care second book carry took science eat room friend began
idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose leave
song measure door product black short numeral class wind question happen complete ship area half
rock order fire south problem piece told knew pass since top whole king space heard best hour
better true during hundred five remember step early hold west ground interest reach fast verb sing
listen six table travel less morning ten simple several vowel toward war lay against pattern slow
center love person money serve appear road map rain rule govern pull cold notice voice unit power
town fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest
correct able pound done beauty drive stood contain front teach week final gave green oh quick
develop ocean warm free minute strong special mind behind clear tail produce fact street inch
multiply nothing course stay wheel full force blue object decide surface deep moon island foot
system busy test record boat common gold possible plane stead dry wonder laugh thousand ago ran
check game shape equate hot miss brought heat snow tire bring yes distant fill east paint language
among image picture describe photo shows there's it's what's cat cats dog dogs person people
left right center background foreground wearing standing sitting holding table chair window
building street sky cloud clouds grass tree trees water white black red blue green yellow brown
gray orange pink purple image images video text model answer question please assistant user
system hello thank thanks sorry yes no maybe because however therefore which while where whose
function return value values print import from class def self none true false data file list
string number result results input output error model models token tokens layer layers
a b c d e f g h i j k l m n o p q r s t u v w x y z
"""
# Word pieces, so words outside the list still split into few tokens.
_PIECES = ['s', 'es', 'ed', 'ing', 'er', 'ers', 'ly', 'tion', 'tions', 'ment', 'ness', 'able',
           'al', 'ic', 'ive', 'ous', 'ful', 'est', 're', 'un', 'in', 'de', 'con', 'pro', 'ex']
_PUNCT_FORMS = ['.', ',', '.Ċ', '.ĊĊ', ',Ġ', '?', '!', ':', ';', "'", '"', 'Ġ"', 'Ġ(', ')', '),',
                ').', '):', 'Ġ-', 'Ġ=', 'Ġ==', 'Ġ+', 'Ġ*', 'Ġ/', '()', '();', '[]', 'Ġ{', '}',
                'Ġ[', ']', 'Ċ', 'ĊĊ', 'ĠĠ', 'ĠĠĠ', 'ĠĠĠĠ', 'ĠĠĠĠĠĠĠ', 'ĠĠĠĠĠĠĠĠ', 'ĉ', 'ĉĉ',
                'Ġ#', 'Ġ<', 'Ġ>', '://', '...', 'Ġ...', '**', 'Ġ**', '--', 'Ġ--']


@functools.cache
def _byte_symbols() -> dict[int, str]:
    """GPT-2 byte -> printable char map used by ByteLevel (space -> 'Ġ', newline -> 'Ċ')."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
                 *range(ord('®'), ord('ÿ') + 1)]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _training_forms() -> dict[tuple[str, ...], int]:
    """Pre-token forms (as byte symbols) with weights: ' word' dominates, then 'word', 'Word'."""
    sym = _byte_symbols()
    # Integer weights keep the counts exact, so a pair's count reaches 0 exactly.
    forms: dict[tuple[str, ...], int] = defaultdict(int)
    for rank, word in enumerate(dict.fromkeys(_WORDS.split())):
        freq = 1_000_000 // (rank + 10)
        for text, weight in ((' ' + word, 10), (word, 3), (' ' + word.capitalize(), 2),
                             (word.capitalize(), 2)):
            forms[tuple(sym[b] for b in text.encode())] += freq * weight
    for rank, piece in enumerate(_PIECES):
        forms[tuple(piece)] += 200_000 // (rank + 1)
    for rank, punct in enumerate(_PUNCT_FORMS):
        forms[tuple(punct)] += 500_000 // (rank + 1)
    return forms


def _train_merges(forms: dict[tuple[str, ...], int]) -> list[tuple[str, str]]:
    """Plain BPE training until every form is one token (ties broken by the pair's text).

    Incremental: pair counts are updated only for the words that contain the merged pair, and a
    lazily invalidated heap finds the best pair, so this takes well under a second.
    """
    words = [list(f) for f in forms]
    freqs = list(forms.values())
    counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, w in enumerate(words):
        for pair in zip(w, w[1:], strict=False):
            counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) <= 0 or -neg != counts[pair]:
            continue  # stale entry
        merges.append(pair)
        for i in sorted(where.pop(pair)):
            _merge_word(i, words, freqs[i], pair, counts, where, heap)
        counts.pop(pair, None)
    return merges


def _merge_word(i: int, words: list[list[str]], freq: int, pair: tuple[str, str],
                counts: dict, where: dict, heap: list) -> None:
    old = words[i]
    new: list[str] = []
    j = 0
    while j < len(old):
        if j + 1 < len(old) and (old[j], old[j + 1]) == pair:
            new.append(old[j] + old[j + 1])
            j += 2
        else:
            new.append(old[j])
            j += 1
    old_pairs = list(zip(old, old[1:], strict=False))
    new_pairs = list(zip(new, new[1:], strict=False))
    for p in old_pairs:
        counts[p] -= freq
        where.get(p, set()).discard(i)
    for p in new_pairs:
        counts[p] = counts.get(p, 0) + freq
        where[p].add(i)
    # Re-push every pair whose count changed; older heap entries for them are now stale.
    for p in set(old_pairs) | set(new_pairs):
        if counts.get(p, 0) > 0 and p != pair:
            heapq.heappush(heap, (-counts[p], p))
    words[i] = new


@functools.cache
def build_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Exactly N_REGULAR regular tokens: 256 byte symbols, trained merges, then filler strings."""
    sym = _byte_symbols()
    vocab = {sym[b]: i for i, b in enumerate(sorted(sym, key=lambda b: ord(sym[b])))}
    merges = _train_merges(_training_forms())
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    # Filler: 2- then 3-symbol strings, letters first, so random ids decode to letter-ish text.
    order = [sym[b] for b in (*b'etaoinshrdlcumwfgypbvkjxqz', 32,
                              *b'ETAOINSHRDLCUMWFGYPBVKJXQZ0123456789')]
    order += [s for s in sym.values() if s not in order]
    for n in (2, 3):
        for combo in product(order, repeat=n):
            if len(vocab) == N_REGULAR:
                return vocab, merges
            vocab.setdefault(''.join(combo), len(vocab))
    raise AssertionError('unreachable: 3-symbol strings outnumber the regular ids')


def added_tokens() -> dict[int, tuple[str, bool]]:
    """Every added id 151643..151935: the real specials, then `<|reserved_N|>` padding ids."""
    out = dict(SPECIAL_TOKENS)
    for i in range(N_REGULAR, VOCAB_SIZE):
        out.setdefault(i, (f'<|reserved_{i}|>', True))
    return out


def build_tokenizer() -> Tokenizer:
    """The `tokenizers.Tokenizer` object (byte-level BPE + added tokens at their real ids)."""
    vocab, merges = build_vocab_and_merges()
    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), fuse_unk=False,
                               byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior='isolated', invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    for i, (content, special) in sorted(added_tokens().items()):
        token = AddedToken(content, special=special, normalized=False)
        n = tok.add_special_tokens([token]) if special else tok.add_tokens([token])
        # Added ids are assigned in order, so each must land on its fixed id.
        if n != 1 or tok.token_to_id(content) != i:
            raise RuntimeError(f'{content!r} landed on {tok.token_to_id(content)}, not {i}')
    return tok


def chat_template(fmt: str = 'original') -> str:
    """ChatML template; image parts render as `<image>` (original) or `<IMG_CONTEXT>` (-HF)."""
    image = '<image>' if fmt == 'original' else '<IMG_CONTEXT>'
    return (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- elif message['content'] is not none -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] in ('image', 'image_url') -%}{{- '" + image + "\\n' -}}"
        "{%- elif part['type'] == 'video' -%}{{- '<video>\\n' -}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


def tokenizer_config(fmt: str = 'original') -> dict:
    """tokenizer_config.json content (Qwen2Tokenizer class, `<|im_end|>` as eos)."""
    decoder = {str(i): dict(content=c, lstrip=False, normalized=False, rstrip=False,
                            single_word=False, special=s)
               for i, (c, s) in sorted(added_tokens().items())}
    return {
        'add_bos_token': False,
        'add_prefix_space': False,
        'added_tokens_decoder': decoder,
        'additional_special_tokens': ['<|im_start|>', '<|im_end|>', *INTERNVL_TOKENS],
        'bos_token': None,
        'chat_template': chat_template(fmt),
        'clean_up_tokenization_spaces': False,
        'eos_token': EOS_TOKEN,
        'errors': 'replace',
        # Attributes transformers' InternVLProcessor reads (tokenizer.context_image_token, ...).
        'extra_special_tokens': {
            'start_image_token': '<img>', 'end_image_token': '</img>',
            'context_image_token': '<IMG_CONTEXT>', 'video_token': '<video>',
        },
        'model_max_length': 40960,
        'pad_token': PAD_TOKEN,
        'split_special_tokens': False,
        'tokenizer_class': 'Qwen2Tokenizer',
        'unk_token': None,
    }


def write_tokenizer(out_dir: str | Path, fmt: str = 'original') -> None:
    """Write all tokenizer files for checkpoint format `fmt` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out / 'tokenizer.json'))
    vocab, merges = build_vocab_and_merges()
    (out / 'vocab.json').write_text(json.dumps(vocab, ensure_ascii=False), encoding='utf-8')
    lines = ['#version: 0.2', *(f'{a} {b}' for a, b in merges)]
    (out / 'merges.txt').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    config = tokenizer_config(fmt)
    _write_json(out / 'tokenizer_config.json', config)
    _write_json(out / 'special_tokens_map.json', {
        'additional_special_tokens': config['additional_special_tokens'],
        'eos_token': EOS_TOKEN, 'pad_token': PAD_TOKEN,
    })
    (out / 'chat_template.jinja').write_text(chat_template(fmt), encoding='utf-8')


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + '\n', encoding='utf-8')
