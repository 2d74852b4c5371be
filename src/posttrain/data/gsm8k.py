"""Real GSM8K through ``datasets``: a hub id (``openai/gsm8k``), its copy in the mirror, or a local file in GSM8K's
format.

Each record has ``question`` and ``answer`` (a worked solution ending in ``#### N``), as the hub dataset and
lm-eval's gsm8k task. A hub id is read from the mirror when the mirror holds it
(``<mirror>/datasets/openai/gsm8k/main/train.jsonl``, posttrain.mirror), from the hub otherwise; with the hub
offline and no copy, one line names the file expected. A malformed local file is reported with its name and line,
not a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain import mirror as mirror_layout
from posttrain.data.synth import Problem
from posttrain.rewards import INVALID, extract_strict


class DataFormatError(ValueError):
    """A data file that does not have the expected shape; the message names the file and line."""


def _check_jsonl(path: Path) -> None:
    with open(path) as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            _check_record(record, f"{path}:{lineno}")


def _check_record(record, where: str) -> None:
    if not isinstance(record, dict) or not {"question", "answer"} <= set(record):
        raise DataFormatError(f"{where}: expected an object with 'question' and 'answer' (GSM8K format)")
    if extract_strict(str(record["answer"])) == INVALID:
        raise DataFormatError(f"{where}: the answer has no final '#### N' line (GSM8K format)")


CONFIG = "main"  # the hub dataset's config (openai/gsm8k has main and socratic)


def load_gsm8k(path: str, split: str = "train", limit: int | None = None, *,
               mirror: str | None = None) -> list[Problem]:
    """GSM8K problems from a hub id (through the mirror when it holds it) or a local json/jsonl/parquet file."""
    from datasets import load_dataset

    local = Path(path).expanduser()
    if not local.exists() and mirror and not mirror_layout.is_local_path(path):
        found = mirror_layout.split_file(mirror, path, CONFIG, split)
        if found is None and mirror_layout.hub_offline():
            raise mirror_layout.missing_split(mirror, path, CONFIG, split, needed_by="GSM8K training prompts")
        local = found or local
    if local.exists():
        suffix = local.suffix.lower()
        if suffix in (".jsonl", ".json"):
            if suffix == ".jsonl":
                _check_jsonl(local)
            ds = load_dataset("json", data_files={split: str(local)}, split=split)
        elif suffix == ".parquet":
            ds = load_dataset("parquet", data_files={split: str(local)}, split=split)
        else:
            raise DataFormatError(f"{local}: unsupported data file type {suffix!r} (use .jsonl, .json or .parquet)")
    else:
        ds = load_dataset(path, CONFIG, split=split)
    out = []
    for i, record in enumerate(ds):
        if limit is not None and i >= limit:
            break
        _check_record(record, f"{path} (record {i})")
        solution = str(record["answer"]).strip()
        out.append(Problem(str(record["question"]).strip(), solution, extract_strict(solution)))
    return out


