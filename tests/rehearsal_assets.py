"""Rehearsal assets for the real scales on CPU (issue 11): everything a ``scale=0.5b|1.5b|3b|7b`` cell needs, built
locally because no hub is reachable.

- :data:`QWEN25`: the published Qwen2.5-Instruct architectures (the hub's ``config.json`` of each model).
- :func:`build_tokenizer`: a byte-level BPE trained here on a small corpus, laid out as Qwen2.5's tokenizer: the
  same pre-tokenizer regex, NFC normaliser and byte-level decoder as transformers' ``Qwen2Tokenizer`` (so
  ``AutoTokenizer`` rebuilds exactly this tokenizer, also from a directory holding a Qwen2 model), Qwen's 22 special
  tokens at their real ids (``<|endoftext|>`` 151643, ``<|im_start|>`` 151644, ``<|im_end|>`` 151645, ...: the
  learned vocabulary is padded with never-produced ``<|reserved_N|>`` entries up to 151643, so ``len(tokenizer)``
  is 151665 as Qwen's), eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos, and Qwen2.5-Instruct's own chat template.
- :func:`build_model`: a random-init ``Qwen2ForCausalLM`` of a scale's published architecture cut to ``layers``
  layers, in bf16 on disk (safetensors), with the hub's ``config.json`` and ``generation_config.json`` (eos
  ``[<|im_end|>, <|endoftext|>]``, pad ``<|endoftext|>``, Qwen's sampling defaults: repetition_penalty 1.05,
  temperature 0.7, top_p 0.8, top_k 20, do_sample, so a sampler that applies them unasked is caught) and the
  tokenizer files beside it, so ``scale.model=<dir>`` alone works.
- :func:`write_gsm8k_train`: a training file in openai/gsm8k's format (``question``, ``answer`` with the
  calculator annotations ``<<a*b=c>>`` and a last line ``#### N``).
- :class:`ScriptedGenerator` / :func:`scripted_selfplay`: a random model never answers right, so self-play would yield
  no pairs; the scripted model answers through the project's real self-play path (``selfplay_samples`` ->
  ``rollout.sample`` -> ``model.generate``) with known-correct and known-wrong worked answers, each followed by one of
  the model's two EOS ids and trailing junk, as ``generate`` of a model that does not stop would return it.

Built assets are cached under the directory the caller gives (a ``rehearsal.json`` stamp says what was built) and
reused when present; only one model is held in memory at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

ASSETS_VERSION = 1

#: Published Qwen2.5-Instruct architectures (config.json on the hub). ``layers`` is the published depth, which
#: :func:`build_model` cuts; ``max_window_layers`` is recorded as published (unused: no sliding window).
QWEN25 = {
    "0.5b": {"hf_id": "Qwen/Qwen2.5-0.5B-Instruct", "hidden_size": 896, "intermediate_size": 4864,
             "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
             "layers": 24, "max_window_layers": 21},
    "1.5b": {"hf_id": "Qwen/Qwen2.5-1.5B-Instruct", "hidden_size": 1536, "intermediate_size": 8960,
             "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
             "layers": 28, "max_window_layers": 21},
    "3b": {"hf_id": "Qwen/Qwen2.5-3B-Instruct", "hidden_size": 2048, "intermediate_size": 11008,
           "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
           "layers": 36, "max_window_layers": 70},
    "7b": {"hf_id": "Qwen/Qwen2.5-7B-Instruct", "hidden_size": 3584, "intermediate_size": 18944,
           "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
           "layers": 28, "max_window_layers": 28},
}
#: Shared by every Qwen2.5-Instruct size.
COMMON = {"rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
          "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "initializer_range": 0.02,
          "attention_dropout": 0.0, "sliding_window": 32768, "use_sliding_window": False, "use_cache": True}

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
#: Qwen2.5's added special tokens, in id order from 151643.
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                  "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                  "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                  "<|file_sep|>"]
FIRST_SPECIAL_ID = 151643
#: Of the added tokens, Qwen marks these 14 special=True; the tool-call and FIM ones are special=False.
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>"}
BPE_VOCAB = 2048  # learned entries at most (the corpus is small: fewer are learned)

#: generation_config.json of Qwen2.5-Instruct (the hub's file).
GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                     "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.7,
                     "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0"}

#: Qwen2.5-Instruct's chat template, verbatim from its tokenizer_config.json.
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

#: Text the tokenizer must round-trip losslessly besides the loader's probe (LaTeX, unicode, GSM8K annotations).
ROUND_TRIP_TEXTS = [
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
    r"Solve $\frac{x^2-1}{x+1} = \sqrt{16}$, so $x = \boxed{5}$ \quad (\alpha \leq \beta_{i}).",
    "Prix : 3,50 € — « déjà vu » naïve café; Größe ½ ≈ 0.5; 数学题 答案是 12。 emoji 🙂\ttab\n\n  indent",
]


# ---------------------------------------------------------------------------------------------------- tokenizer


def _corpus() -> list[str]:
    """A small deterministic corpus: GSM8K-like problems in both answer styles, MC facts, LaTeX, prose, chat."""
    from posttrain.data import synth

    texts = []
    for p in synth.problems("pretrain", 3000, seed=7) + synth.problems("pretrain", 600, hard=True, seed=7):
        texts.append(p.prompt + " " + p.solution)
        texts.append(_gsm8k_answer(p.solution))
    texts += [synth.mc_text(item) for item in synth.mc_items("pretrain", 600, seed=7)]
    texts += [str(n) for n in range(1000)] + [f"{a}.{b:02d}" for a in range(20) for b in range(0, 100, 7)]
    texts += ROUND_TRIP_TEXTS * 20
    texts += [r"\frac{1}{2} + \frac{3}{4} = \frac{5}{4}", r"\sqrt{2}\cdot\pi \approx 4.44", r"\boxed{\dfrac{7}{3}}",
              r"\left( a+b \right)^2 = a^2 + 2ab + b^2", r"\begin{align} x &= 1 \\ y &= 2 \end{align}",
              "Let's think step by step. First, we find the total. The answer is 42.",
              "The following are multiple choice questions (with answers). Which of these is correct?"] * 30
    texts += [f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n{IM_START}user\n{p.question}{IM_END}\n"
              f"{IM_START}assistant\n{p.solution}{IM_END}" for p in synth.problems("pretrain", 300, seed=8)]
    return texts


def _qwen2_pipeline(model):
    """A ``tokenizers.Tokenizer`` with Qwen2Tokenizer's own normaliser, pre-tokenizer and decoder around ``model``."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _tokenizer_config() -> dict:
    added = {str(FIRST_SPECIAL_ID + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                         "single_word": False, "special": t not in NOT_SPECIAL}
             for i, t in enumerate(SPECIAL_TOKENS)}
    return {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
            "additional_special_tokens": [t for t in SPECIAL_TOKENS[1:] if t not in NOT_SPECIAL],
            "bos_token": None, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
            "eos_token": IM_END, "errors": "replace", "model_max_length": 131072, "pad_token": ENDOFTEXT,
            "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def build_tokenizer(out_dir) -> Path:
    """Build (or reuse) the byte-level BPE tokenizer in ``out_dir`` laid out as Qwen2.5-Instruct's; returns the dir.

    Files as on the hub: ``tokenizer.json``, ``tokenizer_config.json`` (with the chat template), ``vocab.json``,
    ``merges.txt``. ~1 s to train.
    """
    from tokenizers import pre_tokenizers, trainers
    from tokenizers.models import BPE

    out_dir = Path(out_dir)
    stamp = {"kind": "tokenizer", "version": ASSETS_VERSION, "bpe_vocab": BPE_VOCAB}
    if _stamp_matches(out_dir, stamp):
        return out_dir
    tmp = _fresh_tmp(out_dir)
    try:
        core = _qwen2_pipeline(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                                   fuse_unk=False, byte_fallback=False))
        trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, min_frequency=2, special_tokens=[], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        core.train_from_iterator(_corpus(), trainer)
        data = json.loads(core.to_str())
        vocab = data["model"]["vocab"]
        learned = len(vocab)
        for i in range(learned, FIRST_SPECIAL_ID):  # never produced by a merge: pads the ids to Qwen's layout
            vocab[f"<|reserved_{i}|>"] = i
        data["added_tokens"] = [{"id": FIRST_SPECIAL_ID + i, "content": t, "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": t not in NOT_SPECIAL}
                                for i, t in enumerate(SPECIAL_TOKENS)]
        (tmp / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
        (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False))
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        _write_stamp(tmp, {**stamp, "learned_vocab": learned, "merges": len(merges)})
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ------------------------------------------------------------------------------------------------------- models


