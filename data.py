"""Data for CAGSR: the split, user JSONL, the tokenizer, IDF, encoding and batching. The generated
datasets of §7.1 are synthetic.py.

Records are plain dicts ``{"prompt": str, "response": str}``, optionally with ``"group"`` (QA:
the fact id). Encoding is T5-style: prompt ids end in EOS (no BOS on the encoder side); the
decoder reads ``[start] + response[:-1]`` and predicts ``response`` (which ends in EOS).

The special ids belong to the tokenizer, not to this module: ``specials(tok)`` reads them (ours:
pad 0, start = BOS 1, EOS 2; T5: pad 0, EOS 1, start = pad), and everything that pads, starts
the decoder, stops at EOS or skips special tokens takes that record (DECISIONS.md §8).

An instruct model's chat template (DECISIONS.md §12) rides on the tokenizer too (`with_chat`):
`encode` then puts every prompt through it, with the generation prompt appended and no EOS.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import warnings
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator

import jinja2
import jinja2.ext
import jinja2.sandbox
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import synthetic

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # order fixes their ids 0..3 in the tokenizers trained here
T5_EOS = "</s>"
DATASETS = synthetic.DATASETS


# ---------------------------------------------------------------------------- splits
@dataclass
class Splits:
    """The 80/10/10 partition of §7.1."""

    train: list[dict]
    val: list[dict]
    test: list[dict]


def split(records: list[dict], seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> Splits:
    """Split records into train/val/test; the one rule for bundled and user data.

    - records with the same prompt go to the same split (no prompt is shared);
    - if records carry ``group``, every group seen in val/test also has a record in
      train: one prompt per group is reserved for train first ("anchors");
    - deterministic given ``seed``. val/test are filled from the non-anchor prompts in
      shuffled order, so they come out at their fractions unless too few are left.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    by_prompt: dict[str, list[dict]] = {}
    for r in records:
        by_prompt.setdefault(r["prompt"], []).append(r)
    units = list(by_prompt.values())
    random.Random(seed).shuffle(units)
    anchors, grouped = set(), set()
    for k, unit in enumerate(units):
        for g in {r["group"] for r in unit if r.get("group") is not None}:
            if g not in grouped:
                grouped.add(g)
                anchors.add(k)
    targets = [round(f * len(records)) for f in fractions[1:]]
    out: list[list[dict]] = [[], [], []]
    for k, unit in enumerate(units):
        dest = 0
        if k not in anchors:
            for s in (1, 2):
                if len(out[s]) + len(unit) <= targets[s - 1]:
                    dest = s
                    break
        out[dest].extend(unit)
    short = [name for s, name in ((1, "val"), (2, "test")) if len(out[s]) < targets[s - 1]]
    if short:
        warnings.warn(
            f"split: {' and '.join(short)} smaller than asked (val/test {len(out[1])}/"
            f"{len(out[2])} records, asked {targets[0]}/{targets[1]}): every group keeps a "
            f"prompt in train and records sharing a prompt stay together"
        )
    return Splits(*out)


# ------------------------------------------------------------------------- user data
class DataError(ValueError):
    """A problem in a user's data file; the message says where and how to fix it."""


_FORMAT = 'each line must be a JSON object like {"prompt": "...", "response": "..."}'


