"""MT-Bench: judge prompts, the judge client against a fake local judge, and the clear error without a judge."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

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


class ScriptedJudge(BaseHTTPRequestHandler):
    """Answers from a script, one entry per request: ("ok", rating), ("status", code), ("close",), ("empty",),
    ("null",); records the Authorization header it saw."""

    script: list[tuple] = []
    seen: list[dict] = []

    def do_GET(self) -> None:  # noqa: N802 - what a followed 302 would send
        ScriptedJudge.seen.append({"authorization": self.headers.get("Authorization")})
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        ScriptedJudge.seen.append({"authorization": self.headers.get("Authorization")})
        step = ScriptedJudge.script.pop(0) if ScriptedJudge.script else ("ok", 6)
        if step[0] == "close":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if step[0] == "status":
            self.send_response(step[1])
            self.send_header("Content-Length", "0")
            self.send_header("Retry-After", "0")
            self.end_headers()
            return
        choices = {
            "ok": [{"message": {"content": f"Rating: [[{step[-1]}]]"}}],
            "empty": [],
            "null": [{"message": {"content": None}}],
        }[step[0]]
        data = json.dumps({"choices": choices}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


@pytest.fixture
def scripted_judge():  # noqa: ANN201
    ScriptedJudge.script, ScriptedJudge.seen = [], []
    server = HTTPServer(("127.0.0.1", 0), ScriptedJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def some_answers(count: int = 2) -> list[dict]:
    questions, _, _ = load_mt_bench(DATA)
    chosen = questions[:count]
    return [{"question_id": q["question_id"], "category": q["category"], "turns": ["a", "b"]} for q in chosen]


def test_scores_outside_one_to_ten_are_not_counted(scripted_judge: str) -> None:
    ScriptedJudge.script = [("ok", 42), ("ok", 8), ("ok", 0), ("ok", 4)]
    result = judge_answers(some_answers(), scripted_judge, "judge", DATA, progress=False, backoff_s=0)
    assert result["unparsed"] == 2 and result["score"] == 6.0
    assert [v["score"] for v in result["verdicts"]] == [None, 8.0, None, 4.0]


def test_transient_failures_are_retried(scripted_judge: str) -> None:
    ScriptedJudge.script = [("status", 429), ("status", 503), ("close",), ("ok", 7)]
    result = judge_answers(some_answers(1), scripted_judge, "judge", DATA, progress=False, backoff_s=0)
    assert result["verdicts"][0]["score"] == 7.0 and len(ScriptedJudge.seen) == 5


@pytest.mark.parametrize(("failure", "message"), [("empty", "without choices"), ("null", "empty message")])
def test_a_reply_without_a_verdict_is_a_clear_error(scripted_judge: str, failure: str, message: str) -> None:
    from hybrid_peft.tasks.mt_bench import JudgeError

    ScriptedJudge.script = [(failure,)]
    with pytest.raises(JudgeError, match=message):
        judge_answers(some_answers(1), scripted_judge, "judge", DATA, progress=False, backoff_s=0)


def test_verdicts_survive_a_failing_judge_and_judging_resumes(scripted_judge: str, tmp_path: Path) -> None:
    from hybrid_peft.tasks.mt_bench import JudgeError, read_verdicts

    verdicts = tmp_path / "verdicts.jsonl"
    ScriptedJudge.script = [("ok", 5), ("ok", 6), *[("status", 500)] * 5]
    with pytest.raises(JudgeError, match="--judge-only"):
        judge_answers(
            some_answers(), scripted_judge, "judge", DATA, progress=False, verdicts_file=verdicts, backoff_s=0
        )
    assert [v["score"] for v in read_verdicts(verdicts)] == [5.0, 6.0]
    ScriptedJudge.script, ScriptedJudge.seen = [("ok", 7), ("ok", 8)], []
    result = judge_answers(
        some_answers(), scripted_judge, "judge", DATA, progress=False, verdicts_file=verdicts, backoff_s=0
    )
    assert len(ScriptedJudge.seen) == 2, "verdicts already received were asked for again"
    assert [v["score"] for v in result["verdicts"]] == [5.0, 6.0, 7.0, 8.0]


def test_api_key_only_over_https_unless_allowed(scripted_judge: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    judge_answers(some_answers(1), scripted_judge, "judge", DATA, progress=False)
    assert all(seen["authorization"] is None for seen in ScriptedJudge.seen)
    ScriptedJudge.seen = []
    judge_answers(some_answers(1), scripted_judge, "judge", DATA, progress=False, allow_insecure_key=True)
    assert all(seen["authorization"] == "Bearer sk-test" for seen in ScriptedJudge.seen)


class RedirectingJudge(BaseHTTPRequestHandler):
    """Answers every POST with a redirect to ``target``."""

    target = ""

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(302)
        self.send_header("Location", RedirectingJudge.target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


@pytest.fixture
def redirecting_judge():  # noqa: ANN201
    server = HTTPServer(("127.0.0.1", 0), RedirectingJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_a_redirect_to_another_origin_is_not_followed_and_never_carries_the_key(
    redirecting_judge: str, scripted_judge: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hybrid_peft.tasks.mt_bench import JudgeError

    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    RedirectingJudge.target = scripted_judge + "/chat/completions"  # another port: another origin
    ScriptedJudge.script = [("ok", 9)]
    with pytest.raises(JudgeError, match="redirected to .*not followed"):
        judge_answers(
            some_answers(1), redirecting_judge + "/v1", "judge", DATA, progress=False, allow_insecure_key=True
        )
    assert ScriptedJudge.seen == [], "the other origin was contacted"


def test_stored_verdicts_are_checked_and_tied_to_their_judge(scripted_judge: str, tmp_path: Path) -> None:
    verdicts = tmp_path / "verdicts.jsonl"
    answers = some_answers(2)
    first, second = answers[0]["question_id"], answers[1]["question_id"]
    judge = {"url": scripted_judge, "model": "judge"}
    stored = [
        {"question_id": first, "turn": 1, "score": 42, "judgment": "[[42]]", "judge": judge},  # out of range
        {"question_id": first, "turn": 2, "score": "NaN", "judgment": "[[5]]", "judge": judge},  # not its text's
        {"question_id": second, "turn": 1, "score": 3.0, "judgment": "[[3]]", "judge": {**judge, "model": "other"}},
        {"question_id": 99999, "turn": 1, "score": 3.0, "judgment": "[[3]]", "judge": judge},  # unknown question
        {"question_id": second, "turn": 2, "score": 6.0, "judgment": "Rating: [[6]]", "judge": judge},  # reusable
    ]
    verdicts.write_text("".join(json.dumps(v) + "\n" for v in stored))
    ScriptedJudge.script = [("ok", 7), ("ok", 7), ("ok", 7)]
    with pytest.warns(UserWarning, match="4 stored verdict"):
        result = judge_answers(answers, scripted_judge, "judge", DATA, progress=False, verdicts_file=verdicts)
    assert len(ScriptedJudge.seen) == 3, "only the valid verdict of this judge is reused"
    assert [v["score"] for v in result["verdicts"]] == [7.0, 7.0, 7.0, 6.0] and result["score"] == 6.75
    with pytest.raises(HybridPeftError, match="question ids MT-Bench does not have"):
        judge_answers([{"question_id": 99999, "turns": ["a", "b"]}], scripted_judge, "judge", DATA, progress=False)
