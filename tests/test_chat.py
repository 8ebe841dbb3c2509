"""task=chat: exact assistant boundaries for three real template styles (with and without
{% generation %} markers), the truncation policy, the cache key, mixing with Alpaca files, every bad
input, learning a generated conversation task, packed = padded, and 2 ZeRO-3 ranks = 1 process.

The templates in fixtures/chat_templates are the published ones of Llama-3-Instruct (llama3),
Qwen2-Instruct (chatml_qwen) and Mistral-7B-Instruct-v0.1 (mistral_inst); the *_generation ones
are Llama-3 and ChatML with {% generation %} around the assistant output. The tiny model gets the
special tokens those templates use, as the real models' tokenizers have them.
"""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from conftest import as_argv, launch_ok, read_metrics, train_losses, write_jsonl
from harness import chat_template, data_cache, default_assets, evaluation
from harness.config import EvalConfig, TrainConfig
from harness.data import IGNORE_INDEX
from harness.dist import DistInfo
from harness.errors import HarnessError
from harness.tasks import chat
from harness.train import preflight, run

CPU1 = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]"]
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome, the eternal city."}]
END_OF_TURN = {"llama3": "<|eot_id|>", "llama3_generation": "<|eot_id|>", "chatml_qwen": "<|im_end|>",
               "chatml_generation": "<|im_end|>", "mistral_inst": "</s>"}


