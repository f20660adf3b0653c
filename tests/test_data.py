"""Tests for data.py: datasets (§7.1), splits, user JSONL, tokenizer, IDF (§3.2), batching.

Sizes, length ranges, determinism, split rules, JSONL errors, tokenizer round trip; `--sft-noise`
replaces exactly round(P·n) seeded responses with the wrong ones and leaves the records it was
given unchanged, takes another instruction's response off-topic, needs a `wrong` field in a JSONL
(named by line); every `qa-grounded` wrong answer is the distractor's predicate of the asked
entity, in the prompt's words."""

import json
import math
import re
import warnings

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

import data
import reward
import synthetic

# The special ids of a tokenizer trained by data.train_tokenizer (<pad> <bos> <eos> <unk> at 0..3),
# spelled out for the tests that build batches without a tokenizer at hand.
SP = data.Specials(pad=0, start=1, eos=2, special=(0, 1, 2, 3))


def words(text):
    return len(text.split())


@pytest.fixture(scope="module")
def qa():
    return synthetic.make_qa()


@pytest.fixture(scope="module")
def grounded():
    return synthetic.make_qa_grounded()


@pytest.fixture(scope="module")
def instruct():
    return synthetic.make_instruct()


@pytest.fixture(scope="module")
def tok(qa, instruct):
    # A small subset and a modest vocabulary keep this fast; nothing here needs more.
    return data.train_tokenizer(data.record_texts(qa[:2000] + instruct[:500]), 800)


# ------------------------------------------------------------------------- datasets
def test_paper_sizes_and_unique_prompts(qa, grounded, instruct):
    for records, n in ((qa, 10_000), (grounded, 10_000), (instruct, 5_000)):
        assert len(records) == n
        assert len({r["prompt"] for r in records}) == n
        assert all(r["prompt"].strip() and r["response"].strip() for r in records)


def test_qa_lengths_follow_paper(qa):
    q = [words(r["prompt"]) for r in qa]
    a = [words(r["response"]) for r in qa]
    assert 5 <= min(q) and max(q) <= 20  # §7.1: questions ~5-20 tokens
    assert 3 <= min(a) and max(a) <= 40  # §7.1: answers ~3-40 tokens
    assert max(a) >= 30 and sum(x >= 15 for x in a) >= 1000 and min(a) <= 6  # the range is used


def test_qa_every_template_is_5_to_20_words():
    # Person names are two words, city names one: check the shortest possible fill.
    for tpl in (t for ts in synthetic.PERSON_QUESTIONS.values() for t in ts):
        assert 5 <= words(tpl.format(e="Ab Cd")) <= 20, tpl
    for tpl in (t for ts in synthetic.CITY_QUESTIONS.values() for t in ts):
        assert 5 <= words(tpl.format(e="Abcd")) <= 20, tpl
    assert (
        min(len(ts) for ts in {**synthetic.PERSON_QUESTIONS, **synthetic.CITY_QUESTIONS}.values())
        >= 4
    )


def test_qa_one_answer_per_fact_several_phrasings(qa):
    answers, prompts = {}, {}
    for r in qa:
        answers.setdefault(r["group"], set()).add(r["response"])
        prompts.setdefault(r["group"], set()).add(r["prompt"])
    assert all(len(a) == 1 for a in answers.values())  # answers come from a fact table
    assert sum(len(p) >= 2 for p in prompts.values()) >= 3000  # facts asked in 2+ ways


def test_qa_num_entities_is_a_knob():
    small = synthetic.make_qa(n=500, num_entities=100)
    assert len(small) == 500 and len({r["group"].split(".")[0] for r in small}) <= 100
    with pytest.raises(ValueError, match="num_entities"):
        synthetic.make_qa(n=5000, num_entities=20)


