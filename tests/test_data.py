"""Tests for jaxrlhf.data with a word-level tokenizer built here (no network)."""

from __future__ import annotations

import json
import math

import datasets
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from jaxrlhf import data as D

WORDS = (
    "hello world how are you fine thanks bad good the a cat dog sat on mat what is "
    "one two three four five six seven eight nine ten"
).split()
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
PAD, BOS, EOS = 0, 1, 2
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# A template whose assistant turns end in EOS itself: add_eos must not add a second one.
EOS_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}<|end|>{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer(*, bos: bool = True, template: str = TEMPLATE) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", BOS)]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"],
    )
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


PLAIN = [
    {"prompt": "hello how are you", "chosen": "fine thanks", "rejected": "bad"},
    {"prompt": "what is two", "chosen": "two", "rejected": "three four"},
]


# ----------------------------------------------------------------------------- forms


def test_plain_pairs(tok):
    data, report = D.tokenize_preferences(PLAIN, tok, max_length=32)
    assert len(data) == 2 and data.margin is None
    assert data.prompt_ids[0].tolist() == [BOS, *ids(tok, "hello how are you")]
    assert data.chosen_ids[0].tolist() == [*ids(tok, "fine thanks"), EOS]
    assert data.rejected_ids[1].tolist() == [*ids(tok, "three four"), EOS]
    assert data.prompt_ids[0].dtype == np.int32
    assert data.row_index.tolist() == [0, 1]
    assert data.lengths.tolist() == [5 + 3, 4 + 3]
    assert data.packed_lengths.tolist() == [5 + 3 + 2, 4 + 2 + 3]
    assert data.batching_lengths(True).tolist() == data.packed_lengths.tolist()
    assert data.batching_lengths(False).tolist() == data.lengths.tolist()
    assert report == D.TokenizeReport(n_rows=2, n_kept=2, n_skipped=0, skipped=(), n_truncated=0)


def test_plain_without_prompt_column_is_bos_only(tok):
    rows = [{"chosen": "the cat sat", "rejected": "the dog sat"}]
    data, _ = D.tokenize_preferences(rows, tok, max_length=32)
    assert data.prompt_ids[0].tolist() == [BOS]
    assert data.chosen_ids[0].tolist() == [*ids(tok, "the cat sat"), EOS]


def test_no_eos_and_no_bos(tok):
    data, _ = D.tokenize_preferences(PLAIN, make_tokenizer(bos=False), max_length=32, add_eos=False)
    assert data.prompt_ids[0].tolist() == ids(tok, "hello how are you")
    assert data.chosen_ids[0].tolist() == ids(tok, "fine thanks")


def test_conversational_explicit_prompt(tok):
    prompt = [user("hello how are you")]
    rows = [{"prompt": prompt, "chosen": [bot("fine thanks")], "rejected": [bot("bad")]}]
    data, _ = D.tokenize_preferences(rows, tok, max_length=32)
    rendered = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert data.prompt_ids[0].tolist() == [BOS, *ids(tok, rendered)]
    # The response is what the template adds after the prompt: content, end-of-turn, EOS.
    assert data.chosen_ids[0].tolist() == [*ids(tok, "fine thanks <|end|>"), EOS]
    assert data.rejected_ids[0].tolist() == [*ids(tok, "bad <|end|>"), EOS]


def test_conversational_forms_agree(tok):
    p = [user("hello"), bot("hello world"), user("how are you")]
    explicit = {"prompt": p, "chosen": [bot("fine")], "rejected": [bot("bad")]}
    implicit = {"chosen": [*p, bot("fine")], "rejected": [*p, bot("bad")]}
    full_with_prompt = {"prompt": p, "chosen": [*p, bot("fine")], "rejected": [*p, bot("bad")]}
    a, _ = D.tokenize_preferences([explicit], tok, max_length=64)
    b, _ = D.tokenize_preferences([implicit], tok, max_length=64)
    c, _ = D.tokenize_preferences([full_with_prompt], tok, max_length=64)
    for other in (b, c):
        for field in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert getattr(a, field)[0].tolist() == getattr(other, field)[0].tolist()
    # The implicit prompt is all three shared messages, not just the first.
    assert a.prompt_ids[0].tolist().count(tok.convert_tokens_to_ids("<|user|>")) == 2