def hub_config(scale: str, layers: int) -> dict:
    """``config.json`` as the hub ships it for ``scale`` (transformers 4.43 keys), with ``layers`` layers."""
    arch = QWEN25[scale]
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **COMMON,
            "hidden_size": arch["hidden_size"], "intermediate_size": arch["intermediate_size"],
            "num_attention_heads": arch["num_attention_heads"], "num_key_value_heads": arch["num_key_value_heads"],
            "vocab_size": arch["vocab_size"], "tie_word_embeddings": arch["tie_word_embeddings"],
            "num_hidden_layers": layers, "max_window_layers": arch["max_window_layers"],
            "transformers_version": "4.43.1"}


def build_model(scale: str, out_dir, tokenizer_dir, layers: int = 2, seed: int = 0) -> Path:
    """Build (or reuse) a random-init Qwen2.5-Instruct of ``scale`` cut to ``layers`` layers in ``out_dir``.

    Created on the meta device, materialised in bf16 and initialised once by transformers' own ``init_weights``
    (no fp32 copy, no double init: peak memory about the bf16 weights, 3.3 GB RSS for 7b), saved with
    ``save_pretrained`` (safetensors), then ``config.json`` and ``generation_config.json`` rewritten as the hub's
    files and the tokenizer files of ``tokenizer_dir`` copied beside the weights. Returns ``out_dir``. Measured on
    2 shared cores: 0.5b 13 s, 1.5b 21 s, 3b 19 s, 7b 44 s (0.9 / 1.4 / 1.8 / 3.3 GB peak RSS).
    """
    import torch
    from transformers import AutoConfig, Qwen2ForCausalLM

    if scale not in QWEN25:
        raise ValueError(f"unknown scale {scale!r}; known: {sorted(QWEN25)}")
    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    tok_stamp = json.loads((tokenizer_dir / "rehearsal.json").read_text())
    stamp = {"kind": "model", "version": ASSETS_VERSION, "scale": scale, "layers": int(layers), "seed": int(seed),
             "config": hub_config(scale, int(layers)), "tokenizer": tok_stamp}
    if _stamp_matches(out_dir, stamp):
        return out_dir
    tmp = _fresh_tmp(out_dir)
    try:
        (tmp / "config.json").write_text(json.dumps(stamp["config"], indent=2))
        config = AutoConfig.from_pretrained(tmp)  # the hub file through transformers' own reading of it
        with torch.device("meta"):  # no allocation, no default init: HF's own init runs once, below
            model = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16)
        model.to_empty(device="cpu")
        torch.manual_seed(int(seed))
        model.init_weights()  # Qwen2PreTrainedModel._init_weights: normal(0, 0.02), zero biases, unit norms
        model.tie_weights()
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        (tmp / "config.json").write_text(json.dumps(stamp["config"], indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_dir / name, tmp / name)
        _write_stamp(tmp, stamp)
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------------------------------------- data


def _gsm8k_answer(solution: str) -> str:
    """A synthetic worked solution (``3*4=12`` lines) in GSM8K's style: ``3*4 = <<3*4=12>>12``."""
    lines = []
    for line in solution.splitlines():
        if line.startswith("####"):
            lines.append(line)
        else:
            expr, value = line.split("=")
            lines.append(f"{expr} = <<{expr}={value}>>{value}")
    return "\n".join(lines)


def write_gsm8k_train(path, n: int = 16, seed: int = 0) -> Path:
    """``n`` rows in openai/gsm8k ``main`` train's format: json lines ``{"question", "answer"}``, answer ending
    ``#### N`` (synthetic GSM8K-like problems from posttrain.data.synth)."""
    from posttrain.data import synth

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"question": p.question, "answer": _gsm8k_answer(p.solution)}
            for p in synth.problems("train", n, seed=seed)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------- scripted answers


