"""Training data for language-model LoRAs: read it, check it, tokenize it with answer-only labels.

Accepted data (``train_data_dir`` is a file or a folder):

* JSONL, JSON (a list of objects) or CSV rows, each one of
    - Alpaca: ``instruction`` (or ``prompt``), optional ``input``, ``output`` (or ``response``/``completion``),
      optional ``system``;
    - chat: ``messages`` (or ShareGPT ``conversations``), a list of ``{"role", "content"}`` with roles
      system / user / assistant (ShareGPT's ``from``/``value`` and human / gpt are understood too);
    - plain text: ``text``.
* a folder of ``.txt`` files (or one ``.txt`` file): plain text, joined and cut into ``max_seq_length`` chunks.

Instruction and chat rows are rendered with the tokenizer's chat template when it has one, else with a
plain Alpaca-style template, and only the answer tokens (the assistant turns and their end-of-turn token)
carry labels; every other label is -100. Plain text trains on every token.

``preflight_llm`` returns a report like the image preflight: rows read, rows skipped and why, rows
truncated, tokens in total. It raises ``DatasetError`` with a clear sentence when nothing can train.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from ..errors import DatasetError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
DATA_SUFFIXES = (".jsonl", ".json", ".csv")
ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
_INSTRUCTION_KEYS = ("instruction", "prompt")
_OUTPUT_KEYS = ("output", "response", "completion")
PLAIN_SYSTEM, PLAIN_USER, PLAIN_ASSISTANT = "{content}\n\n", "### Instruction:\n{content}\n\n", "### Response:\n"


class _Skip(Exception):
    """A row that cannot train; the message is the reason shown in the report."""


@dataclass
class Row:
    """One parsed row: a conversation (``messages``) or plain ``text``."""

    where: str
    kind: str  # "alpaca", "chat" or "text"
    messages: list[dict[str, str]] | None = None
    text: str | None = None


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    where: str


@dataclass
class LLMPreflight:
    source: Path
    rows_read: int = 0
    kinds: Counter = field(default_factory=Counter)
    examples: list[Example] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)
    truncated: list[tuple[str, str]] = field(default_factory=list)  # (where, what)
    template: str = ""
    max_seq_length: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def tokens_total(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def answer_tokens(self) -> int:
        return sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in self.examples)

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items())) or "none"
        text = (f"{self.rows_read} rows read from {self.source} ({kinds}): {len(self.examples)} training sequences, "
                f"{len(self.skipped)} rows skipped, {len(self.truncated)} truncated to {self.max_seq_length} tokens. "
                f"{self.tokens_total:,} tokens in total, {self.answer_tokens:,} of them trained")
        return text + (f"; {self.template}." if self.template else ".")

    def skip_reasons(self) -> Counter:
        return Counter(reason.split(":")[0] for _, reason in self.skipped)

    def lines(self) -> list[str]:
        out = [self.summary()]
        out += [f"  skipped {where}: {reason}" for where, reason in self.skipped[:50]]
        if len(self.skipped) > 50:
            out.append(f"  ... and {len(self.skipped) - 50} more skipped")
        out += [f"  truncated {where}: {what}" for where, what in self.truncated[:20]]
        if len(self.truncated) > 20:
            out.append(f"  ... and {len(self.truncated) - 20} more truncated")
        out += [f"  warning: {w}" for w in self.warnings]
        return out


# --- reading -------------------------------------------------------------------------------------------
def data_files(path: str | Path) -> tuple[list[Path], str]:
    """The files to read and their kind ("rows" for JSONL/JSON/CSV, "text" for .txt). DatasetError if none."""
    if not str(path).strip():
        raise DatasetError("No training data given: set train_data_dir to a .jsonl/.json/.csv file or a folder.")
    p = Path(path).expanduser()
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in DATA_SUFFIXES:
            return [p], "rows"
        if suffix == ".txt":
            return [p], "text"
        raise DatasetError(f"'{p.name}' is a {suffix or 'plain'} file; LLM training data is a .jsonl, .json or .csv "
                           "file, or a folder of .txt files.")
    if not p.is_dir():
        raise DatasetError(f"Training data '{p}' does not exist.")
    rows = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in DATA_SUFFIXES)
    if rows:
        return rows, "rows"
    texts = sorted(f for f in p.rglob("*.txt") if f.is_file())
    if texts:
        return texts, "text"
    raise DatasetError(f"'{p}' holds no .jsonl, .json, .csv or .txt files to train on.")


def _raw_rows(file: Path) -> Iterable[tuple[str, Any]]:
    """(where, row) for every row of a JSONL/JSON/CSV file; unparsable rows come as (where, _Skip)."""
    name = file.name
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"'{file}' is not UTF-8 text; save it as UTF-8 and try again.") from None
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield f"{name} line {n}", json.loads(line)
            except ValueError as exc:
                yield f"{name} line {n}", _Skip(f"not valid JSON ({exc.args[0] if exc.args else exc})")
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DatasetError(f"'{file}' is not valid JSON: {exc}. A .json file holds a list of rows; "
                               "use .jsonl for one row per line.") from None
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else data
        if not isinstance(data, list):
            raise DatasetError(f"'{file}' must hold a list of rows, e.g. [{{\"instruction\": ..., \"output\": ...}}].")
        for n, row in enumerate(data, 1):
            yield f"{name} row {n}", row
    else:
        reader = csv.DictReader(text.splitlines())
        for n, row in enumerate(reader, 2):
            yield f"{name} line {n}", {k.strip(): v for k, v in row.items() if k is not None}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from a spreadsheet
        return None
    return value if isinstance(value, str) else str(value)


def _first(row: dict[str, Any], keys: Sequence[str]) -> tuple[str | None, str | None]:
    for key in keys:
        if key in row:
            return key, _text(row[key])
    return None, None


def _parse_messages(raw: Any) -> list[dict[str, str]]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise _Skip("missing fields: 'messages' is not a JSON list of {role, content}") from None
    if not isinstance(raw, list) or not raw:
        raise _Skip("missing fields: 'messages' must be a non-empty list of {role, content}")
    messages = []
    for i, m in enumerate(raw, 1):
        if not isinstance(m, dict):
            raise _Skip(f"missing fields: message {i} is not an object with role and content")
        role = m.get("role", m.get("from"))
        content = _text(m.get("content", m.get("value")))
        if role is None:
            raise _Skip(f"missing fields: message {i} has no 'role'")
        if content is None:
            raise _Skip(f"missing fields: message {i} has no 'content'")
        role = _ROLE_ALIASES.get(str(role).lower(), str(role).lower())
        if role not in ROLES:
            raise _Skip(f"unknown role: message {i} has role '{role}'; use system, user or assistant")
        messages.append({"role": role, "content": content})
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        raise _Skip("empty answer: no assistant message")
    if not any(m["content"].strip() for m in answers):
        raise _Skip("empty answer: every assistant message is empty")
    return messages


def parse_row(where: str, raw: Any) -> Row:
    """Turn one raw row into a ``Row``; raises ``_Skip`` with the reason when it cannot train."""
    if isinstance(raw, _Skip):
        raise raw
    if not isinstance(raw, dict):
        raise _Skip(f"missing fields: the row is a {type(raw).__name__}, not an object with named fields")
    if "messages" in raw or "conversations" in raw:
        return Row(where, "chat", messages=_parse_messages(raw.get("messages", raw.get("conversations"))))
    ikey, instruction = _first(raw, _INSTRUCTION_KEYS)
    okey, output = _first(raw, _OUTPUT_KEYS)
    if ikey or okey:
        if not instruction or not instruction.strip():
            what = "no 'instruction'" if instruction is None else "'instruction' is empty"
            raise _Skip(f"missing fields: {what}")
        if output is None:
            raise _Skip("missing fields: no 'output'")
        if not output.strip():
            raise _Skip(f"empty answer: '{okey}' is empty")
        user = instruction
        extra = _text(raw.get("input"))
        if extra and extra.strip():
            user = f"{instruction}\n\n{extra}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        system = _text(raw.get("system"))
        if system and system.strip():
            messages.insert(0, {"role": "system", "content": system})
        return Row(where, "alpaca", messages=messages)
    if "text" in raw:
        text = _text(raw["text"])
        if not text or not text.strip():
            raise _Skip("empty answer: 'text' is empty")
        return Row(where, "text", text=text)
    keys = ", ".join(map(str, raw)) or "none"
    raise _Skip(f"missing fields: expected instruction + output, messages, or text; found: {keys}")


def read_rows(path: str | Path) -> tuple[list[Row], list[tuple[str, str]], int]:
    """Parsed rows, skipped rows (where, reason), and the number of rows read. No tokenizer needed."""
    files, kind = data_files(path)
    rows: list[Row] = []
    skipped: list[tuple[str, str]] = []
    read = 0
    for file in files:
        if kind == "text":
            read += 1
            try:
                text = file.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError:
                skipped.append((file.name, "not UTF-8 text"))
                continue
            if text.strip():
                rows.append(Row(file.name, "text", text=text))
            else:
                skipped.append((file.name, "empty answer: the file is empty"))
            continue
        for where, raw in _raw_rows(file):
            read += 1
            try:
                rows.append(parse_row(where, raw))
            except _Skip as skip:
                skipped.append((where, str(skip)))
    return rows, skipped, read


# --- templates -----------------------------------------------------------------------------------------
def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _chat_segments(tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """(text, trained) pieces whose concatenation is the chat-template rendering of ``messages``."""
    segments: list[tuple[str, bool]] = []
    prev = ""
    for i, message in enumerate(messages):
        full = _render(tokenizer, messages[:i + 1])
        if message["role"] == "assistant":
            prompt = _render(tokenizer, messages[:i], generation_prompt=True)
            if not (prompt.startswith(prev) and full.startswith(prompt)):
                return _searched_segments(tokenizer, messages)
            segments += [(prompt[len(prev):], False), (full[len(prompt):], True)]
        else:
            if not full.startswith(prev):
                return _searched_segments(tokenizer, messages)
            segments.append((full[len(prev):], False))
        prev = full
    return segments


def _searched_segments(tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """For templates whose prefixes change as turns are added: find each answer in the full rendering."""
    full = _render(tokenizer, messages)
    eos = tokenizer.eos_token or ""
    segments: list[tuple[str, bool]] = []
    cursor = 0
    for message in messages:
        if message["role"] != "assistant" or not message["content"].strip():
            continue
        answer = message["content"].strip()
        start = full.find(answer, cursor)
        if start < 0:
            raise _Skip("the model's chat template changes the answer text, so its tokens cannot be found")
        end = start + len(answer)
        if eos and full.startswith(eos, end):
            end += len(eos)
        segments += [(full[cursor:start], False), (full[start:end], True)]
        cursor = end
    segments.append((full[cursor:], False))
    return segments


def _plain_segments(tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The plain template for tokenizers without a chat template (Alpaca's ### Instruction / ### Response)."""
    eos = tokenizer.eos_token or ""
    segments: list[tuple[str, bool]] = []
    for m in messages:
        if m["role"] == "system":
            segments.append((PLAIN_SYSTEM.format(content=m["content"]), False))
        elif m["role"] == "user":
            segments.append((PLAIN_USER.format(content=m["content"]), False))
        else:
            segments += [(PLAIN_ASSISTANT, False), (m["content"] + eos, True), ("\n\n", False)]
    return segments


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The text a model is given to answer ``messages`` (same template as training)."""
    if has_chat_template(tokenizer):
        return _render(tokenizer, messages, generation_prompt=True)
    text = "".join(t for t, _ in _plain_segments(tokenizer, messages))
    return text + PLAIN_ASSISTANT


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``render_prompt`` (special tokens added only for the plain template, as in training)."""
    special = not has_chat_template(tokenizer)
    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=special)["input_ids"]