def test_template_eos_not_doubled():
    tok = make_tokenizer(template=EOS_TEMPLATE)
    rows = [{"prompt": [user("hello")], "chosen": [bot("fine")], "rejected": [bot("bad")]}]
    data, _ = D.tokenize_preferences(rows, tok, max_length=32)
    assert data.chosen_ids[0].tolist() == [*ids(tok, "fine"), EOS]


def test_margin_column(tok):
    rows = [dict(PLAIN[0], margin=1.5), dict(PLAIN[1], margin=-2)]
    data, _ = D.tokenize_preferences(rows, tok, max_length=32)
    assert data.margin.dtype == np.float32 and data.margin.tolist() == [1.5, -2.0]


# ----------------------------------------------------------------------------- truncation


def test_truncation_keeps_prompt_end_and_response_start(tok):
    prompt = "one two three four five six seven eight"
    rows = [{"prompt": prompt, "chosen": "nine ten one two three four five", "rejected": "ten"}]
    data, report = D.tokenize_preferences(rows, tok, max_length=8, max_prompt_length=4)
    # BOS stays at the front; the prompt's last words are kept.
    assert data.prompt_ids[0].tolist() == [BOS, *ids(tok, "six seven eight")]
    # 4 tokens left: the response's first four, and so no EOS.
    assert data.chosen_ids[0].tolist() == ids(tok, "nine ten one two")
    assert data.rejected_ids[0].tolist() == [*ids(tok, "ten"), EOS]
    assert report.n_truncated == 1


def test_truncation_without_bos_and_default_prompt_budget():
    tok = make_tokenizer(bos=False)
    rows = [
        {"prompt": "one two three four five six", "chosen": "seven", "rejected": "eight"},
        {"prompt": "one", "chosen": "two", "rejected": "three"},
    ]
    data, report = D.tokenize_preferences(rows, tok, max_length=8)  # max_prompt_length = 4
    assert data.prompt_ids[0].tolist() == ids(tok, "three four five six")
    assert report.n_truncated == 1


# ----------------------------------------------------------------------------- bad rows

GOOD = PLAIN[0]
BAD_ROWS = [
    ({"prompt": "hello", "rejected": "bad"}, "field 'chosen' is missing"),
    ({"prompt": "hello", "chosen": None, "rejected": "bad"}, "field 'chosen' is missing"),
    ({"prompt": "hello", "chosen": "", "rejected": "bad"}, "field 'chosen' is empty"),
    ({"prompt": "hello", "chosen": "fine", "rejected": "   "}, "field 'rejected' is empty"),
    (
        {"prompt": "hello", "chosen": 5, "rejected": "bad"},
        "field 'chosen' must be a string or a list of messages, got int",
    ),
    ({"prompt": "", "chosen": "fine", "rejected": "bad"}, "field 'prompt' is empty"),
    ({"prompt": None, "chosen": "fine", "rejected": "bad"}, "field 'prompt' is missing"),
    (
        {"prompt": {"x": 1}, "chosen": "fine", "rejected": "bad"},
        "field 'prompt' must be a string or a list of messages, got dict",
    ),
    (
        {"prompt": [user("hello")], "chosen": [], "rejected": [bot("bad")]},
        "field 'chosen' is empty",
    ),
    (
        {"prompt": [user("hello")], "chosen": [{"role": "assistant"}], "rejected": [bot("bad")]},
        "field 'chosen' message 1 has no string 'content'",  # messages count from 1
    ),
    (
        {"prompt": [user("hello")], "chosen": ["fine"], "rejected": [bot("bad")]},
        "field 'chosen' message 1 is not a dict",
    ),
    (
        {"prompt": [user("hello")], "chosen": [{"role": "robot", "content": "x"}], "rejected": []},
        "field 'chosen' message 1 has the unknown role 'robot'; use one of system, developer, "
        "user, assistant, tool, function, ipython",
    ),
    (
        {"prompt": "hello", "chosen": "fine", "rejected": [bot("bad")]},
        "fields 'chosen' and 'rejected' mix a string and a list of messages",
    ),
    (
        {"prompt": [user("hello")], "chosen": "fine", "rejected": "bad"},
        "field 'prompt' is a list of messages but 'chosen' is a string",
    ),
    (
        {"prompt": "hello", "chosen": [bot("fine")], "rejected": [bot("bad")]},
        "field 'prompt' is a string but 'chosen' is a list of messages",
    ),
    (
        {"prompt": "hello", "chosen": "fine", "rejected": "bad", "margin": "big"},
        "field 'margin' must be a number",
    ),
    (
        {"prompt": "hello", "chosen": "fine", "rejected": "bad", "margin": math.nan},
        "field 'margin' must be finite",
    ),
    (
        {"prompt": "hello", "chosen": "fine", "rejected": "bad", "margin": None},
        "field 'margin' is missing",
    ),
]
IMPLICIT_BAD = [
    (
        {"chosen": [user("hello"), bot("fine")], "rejected": [user("how"), bot("bad")]},
        "fields 'chosen' and 'rejected' share no leading messages",
    ),
    (
        {"chosen": [user("hello")], "rejected": [user("hello"), bot("bad")]},
        "field 'chosen' has no messages after the shared prompt",
    ),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS + IMPLICIT_BAD)
