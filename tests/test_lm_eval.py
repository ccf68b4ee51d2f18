"""A client nobody here wrote: EleutherAI's lm-evaluation-harness against a live `nanoseek serve`, through its
`local-completions` (log-likelihoods from echo + logprobs, and generation) and `local-chat-completions` models,
on tasks whose files the test writes (no download). Its scores must be the model's own, as `LLM` computes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_serve import MODEL, Server, write_checkpoint

from nanoseek.engine import LLM, SamplingParams

QUESTIONS = [
    {"question": "What is 2 + 3?", "choices": ["5", "6", "7"], "answer": 0},
    {"question": "What is 4 + 4?", "choices": ["9", "8", "7"], "answer": 1},
    {"question": "Which word is a colour?", "choices": ["cat", "run", "red"], "answer": 2},
    {"question": "What comes after Monday?", "choices": ["Tuesday", "Sunday", "May"], "answer": 0},
]
TASKS = {
    "nanoseek_mc": {"output_type": "multiple_choice", "doc_to_text": "Q: {{question}}\nA:",
                    "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]},
    "nanoseek_gen": {"output_type": "generate_until", "doc_to_text": "Q: {{question}}\nA:",
                     "doc_to_target": "{{choices[answer]}}", "metric_list": [{"metric": "exact_match"}],
                     "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}},
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """Both tasks as lm-eval YAML (JSON is YAML) over one local JSON-lines file."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    (folder / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    for name, fields in TASKS.items():
        task = {"task": name, "dataset_path": "json", "test_split": "test",
                "dataset_kwargs": {"data_files": {"test": str(folder / "questions.jsonl")}}, **fields}
        (folder / f"{name}.yaml").write_text(json.dumps(task))
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("lm-eval") / "tiny")


@pytest.fixture(scope="module")
def served(checkpoint):
    server = Server(checkpoint, "--max-num-seqs", "4", "--max-model-len", "512")
    yield server
    server.stop()


def lm_eval(tasks: Path, out: Path, model: str, model_args: str, task: str, *extra: str) -> list[dict]:
    """Run the harness's command line; the logged samples of `task`."""
    command = [str(Path(sys.executable).parent / "lm_eval"), "run", "--model", model, "--model_args", model_args,
               "--include_path", str(tasks), "--tasks", task, "--log_samples", "--output_path", str(out), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (samples,) = out.glob(f"*/samples_{task}_*.jsonl")
    return [json.loads(line) for line in samples.read_text().splitlines()]


def completions_args(served: Server, checkpoint: Path) -> str:
    return (f"model={MODEL},base_url={served.base}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={checkpoint},num_concurrent=4,max_retries=1")


def test_log_likelihoods_through_local_completions_are_the_models(served, checkpoint, tasks, tmp_path):
    samples = lm_eval(tasks, tmp_path, "local-completions", completions_args(served, checkpoint), "nanoseek_mc")
    assert sorted(s["doc_id"] for s in samples) == list(range(len(QUESTIONS)))
    llm = LLM(checkpoint, max_model_len=512)
    scoring = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    for sample in samples:
        for (score, greedy), request in zip(sample["filtered_resps"], sample["arguments"].values(), strict=True):
            context = llm.tokenizer.encode(request["arg_0"], add_special_tokens=False)
            continuation = llm.tokenizer.encode(request["arg_1"], add_special_tokens=False)
            scored = llm.generate(context + continuation, scoring)[0].prompt_logprobs[len(context):]
            tokens = zip(continuation, scored, strict=True)
            assert float(score) == pytest.approx(sum(entry[t] for t, entry in tokens), abs=1e-4)
            is_greedy = all(entry[t] == max(entry.values()) for t, entry in zip(continuation, scored, strict=True))
            assert greedy == str(is_greedy)
        assert sample["acc"] == float(max(range(3), key=lambda c: float(sample["filtered_resps"][c][0]))
                                      == sample["doc"]["answer"])


def test_generation_through_local_completions_and_local_chat_completions(served, checkpoint, tasks,
                                                                         tmp_path):
    llm = LLM(checkpoint, max_model_len=512)
    greedy = SamplingParams(max_tokens=8, temperature=0, stop=["\n"])
    samples = lm_eval(tasks, tmp_path / "text", "local-completions", completions_args(served, checkpoint),
                      "nanoseek_gen")
    for sample in samples:
        prompt = llm.tokenizer.encode(sample["arguments"]["gen_args_0"]["arg_0"], add_special_tokens=False)
        assert sample["filtered_resps"] == [llm.generate(prompt, greedy)[0].outputs[0].text]
    chat_args = f"model={MODEL},base_url={served.base}/v1/chat/completions,num_concurrent=4,max_retries=1"
    chats = lm_eval(tasks, tmp_path / "chat", "local-chat-completions", chat_args, "nanoseek_gen",
                    "--apply_chat_template")
    assert sorted(s["doc_id"] for s in chats) == list(range(len(QUESTIONS)))
    for sample in chats:
        (messages,) = sample["arguments"]["gen_args_0"]["arg_0"]
        reply = llm.chat(json.loads(messages), greedy)[0].outputs[0]
        assert sample["filtered_resps"] == [reply.content]  # the answer after the think block, as served
