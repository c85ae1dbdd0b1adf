"""Where rows come from (`load_rows` and the data section): a file, a `save_to_disk` folder
(Dataset or DatasetDict), a folder of data files, a dataset id; and one clear ValueError,
naming the file and the 1-based line, for each way a data file can be wrong."""

from __future__ import annotations

import json

import datasets
import pytest

from jaxrlhf import config as C
from jaxrlhf import data as D
from jaxrlhf.models.byte_tokenizer import byte_tokenizer

PAIRS = [
    {"prompt": f"say {w}", "chosen": f" {w.upper()}", "rejected": f" {w}"}
    for w in ("ab", "cd", "ef", "gh", "ij", "kl")
]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def data_cfg(**kw) -> C.PreferenceDataConfig:
    return C.PreferenceDataConfig(max_length=32, eval_fraction=0.0, **kw)


def load(cfg):
    return D.load_preferences(cfg, byte_tokenizer(), seed=0, log=lambda _: None)


# ----------------------------------------------------------------------------- sources


def test_save_to_disk_dataset_folder(tmp_path):
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "saved"))
    splits = load(data_cfg(train=str(tmp_path / "saved")))
    assert len(splits.train) == len(PAIRS) and splits.eval is None


def test_save_to_disk_dataset_dict_uses_the_splits(tmp_path):
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(PAIRS[:4]),
            "test": datasets.Dataset.from_list(PAIRS[4:]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    splits = load(data_cfg(train=str(tmp_path / "dd"), eval_split="test"))
    assert len(splits.train) == 4 and len(splits.eval) == 2
    # The eval rows are the test split's, in order: row_index counts within that split.
    assert splits.eval.row_index.tolist() == [0, 1]
    splits = load(data_cfg(train=str(tmp_path / "dd"), split="test"))
    assert len(splits.train) == 2
    with pytest.raises(ValueError, match=r"has no split 'dev'; its splits are \['test', 'train'\]"):
        load(data_cfg(train=str(tmp_path / "dd"), split="dev"))


def test_folder_of_jsonl_files_with_split_names(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", PAIRS[:5])
    write_jsonl(folder / "test.jsonl", PAIRS[5:])
    splits = load(data_cfg(train=str(folder), eval_split="test"))
    assert len(splits.train) == 5 and len(splits.eval) == 1
    # A folder whose files datasets cannot split by name is one "train" split.
    other = tmp_path / "other"
    other.mkdir()
    write_jsonl(other / "a.jsonl", PAIRS[:3])
    write_jsonl(other / "b.jsonl", PAIRS[3:])
    assert len(load(data_cfg(train=str(other))).train) == 6


def test_file_split_slices(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert len(D.load_rows(tmp_path / "pairs.jsonl", split="train[:2]")) == 2


def test_unknown_dataset_id_is_one_clear_line():
    # The tests run with HF_HUB_OFFLINE=1 (conftest): datasets answers from its cache only.
    with pytest.raises(ValueError) as err:
        D.load_rows("nosuch-org/nosuch-dataset", name="data.train")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(
        "data.train='nosuch-org/nosuch-dataset' is not a local file or folder, and datasets "
        "could not load it as a dataset id"
    )


def test_empty_data_train_says_what_to_give():
    with pytest.raises(
        ValueError, match="^data.train is not set: give a file, a folder or a dataset id$"
    ):
        load(data_cfg())


# ----------------------------------------------------------------------------- file errors


def test_invalid_json_line_is_named_with_its_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps(r) for r in PAIRS[:3]]
    lines[2] = lines[2][:-5]  # truncated third line
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        load(data_cfg(train=str(path)))
    assert str(err.value).startswith(f"data.train: {path}: line 3: invalid JSON (")


def test_invalid_json_document_names_its_line(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text('[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": }\n]\n')
    with pytest.raises(ValueError, match=r"pairs\.json: line 3: invalid JSON \(Expecting value"):
        D.load_rows(path, name="data.train")


def test_a_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"line 2: expected a JSON object \{\.\.\.\}, got a list"):
        D.load_rows(path)


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"pairs\.jsonl: the file is empty \(no rows\)$"):
        D.load_rows(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_non_utf8_bytes_name_the_line(tmp_path, suffix):
    path = tmp_path / f"pairs{suffix}"
    first = json.dumps(PAIRS[0]) if suffix == ".jsonl" else "prompt,chosen,rejected"
    path.write_bytes(first.encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"line 2: not UTF-8 text \(byte \d+ is b'\\xe9'\)"):
        D.load_rows(path)


def test_csv_with_missing_columns_names_the_file(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen\nsay ab, AB\n")
    with pytest.raises(
        ValueError, match=rf"^data.train {path}: rows have no 'rejected' column \(columns: "
    ):
        load(data_cfg(train=str(path)))


def test_bad_row_names_the_file_and_the_1_based_row(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [dict(r) for r in PAIRS]
    rows[2]["chosen"] = ""
    write_jsonl(path, rows)
    with pytest.raises(ValueError, match=rf"^data.train {path}: row 3: field 'chosen' is empty"):
        load(data_cfg(train=str(path)))


def test_wrong_extension_says_what_is_accepted(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("hello\n")
    with pytest.raises(ValueError) as err:
        D.load_rows(path, name="data.train")
    assert str(err.value) == (
        f"data.train: unknown data file extension '.txt' for '{path}'; data.train takes "
        f"{D.rows.ACCEPTED_SOURCES}"
    )


def test_folder_without_data_files(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no .json/.jsonl/.parquet/.csv files"):
        D.load_rows(tmp_path)


def test_bad_line_in_a_folder_names_the_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", PAIRS)
    (tmp_path / "train.jsonl").write_text((tmp_path / "train.jsonl").read_text() + "{oops\n")
    with pytest.raises(ValueError, match=r"train\.jsonl: line 7: invalid JSON"):
        D.load_rows(tmp_path)


def test_split_options_are_checked():
    with pytest.raises(ValueError, match="data.eval_split must be a non-empty string or null"):
        data_cfg(eval_split=" ")