def test_bad_row_errors_name_row_and_field(tok, row, message):
    good = (
        {
            "prompt": [user("hello")],
            "chosen": [user("hello"), bot("fine")],
            "rejected": [user("hello"), bot("bad")],
        }
        if "prompt" not in row
        else dict(GOOD)
    )
    if "margin" in row:
        good["margin"] = 1.0
    if "prompt" not in row:
        good.pop("prompt")
    with pytest.raises(ValueError, match="^row 2: " + message.replace("(", r"\(")):
        D.tokenize_preferences([good, row], tok, max_length=32)


def test_prompt_without_room_is_an_error(tok):
    rows = [{"prompt": "one two three four five", "chosen": "six", "rejected": "seven"}]
    with pytest.raises(ValueError, match="^row 1: field 'prompt' leaves no room for a response"):
        D.tokenize_preferences(rows, tok, max_length=4, max_prompt_length=4)


def test_non_prefix_stable_template_is_an_error():
    tok = make_tokenizer(
        template="{% for m in messages %}{{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    rows = [{"prompt": [user("hello")], "chosen": [bot("fine")], "rejected": [bot("bad")]}]
    with pytest.raises(ValueError, match="^row 1: field 'chosen': the chat template"):
        D.tokenize_preferences(rows, tok, max_length=32)


def test_chat_template_problems():
    strict = make_tokenizer(
        template=(
            "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }} {% endfor %}"
        )
    )
    rows = [
        {"prompt": [user("hello"), user("hello")], "chosen": [bot("a")], "rejected": [bot("b")]}
    ]
    with pytest.raises(
        ValueError, match="^row 1: field 'prompt': the chat template failed: roles must alternate"
    ):
        D.tokenize_preferences(rows, strict, max_length=32)
    no_template = make_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="the tokenizer has no chat_template"):
        D.tokenize_preferences(rows, no_template, max_length=32, skip_bad_rows=True)


def test_skip_bad_rows_counts(tok):
    rows = [
        GOOD,
        {"prompt": "hello", "chosen": "", "rejected": "bad"},
        GOOD,
        {"prompt": "hello", "chosen": 3, "rejected": "bad"},
        PLAIN[1],
    ]
    data, report = D.tokenize_preferences(rows, tok, max_length=32, skip_bad_rows=True)
    assert (report.n_rows, report.n_kept, report.n_skipped) == (5, 3, 2)
    # Row numbers count from 1 (row 2 is line 2 of a .jsonl); row_index stays 0-based.
    assert report.skipped == (
        (2, "field 'chosen' is empty"),
        (4, "field 'chosen' must be a string or a list of messages, got int"),
    )
    assert data.row_index.tolist() == [0, 2, 4]
    assert data.chosen_ids[2].tolist() == [*ids(tok, "two"), EOS]
    # Late (post-tokenization) failures are skipped and reported too.
    long = {"prompt": "one two three four five", "chosen": "six", "rejected": "seven"}
    data, report = D.tokenize_preferences(
        [long, {"prompt": "one", "chosen": "two", "rejected": "three"}],
        tok,
        max_length=4,
        max_prompt_length=4,
        skip_bad_rows=True,
    )
    assert report.skipped[0][0] == 1 and "leaves no room" in report.skipped[0][1]
    assert data.row_index.tolist() == [1]