def _scripted_model_class():
    from transformers import Qwen2ForCausalLM

    class ScriptedQwen2(Qwen2ForCausalLM):
        """The random Qwen2 model whose ``generate`` answers from a :class:`ScriptedGenerator` (no forward runs)."""

        script = None

        def generate(self, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
            return self.script.generate(self, input_ids, attention_mask, generation_config, **kwargs)

    return ScriptedQwen2


class ScriptedGenerator:
    """Known answers for the self-play prompts, returned the way HF ``generate`` returns sampled ids.

    Row ``i`` of ``rows`` (GSM8K records), its ``k``-th sample (counted per question over all calls):

    - every 4th problem (``i % 4 == 3``) is never answered right: no pair, so the yield is below 100%;
    - otherwise sample ``k`` is the gold worked answer when ``k % 3 == 0``, else wrong: the final answer off by one
      (``k % 3 == 1``), or the right number without the ``#### N`` line (``k % 3 == 2``: strict-match misses it,
      flexible-extract finds it);
    - the answer is followed by ``<|im_end|>`` for even ``k`` and by ``<|endoftext|>`` (the model's second EOS)
      for odd ``k``, then by junk text (:attr:`JUNK`) until ``max_new_tokens``.

    The output follows HF ``generate``'s semantics with the effective generation config (computed by transformers'
    own ``_prepare_generation_config``: explicit ``generation_config`` / kwargs over the model's
    generation_config.json): a row stops at the first token in ``eos_token_id`` (after which it holds
    ``pad_token_id``), a row that never meets a stop id runs on with junk to ``max_new_tokens``; the result is the
    (left-padded) prompt ids followed by the new ids, ``num_return_sequences`` copies per row; ``stop_strings``
    end a row once its new text holds one. So a sampler that stops only at ``<|im_end|>`` gets the junk in its
    completions. Every call's effective settings are kept in :attr:`calls`.
    """

    JUNK = " JUNK after the stop token"  # holds no stop string of lm-eval gsm8k's until

    def __init__(self, tokenizer, rows: list[dict]):
        from posttrain.rewards import extract_strict

        self.tokenizer = tokenizer
        self.rows = [{"question": str(r["question"]).strip(), "answer": str(r["answer"]).strip(),
                      "gold": extract_strict(str(r["answer"]))} for r in rows]
        self.eos = {IM_END: tokenizer.convert_tokens_to_ids(IM_END),
                    ENDOFTEXT: tokenizer.convert_tokens_to_ids(ENDOFTEXT)}
        self.junk_ids = tokenizer(self.JUNK, add_special_tokens=False)["input_ids"]
        self.seen: Counter = Counter()
        self.calls: list[dict] = []

    # -- what is answered
    def completion(self, index: int, k: int) -> tuple[str, bool]:
        """(text, strictly correct) of sample ``k`` for row ``index``."""
        row = self.rows[index]
        worked = " " + row["answer"]
        if index % 4 != 3 and k % 3 == 0:
            return worked, True
        body = worked.rsplit("####", 1)[0].rstrip()
        if k % 3 == 2:
            return f"{body}\nThe answer is {row['gold']}.", False
        return f"{body}\n#### {int(float(row['gold'].replace(',', ''))) + 1}", False

    def stop_token(self, k: int) -> str:
        return IM_END if k % 2 == 0 else ENDOFTEXT

    def _row_for(self, prompt: str) -> int:
        """The row whose question comes last in the prompt (few-shot prompts hold other training questions)."""
        best, where = None, -1
        for i, row in enumerate(self.rows):
            at = prompt.rfind(row["question"])
            if at > where:
                best, where = i, at
        if best is None:
            raise ValueError(f"the scripted generator knows no question in this prompt: {prompt[-200:]!r}")
        return best

    # -- HF generate, scripted
    def generate(self, model, input_ids, attention_mask, generation_config, **kwargs):
        import torch

        for name in ("streamer", "tokenizer"):  # generate's own arguments, not generation settings
            kwargs.pop(name, None)
        config, _ = model._prepare_generation_config(generation_config, **kwargs)
        eos = config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        stops = set(eos)
        pad = config.pad_token_id if config.pad_token_id is not None else eos[0] if eos else 0  # HF: pad = eos[0]
        stop_strings = [config.stop_strings] if isinstance(config.stop_strings, str) else config.stop_strings or []
        copies = int(config.num_return_sequences or 1)
        max_new = config.max_new_tokens
        if max_new is None:
            max_new = int(config.max_length) - input_ids.shape[1]
        self.calls.append({"batch": int(input_ids.shape[0]), "num_return_sequences": copies, "max_new_tokens": max_new,
                           "eos_token_id": sorted(stops), "pad_token_id": pad, "do_sample": config.do_sample,
                           "temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k,
                           "repetition_penalty": config.repetition_penalty, "stop_strings": list(stop_strings)})
        prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        prompt_rows, new_rows = [], []
        for ids, prompt in zip(input_ids, prompts):
            index = self._row_for(prompt)
            for _ in range(copies):
                k = self.seen[index]
                self.seen[index] += 1
                text, _ok = self.completion(index, k)
                raw = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos[self.stop_token(k)]]
                while len(raw) < max_new:
                    raw += self.junk_ids
                new, text = [], ""
                for token in raw[:max_new]:
                    new.append(token)
                    if token in stops:
                        break
                    if stop_strings:  # StopStringCriteria: the row ends once its text holds a stop string
                        text += self.tokenizer.decode([token])
                        if any(s in text for s in stop_strings):
                            break
                prompt_rows.append(ids)
                new_rows.append(new)
        width = max(len(n) for n in new_rows)
        new = torch.tensor([n + [pad] * (width - len(n)) for n in new_rows], dtype=input_ids.dtype,
                           device=input_ids.device)
        sequences = torch.cat([torch.stack(prompt_rows), new], dim=1)
        if config.return_dict_in_generate:
            from transformers.generation.utils import GenerateDecoderOnlyOutput

            return GenerateDecoderOnlyOutput(sequences=sequences)
        return sequences

    def load_model(self, model_dir):
        """The built random model of ``model_dir`` (bf16) with this script as its ``generate``."""
        import torch

        model = _scripted_model_class().from_pretrained(str(model_dir), dtype=torch.bfloat16)
        model.script = self
        return model