@pytest.mark.parametrize(
    "make", [synthetic.make_qa, synthetic.make_qa_grounded, synthetic.make_instruct]
)
def test_generation_is_deterministic(make):
    a, b, c = make(n=1000, seed=3), make(n=1000, seed=3), make(n=1000, seed=4)
    assert a == b
    assert a != c and {r["prompt"] for r in a} != {r["prompt"] for r in c}


def test_default_fixture_matches_fresh_generation(qa):
    assert synthetic.make_qa(seed=0) == qa


STOP = {
    "a",
    "an",
    "the",
    "in",
    "on",
    "of",
    "as",
    "is",
    "was",
    "and",
    "has",
    "called",
    "lives",
    "works",
    "born",
    "loves",
    "keeps",
    "lies",
    "city",
    "river",
    "colour",
    "pet",
    "sibling",
    "founded",
}


def _word_set(text):
    return set(re.findall(r"[A-Za-z0-9]+", text))


def test_grounded_answer_is_in_the_prompt(grounded):
    for r in grounded:
        context, question = r["prompt"].rsplit(". ", 1)  # the question is the last sentence
        key = _word_set(r["response"]) - STOP - _word_set(question)
        assert key, r  # the answer says something the question does not
        assert key <= _word_set(context), r  # ... and it is stated in the prompt
        assert _word_set(r["response"]) <= _word_set(r["prompt"]), r
    # each prompt states two facts, one of them a distractor: at least two predicates
    preds = re.compile(
        r"lives in|works as|was born|loves the|keeps a|has a sibling|is a city|lies on|was founded"
    )
    assert all(len(preds.findall(r["prompt"].rsplit(". ", 1)[0])) == 2 for r in grounded)


def _fits(template, text):
    """Does ``text`` come from ``template`` (any filling of its {slots})?"""
    parts = re.split(r"\{\w+\}", template)
    return re.fullmatch(".*?".join(map(re.escape, parts)), text) is not None


def test_instruct_responses_use_the_topic_words(instruct):
    kinds = {"brainstorm": 0, "explain": 0, "compose": 0}
    for r in instruct:
        topics = [t for t in synthetic.TOPICS if re.search(rf"\b{t}\b", r["prompt"])]
        assert len(topics) == 1, r
        t = topics[0]
        assert t in r["response"], r
        assert sum(w in r["response"] for w in synthetic.TOPICS[t]) >= 2, r
        assert 10 <= words(r["response"]) <= 60, r
        kind = [
            k
            for k, ts in synthetic.INSTRUCT_PROMPTS.items()
            if any(_fits(x, r["prompt"]) for x in ts)
        ]
        kinds[kind[0]] += 1
    assert len(synthetic.TOPICS) >= 30 and min(len(w) for w in synthetic.TOPICS.values()) >= 6
    assert all(1600 <= c <= 1700 for c in kinds.values()), kinds  # three kinds, ~n/3 each


# --------------------------------------------------------------------------- splits
def test_split_sizes_and_no_shared_prompt(qa, grounded, instruct):
    for records, sizes in (
        (qa, (8000, 1000, 1000)),
        (grounded, (8000, 1000, 1000)),
        (instruct, (4000, 500, 500)),
    ):
        s = data.split(records, seed=0)
        assert (len(s.train), len(s.val), len(s.test)) == sizes
        p = [{r["prompt"] for r in part} for part in (s.train, s.val, s.test)]
        assert not (p[0] & p[1]) and not (p[0] & p[2]) and not (p[1] & p[2])


def test_split_qa_test_facts_are_stated_in_train(qa):
    s = data.split(qa, seed=0)
    train_groups = {r["group"] for r in s.train}
    assert all(r["group"] in train_groups for r in s.val + s.test)


def test_split_is_deterministic(qa):
    assert data.split(qa, seed=0) == data.split(qa, seed=0)
    assert data.split(qa, seed=0).test != data.split(qa, seed=1).test