def load_jsonl(path: str) -> list[dict]:
    """Read ``{"prompt", "response"}`` records (one JSON object a line, blank lines skipped).

    Other fields are ignored, except a string ``group`` (see ``split``), ``wrong`` (a plausible
    wrong response, what ``--sft-noise`` trains on, see ``sft_noise``), and ``key`` and
    ``wrong_key`` (the key spans of evaluation.key_span_match), which are kept. Each record
    also keeps its ``line`` in the file, so a later check (``encode_records``) can name it.
    Bytes are decoded line by line so a bad byte is reported with its line number.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(
            f"{path}: file not found; pass an existing .jsonl file "
            f"or one of the dataset names {', '.join(DATASETS)}"
        ) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror})") from None
    records = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}, line {lineno}"
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]  # a UTF-8 byte-order mark from some editors
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{where}: byte 0x{line[e.start]:02x} at column {e.start + 1} is not "
                f"valid UTF-8; save the file as UTF-8"
            ) from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: malformed JSON ({e.msg} at column {e.colno}); {_FORMAT}"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}; {_FORMAT}")
        rec = {"line": lineno}
        for key in ("prompt", "response"):
            if key not in obj:
                raise DataError(f"{where}: field '{key}' is missing; {_FORMAT}")
            if not isinstance(obj[key], str):
                raise DataError(
                    f"{where}: field '{key}' must be a string, got "
                    f"{type(obj[key]).__name__}; {_FORMAT}"
                )
            if not obj[key].strip():
                raise DataError(
                    f"{where}: field '{key}' is empty; give it some text or drop the line"
                )
            rec[key] = obj[key]
        for key in ("group", "wrong", "key", "wrong_key"):
            if key in obj:
                if not isinstance(obj[key], str) or not obj[key].strip():
                    raise DataError(
                        f"{where}: field '{key}' must be a non-empty string when present"
                    )
                rec[key] = obj[key]
        records.append(rec)
    if not records:
        raise DataError(f"{path}: no records (the file is empty or only blank lines); {_FORMAT}")
    return records


def record_where(record: dict, index: int) -> str:
    """How a message names a record: its line in the file (records of `load_jsonl`), else
    its index."""
    return f"line {record['line']}" if "line" in record else f"record {index}"


def check_splits(splits: Splits) -> None:
    """A DataError when the split left no validation or no test pair: SFT reports its
    validation loss, RL its fixed evaluation set and the held-out test prompts, and none of
    these can be empty."""
    n = (len(splits.train), len(splits.val), len(splits.test))
    if not (splits.val and splits.test):
        raise DataError(
            f"{sum(n)} records split into {n[0]} train / {n[1]} validation / {n[2]} test pairs; a "
            "run needs at least one validation and one test pair (10% each, records sharing a "
            "prompt stay together): give at least 6 records with distinct prompts"
        )


def sft_noise(
    records: list[dict], share: float, seed: int, off_topic: bool = False
) -> tuple[list[dict], list[int]]:
    """SFT data with known mistakes, so the SFT policy has good and bad behaviours for RL to choose
    between (headroom by construction; DECISIONS.md §5). Exactly round(share * n) records, drawn
    with `seed`, get a wrong response in place of the reference: their own ``wrong`` field
    (qa-grounded: the distractor's answer; a user's JSONL), or with `off_topic` (instruct) the
    response to another instruction of `records`. The records given are not changed: evaluation,
    relevance and the oracle keep the clean references. Records whose `wrong` equals their response
    (a distractor that happens to say the same) are never drawn. Returns (the noisy copy, the
    indices corrupted)."""
    if not 0 <= share < 1:
        raise ValueError(f"the noise share must be in [0, 1), got {share}")
    lacking = next((r for r in records if "wrong" not in r), None)
    if not off_topic and lacking is not None:
        raise DataError(
            f"{record_where(lacking, records.index(lacking))}: no 'wrong' field; --sft-noise "
            "replaces a share of the SFT responses with each "
            f'record\'s plausible wrong response, so every record needs one ("wrong": "...")'
        )
    rng = random.Random(seed)
    eligible = [
        i for i, r in enumerate(records) if off_topic or r["wrong"] != r["response"]
    ]  # a wrong that is wrong
    count = round(share * len(records))
    if count > len(eligible):
        raise DataError(
            f"--sft-noise {share}: {count} responses to replace, but only {len(eligible)} records "
            "have a 'wrong' response that differs from theirs"
        )
    corrupted = sorted(rng.sample(eligible, count))
    noisy = list(records)
    for i in corrupted:
        if off_topic:
            j = next(
                j
                for j in iter(lambda: rng.randrange(len(records)), None)
                if records[j]["response"] != records[i]["response"]
            )
            wrong = records[j]["response"]
        else:
            wrong = records[i]["wrong"]
        noisy[i] = {**records[i], "response": wrong}
    return noisy, corrupted


def noisy_sft_pairs(
    tok: Tokenizer,
    records: list[dict],
    pairs: list,
    share: float,
    seed: int,
    dataset: str,
    max_prompt_len: int,
    max_response_len: int,
    truncate: bool = False,
) -> tuple[list, list[int]]:
    """SFT's training pairs under --sft-noise `share`: `pairs` (the encoded `records`) with the
    records `sft_noise` draws re-encoded with their wrong responses (off-topic ones on the bundled
    `instruct`). Returns (the pairs, the indices corrupted); with no noise, `pairs` itself."""
    if not share:
        return pairs, []
    noisy, corrupted = sft_noise(records, share, seed, off_topic=dataset == "instruct")
    out = list(pairs)
    encoded = encode_records(
        tok, [noisy[i] for i in corrupted], max_prompt_len, max_response_len, truncate
    )
    for i, pair in zip(corrupted, encoded):
        out[i] = pair
    return out, corrupted


def check_held_out(
    splits: Splits,
    tok: Tokenizer,
    max_prompt_len: int,
    max_response_len: int,
    truncate: bool = False,
) -> tuple[Splits, dict]:
    """The splits with their validation and test records checked before any work: a record over the
    model's lengths is a DataError naming it, or under `truncate` is left out of the evaluation (a
    cut prompt would be another question); then `check_splits`. Returns (the splits, how many
    records each held-out split left out)."""
    sp = specials(tok)
    fits = lambda r: (
        len(encode(tok, r["prompt"], sp)) <= max_prompt_len
        and len(encode(tok, r["response"], sp, response=True)) <= max_response_len
    )
    kept = {}
    for name in ("val", "test"):
        records = getattr(splits, name)
        if truncate:
            kept[name] = [r for r in records if fits(r)]
        else:
            encode_records(
                tok, records, max_prompt_len, max_response_len
            )  # names the first over-long one
            kept[name] = records
    checked = Splits(splits.train, kept["val"], kept["test"])
    check_splits(checked)
    return checked, {name: len(getattr(splits, name)) - len(kept[name]) for name in kept}


def dataset_name(name_or_path: str) -> str:
    """The short name of a dataset, for directories and result files: qa, instruct, or a .jsonl
    file's stem."""
    return Path(name_or_path).stem if str(name_or_path).endswith(".jsonl") else name_or_path


