"""MT-Bench: judge prompts, the judge client against a fake local judge, and the clear error without a judge."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from hybrid_peft.errors import HybridPeftError
from hybrid_peft.tasks.mt_bench import judge_answers, judge_prompt, load_mt_bench

from conftest import DATA


class FakeJudge(BaseHTTPRequestHandler):
    """Answers every grading request with rating 7 (turn 1) or 4 (turn 2), recording what it was sent."""

    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.received.append(body)
        rating = 4 if "### User:" in body["messages"][1]["content"] else 7
        reply = {"choices": [{"message": {"role": "assistant", "content": f"Fine. Rating: [[{rating}]]"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


def test_judge_prompts_use_references_for_math() -> None:
    questions, references, prompts = load_mt_bench(DATA)
    assert len(questions) == 80
    math = next(q for q in questions if q["category"] == "math")
    writing = next(q for q in questions if q["category"] == "writing")
    answer = {"turns": ["first answer", "second answer"]}
    _, text = judge_prompt(math, answer, 1, references, prompts)
    assert "[The Start of Reference Answer]" in text and "first answer" in text
    _, text = judge_prompt(writing, answer, 2, references, prompts)
    assert "second answer" in text and writing["turns"][1] in text and "Reference" not in text


def test_judging_against_a_local_judge() -> None:
    server = HTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        questions, _, _ = load_mt_bench(DATA)
        answers = [
            {"question_id": q["question_id"], "category": q["category"], "turns": ["a", "b"]} for q in questions[:3]
        ]
        result = judge_answers(answers, f"http://127.0.0.1:{server.server_port}/v1", "judge", DATA, progress=False)
    finally:
        server.shutdown()
    assert result["turn_1"] == 7 and result["turn_2"] == 4 and result["score"] == 5.5
    assert len(result["verdicts"]) == 6 and FakeJudge.received[0]["temperature"] == 0


def test_no_judge_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(HybridPeftError, match="--judge-url"):
        judge_answers([], None, "judge", DATA)
    from hybrid_peft.cli import main

    assert main(["mt-bench", "--model", "smollm2-135m"]) == 2
    assert "--answers-only" in capsys.readouterr().err