def test_all_skipped_and_missing_column_are_errors(tok):
    with pytest.raises(ValueError, match="all 1 rows were skipped"):
        D.tokenize_preferences(
            [{"prompt": "a", "chosen": "", "rejected": "b"}], tok, max_length=8, skip_bad_rows=True
        )
    with pytest.raises(ValueError, match="rows have no 'rejected' column"):
        D.tokenize_preferences([{"prompt": "a", "chosen": "b"}], tok, max_length=8)
    with pytest.raises(ValueError, match="rows is empty"):
        D.tokenize_preferences([], tok, max_length=8)
    with pytest.raises(ValueError, match="max_prompt_length must be in"):
        D.tokenize_preferences(PLAIN, tok, max_length=8, max_prompt_length=9)


# ----------------------------------------------------------------------------- prompts


def test_tokenize_prompts(tok):
    rows = [
        {"prompt": "what is one", "answer": "one"},
        {"prompt": [user("what is two")], "answer": "two"},
        {"prompt": "", "answer": "none"},
        {"prompt": "one two three four five six seven", "answer": "seven"},
    ]
    data, report = D.tokenize_prompts(rows, tok, max_prompt_length=4, skip_bad_rows=True)
    assert report.skipped == ((3, "field 'prompt' is empty"),)
    assert report.n_truncated == 2  # the rendered chat prompt is 7 tokens, too
    assert data.row_index.tolist() == [0, 1, 3]
    assert data.prompt_ids[0].tolist() == [BOS, *ids(tok, "what is one")]
    assert data.prompt_ids[2].tolist() == [BOS, *ids(tok, "five six seven")]
    rendered = tok.apply_chat_template(
        rows[1]["prompt"], add_generation_prompt=True, tokenize=False
    )
    assert data.prompt_text[1] == rendered and data.prompts[1] == rows[1]["prompt"]
    assert data.prompt_ids[1].tolist() == [BOS, *ids(tok, rendered)[-3:]]
    assert data.extras == {"answer": ("one", "two", "seven")}
    picked = data.select([2, 0])
    assert picked.extras == {"answer": ("seven", "one")} and picked.row_index.tolist() == [3, 0]
    assert picked.prompt_text[1] == "what is one"
    with pytest.raises(ValueError, match="^row 3: field 'prompt' is empty"):
        D.tokenize_prompts(rows, tok, max_prompt_length=4)
    with pytest.raises(ValueError, match="rows have no 'question' column"):
        D.tokenize_prompts(rows, tok, max_prompt_length=4, field="question")


def test_tokenize_prompts_from_dataset_with_other_field(tok):
    ds = datasets.Dataset.from_list(
        [
            {"question": "what is one", "answer": "one"},
            {"question": "", "answer": "x"},
            {"question": "what is two", "answer": "two"},
        ]
    )
    data, _ = D.tokenize_prompts(ds, tok, max_prompt_length=8, field="question", skip_bad_rows=True)
    assert data.extras == {"answer": ("one", "two")} and data.prompts == (
        "what is one",
        "what is two",
    )


# ----------------------------------------------------------------------------- loading


def _write(path, rows):
    suffix = path.suffix
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet", ".csv"])
def test_load_rows_from_files(tmp_path, tok, suffix):
    rows = [dict(r, margin=float(i)) for i, r in enumerate(PLAIN)]
    path = tmp_path / f"pairs{suffix}"
    _write(path, rows)
    ds = D.load_rows(path)
    assert isinstance(ds, datasets.Dataset) and len(ds) == 2
    assert ds[0]["chosen"] == "fine thanks"
    data, _ = D.tokenize_preferences(ds, tok, max_length=32)
    assert data.margin.tolist() == [0.0, 1.0]
    assert data.chosen_ids[0].tolist() == [*ids(tok, "fine thanks"), EOS]