def is_qa(name_or_path: str) -> bool:
    """A question-answering task (qa, qa-grounded, or a .jsonl named qa*): scored by exact-match."""
    return dataset_name(name_or_path).startswith("qa")


def load_dataset(name_or_path: str, seed: int = 0) -> Splits:
    """A bundled dataset at the paper's size (§7.1) or a user .jsonl file, split 80/10/10."""
    if name_or_path in synthetic.MAKERS:
        make = synthetic.MAKERS[name_or_path]
        return split(make(synthetic.PAPER_SIZES[name_or_path], seed=seed), seed=seed)
    if str(name_or_path).endswith(".jsonl"):
        return split(load_jsonl(name_or_path), seed=seed)
    raise ValueError(
        f"unknown dataset {name_or_path!r}: use one of {', '.join(DATASETS)}, "
        f"or a path to an existing file ending in .jsonl"
    )


# ------------------------------------------------------------------------- tokenizer
def record_texts(records: Iterable[dict]) -> Iterator[str]:
    """Prompts and responses, the texts a tokenizer is trained on (training split only)."""
    for r in records:
        yield r["prompt"]
        yield r["response"]


@dataclass(frozen=True)
class Specials:
    """The special ids of one tokenizer (DECISIONS.md §8): what pads a batch, starts the decoder and
    ends a sequence, and which ids are special (never content, the prompt's attention sinks).
    Read from the tokenizer by `specials(tok)` and stored in every checkpoint."""

    pad: int
    start: int  # the decoder's first input: BOS here, pad for T5
    eos: int
    special: tuple  # every special id, sorted (T5: pad, EOS, UNK and the <extra_id_*> sentinels)
    appends_eos: bool = (
        False  # the tokenizer's post-processor ends every encoding in EOS itself (T5)
    )

    def sample_ids(self) -> dict:
        """The keywords of `EncoderDecoder.sample`."""
        return dict(bos_id=self.start, eos_id=self.eos, pad_id=self.pad)