def test_split_keeps_duplicate_prompts_together():
    records = [{"prompt": f"p{i % 40}", "response": f"r{i}"} for i in range(200)]  # 5 copies each
    s = data.split(records, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (160, 20, 20)
    for part in (s.val, s.test):
        assert not {r["prompt"] for r in part} & {r["prompt"] for r in s.train}
    with pytest.raises(ValueError, match="fractions"):
        data.split(records, fractions=(0.5, 0.5, 0.5))


# ------------------------------------------------------------------------ user JSONL
def _write(tmp_path, content: bytes, name="mine.jsonl"):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


GOOD = b'{"prompt": "Hi?", "response": "Hello."}\n'


@pytest.mark.parametrize(
    "bad_line, what",
    [
        (b'{"prompt": "Hi?", "response": }', "malformed JSON"),
        (b'{"response": "Hello."}', "'prompt' is missing"),
        (b'{"prompt": "Hi?", "response": 3}', "'response' must be a string"),
        (b'{"prompt": "  ", "response": "Hello."}', "'prompt' is empty"),
        (b'{"prompt": "Hi \xff?", "response": "Hello."}', "not valid UTF-8"),
        (b'["Hi?", "Hello."]', "expected a JSON object"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, what):
    path = _write(tmp_path, GOOD + b"\n" + bad_line + b"\n" + GOOD)  # the bad line is line 3
    with pytest.raises(data.DataError) as e:
        data.load_jsonl(path)
    msg = str(e.value)
    assert "mine.jsonl" in msg and "line 3:" in msg and what in msg, msg
    assert isinstance(e.value, ValueError)


def test_jsonl_empty_and_missing_file(tmp_path):
    with pytest.raises(data.DataError, match=r"empty\.jsonl: no records"):
        data.load_jsonl(_write(tmp_path, b"\n  \n", "empty.jsonl"))
    with pytest.raises(data.DataError, match=r"nope\.jsonl: file not found"):
        data.load_jsonl(str(tmp_path / "nope.jsonl"))


def test_jsonl_round_trip_and_blank_lines(tmp_path):
    records = [
        {"prompt": f"Question {i} — ünïcode?", "response": f"Answer {i}."} for i in range(30)
    ]
    lines = [json.dumps({**r, "extra": 1}, ensure_ascii=False) for r in records]
    lines.insert(5, "")
    lines.insert(9, "   ")
    path = _write(tmp_path, ("\r\n".join(lines) + "\n").encode("utf-8"))
    lineno = [
        i + 1 for i, line in enumerate(lines) if line.strip()
    ]  # blank lines skipped, still counted
    assert data.load_jsonl(path) == [{"line": n, **r} for n, r in zip(lineno, records)]
    s = data.load_dataset(path)
    assert (len(s.train), len(s.val), len(s.test)) == (24, 3, 3)


def test_load_dataset_names_and_unknown_name():
    s = data.load_dataset("instruct")
    assert (len(s.train), len(s.val), len(s.test)) == (4000, 500, 500)
    with pytest.raises(ValueError) as e:
        data.load_dataset("squad")
    assert all(x in str(e.value) for x in ("qa", "qa-grounded", "instruct", ".jsonl"))


# ------------------------------------------------------------------------ tokenizer
def test_special_ids_and_vocab_size(tok):
    assert [tok.token_to_id(t) for t in (data.PAD, data.BOS, data.EOS, data.UNK)] == [0, 1, 2, 3]
    assert 260 < tok.get_vocab_size() <= 800
    assert tok.post_processor is None
    with pytest.raises(ValueError, match="at least 260"):
        data.train_tokenizer(["abc"], 100)


def test_round_trip_exact(tok, qa, grounded, instruct):
    texts = [
        r[k]
        for recs in (qa[:300], grounded[:300], instruct[:300])
        for r in recs
        for k in ("prompt", "response")
    ]
    texts += [
        "  Ünïcödé ✓ 日本語, «quotes» — dashes… emoji 🙂!\n\ttabs  ",
        "literal <eos> and <pad>",
    ]
    for s in texts:
        assert data.decode(tok, data.encode(tok, s)) == s
        assert tok.decode(tok.encode(s).ids) == s
    assert tok.token_to_id(data.UNK) not in data.encode(tok, texts[-2])  # byte-level: no UNK ever


def test_tokenizer_deterministic_and_serialisable(tok, qa, instruct):
    again = data.train_tokenizer(data.record_texts(qa[:2000] + instruct[:500]), 800)
    assert data.tokenizer_to_str(again) == data.tokenizer_to_str(tok)
    loaded = data.tokenizer_from_str(data.tokenizer_to_str(tok))
    for s in ("Where does Varo Kelin live?", "a <eos> b", "日本"):
        assert loaded.encode(s).ids == tok.encode(s).ids


def _gpt2_byte_decoder():
    """The byte-level alphabet written out independently (GPT-2's bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def test_content_token_mask(tok):
    mask = data.content_token_mask(tok)
    assert mask.dtype == torch.bool and mask.shape == (tok.get_vocab_size(),)
    assert not mask[:4].any()  # special tokens
    for t in (".", ",", "?", "Ġ", "!", "'"):  # punctuation / space only
        assert not mask[tok.token_to_id(t)], t
    for t in ("a", "Z", "7", "Ġthe"):
        assert mask[tok.token_to_id(t)], t
    # a second computation from the raw token strings must agree on every id
    dec = _gpt2_byte_decoder()
    for i in range(4, tok.get_vocab_size()):
        text = bytes(dec[c] for c in tok.id_to_token(i)).decode("utf-8", errors="replace")
        assert bool(mask[i]) == any(c.isalnum() for c in text), tok.id_to_token(i)


def test_idf_hand_computed():
    docs = [[4, 5, 5], [5, 6], [7]]  # token 5 twice in doc 0 still counts once
    got = data.idf(docs, vocab_size=8)
    # n_docs = 3: df=0 -> log(4/1); df=1 -> log(4/2); df=2 (token 5) -> log(4/3)
    want = torch.tensor(
        [math.log(4)] * 4 + [math.log(2), math.log(4 / 3), math.log(2), math.log(2)]
    )
    assert got.dtype == torch.float32 and got.shape == (8,)
    assert torch.allclose(got, want)


# --------------------------------------------------------------- encoding, batching
def test_encode_conventions(tok):
    eos, bos, pad = (tok.token_to_id(t) for t in (data.EOS, data.BOS, data.PAD))
    p = data.encode(tok, "Where does Varo Kelin live?")
    r = data.encode(tok, "Varo Kelin lives in Tamsa.")
    assert p[-1] == eos and bos not in p and p.count(eos) == 1
    assert r[-1] == eos and r[:-1] == tok.encode("Varo Kelin lives in Tamsa.").ids
    assert data.decode(tok, [bos] + r + [9, 9, pad]) == "Varo Kelin lives in Tamsa."
    assert data.decode(tok, torch.tensor(r + [0, 0])) == "Varo Kelin lives in Tamsa."


def test_encode_records_overlong_raises_or_truncates_once(tok):
    records = [
        {"prompt": "Short?", "response": "Yes."},
        {"prompt": "word " * 40, "response": "Yes."},
        {"prompt": "word " * 30, "response": "no " * 30},
    ]
    with pytest.raises(
        ValueError, match=r"record 1: prompt is \d+ tokens .*max_src_len of 16.*--truncate"
    ):
        data.encode_records(tok, records, max_prompt_len=16, max_response_len=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = data.encode_records(tok, records, 16, 16, truncate=True)
    assert len(caught) == 1 and "truncated 2 prompts" in str(caught[0].message)
    assert "1 responses" in str(caught[0].message)
    assert [len(p) for p, _ in pairs][1:] == [16, 16] and len(pairs[2][1]) == 16
    eos = tok.token_to_id(data.EOS)
    assert all(p[-1] == eos and r[-1] == eos for p, r in pairs)
    assert pairs[0] == (data.encode(tok, "Short?"), data.encode(tok, "Yes."))


def test_collate_hand_built():
    pairs = [([5, 6, 2], [7, 8, 2]), ([9, 2], [2])]
    b = data.collate(pairs, SP)
    assert b["src"].tolist() == [[5, 6, 2], [9, 2, 0]]
    assert b["src_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert b["tgt_in"].tolist() == [[1, 7, 8], [1, 0, 0]]
    assert b["tgt_out"].tolist() == [[7, 8, 2], [2, 0, 0]]
    assert b["tgt_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert all(v.dtype == (torch.bool if k.endswith("mask") else torch.long) for k, v in b.items())
    # teacher forcing: the input at t+1 is the target at t, wherever t+1 is real
    m = b["tgt_mask"][:, 1:]
    assert torch.equal(b["tgt_in"][:, 1:][m], b["tgt_out"][:, :-1][m])
    with pytest.raises(ValueError, match="end in EOS"):
        data.collate([([5, 2], [7, 8])], SP)


def test_batches_cover_everything_deterministically():
    pairs = [([i + 4, 2], [i + 4] * (i % 3) + [2]) for i in range(10)]
    got = list(data.batches(pairs, batch_size=4, sp=SP, seed=1))
    assert [b["src"].shape[0] for b in got] == [4, 4, 2]
    assert sorted(int(x) for b in got for x in b["src"][:, 0]) == list(range(4, 14))
    again = list(data.batches(pairs, batch_size=4, sp=SP, seed=1))
    assert all(torch.equal(x["tgt_out"], y["tgt_out"]) for x, y in zip(got, again))
    plain = list(data.batches(pairs, batch_size=4, sp=SP, seed=1, shuffle=False))
    assert plain[0]["src"][:, 0].tolist() == [4, 5, 6, 7]
    assert plain[0]["tgt_out"].shape == (4, 3)  # T is the batch's own maximum


def test_collate_prompts_pads_like_collate():
    prompts = [[5, 6, 2], [7, 2]]
    src, mask = data.collate_prompts(prompts, SP)
    full = data.collate([(p, [2]) for p in prompts], SP)
    assert src.tolist() == [[5, 6, 2], [7, 2, 0]] and torch.equal(src, full["src"])
    assert mask.tolist() == [[True, True, True], [True, True, False]] and torch.equal(
        mask, full["src_mask"]
    )


# --------------------------------------------------------------- special ids from the tokenizer
def test_specials_of_our_tokenizer(tok):
    sp = data.specials(tok)
    assert (sp.pad, sp.start, sp.eos, sp.special, sp.appends_eos) == (0, 1, 2, (0, 1, 2, 3), False)
    assert sp == SP and sp.sample_ids() == dict(bos_id=1, eos_id=2, pad_id=0)


# A T5-style vocabulary written out by hand: id = position in this list. "<pad>" 0, "</s>" 1,
# "<unk>" 2, then SentencePiece pieces ("▁" starts a word), then single letters; the sentinels come
# after (38, 39).
T5_PIECES = [
    "<pad>",
    "</s>",
    "<unk>",
    "\u2581",
    "\u2581the",
    "\u2581Paris",
    "\u2581is",
    "\u2581in",
    "\u2581France",
    "\u2581where",
    "s",
] + [c for c in "abcdefghijklmnopqrtuvwxyzPF"]
T5_SENTINELS = ["<extra_id_0>", "<extra_id_1>"]
T5_ID = {p: i for i, p in enumerate(T5_PIECES + T5_SENTINELS)}


@pytest.fixture
def t5_dir(tmp_path):
    """A snapshot directory holding only a tiny T5-style tokenizer.json: Unigram pieces, Metaspace,
    a post-processor that appends </s>, sentinels as special tokens, and truncation (4 tokens) and
    padding (to 12) switched on, as some snapshots ship them."""
    scores = [
        (p, 0.0 if i < 3 else -1.0 if len(p) > 2 else -2.0 if p == "\u2581" else -5.0)
        for i, p in enumerate(T5_PIECES)
    ]
    t = Tokenizer(models.Unigram(scores, unk_id=2))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    t.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    t.add_special_tokens(["<pad>", "</s>", "<unk>"] + T5_SENTINELS)
    t.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t.enable_truncation(max_length=4)
    t.enable_padding(pad_id=0, pad_token="<pad>", length=12)
    assert [t.token_to_id(s) for s in T5_SENTINELS] == [
        T5_ID[s] for s in T5_SENTINELS
    ]  # the layout above
    t.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_a_t5_style_snapshot_tokenizer(t5_dir):
    tok = data.snapshot_tokenizer(t5_dir)
    assert tok.truncation is None and tok.padding is None  # both turned off
    sp = data.specials(tok)
    assert (sp.pad, sp.start, sp.eos, sp.appends_eos) == (0, 0, 1, True)
    assert set(sp.special) == {0, 1, 2, 38, 39} and list(sp.special) == sorted(sp.special)
    assert sp.sample_ids() == dict(bos_id=0, eos_id=1, pad_id=0)
    ids = data.encode(tok, "the Paris")
    assert (
        ids == [T5_ID["\u2581the"], T5_ID["\u2581Paris"], 1] == [4, 5, 1]
    )  # one EOS: the post-processor's
    assert data.encode(tok, "the Paris", sp) == ids
    long = "where is Paris the Paris is in France"  # 8 pieces + EOS, over the 4 shipped
    want = [T5_ID["\u2581" + w] for w in long.split()] + [1]
    assert data.encode(tok, long, sp) == want and len(want) == 9
    assert data.decode(tok, ids, sp) == "the Paris"
    assert data.decode(tok, [0] + want + [0, 0], sp) == long  # start/pad dropped, cut at EOS
    content = data.content_token_mask(tok, sp)
    for piece in ("<pad>", "</s>", "<unk>", "\u2581", *T5_SENTINELS):
        assert not content[T5_ID[piece]], piece
    for piece in ("\u2581Paris", "\u2581the", "s", "a"):
        assert content[T5_ID[piece]], piece
    texts = data.token_texts(tok)
    assert len(texts) == 40
    assert texts[T5_ID["\u2581Paris"]] == " Paris" and texts[T5_ID["\u2581where"]] == " where"
    assert texts[T5_ID["s"]] == "s" and texts[T5_ID["P"]] == "P"


def test_collate_with_t5_specials_starts_the_decoder_from_pad(t5_dir):
    sp = data.specials(data.snapshot_tokenizer(t5_dir))
    b = data.collate([([5, 6, 1], [7, 8, 1]), ([9, 1], [1])], sp)
    assert b["src"].tolist() == [[5, 6, 1], [9, 1, 0]]
    assert b["tgt_in"].tolist() == [[0, 7, 8], [0, 0, 0]]  # start id 0, then pad 0
    assert b["tgt_out"].tolist() == [[7, 8, 1], [1, 0, 0]]
    assert b["tgt_mask"].tolist() == [[True, True, True], [True, False, False]]
    with pytest.raises(ValueError, match=r"end in EOS \(id 1\)"):
        data.collate([([5, 1], [7, 2])], sp)  # 2 is <unk> here, not EOS
    src, mask = data.collate_prompts([[5, 6, 1], [9, 1]], sp)
    assert src.tolist() == [[5, 6, 1], [9, 1, 0]] and mask.tolist() == [
        [True] * 3,
        [True, True, False],
    ]


def test_snapshot_tokenizer_refuses_a_directory_without_tokenizer_json(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"\x00not a real sentencepiece model")
    with pytest.raises(ValueError) as e:
        data.snapshot_tokenizer(tmp_path)
    assert "spiece.model" in str(e.value) and "tokenizer.json" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no tokenizer\.json") as e:
        data.snapshot_tokenizer(empty)
    assert "spiece.model" not in str(e.value)


def test_salient_ner_on_sentencepiece_pieces(t5_dir):
    """The NER rule reads word starts from "▁": a capitalised word after the start is salient, the
    sentence's first word and lower-case words are not."""
    tok = data.snapshot_tokenizer(t5_dir)
    sp = data.specials(tok)
    prompts = [data.encode(tok, t, sp) for t in ("where is Paris", "Paris is in France")]
    assert prompts == [[9, 6, 5, 1], [5, 6, 7, 8, 1]]
    src, mask = data.collate_prompts(prompts, sp)
    salient = reward.SalientTokens.from_idf(tok, torch.ones(tok.get_vocab_size()))
    got = salient(src, mask, reward.RewardConfig(salient_method="ner"))
    assert got.tolist() == [
        [False, False, True, False, False],  # "▁Paris"; not "▁where", "▁is", EOS, pad
        [False, False, False, True, False],
    ]  # "▁France"; "▁Paris" starts the sentence
    texts = data.token_texts(tok)
    assert torch.equal(
        got, reward.salient_ner(src, mask, texts, data.content_token_mask(tok, sp, texts))
    )


# ---- --sft-noise: SFT data with known mistakes ------------------------------------------------


@pytest.mark.parametrize("share, n", [(0.3, 40), (0.25, 10), (0.0, 7), (0.5, 3)])
def test_sft_noise_replaces_exactly_round_p_n_seeded_responses_with_the_wrong_ones(share, n):
    records = [dict(prompt=f"q{i}", response=f"right {i}", wrong=f"wrong {i}") for i in range(n)]
    before = [dict(r) for r in records]
    noisy, corrupted = data.sft_noise(records, share, seed=5)
    assert (
        len(corrupted) == round(share * n) == sum(r["response"].startswith("wrong") for r in noisy)
    )
    assert all(noisy[i]["response"] == f"wrong {i}" for i in corrupted)
    assert all(noisy[i] is records[i] for i in range(n) if i not in corrupted)
    assert records == before  # the clean references are kept
    assert data.sft_noise(records, share, seed=5)[1] == corrupted  # seeded
    if 0 < len(corrupted) < n - 1:
        assert any(data.sft_noise(records, share, seed=s)[1] != corrupted for s in range(6, 12))


def test_sft_noise_off_topic_takes_another_instructions_response_and_a_jsonl_needs_wrong(tmp_path):
    records = [dict(prompt=f"q{i}", response=f"answer {i % 5}") for i in range(20)]
    noisy, corrupted = data.sft_noise(records, 0.5, seed=0, off_topic=True)
    responses = {r["response"] for r in records}
    for i in corrupted:
        assert noisy[i]["response"] in responses and noisy[i]["response"] != records[i]["response"]
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"prompt": "a?", "response": "b.", "wrong": "c."}\n{"prompt": "d?", "response": "e."}\n'
    )
    with pytest.raises(data.DataError, match="line 2: no 'wrong' field"):
        data.sft_noise(data.load_jsonl(str(path)), 0.5, seed=0)


def test_qa_grounded_wrong_answers_say_the_distractors_predicate_of_the_asked_entity():
    records = synthetic.make_qa_grounded(200, seed=0)
    for r in records:
        assert r["wrong"].split()[0] == r["response"].split()[0]  # the asked entity ...
        assert set(re.findall(r"\w+", r["wrong"])) <= set(
            re.findall(r"\w+", r["prompt"])
        )  # ... the prompt's words
    same = [
        r for r in records if r["wrong"] == r["response"]
    ]  # another entity that happens to share the value
    assert len(same) < 0.05 * len(records)
    _, corrupted = data.sft_noise(records, 0.3, seed=0)
    assert all(records[i]["wrong"] != records[i]["response"] for i in corrupted)  # never drawn