@pytest.fixture(scope="session")
def chat_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with the special tokens of the three template families (no chat template)."""
    from transformers import AutoTokenizer

    tokenizer_dir = tmp_path_factory.mktemp("chat_tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS})
    tokenizer.save_pretrained(tokenizer_dir)
    shutil.copyfile(tiny_model / default_assets.SPM_MODEL_FILE, tokenizer_dir / default_assets.SPM_MODEL_FILE)
    out = tmp_path_factory.mktemp("chat_model")
    default_assets.build_tiny_model(out, tokenizer_dir)
    return out


@pytest.fixture(scope="module")
def tokenizer(chat_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_model)


def conversations_of(messages_list):
    return [chat.Conversation(row=i, prompt="", target=m[-1]["content"], golds=(m[-1]["content"],),
                              messages=tuple((x["role"], x["content"]) for x in m)) for i, m in enumerate(messages_list)]


def tokenized_rows(messages_list, tokenizer, template, seq_len=512):
    cfg = TrainConfig(task="chat", chat_template=str(template))
    tokenized = chat.tokenize_examples(conversations_of(messages_list), cfg, tokenizer, seq_len)
    return tokenized.to_list()


def supervised_spans(row) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, label in enumerate(row["labels"] + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


# --- exact boundaries --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(END_OF_TURN))
def test_supervised_tokens_are_the_assistant_turns_exactly(name, tokenizer):
    template = TEMPLATES / f"{name}.jinja"
    messages = CONVERSATION[1:] if name == "mistral_inst" else CONVERSATION  # v0.1 refuses a system turn
    (row,) = tokenized_rows([messages], tokenizer, template)
    ids, labels = row["input_ids"], row["labels"]
    eot = END_OF_TURN[name]
    assert [tokenizer.decode(ids[s:e]) for s, e in supervised_spans(row)] == [f"Paris.{eot}",
                                                                             f"Rome, the eternal city.{eot}"]
    assert all(labels[i] == ids[i] for s, e in supervised_spans(row) for i in range(s, e))
    # The row is the template's rendering, ending with the last end-of-turn token (ChatML's
    # newline after it is masked and at the end, so it is not kept).
    rendered = tokenizer.apply_chat_template(messages, chat_template=template.read_text(), tokenize=False)
    assert rendered.startswith(tokenizer.decode(ids)) and not rendered[len(tokenizer.decode(ids)):].strip()
    masked = tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE_INDEX])
    assert "Capital of France?" in masked and "And of Italy?" in masked and "Paris" not in masked and "Rome" not in masked
    assert row["target_len"] == sum(e - s for s, e in supervised_spans(row))
    assert row["prompt_len"] + row["target_len"] == len(ids)


@pytest.mark.parametrize("plain, marked", [("llama3", "llama3_generation"), ("chatml_qwen", "chatml_generation")])
def test_generation_markers_and_prefix_rendering_give_the_same_labels(plain, marked, tokenizer):
    rng = random.Random(0)
    conversations = [CONVERSATION, CONVERSATION[1:], CONVERSATION[:3]]
    for _ in range(6):  # random multi-turn conversations, with and without a system turn
        turns = [m for _ in range(rng.randint(1, 3)) for m in (
            {"role": "user", "content": " ".join(rng.sample(default_assets.WORDS, 3)) + "?"},
            {"role": "assistant", "content": " ".join(rng.sample(default_assets.WORDS, rng.randint(1, 4)))})]
        conversations.append(([{"role": "system", "content": "Answer."}] if rng.random() < 0.5 else []) + turns)
    by_prefix = tokenized_rows(conversations, tokenizer, TEMPLATES / f"{plain}.jinja")
    by_marker = tokenized_rows(conversations, tokenizer, TEMPLATES / f"{marked}.jinja")
    assert [r["input_ids"] for r in by_prefix] == [r["input_ids"] for r in by_marker]
    assert [r["labels"] for r in by_prefix] == [r["labels"] for r in by_marker]
    assert [len(supervised_spans(r)) for r in by_prefix] == [sum(m["role"] == "assistant" for m in c)
                                                            for c in conversations]


# --- truncation policy -------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len, opening, kept, context_cut, turn_cut", [
    (20, 2, list(range(20)), False, False),  # fits
    (15, 2, [0, 1] + list(range(8, 20)), True, False),  # the oldest exchange goes, the opening stays
    (6, 2, [0, 1, 16, 17, 18, 19], True, False),  # last exchange only: its context loses its start
    (4, 2, [0, 1, 17, 18], True, True),  # context keeps half the budget, the last turn is cut at its end
    (8, 5, list(range(15, 20)), True, False),  # an opening over half of seq_len is the oldest turn
])
def test_truncation_drops_oldest_turns_and_keeps_the_last_turns_start(seq_len, opening, kept, context_cut, turn_cut):
    # 20 tokens; assistant turns at [5, 8), [12, 14), [18, 20); a newline after the second turn,
    # so exchanges start after the opening, at 8 and at 15.
    spans, breaks = [(5, 8), (12, 14), (18, 20)], [8, 15]
    assert chat_template.kept_positions(20, spans, opening, breaks, seq_len) == (kept, context_cut, turn_cut)
    keep, _, _ = chat_template.kept_positions(20, spans, opening, breaks, seq_len)
    assert 18 in keep and len(keep) <= seq_len


def test_truncated_conversation_keeps_system_and_newest_turns(tokenizer):
    template = TEMPLATES / "chatml_qwen.jinja"
    third = CONVERSATION + [{"role": "user", "content": "And Spain?"}, {"role": "assistant", "content": "Madrid."}]
    (full,) = tokenized_rows([third], tokenizer, template)
    (cut,) = tokenized_rows([third], tokenizer, template, seq_len=len(full["input_ids"]) - 1)
    text = tokenizer.decode(cut["input_ids"])
    # What the template renders for the conversation without its first exchange.
    assert text == tokenizer.apply_chat_template([third[0]] + third[3:], chat_template=template.read_text(),
                                                 tokenize=False).removesuffix("\n")
    assert [tokenizer.decode(cut["input_ids"][s:e]) for s, e in supervised_spans(cut)] == [
        "Rome, the eternal city.<|im_end|>", "Madrid.<|im_end|>"]
    assert cut["prompt_truncated"] and not cut["target_truncated"] and not full["prompt_truncated"]
    assert cut["prompt_len"] == full["prompt_len"] and cut["target_len"] == full["target_len"]  # before truncation


def test_eval_prompt_is_the_conversation_up_to_the_last_turn_with_the_generation_prompt(tokenizer):
    template = TEMPLATES / "llama3.jinja"
    cfg = TrainConfig(task="chat", chat_template=str(template), chat_eval_generations=1)
    examples = conversations_of([CONVERSATION, CONVERSATION[:3]])
    rows, prompts, stops = chat.eval_tokens(examples, cfg, tokenizer, 512, room=8)
    assert len(rows) == 2 and len(prompts) == 1
    assert tokenizer.decode(prompts[0]) == tokenizer.apply_chat_template(
        CONVERSATION[:-1], chat_template=template.read_text(), tokenize=False, add_generation_prompt=True)
    assert stops == sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")})
    # seq_len 40, room 8 for the reply: the system opening (18 tokens) stays, the first exchange goes,
    # and the last user turn keeps its newest max(min(its length, 22 // 2), 22 - 8) = 14 tokens.
    opening = tokenizer("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>",
                        add_special_tokens=False)["input_ids"]
    assert prompts[0][: len(opening)] == opening and len(opening) == 18
    _, (short,), _ = chat.eval_tokens(examples, cfg, tokenizer, seq_len=40, room=8)
    assert short == opening + prompts[0][-14:]


# --- layouts, mixing, cache key ------------------------------------------------------------------


def test_sharegpt_openai_and_alpaca_rows_mix_in_one_run(chat_model, tmp_path):
    openai = write_jsonl(tmp_path / "openai.jsonl", [{"messages": CONVERSATION}] * 4)
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": [
        {"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."}]}] * 4)
    custom = write_jsonl(tmp_path / "custom.jsonl", [{"turns": [
        {"speaker": "customer", "text": "Capital of France?"}, {"speaker": "bot", "text": "Paris."}]}] * 4)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add.", "input": "2 3", "output": "5"}] * 4)
    plan = preflight(TrainConfig(model=str(chat_model), task="chat", chat_template="chatml", micro_batch_size=2,
                                 data=f"{openai}:1,{sharegpt}:1,{alpaca}:1", output_dir=str(tmp_path / "run")), CPU1)
    tokenizer = plan.tokenizer
    texts = {r.source: tokenizer.decode([t for t, label in zip(r.input_ids, r.labels) if label != IGNORE_INDEX])
             for r in plan.train_rows}
    assert texts == {0: "Paris.<|im_end|>Rome, the eternal city.<|im_end|>", 1: "Paris.<|im_end|>", 2: "5<|im_end|>"}
    alpaca_row = next(r for r in plan.train_rows if r.source == 2)
    assert tokenizer.decode(alpaca_row.input_ids) == "<|im_start|>user\nAdd.\n\n2 3<|im_end|>\n<|im_start|>assistant\n5<|im_end|>"
    assert tokenizer.chat_template == chat_template.CHATML  # carried into final/ and best/

    plan = preflight(TrainConfig(model=str(chat_model), task="chat", chat_template="chatml", micro_batch_size=2,
                                 data=str(custom), messages_field="turns", message_keys="speaker,text",
                                 role_names="{'customer': 'user', 'bot': 'assistant'}",
                                 output_dir=str(tmp_path / "run2")), CPU1)
    assert tokenizer.decode(plan.train_rows[0].input_ids) == (
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>")


def test_template_text_is_in_the_cache_key(chat_model, tmp_path):
    rows = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    template = tmp_path / "t.jinja"
    template.write_text((TEMPLATES / "chatml_qwen.jinja").read_text())

    def key(**flags):
        cfg = TrainConfig(model=str(chat_model), task="chat", data=str(rows), **flags)
        return data_cache.key_inputs(str(rows), str(chat_model), cfg, "", 128).key()

    by_file = key(chat_template=str(template))
    assert by_file == key(chat_template=template.read_text())  # the text counts, not how it was given
    assert by_file != key(chat_template="chatml") != key(chat_template=str(TEMPLATES / "llama3.jinja"))
    template.write_text(template.read_text().replace("You are a helpful assistant.", "Be helpful."))
    assert key(chat_template=str(template)) != by_file
    with_own = tmp_path / "own_template_model"
    shutil.copytree(chat_model, with_own)
    before = data_cache.tokenizer_digest(str(with_own))
    (with_own / "chat_template.jinja").write_text(chat_template.CHATML)  # how transformers saves a template
    assert data_cache.tokenizer_digest(str(with_own)) != before


# --- bad input: all in preflight, naming the rows ------------------------------------------------


@pytest.fixture
def chat_flags(chat_model, tmp_path):
    return dict(model=str(chat_model), task="chat", chat_template="chatml", micro_batch_size=1,
                output_dir=str(tmp_path / "run"))


def check(message, **flags):
    with pytest.raises(HarnessError, match=message):
        preflight(TrainConfig(**flags), CPU1)


def test_bad_conversations_are_named_by_row(chat_flags, tmp_path):
    good = {"messages": CONVERSATION}
    rows = [{"messages": []}, {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "user", "content": "hi"}]}, good,
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, {"messages": "hi"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(HarnessError) as err:
        preflight(TrainConfig(**chat_flags, data=str(path)), CPU1)
    message = str(err.value)
    assert "row 0: empty conversation" in message
    assert "row 1: unknown role(s) ['robot']" in message and "--role_names" in message
    assert "row 2: no assistant turn" in message
    assert "row 4: an empty assistant message" in message
    assert "row 5: a message without a text 'role' and 'content'" in message
    assert "row 6: field 'messages' is missing or not a list" in message
    assert "row 3" not in message


def test_template_errors_name_the_rows(chat_flags, tmp_path):
    user, answer = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    rows = [{"messages": [user, answer]}, {"messages": [user, user, answer]},
            {"messages": [user, {"role": "system", "content": "Be brief."}, answer]}]
    path = write_jsonl(tmp_path / "mistral.jsonl", rows)
    check(r"row 1: the chat template raised TemplateError: Conversation roles must alternate user/assistant",
          **{**chat_flags, "chat_template": str(TEMPLATES / "mistral_inst.jinja"), "data": str(path)})
    check(r"row 2: the chat template raised TemplateError: Only user and assistant roles are supported",
          **{**chat_flags, "chat_template": str(TEMPLATES / "mistral_inst.jinja"), "data": str(path)})


@pytest.mark.parametrize("template, message", [
    # Rewrites its first line as the conversation grows (as templates that drop earlier reasoning do).
    ("{{ '<|im_start|>system\\n' + (messages | length | string) + '<|im_end|>\\n' }}{% for m in messages %}"
     "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
     r"rows 0, 1: the template is not prefix-stable: .* assistant message 1 .*generation"),
    # The generation prompt ends in a space that the tokenizer merges into the reply's first word.
    ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|im_start|>assistant: ' }}{% endif %}",
     r"rows 0, 1: the tokens are not prefix-stable at assistant message 1: the tokenizer merges"),
    ("{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] + '\\n' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}",
     r"rows 0, 1: assistant message 1 is not followed by a special end-of-turn token"),
    ("{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{{ '<|im_end|>' }}{% endfor %}",
     r"rows 0, 1: assistant turn 1 \(as marked\) is not followed by a special end-of-turn token"),
    ("{% for m in messages %}{{ m['content'] }}", r"the chat template is not valid Jinja"),
    ("nosuchtemplate", r"--chat_template 'nosuchtemplate' is not a built-in name \(chatml\), not a file"),
])
def test_templates_without_exact_boundaries_are_refused(template, message, chat_flags, tmp_path):
    messages = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "the city of paris."}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}] * 2)
    check(message, **{**chat_flags, "chat_template": template, "data": str(path)})


def test_missing_template_and_chatml_without_its_tokens(chat_flags, tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}] * 2)
    check("the tokenizer has no chat template; give --chat_template", **{**chat_flags, "chat_template": "", "data": str(path)})
    check(r"--chat_template chatml: the tokenizer has no token <\|im_start\|> or <\|im_end\|>",
          **{**chat_flags, "model": str(tiny_model), "data": str(path)})
    check("--template is a prompt template", **{**chat_flags, "template": "{instruction}", "data": str(path)})
    check(r"--role_names 'bot': give a mapping", **{**chat_flags, "role_names": "bot", "data": str(path)})
    check("data has no field 'messages'", **{**chat_flags, "data": str(write_jsonl(tmp_path / "x.jsonl", [{"a": 1}]))})


# --- learning, packing, and 2 ZeRO-3 ranks = 1 process -------------------------------------------

COLOURS = {"apple": "red", "sky": "blue", "grass": "green", "sun": "yellow", "coal": "black", "snow": "white"}


def colour_conversations(n: int, seed: int) -> list[dict]:
    """1-3 exchanges asking the colour of a thing; the reply is its fixed colour."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": "Answer with a colour."}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            thing = rng.choice(sorted(COLOURS))
            messages += [{"role": "user", "content": f"what colour is the {thing}?"},
                         {"role": "assistant", "content": COLOURS[thing]}]
        rows.append({"messages": messages})
    return rows


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat_data")
    return (write_jsonl(folder / "train.jsonl", colour_conversations(240, 0)),
            write_jsonl(folder / "eval.jsonl", colour_conversations(24, 1)))