def specials(tok: Tokenizer) -> Specials:
    """The special ids of `tok`: the ones a Llama/Qwen2 snapshot's config.json gave it
    (`snapshot_tokenizer`, kept in checkpoints), else by name: a tokenizer trained here (<pad> <bos>
    <eos> <unk>) or a T5-family one (<pad>, </s>, the decoder starting from pad). Every token the
    tokenizer marks special is in `special`. ValueError if it has no pad or EOS token."""
    if getattr(tok, "cagsr_specials", None) is not None:
        return tok.cagsr_specials
    pad = tok.token_to_id(PAD)
    eos = tok.token_to_id(EOS) if tok.token_to_id(EOS) is not None else tok.token_to_id(T5_EOS)
    if pad is None or eos is None:
        raise ValueError(
            f"the tokenizer has no {PAD} or no {EOS}/{T5_EOS} token; cagsr needs a pad and an "
            f"end-of-sequence token (T5's tokenizer.json has both)"
        )
    start = tok.token_to_id(BOS) if tok.token_to_id(BOS) is not None else pad
    return specials_of(tok, pad, start, eos)


def specials_of(tok: Tokenizer, pad: int, start: int, eos: int) -> Specials:
    """The Specials record of `tok` with these pad, start and EOS ids: every token the
    tokenizer marks special joins them, and a probe encoding says whether its post-processor
    appends EOS itself."""
    marked = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    return Specials(
        pad,
        start,
        eos,
        tuple(sorted(marked | {pad, start, eos})),
        tok.encode("a").ids[-1:] == [eos],
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with PAD/BOS/EOS/UNK at ids 0..3 and no post-processor.

    Byte-level means every UTF-8 string encodes without UNK and decodes back exactly.
    ``get_vocab_size()`` may come out below ``vocab_size`` when the texts run out of merges.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be at least 260 (256 bytes + 4 special tokens), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    tok.encode_special_tokens = True  # a literal "<eos>" in user text is text, not EOS
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    return tok


def tokenizer_to_str(tok: Tokenizer) -> str:
    """JSON string of the tokenizer, for storing inside a checkpoint."""
    return tok.to_str()


def tokenizer_from_str(s: str, stored_specials: dict | None = None) -> Tokenizer:
    """Inverse of ``tokenizer_to_str``. stored_specials: a checkpoint's `specials`, kept with the
    tokenizer when they are not the ones its token names give (a Llama/Qwen2 snapshot's, from its
    config.json)."""
    tok = Tokenizer.from_str(s)
    tok.encode_special_tokens = True  # not part of the JSON, so set it again
    if stored_specials is not None:
        stored = Specials(**{**stored_specials, "special": tuple(stored_specials["special"])})
        try:
            by_name = specials(tok)
        except ValueError:
            by_name = None
        if stored != by_name:
            tok.cagsr_specials = stored
    return tok


def snapshot_tokenizer(path) -> Tokenizer:
    """The tokenizer.json of a Hugging Face snapshot directory, as the `tokenizers` library reads
    it, with any truncation or padding it carries turned off (a snapshot's tokenizer.json may cut
    every text at 512 tokens without a word; here over-long texts are refused or cut with a warning,
    see `encode_records`). T5's post-processor appends </s> itself (`Specials.appends_eos`)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        if (path / "spiece.model").is_file():
            raise ValueError(
                f"{path} ships only spiece.model (a SentencePiece model) and no tokenizer.json, "
                "which is what cagsr reads. Write one once, where transformers and sentencepiece "
                "are installed: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)"
            )
        raise ValueError(f"{path}: no tokenizer.json; a snapshot for --init needs its tokenizer")
    try:
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as e:
        raise ValueError(
            f"{path / 'tokenizer.json'}: not readable by the tokenizers library ({e})"
        ) from None
    tok.no_truncation()
    tok.no_padding()
    tok.encode_special_tokens = True
    config = path / "config.json"
    if config.is_file():
        hf_config = read_json(config)
        if hf_config.get("model_type") in DECODER_ONLY_TYPES:
            tok.cagsr_specials = config_specials(tok, hf_config, config)
    specials(tok)  # a tokenizer without pad or EOS is refused here, before any work
    return tok


def read_json(path: Path) -> dict:
    """A snapshot's JSON file as a dict; ValueError naming the file when it is not a JSON object."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path}: not valid JSON ({e}); the snapshot is damaged, copy it again"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path}: a JSON {type(obj).__name__}, not an object; "
            "the snapshot is damaged, copy it again"
        )
    return obj