def test_load_conversational_jsonl(tmp_path, tok):
    rows = [{"chosen": [user("hello"), bot("fine")], "rejected": [user("hello"), bot("bad")]}]
    path = tmp_path / "chat.jsonl"
    _write(path, rows)
    data, _ = D.tokenize_preferences(D.load_rows(str(path)), tok, max_length=32)
    assert data.chosen_ids[0].tolist() == [*ids(tok, "fine <|end|>"), EOS]


def test_load_rows_other_sources_and_errors(tmp_path):
    ds = datasets.Dataset.from_list(PLAIN)
    assert D.load_rows(ds) is ds
    assert D.load_rows(PLAIN)[1]["prompt"] == "what is two"
    assert len(D.load_rows(datasets.DatasetDict({"train": ds}), split="train")) == 2
    with pytest.raises(FileNotFoundError, match="data file not found"):
        D.load_rows(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r"unknown data file extension '\.txt'"):
        D.load_rows(tmp_path / "pairs.txt")
    assert len(D.load_rows(datasets.DatasetDict({"train": ds}))) == 2  # split: "train"
    with pytest.raises(ValueError, match=r"has no split 'train'; its splits are \['test'\]"):
        D.load_rows(datasets.DatasetDict({"test": ds}))
    with pytest.raises(TypeError, match="source must be"):
        D.load_rows(42)


# ----------------------------------------------------------------------------- batching


def test_buckets():
    assert D.default_buckets(100) == (16, 24, 32, 48, 64, 96, 100)
    assert D.default_buckets(64) == (16, 24, 32, 48, 64)
    assert D.default_buckets(8) == (8,)
    assert D.default_buckets(2, min_length=1) == (1, 2)
    assert D.default_buckets(100, midpoints=False) == (16, 32, 64, 100)
    b = D.default_buckets(100)
    assert [D.bucket_length(n, b) for n in (0, 1, 16, 17, 64, 65, 100)] == [
        16,
        16,
        16,
        24,
        64,
        96,
        100,
    ]
    with pytest.raises(ValueError, match="sequence length 101 exceeds the largest bucket 100"):
        D.bucket_length(101, b)
    with pytest.raises(ValueError, match="strictly increasing"):
        D.bucket_length(3, (32, 16))


@pytest.fixture(scope="module")
def pairs(tok):
    rows = [
        {"prompt": "hello how are you", "chosen": "fine thanks", "rejected": "bad", "margin": 0.5},
        {
            "prompt": "what is two",
            "chosen": "two",
            "rejected": "three four five six",
            "margin": 1.0,
        },
        {
            "prompt": "one",
            "chosen": "one two three four five six seven eight nine ten one two "
            "three four five six",
            "rejected": "ten",
            "margin": 2.0,
        },
    ]
    return D.tokenize_preferences(rows, tok, max_length=64)[0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_preference_batch(pairs, side):
    batch = D.pad_preference_batch(
        pairs, [1, 0], pad_id=PAD, buckets=(8, 16, 32), padding_side=side, batch_size=4
    )
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape == (4, 16)
    assert batch["pair_mask"].tolist() == [1, 1, 0, 0]
    assert batch["margin"].tolist() == [1.0, 0.5, 0.0, 0.0]
    assert batch["row_index"].tolist() == [1, 0, -1, -1]
    assert batch["prompt_lengths"].tolist() == [4, 5, 4, 4]
    for b, i in enumerate([1, 0]):
        for name in ("chosen", "rejected"):
            seq = np.concatenate([pairs.prompt_ids[i], getattr(pairs, f"{name}_ids")[i]])
            ids, mask = batch[f"{name}_input_ids"][b], batch[f"{name}_attention_mask"][b]
            real = np.flatnonzero(mask)
            assert ids[real].tolist() == seq.tolist() and (ids[mask == 0] == PAD).all()
            assert real[0] == (0 if side == "right" else 16 - len(seq))
            # The response mask covers exactly the response tokens.
            resp = batch[f"{name}_response_mask"][b]
            assert ids[resp == 1].tolist() == getattr(pairs, f"{name}_ids")[i].tolist()
            assert np.flatnonzero(resp).tolist() == real[len(pairs.prompt_ids[i]) :].tolist()
    # Dummy rows: real tokens (no fully masked row) but no response, margin or pair weight.
    for name in ("chosen", "rejected"):
        assert batch[f"{name}_attention_mask"][2:].sum() > 0
        assert batch[f"{name}_response_mask"][2:].sum() == 0
        assert (batch[f"{name}_input_ids"][2] == batch[f"{name}_input_ids"][0]).all()
    for v in batch.values():
        assert v.shape[0] == 4


def test_pad_preference_batch_buckets_and_errors(pairs):
    batch = D.pad_preference_batch(pairs, [2], pad_id=PAD, buckets=(8, 16, 32))
    assert batch["chosen_input_ids"].shape == (1, 32)  # 2 prompt + 17 response tokens
    with pytest.raises(ValueError, match="exceeds the largest bucket 16"):
        D.pad_preference_batch(pairs, [2], pad_id=PAD, buckets=(8, 16))
    with pytest.raises(ValueError, match="do not fit in batch_size 1"):
        D.pad_preference_batch(pairs, [0, 1], pad_id=PAD, buckets=(32,), batch_size=1)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 3\)"):
        D.pad_preference_batch(pairs, [3], pad_id=PAD, buckets=(32,))
    with pytest.raises(ValueError, match="padding_side"):
        D.pad_preference_batch(pairs, [0], pad_id=PAD, buckets=(32,), padding_side="middle")


