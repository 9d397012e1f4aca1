"""Writes the small synthetic data files the tests read (``python tests/data/make_fixtures.py``), in the layout
of the real benchmark data (GLUE TSV, GSM8K JSONL, XNLI dev TSV, FLORES-200 line files, MT-Bench JSONL) so that a
clone without any data folder runs every test. Every sentence is generated here from templates; none is taken
from the benchmarks. Deterministic: running it again rewrites the same bytes."""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUBJECTS = ["the film", "this movie", "the story", "the acting", "the soundtrack", "the plot", "the ending", "the cast"]
GOOD = ["wonderful", "moving", "brilliant", "delightful", "sharp", "warm", "gripping", "lovely"]
BAD = ["dull", "clumsy", "tedious", "flat", "messy", "boring", "lifeless", "awkward"]
ADVERBS = ["truly", "quite", "rather", "simply", "often", "mostly", "really", "oddly"]


def sentiment_rows(count: int, rng: random.Random) -> list[tuple[str, int]]:
    rows = []
    for _ in range(count):
        label = rng.randrange(2)
        word = rng.choice(GOOD if label else BAD)
        rows.append((f"{rng.choice(SUBJECTS)} is {rng.choice(ADVERBS)} {word}", label))
    return rows


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def glue(rng: random.Random) -> None:
    for split, count in (("train", 800), ("dev", 48)):
        rows = sentiment_rows(count, rng)
        write(HERE / "glue" / "SST-2" / f"{split}.tsv", "sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
        pairs = [(s, s.replace(" is ", " seems ") if y else s.replace(" is ", " is not "), y) for s, y in rows[:24]]
        write(
            HERE / "glue" / "MRPC" / f"{split}.tsv",
            "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
            + "".join(f"{y}\t{1000 + i}\t{2000 + i}\t{a}\t{b}\n" for i, (a, b, y) in enumerate(pairs)),
        )
        write(
            HERE / "glue" / "CoLA" / f"{split}.tsv",
            "".join(
                f"src{i % 3}\t{y}\t{'' if y else '*'}\t{s if y else ' '.join(reversed(s.split()))}\n"
                for i, (s, y) in enumerate(rows[:30])
            ),
        )


def gsm8k(rng: random.Random) -> None:
    for split, count in (("train", 40), ("test", 8)):
        lines = []
        for _ in range(count):
            a, b = rng.randrange(2, 40), rng.randrange(2, 40)
            question = f"Sam has {a} apples and buys {b} more. How many apples does Sam have now?"
            answer = f"Sam has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"
            lines.append(json.dumps({"question": question, "answer": answer}))
        write(HERE / "gsm8k" / f"{split}.jsonl", "\n".join(lines) + "\n")


XNLI_LANGUAGES = ["ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh"]


def xnli(rng: random.Random) -> None:
    for language in XNLI_LANGUAGES:
        lines = []
        for i in range(48):
            premise = f"[{language}] {rng.choice(SUBJECTS)} number {i} is {rng.choice(GOOD + BAD)}"
            label = ("entailment", "neutral", "contradiction")[i % 3]
            hypothesis = {"entailment": premise, "neutral": f"{premise} today", "contradiction": f"not {premise}"}[
                label
            ]
            lines.append(f"{premise}\t{hypothesis}\t{label}\n")
        write(HERE / "xnli" / f"dev-{language}.tsv", "".join(lines))


FLORES_LANGUAGES = ["arb_Arab", "deu_Latn", "fra_Latn", "hin_Deva", "npi_Deva", "spa_Latn", "swh_Latn", "yor_Latn",
                    "zho_Hans"]  # fmt: skip


def flores() -> None:
    for split, count in (("dev", 40), ("devtest", 6)):
        english = [f"sentence {i} of the {split} split is about {SUBJECTS[i % len(SUBJECTS)]}" for i in range(count)]
        write(HERE / "flores" / split / f"eng_Latn.{split}", "\n".join(english) + "\n")
        for code in FLORES_LANGUAGES:
            write(HERE / "flores" / split / f"{code}.{split}", "\n".join(f"<{code}> {s}" for s in english) + "\n")


MT_BENCH_CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]
SINGLE = "Rate the assistant's answer from 1 to 10 and write the rating as [[rating]]."


def mt_bench() -> None:
    questions, references = [], []
    for number in range(80):
        category = MT_BENCH_CATEGORIES[number // 10]
        question_id = 81 + number
        turns = [f"{category} question {question_id}: first turn?", f"{category} question {question_id}: follow-up?"]
        questions.append({"question_id": question_id, "category": category, "turns": turns})
        if category in ("math", "reasoning", "coding"):
            answer = {"index": 0, "turns": [f"reference {question_id} one", f"reference {question_id} two"]}
            references.append({"question_id": question_id, "model_id": "reference", "choices": [answer]})
    prompts = [
        {"name": "single-v1", "type": "single", "system_prompt": "You are a careful judge.",
         "prompt_template": f"{SINGLE}\n\n[Question]\n{{question}}\n\n[The Start of Assistant's Answer]\n{{answer}}\n"
                            "[The End of Assistant's Answer]"},
        {"name": "single-math-v1", "type": "single", "system_prompt": "You are a careful judge.",
         "prompt_template": f"{SINGLE}\n\n[Question]\n{{question}}\n\n[The Start of Reference Answer]\n{{ref_answer_1}}"
                            "\n[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n"
                            "[The End of Assistant's Answer]"},
        {"name": "single-v1-multi-turn", "type": "single", "system_prompt": f"{SINGLE} Grade the second answer.",
         "prompt_template": "### User:\n{question_1}\n\n### Assistant A:\n{answer_1}\n\n### User:\n{question_2}\n\n"
                            "### Assistant A:\n{answer_2}"},
        {"name": "single-math-v1-multi-turn", "type": "single", "system_prompt": f"{SINGLE} Grade the second answer.",
         "prompt_template": "### Reference answer:\n{ref_answer_1}\n{ref_answer_2}\n\n### User:\n{question_1}\n\n"
                            "### Assistant A:\n{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}"},
    ]  # fmt: skip
    folder = HERE / "mt_bench"
    write(folder / "question.jsonl", "".join(json.dumps(q) + "\n" for q in questions))
    write(folder / "reference_answer" / "gpt-4.jsonl", "".join(json.dumps(r) + "\n" for r in references))
    write(folder / "judge_prompts.jsonl", "".join(json.dumps(p) + "\n" for p in prompts))


if __name__ == "__main__":
    generator = random.Random(0)
    glue(generator)
    gsm8k(generator)
    xnli(generator)
    flores()
    mt_bench()