DECODER_ONLY_TYPES = ("llama", "qwen2")
"""The snapshot model_types read into decoder.DecoderOnly (the Llama layout; interop/snapshot.py).
Their special ids come from config.json: their token names vary (</s>, <|end_of_text|>,
<|endoftext|>, <|im_end|>), and Llama has no pad token."""


def config_specials(tok: Tokenizer, hf_config: dict, where) -> Specials:
    """The special ids of a Llama/Qwen2 snapshot (DECISIONS.md §10): EOS is config.json's
    eos_token_id (the first, when it lists several); pad its pad_token_id, else EOS (Llama has none:
    padding is never attended to, so any id does); start is the BOS the tokenizer puts in front of a
    prompt, when it does (Llama), else pad (Qwen2 has no BOS). A decoder-only model never reads
    start: its first response token comes from the prompt's last position."""

    def one(key):
        v = hf_config.get(key)
        return v[0] if isinstance(v, list) and v else v

    eos = one("eos_token_id")
    if not isinstance(eos, int) or not 0 <= eos < tok.get_vocab_size(with_added_tokens=True):
        raise ValueError(
            f"{where}: eos_token_id {hf_config.get('eos_token_id')!r} is not a token of its "
            "tokenizer.json; cagsr needs the end-of-sequence id of this snapshot"
        )
    pad = one("pad_token_id")
    pad = pad if isinstance(pad, int) else eos
    bos = one("bos_token_id")
    start = bos if isinstance(bos, int) and tok.encode("a").ids[:1] == [bos] else pad
    return specials_of(tok, pad, start, eos)


def token_texts(tok: Tokenizer) -> list[str]:
    """The text of every id as it reads inside a longer text: a piece that begins a word begins with
    a space. Byte-level BPE decodes its "Ġ" to that space; a SentencePiece piece marks it with "▁",
    which a Metaspace decode of the piece alone drops, so it is read from the piece itself."""
    out = tok.decode_batch([[i] for i in range(tok.get_vocab_size())], skip_special_tokens=False)
    return [
        (" " + t if (tok.id_to_token(i) or "").startswith("\u2581") and not t[:1].isspace() else t)
        for i, t in enumerate(out)
    ]


