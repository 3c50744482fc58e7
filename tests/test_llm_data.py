"""LLM data: each format, answer-only labels (checked token by token), every bad row's message, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_studio.data.llm_data import (IGNORE_INDEX, collate, epoch_batches, preflight_llm, prompt_ids, read_rows,
                                       render_prompt)
from lora_studio.errors import DatasetError
from lora_studio.models.tiny_llm import build_tiny_tokenizer


@pytest.fixture(scope="module")
def chat_tok():
    return build_tiny_tokenizer(chat_template=True)


@pytest.fixture(scope="module")
def plain_tok():
    return build_tiny_tokenizer(chat_template=False)


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def trained(tok, example) -> str:
    return tok.decode([x for x in example.labels if x != IGNORE_INDEX])


def assert_answer_only(tok, example, messages):
    """Everything up to the generation prompt is masked, the rest is trained, and the prompt tokens are
    exactly the ones ``prompt_ids`` gives at inference time."""
    prompt = prompt_ids(tok, messages[:-1])
    n = len(prompt)
    assert example.input_ids[:n] == prompt
    assert example.labels[:n] == [IGNORE_INDEX] * n
    return n


def test_alpaca_jsonl_masks_the_prompt_with_chat_template(tmp_path, chat_tok):
    data = jsonl(tmp_path / "d.jsonl", [{"instruction": "Name a fruit.", "input": "It is yellow.", "output": "A banana."}])
    report = preflight_llm(data, chat_tok, 512)
    (ex,) = report.examples
    messages = [{"role": "user", "content": "Name a fruit.\n\nIt is yellow."}, {"role": "assistant", "content": "A banana."}]
    n = assert_answer_only(chat_tok, ex, messages)
    assert ex.labels[n:] == ex.input_ids[n:]  # the answer, its end-of-turn token and the template's newline
    assert trained(chat_tok, ex) == "A banana.</s>\n"
    assert "It is yellow." in chat_tok.decode(ex.input_ids)
    assert report.kinds == {"alpaca": 1} and report.answer_tokens == sum(x != IGNORE_INDEX for x in ex.labels)


def test_plain_template_without_chat_template(tmp_path, plain_tok):
    data = jsonl(tmp_path / "d.jsonl", [{"instruction": "Say hi.", "output": "Hello!", "system": "Be brief."}])
    report = preflight_llm(data, plain_tok, 512)
    (ex,) = report.examples
    text = plain_tok.decode(ex.input_ids)
    assert text == "Be brief.\n\n### Instruction:\nSay hi.\n\n### Response:\nHello!</s>\n\n"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
                {"role": "assistant", "content": "Hello!"}]
    assert_answer_only(plain_tok, ex, messages)
    assert trained(plain_tok, ex) == "Hello!</s>"  # the trailing blank line is not trained
    assert "plain ### Instruction" in report.summary()
    assert render_prompt(plain_tok, messages[:-1]).endswith("### Response:\n")


def test_multi_turn_chat_trains_every_answer_and_no_user_turn(tmp_path, chat_tok):
    messages = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Ahoy!"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Farewell, matey."}]
    data = tmp_path / "chat.json"
    data.write_text(json.dumps([{"messages": messages}]), encoding="utf-8")
    (ex,) = preflight_llm(data, chat_tok, 512).examples
    assert trained(chat_tok, ex) == "Ahoy!</s>\nFarewell, matey.</s>\n"
    assert_answer_only(chat_tok, ex, messages[:3])  # the first answer starts right after its prompt
    # the second user turn sits between the answers and is masked
    second_prompt = prompt_ids(chat_tok, messages[:4])
    assert ex.input_ids[:len(second_prompt)] == second_prompt
    first_end = len(prompt_ids(chat_tok, messages[:2])) + len(chat_tok("Ahoy!</s>\n", add_special_tokens=False)["input_ids"])
    assert ex.labels[first_end:len(second_prompt)] == [IGNORE_INDEX] * (len(second_prompt) - first_end)


def test_sharegpt_and_csv_formats(tmp_path, chat_tok):
    share = jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}])
    assert trained(chat_tok, preflight_llm(share, chat_tok, 512).examples[0]) == "A.</s>\n"
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('instruction,input,output\n"Add, please",1 and 2,3\nHi,,Hello\n', encoding="utf-8")
    report = preflight_llm(csv_file, chat_tok, 512)
    assert report.rows_read == 2 and len(report.examples) == 2
    assert "Add, please\n\n1 and 2" in chat_tok.decode(report.examples[0].input_ids)
    assert trained(chat_tok, report.examples[1]) == "Hello</s>\n"


def test_text_folder_is_chunked_and_fully_trained(tmp_path, chat_tok):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("the quick brown fox jumps over the lazy dog " * 6, encoding="utf-8")
    (folder / "b.txt").write_text("Hello world, this is a tiny model.", encoding="utf-8")
    (folder / "empty.txt").write_text("  \n", encoding="utf-8")
    report = preflight_llm(folder, chat_tok, 16)
    assert report.rows_read == 3 and report.kinds == {"text": 2}
    assert report.skipped == [("empty.txt", "empty answer: the file is empty")]
    lengths = [len(e.input_ids) for e in report.examples]
    assert all(n == 16 for n in lengths[:-1]) and 2 <= lengths[-1] <= 16
    assert all(e.labels == e.input_ids for e in report.examples)
    stream = [t for e in report.examples for t in e.input_ids]
    assert stream.count(chat_tok.eos_token_id) == 2  # each text ends with EOS


@pytest.mark.parametrize("row, reason", [
    ({"instruction": "Hi"}, "missing fields: no 'output'"),
    ({"output": "Hello"}, "missing fields: no 'instruction'"),
    ({"instruction": "Hi", "output": "  "}, "empty answer: 'output' is empty"),
    ({"question": "Hi", "answer": "Hello"}, "missing fields: expected instruction + output, messages, or text; found: question, answer"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "empty answer: no assistant message"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
     "empty answer: every assistant message is empty"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "missing fields: message 1 has no 'content'"),
    ({"messages": [{"content": "Hi"}]}, "missing fields: message 1 has no 'role'"),
    ({"messages": [{"role": "narrator", "content": "Hi"}, {"role": "assistant", "content": "x"}]},
     "unknown role: message 1 has role 'narrator'; use system, user or assistant"),
    ({"messages": "not json"}, "missing fields: 'messages' is not a JSON list of {role, content}"),
    ([1, 2], "missing fields: the row is a list, not an object with named fields"),
    ('{"instruction": "Hi", "output": ', "not valid JSON"),
    ({"instruction": "word " * 200, "output": "Hello"}, "too long: the prompt takes"),
])
def test_each_bad_row_is_skipped_with_its_reason(tmp_path, chat_tok, row, reason):
    data = jsonl(tmp_path / "d.jsonl", [{"instruction": "Say hi", "output": "Hi"}, row])
    report = preflight_llm(data, chat_tok, 64)
    assert len(report.examples) == 1 and report.rows_read == 2
    (where, got), = report.skipped
    assert where == "d.jsonl line 2"
    assert got.startswith(reason)
    assert f"  skipped d.jsonl line 2: {got}" in report.lines()
    assert "1 rows skipped" in report.summary()


def test_long_answer_is_truncated_and_reported(tmp_path, chat_tok):
    data = jsonl(tmp_path / "d.jsonl", [{"instruction": "Talk", "output": "blah " * 100}])
    report = preflight_llm(data, chat_tok, 32)
    (ex,) = report.examples
    assert len(ex.input_ids) == 32 and ex.labels[-1] != IGNORE_INDEX
    (where, what), = report.truncated
    assert where == "d.jsonl line 1" and what.endswith("tokens cut to 32")
    assert "1 truncated to 32 tokens" in report.summary()


def test_template_that_rewrites_history_falls_back_to_searching_answers(tmp_path):
    tok = build_tiny_tokenizer(chat_template=False)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}"
                         "{% if loop.last %}\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    data = jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy!"},
                                                      {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Later."}]}])
    (ex,) = preflight_llm(data, tok, 512).examples
    assert trained(tok, ex) == "Ahoy!</s>Later.</s>"


@pytest.mark.parametrize("setup, words", [
    ("missing", "does not exist"),
    ("parquet", "is a .parquet file"),
    ("emptydir", "holds no .jsonl, .json, .csv or .txt files"),
    ("allbad", "None of the 2 rows"),
    ("badjson", "is not valid JSON"),
    ("notlist", "must hold a list of rows"),
    ("blank", "holds no rows"),
])
def test_unusable_data_raises_a_clear_dataset_error(tmp_path, chat_tok, setup, words):
    path = tmp_path / "data"
    if setup == "parquet":
        path = tmp_path / "d.parquet"
        path.write_bytes(b"PAR1")
    elif setup == "emptydir":
        path.mkdir()
        (path / "notes.md").write_text("x")
    elif setup == "allbad":
        path = jsonl(tmp_path / "d.jsonl", [{"instruction": "x"}, {"instruction": "y", "output": ""}])
    elif setup == "badjson":
        path = tmp_path / "d.json"
        path.write_text("[{", encoding="utf-8")
    elif setup == "notlist":
        path = tmp_path / "d.json"
        path.write_text('"hello"', encoding="utf-8")
    elif setup == "blank":
        path = tmp_path / "d.jsonl"
        path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DatasetError) as err:
        preflight_llm(path, chat_tok, 64)
    assert words in str(err.value)
    if setup == "allbad":
        assert "1 missing fields, 1 empty answer" in str(err.value) and "d.jsonl line 1" in str(err.value)


def test_read_rows_needs_no_tokenizer_and_folder_prefers_row_files(tmp_path):
    jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}, {"text": "plain"}])
    (tmp_path / "notes.txt").write_text("ignored: row files win", encoding="utf-8")
    rows, skipped, read = read_rows(tmp_path)
    assert read == 2 and not skipped and [r.kind for r in rows] == ["alpaca", "text"]


def test_batches_group_lengths_cover_every_example_and_repeat_by_seed():
    lengths = [5, 50, 6, 48, 7, 49, 8, 47]
    a = epoch_batches(lengths, 2, seed=1, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(8))
    assert a == epoch_batches(lengths, 2, seed=1, epoch=0) and a != epoch_batches(lengths, 2, seed=1, epoch=1)
    assert all(abs(lengths[b[0]] - lengths[b[1]]) <= 3 for b in a)  # short with short, long with long


def test_collate_pads_right_with_ignored_labels(chat_tok, tmp_path):
    data = jsonl(tmp_path / "d.jsonl", [{"instruction": "Hi", "output": "Hello"},
                                        {"instruction": "A longer question here?", "output": "Yes"}])
    examples = preflight_llm(data, chat_tok, 512).examples
    batch = collate(examples, chat_tok.pad_token_id)
    n0 = len(examples[0].input_ids)
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][0].sum() == n0
    assert (batch["labels"][0, n0:] == IGNORE_INDEX).all() and (batch["input_ids"][0, n0:] == chat_tok.pad_token_id).all()