@pytest.mark.slow
def test_chat_learns_generated_conversations(chat_model, colour_data, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    run(TrainConfig(model=str(chat_model), task="chat", chat_template="chatml", data=str(colour_data[0]),
                    eval_data=str(colour_data[1]), output_dir=str(out), max_steps=120, eval_steps=120, lr=5e-3,
                    micro_batch_size=16, lr_schedule="constant", warmup_steps=5, dtype="fp32", eval_batch_size=16,
                    max_new_tokens=4, chat_eval_generations=16, log_every=20))
    evals = [m for m in read_metrics(out) if "eval/loss" in m]
    assert [m["step"] for m in evals] == [0, 120]
    assert evals[0]["eval/loss"] > 4 and evals[-1]["eval/loss"] < 0.3, evals
    predictions = [json.loads(line) for line in (out / "eval" / "step-120.predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 16 and [p["row"] for p in predictions] == list(range(16))
    assert sum(p["prediction"] == p["golds"][0] for p in predictions) >= 14, predictions  # stops at <|im_end|>
    assert AutoTokenizer.from_pretrained(out / "final").chat_template == chat_template.CHATML
    report = json.loads((out / "data_report.json").read_text())
    assert report["sources"][0]["rows_kept"] == 240


@pytest.mark.slow
def test_packed_chat_rows_train_like_padded_ones(chat_model, colour_data, tmp_path):
    flags = dict(model=str(chat_model), task="chat", chat_template=str(TEMPLATES / "llama3.jinja"),
                 data=str(colour_data[0]), max_steps=3, lr=1e-3, seed=3, dtype="fp32", micro_batch_size=8)
    run(TrainConfig(**flags, packing=False, output_dir=str(tmp_path / "padded")))
    run(TrainConfig(**flags, packing=True, output_dir=str(tmp_path / "packed")))
    assert train_losses(tmp_path / "packed") == pytest.approx(train_losses(tmp_path / "padded"), abs=1e-5)


@pytest.mark.slow
def test_chat_generation_two_zero3_ranks_equal_one_process(chat_model, colour_data, tmp_path):
    flags = dict(model=str(chat_model), data=str(colour_data[1]), task="chat", chat_template="chatml",
                 max_new_tokens=5, ds_config="zero3", eval_batch_size=4, dtype="fp32", chat_eval_generations=10)
    one = evaluation.run(EvalConfig(**flags, output_dir=str(tmp_path / "one")))
    launch_ok("torchrun", 2, as_argv({**flags, "output_dir": tmp_path / "two"}), script_name="evaluate.py")
    texts = [p["prediction"] for p in one.predictions]
    assert len(texts) == 10 and len(set(texts)) > 1
    two = [json.loads(line) for line in (tmp_path / "two" / "predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in two] == texts and [p["golds"] for p in two] == [p["golds"] for p in one.predictions]
    written = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert written["world_size"] == 2 and written["rows"] == 24
    assert written["metrics"]["loss"] == pytest.approx(one.metrics["eval/loss"], abs=1e-6)
