"""MT-Bench (Zheng et al. 2023): 80 two-turn questions, answers judged 1–10 by a strong model.

Generation runs here (greedy, the model's chat template). Judging needs a judge model behind an OpenAI-compatible
``/chat/completions`` endpoint (``--judge-url``, e.g. a local vLLM or llama.cpp server); the prompts are FastChat's
single-answer grading prompts from ``mt_bench/judge_prompts.jsonl``, with the reference answers for the math,
reasoning and coding categories.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hybrid_peft.errors import HybridPeftError, TaskDataError
from hybrid_peft.tasks.data import read_text, resolve_data_dir

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
    return [json.loads(line) for line in read_text(path, "mt-bench").splitlines() if line.strip()]


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


class JudgeError(HybridPeftError):
    """The judge could not be reached, or answered with something that is not a verdict."""


RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_REPLY_BYTES = 4 << 20  # a verdict of max_tokens=1024 is a few kB; more is not a judge's reply


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to the same scheme, host and port: urllib would carry the ``Authorization`` header to
    wherever the judge points (an https judge redirecting to ``http://`` would send the API key in clear)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201 - urllib's signature
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        if (old.scheme, old.hostname, old.port) != (new.scheme, new.hostname, new.port):
            raise JudgeError(
                f"the judge at {old.scheme}://{old.netloc} redirected to {new.scheme}://{new.netloc}, another scheme "
                "or host; not followed, so the API key stays where it was sent. Pass the final address as --judge-url"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SameOriginRedirects)


def call_judge(
    url: str,
    model: str,
    system: str,
    user: str,
    *,
    deadline_s: float = 300.0,
    attempts: int = 5,
    backoff_s: float = 2.0,
    allow_insecure_key: bool = False,
) -> str:
    """The judge's reply to one grading prompt. Retries with exponential backoff (honouring ``Retry-After``) on
    429, 5xx and dropped connections, within one overall ``deadline_s``. ``$OPENAI_API_KEY`` is sent only over
    https (or to a plain-http judge when ``allow_insecure_key``)."""
    body = json.dumps(
        {
            "model": model,
            "temperature": 0,
            "max_tokens": 1024,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        }
    ).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get("OPENAI_API_KEY")
    if key and (url.lower().startswith("https://") or allow_insecure_key):
        headers["Authorization"] = f"Bearer {key}"
    endpoint = url.rstrip("/") + "/chat/completions"
    deadline = time.monotonic() + deadline_s
    problem = "no attempt made"
    for attempt in range(attempts):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        wait = backoff_s * 2**attempt
        try:
            request = urllib.request.Request(endpoint, data=body, headers=headers)
            with _OPENER.open(request, timeout=remaining) as response:
                raw = response.read(MAX_REPLY_BYTES + 1)
                if len(raw) > MAX_REPLY_BYTES:
                    raise JudgeError(
                        f"the judge at {url} answered with over {MAX_REPLY_BYTES >> 20} MB; that is not a verdict"
                    )
                return _reply_text(raw, url)
        except urllib.error.HTTPError as exc:
            problem = f"HTTP {exc.code} {exc.reason}"
            if exc.code not in RETRY_STATUS:
                raise JudgeError(
                    f"the judge at {url} refused the request ({problem}); check --judge-url, "
                    "--judge-model and the API key"
                ) from None
            retry_after = exc.headers.get("Retry-After") if exc.headers else None
            if retry_after and retry_after.strip().isdigit():
                wait = max(wait, float(retry_after))
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            problem = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        if attempt + 1 < attempts:
            time.sleep(max(0.0, min(wait, deadline - time.monotonic())))
    raise JudgeError(
        f"the judge at {url} did not answer ({problem}) after {attempts} attempts within {deadline_s:.0f} s; "
        "check that it is running, then continue with --judge-only (verdicts received so far are kept)"
    )


def _reply_text(raw: bytes, url: str) -> str:
    try:
        reply = json.loads(raw)
    except json.JSONDecodeError:
        raise JudgeError(f"the judge at {url} answered with something that is not JSON: {raw[:200]!r}") from None
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not choices:
        raise JudgeError(f"the judge at {url} answered without choices: {str(reply)[:200]}")
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str) or not content.strip():
        raise JudgeError(f"the judge at {url} answered with an empty message: {str(choices[0])[:200]}")
    return content


def parse_rating(text: str) -> float | None:
    """The ``[[rating]]`` of a verdict when it is a score from 1 to 10, else None."""
    match = RATING.search(text)
    if not match:
        return None
    score = float(match.group(1))
    return score if 1.0 <= score <= 10.0 else None


def read_verdicts(path: Path) -> list[dict[str, Any]]:
    """Verdicts already received (one JSON line each); a line torn by an interruption is dropped."""
    if not path.is_file():
        return []
    verdicts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            verdicts.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return verdicts


def reusable_verdict(verdict: Any, judge: dict[str, str], question_ids: set[Any]) -> bool:
    """Whether a stored verdict may stand in for a new call: given by this judge (URL and model), for a known
    question and turn, its score the one its judgment text states (1–10, or none)."""
    return (
        isinstance(verdict, dict)
        and verdict.get("judge") == judge
        and verdict.get("question_id") in question_ids
        and verdict.get("turn") in (1, 2)
        and isinstance(verdict.get("judgment"), str)
        and verdict.get("score") == parse_rating(verdict["judgment"])
    )


def judge_answers(
    answers: Sequence[dict[str, Any]],
    judge_url: str | None,
    judge_model: str,
    data_dir: Any = None,
    progress: bool = True,
    *,
    verdicts_file: str | os.PathLike | None = None,
    allow_insecure_key: bool = False,
    deadline_s: float = 300.0,
    backoff_s: float = 2.0,
) -> dict[str, Any]:
    """Scores 1–10 per turn from the judge; returns the mean per turn, overall and per category, and each verdict.
    With ``verdicts_file`` each verdict is appended there as it arrives, and verdicts already there are reused, so
    an interrupted judging continues where it stopped."""
    from tqdm.auto import tqdm

    if not judge_url:
        raise HybridPeftError(NO_JUDGE)
    questions, references, prompts = load_mt_bench(data_dir)
    by_id = {q["question_id"]: q for q in questions}
    unknown = [a.get("question_id") for a in answers if not isinstance(a, dict) or a.get("question_id") not in by_id]
    if unknown:
        raise HybridPeftError(
            f"answers for question ids MT-Bench does not have ({unknown[:3]}); the answers come from another question "
            "set: generate them again without --judge-only"
        )
    judge = {"url": judge_url, "model": judge_model}
    path = Path(verdicts_file) if verdicts_file is not None else None
    stored = read_verdicts(path) if path else []
    received = {(v["question_id"], v["turn"]): v for v in stored if reusable_verdict(v, judge, set(by_id))}
    if len(received) < len(stored):
        warnings.warn(
            f"{len(stored) - len(received)} stored verdict(s) in {path} were given by another judge or are damaged; "
            "they are asked for again",
            stacklevel=2,
        )
    verdicts = []
    for answer in tqdm(answers, desc="MT-Bench judging", unit="question", disable=not progress):
        question = by_id[answer["question_id"]]
        for turn in (1, 2):
            if (question["question_id"], turn) in received:
                verdicts.append(received[question["question_id"], turn] | {"category": question["category"]})
                continue
            system, user = judge_prompt(question, answer, turn, references, prompts)
            text = call_judge(
                judge_url,
                judge_model,
                system,
                user,
                deadline_s=deadline_s,
                backoff_s=backoff_s,
                allow_insecure_key=allow_insecure_key,
            )
            verdict = {
                "question_id": question["question_id"],
                "category": question["category"],
                "turn": turn,
                "score": parse_rating(text),
                "judgment": text,
                "judge": judge,
            }
            verdicts.append(verdict)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(verdict) + "\n")
    scored = [v for v in verdicts if v["score"] is not None]
    if not scored:
        raise HybridPeftError("the judge never gave a [[rating]] from 1 to 10; is it an instruction-tuned model?")

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