def content_token_mask(
    tok: Tokenizer, sp: Specials | None = None, texts: list[str] | None = None
) -> torch.Tensor:
    """(V,) bool: True where a token can be salient (§3.2, DECISIONS.md §2).

    Special tokens (`Specials.special`: T5's sentinels too) and tokens with no letter or digit once
    decoded (spaces, "▁", punctuation, partial UTF-8 bytes) are never salient. texts:
    `token_texts(tok)` when the caller has it already.
    """
    special = set((sp or specials(tok)).special)
    texts = token_texts(tok) if texts is None else texts
    return torch.tensor(
        [i not in special and any(ch.isalnum() for ch in t) for i, t in enumerate(texts)],
        dtype=torch.bool,
    )


def idf(prompt_ids: list[list[int]], vocab_size: int) -> torch.Tensor:
    """(V,) float: idf[v] = log((1 + n_docs) / (1 + df[v])), df over training prompts (§3.2)."""
    df = torch.zeros(vocab_size, dtype=torch.float64)
    for ids in prompt_ids:
        df[torch.tensor(sorted(set(ids)), dtype=torch.long)] += 1  # presence, not counts
    return torch.log((1 + len(prompt_ids)) / (1 + df)).float()


# ---------------------------------------------------------------------------- chat templates
@dataclass(frozen=True)
class ChatTemplate:
    """An instruct model's chat template (DECISIONS.md §12): the Jinja `source` its snapshot
    (chat_template.jinja, tokenizer_config.json), GGUF file (tokenizer.chat_template) or
    --chat-template FILE gives; the `system` turn (--system; None: the template's own default);
    the special-token strings the template may read (`tokens`: bos_token, eos_token, unk_token,
    pad_token, as transformers passes its special_tokens_map). Carried on the tokenizer by
    `with_chat` and stored in every checkpoint (cli/runs.checkpoint_state)."""

    source: str
    system: str | None = None
    tokens: dict = dataclasses.field(default_factory=dict)


class _Generation(jinja2.ext.Extension):
    """{% generation %} ... {% endgeneration %} (transformers' mark of the assistant's tokens):
    renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=16)
def compile_chat(source: str) -> jinja2.Template:
    """The template compiled as transformers.utils.chat_template_utils compiles it: an immutable
    sandbox with trim_blocks and lstrip_blocks, loopcontrols, {% generation %}, its tojson
    (json.dumps, no HTML escaping), raise_exception (a TemplateError) and strftime_now.
    jinja2.TemplateSyntaxError when the source is not a template."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda x, ensure_ascii=False, **kw: json.dumps(
        x, ensure_ascii=ensure_ascii, **kw
    )  # indent, separators, sort_keys
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=lambda f: datetime.now().strftime(f)
    )
    return env.from_string(source)


def chat_messages(chat: ChatTemplate, text: str) -> list[dict]:
    """The conversation a prompt stands for: the system turn (when given), then `text` as the
    user's turn."""
    system = [] if chat.system is None else [{"role": "system", "content": chat.system}]
    return system + [{"role": "user", "content": text}]


def render_messages(chat: ChatTemplate, messages: list[dict], generation: bool) -> str:
    """`messages` rendered by the template with the variables transformers gives it: messages,
    tools and documents (None), add_generation_prompt and the special-token strings."""
    variables = dict(tools=None, documents=None, add_generation_prompt=generation)
    return compile_chat(chat.source).render(messages=messages, **variables, **chat.tokens)


def render_chat(chat: ChatTemplate, text: str) -> str:
    """The prompt `text` as the model sees it: its conversation rendered with the generation prompt
    appended (for ChatML, ending in "<|im_start|>assistant\\n")."""
    return render_messages(chat, chat_messages(chat, text), generation=True)