def test_pad_prompt_batch(tok):
    data, _ = D.tokenize_prompts(
        [{"prompt": "what is one"}, {"prompt": "hello"}], tok, max_prompt_length=16
    )
    batch = D.pad_prompt_batch(data, [0, 1], pad_id=PAD, buckets=(4, 8), batch_size=3)
    assert batch["input_ids"].tolist() == [
        [BOS, *ids(tok, "what is one")],
        [PAD, PAD, BOS, *ids(tok, "hello")],
        [BOS, *ids(tok, "what is one")],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch["row_mask"].tolist() == [1, 1, 0]
    assert batch["row_index"].tolist() == [0, 1, -1]
    assert batch["prompt_lengths"].tolist() == [4, 2, 4]


def test_padding_fraction():
    batch = {"attention_mask": np.array([[1, 1, 0, 0], [1, 1, 1, 1]]), "row_mask": np.array([1, 0])}
    assert D.padding_fraction(batch) == pytest.approx(6 / 8)
    pair = {
        "chosen_attention_mask": np.array([[1, 1, 1, 0]]),
        "rejected_attention_mask": np.array([[1, 0, 0, 0]]),
        "pair_mask": np.array([1]),
    }
    assert D.padding_fraction(pair) == pytest.approx(4 / 8)


# ----------------------------------------------------------------------------- order


def test_epoch_order_is_deterministic():
    a = D.epoch_order(50, seed=3, epoch=1)
    assert a.tolist() == D.epoch_order(50, seed=3, epoch=1).tolist()
    assert a.tolist() == np.random.default_rng((3, 1)).permutation(50).tolist()
    assert sorted(a.tolist()) == list(range(50))
    assert a.tolist() != D.epoch_order(50, seed=3, epoch=2).tolist()
    assert a.tolist() != D.epoch_order(50, seed=4, epoch=1).tolist()


def _run(n, steps, position=0, **kw):
    out = []
    for _ in range(steps):
        idx, position = D.batch_indices(n, position=position, **kw)
        out.append(idx.tolist())
    return out, position


@pytest.mark.parametrize("grouped", [False, True])
def test_batch_indices_resume_and_epochs(grouped):
    n, bs = 23, 4  # 5 batches per epoch, 3 rows dropped each epoch
    lengths = np.random.default_rng(0).integers(1, 100, n)
    kw = dict(batch_size=bs, seed=7) | (dict(lengths=lengths, group_factor=2) if grouped else {})
    full, end = _run(n, 15, **kw)
    assert end == 15 * bs
    for p in range(0, 15 * bs, bs):  # resume from every checkpointable position
        assert _run(n, 15 - p // bs, position=p, **kw)[0] == full[p // bs :]
    for e in range(3):  # each epoch: 20 distinct rows, the first 20 of that epoch's order
        epoch = [i for b in full[5 * e : 5 * e + 5] for i in b]
        assert sorted(epoch) == sorted(D.epoch_order(n, seed=7, epoch=e)[:20].tolist())
    assert full[:5] != full[5:10]
    if not grouped:
        assert full[0] == D.epoch_order(n, seed=7, epoch=0)[:4].tolist()


def test_block_batch_indices_visit_whole_blocks_each_epoch():
    n, bs = 23, 4  # blocks [0-3] … [16-19]; rows 20-22 (the incomplete block) never train
    kw = dict(batch_size=bs, seed=7)
    batches, position = [], 0
    for _ in range(15):
        idx, position = D.block_batch_indices(n, position=position, **kw)
        batches.append(idx.tolist())
    assert position == 15 * bs
    blocks = [list(range(4 * b, 4 * b + 4)) for b in range(5)]
    for e in range(3):  # each epoch: every block once, in that epoch's own order
        assert sorted(batches[5 * e : 5 * e + 5]) == blocks
    assert batches[:5] != batches[5:10]
    for p in range(0, 15 * bs, bs):  # a pure function of the position: resume is exact
        assert D.block_batch_indices(n, position=p, **kw)[0].tolist() == batches[p // bs]
    with pytest.raises(ValueError, match="multiple of batch_size"):
        D.block_batch_indices(n, position=3, **kw)


def test_length_grouping_reduces_padding():
    n, bs = 256, 8
    lengths = np.random.default_rng(1).integers(1, 512, n)

    def waste(**kw):
        batches, _ = _run(n, n // bs, batch_size=bs, seed=0, **kw)
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches)

    assert waste(lengths=lengths, group_factor=8) < 0.5 * waste()


def test_batch_indices_errors():
    with pytest.raises(ValueError, match="multiple of batch_size 4"):
        D.batch_indices(20, batch_size=4, seed=0, position=6)
    with pytest.raises(ValueError, match="fewer than one batch"):
        D.batch_indices(3, batch_size=4, seed=0, position=0)
    with pytest.raises(ValueError, match=r"lengths must have shape \(20,\)"):
        D.batch_indices(20, batch_size=4, seed=0, position=0, lengths=[1, 2])


def test_train_eval_split():
    tr, ev = D.train_eval_split(100, eval_fraction=0.1, seed=0)
    assert len(ev) == 10 and len(tr) == 90
    assert sorted(np.concatenate([tr, ev]).tolist()) == list(range(100))
    assert (np.diff(tr) > 0).all() and (np.diff(ev) > 0).all()
    tr2, ev2 = D.train_eval_split(100, eval_size=10, seed=0)
    assert tr2.tolist() == tr.tolist() and ev2.tolist() == ev.tolist()
    assert D.train_eval_split(100, eval_size=10, seed=1)[1].tolist() != ev.tolist()
    sub = D.PreferenceData(
        prompt_ids=tuple(np.array([i], np.int32) for i in range(100)),
        chosen_ids=tuple(np.array([i, i], np.int32) for i in range(100)),
        rejected_ids=tuple(np.array([i], np.int32) for i in range(100)),
        margin=np.arange(100, dtype=np.float32),
        row_index=np.arange(100) + 1000,
    ).select(ev)
    assert sub.row_index.tolist() == (ev + 1000).tolist() and sub.margin.tolist() == ev.tolist()
    assert [c.tolist() for c in sub.chosen_ids] == [[i, i] for i in ev]
    with pytest.raises(ValueError, match="exactly one of"):
        D.train_eval_split(100, eval_fraction=0.1, eval_size=5, seed=0)
    with pytest.raises(ValueError, match="eval set of 0 rows"):
        D.train_eval_split(4, eval_fraction=0.1, seed=0)


def test_process_slice():
    batch = np.arange(8) * 10
    slices = [D.process_slice(batch, process_index=i, process_count=4) for i in range(4)]
    assert [s.tolist() for s in slices] == [[0, 10], [20, 30], [40, 50], [60, 70]]
    with pytest.raises(ValueError, match="global batch of 8 does not divide over 3 processes"):
        D.process_slice(batch, process_index=0, process_count=3)
    with pytest.raises(ValueError, match=r"process_index must be in \[0, 2\)"):
        D.process_slice(batch, process_index=2, process_count=2)