def compose_config(overrides: list[str]):
    """The run config Hydra composes from ``conf/`` for ``overrides`` (what ``launch.py OVERRIDES`` runs with, less
    its output directory): pass its ``data`` block to :func:`scripted_selfplay` so the run hits the same cache."""
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def scripted_selfplay(model_dir, data_cfg, rows: list[dict] | None = None, *, base_id: str | None = None,
                      precision: str = "fp32") -> tuple[Path, ScriptedGenerator]:
    """Build the self-play sample cache of ``model_dir`` for ``data_cfg`` through the real path, scripted.

    Calls ``posttrain.data.selfplay.selfplay_samples(model, tokenizer, str(model_dir), data_cfg)`` with the
    tokenizer ``load_tokenizer`` gives for the dir and the scripted model, under the current ``POSTTRAIN_CACHE``:
    a run with ``scale.model=<model_dir>`` (the same string: it is the cache's base id) and the same data block
    then hits this cache. ``data_cfg`` must be the run's composed ``cfg.data`` (:func:`compose_config`); ``rows``
    default to the json-lines GSM8K file at ``data_cfg.path``. Returns the samples file and the generator (its
    ``calls`` say what the sampler asked for).
    """
    from posttrain.data.selfplay import selfplay_samples
    from posttrain.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    if rows is None:
        with open(Path(str(data_cfg.path)).expanduser()) as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    generator = ScriptedGenerator(tokenizer, rows)
    model = generator.load_model(model_dir)
    try:
        path = selfplay_samples(model, tokenizer, base_id or str(model_dir), data_cfg, precision=precision)
    finally:
        del model
    return path, generator


# ------------------------------------------------------------------------------------------------------ caching


def _stamp_matches(out_dir: Path, stamp: dict) -> bool:
    path = out_dir / "rehearsal.json"
    return path.exists() and json.loads(path.read_text()).get("spec") == stamp


def _write_stamp(tmp: Path, stamp: dict) -> None:
    spec = {k: v for k, v in stamp.items() if k not in ("learned_vocab", "merges")}
    (tmp / "rehearsal.json").write_text(json.dumps({"spec": spec, **stamp}, indent=2))


def _fresh_tmp(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)
    return tmp


def _publish(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by the finished ``tmp`` (a reader never sees half an asset)."""
    for path in tmp.iterdir():
        path.chmod(0o644)  # safetensors writes 0600: a cluster's other jobs must read the assets too
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