# --- tokenizing ----------------------------------------------------------------------------------------
def _tokenize_segments(tokenizer, segments: list[tuple[str, bool]], special: bool) -> tuple[list[int], list[int]]:
    """Token ids and labels: tokens that start inside a trained segment keep their id, others get -100."""
    text = "".join(t for t, _ in segments)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        spans, pos = [], 0
        for piece, trained in segments:
            if trained:
                spans.append((pos, pos + len(piece)))
            pos += len(piece)
        ids = list(enc["input_ids"])
        labels = []
        for tid, (start, end) in zip(ids, enc["offset_mapping"]):
            inside = end > start and any(a <= start < b for a, b in spans)
            labels.append(tid if inside else IGNORE_INDEX)
        return ids, labels
    ids, labels = [], []
    for n, (piece, trained) in enumerate(segments):  # slow tokenizers: piece by piece
        part = tokenizer(piece, add_special_tokens=special and n == 0)["input_ids"]
        ids += part
        labels += part if trained else [IGNORE_INDEX] * len(part)
    return ids, labels


def tokenize_conversation(tokenizer, messages: list[dict[str, str]], max_seq_length: int) -> tuple[Example, int]:
    """One training example (answer-only labels) and its length before truncation. Raises ``_Skip``."""
    chat = has_chat_template(tokenizer)
    try:
        segments = _chat_segments(tokenizer, messages) if chat else _plain_segments(tokenizer, messages)
    except _Skip:
        raise
    except Exception as exc:  # a template that rejects a conversation (e.g. no system role)
        raise _Skip(f"the model's chat template rejected this conversation ({exc})") from None
    ids, labels = _tokenize_segments(tokenizer, segments, special=not chat)
    full = len(ids)
    if all(x == IGNORE_INDEX for x in labels[:max_seq_length]):
        first = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), full)
        raise _Skip(f"too long: the prompt takes {first} tokens before the answer starts, max_seq_length is "
                    f"{max_seq_length}; nothing of the answer would be trained")
    ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    return Example(ids, labels, ""), full


