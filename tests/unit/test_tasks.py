"""The seeded accuracy tasks: reproducible, about the asked length, answer inside."""

from __future__ import annotations

import pytest

from harness import tasks
from harness.tasks import ALL_TASKS, FORCED_TASKS, RETRIEVAL_TASKS, TASKS, Sample, TaskGenerator, is_correct


@pytest.fixture(scope="module")
def generator(tokenizer):
    return TaskGenerator(tokenizer)


@pytest.mark.parametrize("task", ALL_TASKS)
@pytest.mark.parametrize("context", [1024, 2048])
def test_samples_are_seeded_and_about_the_asked_length(generator, tokenizer, task, context):
    samples = generator.samples(task, context, 3, seed=0)
    again = generator.samples(task, context, 3, seed=0)
    other = generator.samples(task, context, 3, seed=1)
    assert [s.prompt_ids for s in samples] == [s.prompt_ids for s in again]
    assert [s.prompt_ids for s in samples] != [s.prompt_ids for s in other]
    for s in samples:
        assert s.task == task and s.context == context
        if task == "generation":
            # A short prompt; the rest of the window is forced, one decode step each.
            assert len(s.prompt_ids) == tasks.GENERATION_PROMPT_TOKENS
            assert len(s.prompt_ids) + len(s.forced_ids) == context and s.answer == ""
            continue
        assert 0.85 * context <= len(s.prompt_ids) <= 1.15 * context
        if task == "loss":
            # The prompt and its forced continuation are one window of the text.
            assert s.answer == "" and len(s.forced_ids) == tasks.forced_tokens(context)
            assert len(s.prompt_ids) + len(s.forced_ids) == context
            continue
        text = tokenizer.decode(s.prompt_ids)
        # The answer is in the prompt, before the last 10% (the recent window).
        head = tokenizer.decode(s.prompt_ids[: int(0.9 * len(s.prompt_ids))])
        assert s.answer in head and s.answer.replace("-", "").isdigit()
        assert text.rstrip().endswith(("is", "="))


def test_multikey_asks_for_one_of_several_similar_keys(generator, tokenizer):
    for s in generator.samples("multikey", 1024, 4, seed=3):
        text = tokenizer.decode(s.prompt_ids)
        assert text.count("The pass key of the") == 5  # four needles and the question
        assert text.count(s.answer) == 1


def test_passkey_long_asks_for_twenty_digits_stated_twice(generator, tokenizer):
    for s in generator.samples("passkey-long", 1024, 4, seed=2):
        groups = s.answer.split("-")
        assert len(groups) == 4 and all(len(g) == 5 and g.isdigit() for g in groups)
        assert tokenizer.decode(s.prompt_ids).count(s.answer) == 2
        # Every digit is a token of its own: the answer is ~24 tokens to copy.
        assert len(tokenizer.encode(" " + s.answer, add_special_tokens=False)) >= 20


def test_answers_are_matched_as_whole_numbers():
    sample = Sample("passkey-repeat", [], 100, "12345")
    assert is_correct(sample, " 12345. Remember it.")
    assert not is_correct(sample, " 123456")
    assert not is_correct(sample, " 912345")
    assert not is_correct(sample, " 1234")


def test_unknown_task_names_the_allowed_ones(generator):
    with pytest.raises(ValueError, match="unknown task 'needle': allowed tasks are passkey-repeat"):
        generator.samples("needle", 1024, 1, 0)


def test_missing_text_names_the_debian_package(monkeypatch, tmp_path, tokenizer):
    monkeypatch.setattr(tasks, "FORTUNES_DIR", tmp_path)
    with pytest.raises(tasks.MissingTextError, match=r"apt-get install -y fortunes"):
        TaskGenerator(tokenizer).samples("passkey-natural", 1024, 1, 0)


def test_tasks_are_retrieval_or_forced():
    assert set(TASKS) - set(RETRIEVAL_TASKS) == {"loss"}
    assert set(ALL_TASKS) == set(RETRIEVAL_TASKS) | set(FORCED_TASKS)


def test_generation_continues_its_prompt_in_the_text(generator):
    text = generator.encode(tasks.long_text())
    for s in generator.samples("generation", 1024, 2, seed=0):
        window = [*s.prompt_ids, *s.forced_ids]
        starts = [i for i in range(len(text) - len(window) + 1) if text[i] == window[0]]
        assert any(text[i : i + len(window)] == window for i in starts)