def special_ids(tok: Tokenizer, text: str) -> list[int]:
    """Ids of `text` with the special tokens written in it read as special tokens and no
    post-processor: what transformers' apply_chat_template tokenizes a rendered chat into
    (add_special_tokens=False)."""
    kept = tok.encode_special_tokens
    tok.encode_special_tokens = False
    try:
        return tok.encode(text, add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = kept


def end_of_turn(tok: Tokenizer, chat: ChatTemplate, sp: Specials) -> int:
    """The id that ends the assistant's turn in `chat`: the first token after an assistant message
    of a rendered conversation, when it is a special token (ChatML's <|im_end|>, Llama 3's
    <|eot_id|>, Gemma's <end_of_turn>); else sp.eos."""
    mark = "CAGSRENDOFTURNPROBE"
    messages = chat_messages(chat, "Hello") + [{"role": "assistant", "content": mark}]
    try:
        text = render_messages(chat, messages, generation=False)
    except Exception:  # a template that renders no assistant turn: EOS stays the end
        return sp.eos
    ids = special_ids(tok, text.split(mark, 1)[1] if mark in text else "")
    return ids[0] if ids and ids[0] in sp.special else sp.eos


def with_chat(tok: Tokenizer, chat: ChatTemplate | None) -> Tokenizer:
    """`tok` carrying `chat` (or no template, None) as `tok.cagsr_chat`, read by `encode`. With a
    template the response ends at the template's end-of-turn token: when that is not the EOS,
    it becomes the EOS of `specials(tok)` (SFT targets end in it, sampling stops at it; pad is
    unchanged), and is stored so in checkpoints (DECISIONS.md §12)."""
    tok.cagsr_chat = chat
    if chat is not None:
        sp = specials(tok)
        eot = end_of_turn(tok, chat, sp)
        if eot != sp.eos:
            tok.cagsr_specials = replace(sp, eos=eot)
    return tok


def chat_of(tok: Tokenizer) -> ChatTemplate | None:
    """The chat template `tok` carries (`with_chat`), or None."""
    return getattr(tok, "cagsr_chat", None)


# ------------------------------------------------------------------ encoding, batches
def encode(
    tok: Tokenizer, text: str, sp: Specials | None = None, response: bool = False
) -> list[int]:
    """Token ids ending in one EOS, for a prompt (T5-style: the encoder sees no BOS) or a response
    (the decoder is fed ``[start] + ids[:-1]``, see ``collate``). A prompt is what the tokenizer's
    post-processor makes of it (a Llama tokenizer's BOS first), ending in EOS: the same for both
    architectures (DECISIONS.md §10). A response skips the post-processor (no BOS in the middle of a
    decoder-only sequence). A tokenizer that appends EOS itself (T5) is not given a second one.
    With a chat template on `tok` (`with_chat`) a prompt is its rendered conversation, generation
    prompt included, tokenized as transformers' apply_chat_template does, with no EOS after it
    (DECISIONS.md §12); the response ends in EOS, the template's end-of-turn.
    sp: `specials(tok)`, read again when not given."""
    sp = sp or specials(tok)
    chat = chat_of(tok)
    if chat is not None and not response:
        return special_ids(tok, render_chat(chat, text))
    ids = tok.encode(text, add_special_tokens=not response).ids
    return ids if sp.appends_eos and ids[-1:] == [sp.eos] else ids + [sp.eos]


def decode(tok: Tokenizer, ids, sp: Specials | None = None) -> str:
    """Text of ``ids`` (list or 1-D tensor) up to the first EOS, without pad and start tokens."""
    sp = sp or specials(tok)
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if sp.eos in ids:
        ids = ids[: ids.index(sp.eos)]
    return tok.decode([i for i in ids if i not in (sp.pad, sp.start)], skip_special_tokens=False)


def encode_records(
    tok: Tokenizer,
    records: list[dict],
    max_prompt_len: int,
    max_response_len: int,
    truncate: bool = False,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per record; lengths count the EOS. Nothing is cut silently: an
    over-long text is a DataError naming the record (its file line, for records of `load_jsonl`)
    and the limit (the model's max_src_len or max_tgt_len), unless `truncate` (a templated prompt
    keeps its last tokens, so that it still ends in the generation prompt)."""
    if min(max_prompt_len, max_response_len) < 1:
        raise ValueError("max_prompt_len and max_response_len must be at least 1 (room for EOS)")
    sp = specials(tok)
    pairs, cut = [], {"prompt": 0, "response": 0}
    for idx, r in enumerate(records):
        pair = []
        for key, limit, field in (
            ("prompt", max_prompt_len, "max_src_len"),
            ("response", max_response_len, "max_tgt_len"),
        ):
            ids = encode(tok, r[key], sp, response=key == "response")
            if len(ids) > limit:
                if not truncate:
                    raise DataError(
                        f"{record_where(r, idx)}: {key} is {len(ids)} tokens (with EOS), over the "
                        f"model's {field} of {limit}; shorten it, or pass --truncate to cut "
                        "over-long texts with a warning (truncate=True in code)"
                    )
                ids = (
                    ids[-limit:]  # a templated prompt keeps its end: the generation prompt
                    if key == "prompt" and chat_of(tok) is not None
                    else ids[: limit - 1] + [sp.eos]  # keep EOS so the sequence still ends
                )
                cut[key] += 1
            pair.append(ids)
        pairs.append(tuple(pair))
    if cut["prompt"] or cut["response"]:
        warnings.warn(
            f"truncated {cut['prompt']} prompts (to {max_prompt_len} tokens) and "
            f"{cut['response']} responses (to {max_response_len} tokens) of {len(records)}"
        )
    return pairs


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = True
    return ids, mask


def collate(pairs: list[tuple[list[int], list[int]]], sp: Specials) -> dict:
    """Right-pad a batch to its own maxima with sp.pad; teacher forcing shifts the response by one.

    src (B, S), src_mask (B, S) True on real prompt tokens; tgt_in (B, T) = [sp.start] + r[:-1];
    tgt_out (B, T) = r; tgt_mask (B, T) True up to and including EOS.
    """
    for b, (p, r) in enumerate(pairs):
        if not p or not r or r[-1] != sp.eos:
            raise ValueError(
                f"pair {b}: prompt must be non-empty and response must end in EOS (id {sp.eos})"
            )
    src, src_mask = _pad([p for p, _ in pairs], sp.pad)  # (B, S)
    tgt_in, _ = _pad([[sp.start] + r[:-1] for _, r in pairs], sp.pad)  # (B, T)
    tgt_out, tgt_mask = _pad([r for _, r in pairs], sp.pad)  # (B, T)
    return {
        "src": src,
        "src_mask": src_mask,
        "tgt_in": tgt_in,
        "tgt_out": tgt_out,
        "tgt_mask": tgt_mask,
    }


def collate_prompts(prompts: list[list[int]], sp: Specials) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad encoded prompts alone (for sampling) with sp.pad: src (B, S), src_mask (B, S)."""
    if not all(prompts):
        raise ValueError("every prompt must be non-empty (it ends in EOS)")
    return _pad(prompts, sp.pad)


def batches_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """How many batches `batches` yields for n pairs."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest and rest >= world else 0)


def batches(
    pairs: list,
    batch_size: int,
    sp: Specials,
    seed: int = 0,
    shuffle: bool = True,
    rank: int = 0,
    world: int = 1,
    skip: int = 0,
) -> Iterator[dict]:
    """Collated batches over ``pairs`` (one pass; the last partial batch included).

    Pass a different ``seed`` each epoch (e.g. ``seed + epoch``) for a new order. With ``world``
    data-parallel processes every rank walks the same order and collates only its contiguous
    share of each batch (sizes differ by at most one); a last batch smaller than ``world`` is left
    out, since some rank would have nothing. ``skip``: start after that many batches of the pass
    (a resumed run), without collating them.
    """
    order = list(range(len(pairs)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for b in range(skip, batches_per_epoch(len(order), batch_size, world)):
        chunk = order[b * batch_size : (b + 1) * batch_size]
        chunk = chunk[rank * len(chunk) // world : (rank + 1) * len(chunk) // world]
        yield collate([pairs[i] for i in chunk], sp)