def chunk_text(tokenizer, texts: Sequence[str], max_seq_length: int) -> list[list[int]]:
    """Plain text joined (each text ends with EOS) and cut into chunks of ``max_seq_length`` tokens."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    chunks = [stream[i:i + max_seq_length] for i in range(0, len(stream), max_seq_length)]
    return [c for c in chunks if len(c) >= 2]


def preflight_llm(path: str | Path, tokenizer, max_seq_length: int,
                  progress: Callable[[int, int], None] | None = None) -> LLMPreflight:
    """Read, check and tokenize the data. ``tokenizer`` is a tokenizer or a model folder / hub id;
    ``progress(done, total)`` is called every 500 rows."""
    if isinstance(tokenizer, (str, Path)):
        from ..models.llm import load_tokenizer

        tokenizer = load_tokenizer(str(tokenizer))
    rows, skipped, read = read_rows(path)
    report = LLMPreflight(source=Path(path), rows_read=read, skipped=list(skipped), max_seq_length=max_seq_length)
    report.template = ("the tokenizer's chat template" if has_chat_template(tokenizer)
                       else "a plain ### Instruction / ### Response template (the tokenizer has no chat template)")
    texts = []
    for n, row in enumerate(rows, 1):
        if progress and (n % 500 == 0 or n == len(rows)):
            progress(n, len(rows))
        report.kinds[row.kind] += 1
        if row.kind == "text":
            texts.append(row.text or "")
            continue
        try:
            example, full = tokenize_conversation(tokenizer, row.messages or [], max_seq_length)
        except _Skip as skip:
            report.skipped.append((row.where, str(skip)))
            continue
        example.where = row.where
        if full > max_seq_length:
            report.truncated.append((row.where, f"{full} tokens cut to {max_seq_length}"))
        report.examples.append(example)
    if texts:
        for n, chunk in enumerate(chunk_text(tokenizer, texts, max_seq_length), 1):
            report.examples.append(Example(chunk, list(chunk), f"text chunk {n}"))
    if report.kinds.get("text") and len(report.kinds) > 1:
        report.warnings.append("plain text rows are mixed with instruction/chat rows; both are used.")
    if not report.examples:
        raise DatasetError(_nothing_to_train(report))
    return report


def _nothing_to_train(report: LLMPreflight) -> str:
    if not report.rows_read:
        return f"'{report.source}' holds no rows."
    reasons = ", ".join(f"{n} {r}" for r, n in report.skip_reasons().most_common())
    where, first = report.skipped[0] if report.skipped else ("", "")
    return (f"None of the {report.rows_read} rows in '{report.source}' can train ({reasons}). First problem, "
            f"{where}: {first}. Each row needs instruction + output, messages with an assistant answer, or text.")


# --- batches -------------------------------------------------------------------------------------------
def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, process_index: int = 0,
                  num_processes: int = 1, group: int = 50) -> list[list[int]]:
    """Example indices in batches of similar length (less padding), shuffled by (seed, epoch), sharded.

    Like transformers' length-grouped sampler: shuffle, cut into groups of ``group`` batches, sort each group
    by length, batch it, shuffle the batches. Every process gets the same number of batches.
    """
    rng = random.Random(seed * 1000003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * group
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        part = sorted(order[start:start + span], key=lambda i: -lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    if num_processes > 1:
        usable = len(batches) // num_processes * num_processes
        if usable == 0:
            raise DatasetError(f"{len(batches)} batch(es) per epoch cannot be split over {num_processes} processes; "
                               "add data or lower batch_size.")
        batches = batches[:usable][process_index::num_processes]
    return batches


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
