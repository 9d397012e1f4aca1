"""MT-Bench (Zheng et al. 2023): 80 two-turn questions, answers judged 1–10 by a strong model.

Generation runs here (greedy, the model's chat template). Judging needs a judge model behind an OpenAI-compatible
``/chat/completions`` endpoint (``--judge-url``, e.g. a local vLLM or llama.cpp server); the prompts are FastChat's
single-answer grading prompts from ``mt_bench/judge_prompts.jsonl``, with the reference answers for the math,
reasoning and coding categories.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hybrid_peft.errors import HybridPeftError, TaskDataError
from hybrid_peft.tasks.data import resolve_data_dir

REFERENCE_CATEGORIES = ("math", "reasoning", "coding")
RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
NO_JUDGE = (
    "MT-Bench scores come from a judge model, and none was given. Serve one behind an OpenAI-compatible API (for "
    "example `vllm serve <model>` or llama.cpp's `llama-server`) and pass --judge-url http://HOST:PORT/v1 and "
    "--judge-model NAME (an API key, if needed, goes in $OPENAI_API_KEY). To only generate the answers, pass "
    "--answers-only."
)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise TaskDataError(f"{path} does not exist")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_mt_bench(data_dir: Any = None) -> tuple[list[dict], dict[int, list[str]], dict[str, dict]]:
    """Questions, reference answers by question id, and judge prompts by name."""
    folder = resolve_data_dir(data_dir) / "mt_bench"
    questions = _read_jsonl(folder / "question.jsonl")
    references = {
        r["question_id"]: r["choices"][0]["turns"] for r in _read_jsonl(folder / "reference_answer" / "gpt-4.jsonl")
    }
    prompts = {p["name"]: p for p in _read_jsonl(folder / "judge_prompts.jsonl")}
    return questions, references, prompts


@torch.no_grad()
def generate_answers(
    model: Any, tokenizer: Any, questions: Sequence[dict[str, Any]], max_new_tokens: int = 256, progress: bool = True
) -> list[dict[str, Any]]:
    """Both turns of every question, greedy, through the tokenizer's chat template."""
    from tqdm.auto import tqdm

    if getattr(tokenizer, "chat_template", None) is None:
        raise HybridPeftError("MT-Bench needs a chat model: this tokenizer has no chat template")
    model.eval()
    answers = []
    for question in tqdm(questions, desc="MT-Bench answers", unit="question", disable=not progress):
        messages: list[dict[str, str]] = []
        turns = []
        for turn in question["turns"]:
            messages.append({"role": "user", "content": turn})
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            output = model.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            text = tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            messages.append({"role": "assistant", "content": text})
            turns.append(text)
        answers.append({"question_id": question["question_id"], "category": question["category"], "turns": turns})
    return answers


def judge_prompt(
    question: dict, answer: dict, turn: int, references: dict[int, list[str]], prompts: dict[str, dict]
) -> tuple[str, str]:
    """``(system, user)`` messages grading ``turn`` (1 or 2) of ``answer``."""
    with_reference = question["category"] in REFERENCE_CATEGORIES and question["question_id"] in references
    name = ("single-math-v1" if with_reference else "single-v1") + ("-multi-turn" if turn == 2 else "")
    template = prompts[name]
    fields = {
        "question": question["turns"][0],
        "answer": answer["turns"][0],
        "question_1": question["turns"][0],
        "answer_1": answer["turns"][0],
    }
    if turn == 2:
        fields |= {"question_2": question["turns"][1], "answer_2": answer["turns"][1]}
    if with_reference:
        reference = references[question["question_id"]]
        fields |= {"ref_answer_1": reference[0], "ref_answer_2": reference[1] if len(reference) > 1 else ""}
    return template["system_prompt"], template["prompt_template"].format(**fields)


def call_judge(url: str, model: str, system: str, user: str, timeout: float = 120.0) -> str:
    body = json.dumps(
        {
            "model": model,
            "temperature": 0,
            "max_tokens": 1024,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        }
    )
    headers = {"Content-Type": "application/json"}
    if key := os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=body.encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"]
    except (urllib.error.URLError, TimeoutError, KeyError, json.JSONDecodeError) as exc:
        raise HybridPeftError(f"the judge at {url} did not answer usefully ({exc}); check --judge-url") from exc


def judge_answers(
    answers: Sequence[dict[str, Any]],
    judge_url: str | None,
    judge_model: str,
    data_dir: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Scores 1–10 per turn from the judge; returns the mean per turn, overall and per category, and each verdict."""
    from tqdm.auto import tqdm

    if not judge_url:
        raise HybridPeftError(NO_JUDGE)
    questions, references, prompts = load_mt_bench(data_dir)
    by_id = {q["question_id"]: q for q in questions}
    verdicts = []
    for answer in tqdm(answers, desc="MT-Bench judging", unit="question", disable=not progress):
        question = by_id[answer["question_id"]]
        for turn in (1, 2):
            system, user = judge_prompt(question, answer, turn, references, prompts)
            text = call_judge(judge_url, judge_model, system, user)
            match = RATING.search(text)
            verdicts.append(
                {
                    "question_id": question["question_id"],
                    "category": question["category"],
                    "turn": turn,
                    "score": float(match.group(1)) if match else None,
                    "judgment": text,
                }
            )
    scored = [v for v in verdicts if v["score"] is not None]
    if not scored:
        raise HybridPeftError("the judge never answered in the [[rating]] format; is it an instruction-tuned model?")

    def mean(items: list[dict]) -> float:
        return sum(v["score"] for v in items) / len(items) if items else float("nan")

    categories = sorted({v["category"] for v in scored})
    return {
        "score": mean(scored),
        "turn_1": mean([v for v in scored if v["turn"] == 1]),
        "turn_2": mean([v for v in scored if v["turn"] == 2]),
        "by_category": {c: mean([v for v in scored if v["category"] == c]) for c in categories},
        "unparsed": len(verdicts) - len(scored),
        "verdicts": verdicts,
    }
