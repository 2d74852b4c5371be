"""A few rows of each of the study's evaluation datasets, in their real schema, written into a mirror.

``write_study_datasets(mirror_root, rows=3)`` fills ``<mirror_root>/datasets/...`` (layout: posttrain.mirror) with
every split lm-eval's YAMLs of the study tasks read: GSM8K (``openai/gsm8k`` main: train, test), the 7
EleutherAI/hendrycks_math configs (train, test), ARC-Challenge (``allenai/ai2_arc``: train, validation, test),
HellaSwag (``Rowan/hellaswag``: train, validation), WinoGrande (``allenai/winogrande`` winogrande_xl: train,
validation). Field names and types are the hub's (HellaSwag's label is a string "0".."3", WinoGrande's answer "1"
or "2", ARC's choices a {text, label} mapping, MATH's solution a worked answer with ``\\boxed{}``). Evaluation
splits get ``rows`` rows; training splits at least 10, so gsm8k's 8-shot prompts can be drawn from train.

Gold answers vary by row (the gold choice is not always the first), so only an answerer that reads each document
scores 1.0. Every text carries ``[<split> <i>]``, so documents are unique across splits and tasks.
"""

from __future__ import annotations

import json
from pathlib import Path

MATH_CONFIGS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                "prealgebra", "precalculus")
MATH_TYPES = {"algebra": "Algebra", "counting_and_probability": "Counting & Probability", "geometry": "Geometry",
              "intermediate_algebra": "Intermediate Algebra", "number_theory": "Number Theory",
              "prealgebra": "Prealgebra", "precalculus": "Precalculus"}
#: (dataset_path, dataset_name, splits) of every study dataset.
STUDY_DATASETS = (
    [("openai/gsm8k", "main", ("train", "test"))]
    + [("EleutherAI/hendrycks_math", c, ("train", "test")) for c in MATH_CONFIGS]
    + [("allenai/ai2_arc", "ARC-Challenge", ("train", "validation", "test")),
       ("Rowan/hellaswag", None, ("train", "validation")),
       ("allenai/winogrande", "winogrande_xl", ("train", "validation"))]
)
TRAIN_ROWS = 10


def _gsm8k(split: str, i: int) -> dict:
    a, b = 3 + i, 4 + 2 * i
    return {"question": f"[{split} {i}] Ann has {a} boxes with {b} pens in each. How many pens does she have?",
            "answer": f"She has {a}*{b}=<<{a}*{b}={a * b}>>{a * b} pens.\n#### {a * b}"}


def _math(config: str, split: str, i: int) -> dict:
    gold = 7 * i + len(config)
    return {"problem": f"[{config} {split} {i}] What is ${gold - 2} + 2$?",
            "level": f"Level {1 + i % 5}", "type": MATH_TYPES[config],
            "solution": f"Adding, ${gold - 2} + 2 = {gold}$, so the answer is $\\boxed{{{gold}}}$."}


def _arc(split: str, i: int) -> dict:
    labels = ["A", "B", "C", "D"]
    gold = (i + 1) % 4
    return {"id": f"Mercury_{split}_{i}", "question": f"[{split} {i}] Which tool measures the mass of a rock?",
            "choices": {"text": [f"option {k} of question {i}" for k in range(4)], "label": labels},
            "answerKey": labels[gold]}


def _hellaswag(split: str, i: int) -> dict:
    return {"ind": i, "activity_label": "Removing ice from car",
            "ctx_a": f"[{split} {i}] A man stands beside a frosted car.", "ctx_b": "then",
            "ctx": f"[{split} {i}] A man stands beside a frosted car. then",
            "endings": [f"he does thing {k} in scene {i}." for k in range(4)],
            "source_id": f"activitynet~v_{split}{i}", "split": split, "split_type": "indomain",
            "label": str((i + 2) % 4)}


def _winogrande(split: str, i: int) -> dict:
    return {"sentence": f"[{split} {i}] The trophy did not fit in the suitcase because the _ was too big.",
            "option1": "trophy" if i % 2 == 0 else "suitcase", "option2": "suitcase" if i % 2 == 0 else "trophy",
            "answer": "1" if i % 2 == 0 else "2"}


def rows_of(path: str, name: str | None, split: str, n: int) -> list[dict]:
    make = {"openai/gsm8k": lambda j: _gsm8k(split, j),
            "EleutherAI/hendrycks_math": lambda j: _math(str(name), split, j),
            "allenai/ai2_arc": lambda j: _arc(split, j),
            "Rowan/hellaswag": lambda j: _hellaswag(split, j),
            "allenai/winogrande": lambda j: _winogrande(split, j)}[path]
    return [make(j) for j in range(n)]


def write_study_datasets(mirror_root: Path, rows: int = 3) -> None:
    """Write every study dataset's splits under ``mirror_root/datasets`` (see the module docstring)."""
    for path, name, splits in STUDY_DATASETS:
        where = Path(mirror_root) / "datasets" / path / (name or "default")
        where.mkdir(parents=True, exist_ok=True)
        for split in splits:
            n = max(rows, TRAIN_ROWS) if split == "train" else rows
            with open(where / f"{split}.jsonl", "w") as handle:
                for row in rows_of(path, name, split, n):
                    handle.write(json.dumps(row) + "\n")
