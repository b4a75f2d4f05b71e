"""The long-context task generators and scorers, without any model or download."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixkv.testbeds import tasks as T

GENERATORS = {"passkey": T.make_passkey, "kv_retrieval": T.make_kv_retrieval, "redundant": T.make_redundant}


class CharTokenizer:
    """Duck-typed stand-in for a HF tokenizer: one token per three characters.

    Its counts differ a lot from :func:`approx_token_count`, so fitting with it checks that the
    tokenizer, not the proxy, drives the length.
    """

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1] * (len(text) // 3)


def whole_number_count(text: str, number: str) -> int:
    return len(re.findall(rf"(?<!\d){re.escape(number)}(?!\d)", text))


# --------------------------------------------------------------------------------------------------------
# determinism


@pytest.mark.parametrize("task", sorted(T.TASKS))
def test_same_seed_same_sample_different_seed_different(task: str) -> None:
    make = T.TASKS[task]
    a, b = make(7, 800), make(7, 800)
    assert a == b
    c = make(8, 800)
    assert c.prompt != a.prompt
    assert c.answer != a.answer


def test_suite_is_deterministic_and_independent_of_other_tasks() -> None:
    one = T.make_suite(["passkey", "redundant"], 3, seed=11, length=600, tokenizer=None)
    two = T.make_suite(["passkey", "redundant"], 3, seed=11, length=600, tokenizer=None)
    assert one == two
    assert T.make_suite(["passkey"], 3, seed=12, length=600)[0] != one[0]
    # adding a task does not change another task's samples
    mixed = T.make_suite(["kv_retrieval", "passkey"], 3, seed=11, length=600)
    assert [s for s in mixed if s.task == "passkey"] == one[:3]


def test_generators_leave_global_random_state_alone() -> None:
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    T.make_suite(list(T.TASKS), 2, seed=1, length=400)
    assert random.random() == expected


def test_suite_spreads_depths_and_counts() -> None:
    suite = T.make_suite(list(T.TASKS), 5, seed=0, length=500)
    assert len(suite) == 5 * len(T.TASKS)
    assert [s.task for s in suite] == [t for t in T.TASKS for _ in range(5)]
    depths = [s.meta["depth"] for s in suite[:5]]
    assert depths == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    assert T.make_suite(["passkey"], 1, 0, 500)[0].meta["depth"] == 0.5
    assert T.make_suite(["passkey"], 0, 0, 500) == []


def test_suite_cycles_a_list_of_lengths() -> None:
    suite = T.make_suite(["passkey", "passage_qa"], 4, seed=2, length=[400, 1200])
    sizes = [T.approx_token_count(s.prompt) for s in suite]
    for size, want in zip(sizes, [400, 1200] * 4, strict=True):
        assert size == pytest.approx(want, rel=0.05)
    # one length as a list is that length
    assert T.make_suite(["passkey"], 2, 2, [400]) == T.make_suite(["passkey"], 2, 2, 400)
    for bad in ([], [0], [400, -1], [True]):
        with pytest.raises(ValueError, match="length"):
            T.make_suite(["passkey"], 1, 0, bad)


def test_sample_is_frozen() -> None:
    s = T.make_passkey(0, 300)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.answer = "1"  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------------
# content


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), length=st.integers(150, 3000), depth=st.floats(0.1, 0.9))
def test_passkey_invariants(seed: int, length: int, depth: float) -> None:
    s = T.make_passkey(seed, length, depth=depth)
    assert re.fullmatch(r"\d{5}", s.answer)
    # the key is the only number in the prompt, stated exactly once
    assert re.findall(r"\d+", s.prompt) == [s.answer]
    assert f"The pass key is {s.answer}. Remember it." in s.prompt
    assert s.prompt.rstrip().endswith("What is the pass key? Answer with the number only.")
    # the needle sits near the requested depth of the filler
    body = s.prompt.split("\n\n")[1]
    rel = body.index("The pass key is") / len(body)
    assert abs(rel - depth) < 0.1 + 60 / len(body)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    length=st.integers(150, 3000),
    depth=st.floats(0.1, 0.9),
    n_pairs=st.integers(1, 12),
)
def test_kv_retrieval_invariants(seed: int, length: int, depth: float, n_pairs: int) -> None:
    s = T.make_kv_retrieval(seed, length, depth=depth, n_pairs=n_pairs)
    key = s.meta["key"]
    assert re.fullmatch(r"\d{3}", s.answer)
    assert whole_number_count(s.prompt, s.answer) == 1
    assert f"The secret number for {key} is {s.answer}." in s.prompt
    assert s.prompt.rstrip().endswith(f"What is the secret number for {key}? Answer with the number only.")
    pairs = re.findall(r"The secret number for (\w+) is (\d+)\.", s.prompt)
    assert len(pairs) == s.meta["n_pairs"] == n_pairs
    keys = [k for k, _ in pairs]
    values = [v for _, v in pairs]
    assert len(set(keys)) == len(keys) and len(set(values)) == len(values)
    # the only numbers in the prompt are the values
    assert sorted(re.findall(r"\d+", s.prompt)) == sorted(values)
    body = s.prompt.split("\n\n")[1]
    rel = body.index(f"for {key} is") / len(body)
    assert abs(rel - depth) < 0.05 + 300 / len(body)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    length=st.integers(150, 3000),
    depth=st.floats(0.1, 0.9),
    n_informative=st.integers(1, 6),
)
def test_redundant_invariants(seed: int, length: int, depth: float, n_informative: int) -> None:
    s = T.make_redundant(seed, length, depth=depth, n_informative=n_informative)
    key = s.meta["key"]
    assert s.meta["informative"][key] == s.answer
    assert whole_number_count(s.prompt, s.answer) == 1
    assert s.prompt.rstrip().endswith(f"What is the {key}? Answer with the number only.")
    body = s.prompt.split("\n\n")[1]
    units = re.findall(r"[^.]+\.", body)
    informative = [u.strip() for u in units if u.strip() != "This part of the page is blank."]
    # everything but the few facts is the identical blank unit
    assert sorted(informative) == sorted(f"The {k} is {v}." for k, v in s.meta["informative"].items())
    assert len(informative) == n_informative
    assert len(units) - n_informative == s.meta["n_blank"] >= n_informative
    assert len(set(s.meta["informative"].values())) == n_informative
    pos = next(i for i, u in enumerate(units) if f"The {key} is" in u) / len(units)
    assert abs(pos - depth) < 0.05 + 5 / len(units)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), length=st.integers(200, 3000), depth=st.floats(0.1, 0.9),
       n_facts=st.integers(1, 4))
def test_passage_qa_invariants(seed: int, length: int, depth: float, n_facts: int) -> None:
    s = T.make_passage_qa(seed, length, depth=depth, n_facts=n_facts)
    assert s.meta["fact"] in s.prompt and s.answer in s.meta["fact"]
    assert whole_number_count(s.prompt, s.answer) == 1
    assert s.prompt.rstrip().endswith(f"Question: {s.meta['question']} Answer with the number only.")
    body = s.prompt.split("\n\n")[1]
    numbers = re.findall(r"\d+", body)
    assert len(numbers) == n_facts and len(set(numbers)) == n_facts  # one distinct value per fact
    # the question paraphrases the fact: not a copy of the sentence
    assert s.meta["question"] not in s.meta["fact"]
    rel = body.index(s.meta["fact"]) / len(body)
    assert abs(rel - depth) < 0.05 + 300 / len(body)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), length=st.integers(200, 3000), depth=st.floats(0.1, 0.9))
def test_multi_value_invariants(seed: int, length: int, depth: float) -> None:
    s = T.make_multi_value(seed, length, depth=depth)
    key = s.meta["key"]
    first, second = s.answer.split()
    assert f"One number for the {key} is {first}." in s.prompt
    assert f"Another number for the {key} is {second}." in s.prompt
    assert s.prompt.index(first) < s.prompt.index(second)
    # three numbers in all (the key's two and a distractor's), all distinct, each once
    numbers = re.findall(r"\d+", s.prompt)
    assert len(numbers) == 3 == len(set(numbers))
    assert s.prompt.rstrip().endswith(f"What are the two numbers for the {key}? Answer with the two numbers only.")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The two numbers are 852 and 826.", 1.0),
        ("826, 852", 1.0),
        ("852", 0.0),  # one of the two
        ("852 and 111", 0.0),
        ("852 and 852", 0.0),
        ("111, 852 and 826", 0.0),  # the first two numbers decide, as the first number does elsewhere
        ("none", 0.0),
    ],
)
def test_score_number_set(text: str, expected: float) -> None:
    sample = T.Sample("multi_value", "", "852 826", {"answer_kind": "number_set"})
    assert T.score(sample, text) == expected


def test_kv_key_named_first_unless_disabled() -> None:
    s = T.make_kv_retrieval(4, 600)
    head = s.prompt.split("\n\n")[0]
    assert f"Find the secret number for {s.meta['key']}." in head
    plain = T.make_kv_retrieval(4, 600, ask_first=False)
    assert s.meta["key"] not in plain.prompt.split("\n\n")[0]
    assert plain.answer == s.answer


def test_suite_options_reach_the_generator() -> None:
    suite = T.make_suite(["kv_retrieval", "redundant"], 2, 0, 500, options={"kv_retrieval": {"n_pairs": 7}})
    assert [s.meta.get("n_pairs") for s in suite] == [7, 7, None, None]
    with pytest.raises(ValueError, match="accepted"):
        T.make_suite(["passkey"], 1, 0, 500, options={"kv": {"n_pairs": 2}})


def test_parameter_ranges_checked() -> None:
    with pytest.raises(ValueError, match="n_pairs"):
        T.make_kv_retrieval(0, 300, n_pairs=0)
    with pytest.raises(ValueError, match="n_informative"):
        T.make_redundant(0, 300, n_informative=99)
    with pytest.raises(ValueError, match="n_facts"):
        T.make_passage_qa(0, 300, n_facts=5)


# --------------------------------------------------------------------------------------------------------
# lengths


@pytest.mark.parametrize("task", sorted(T.TASKS))
@pytest.mark.parametrize("length", [300, 1000, 2000, 4000])
def test_length_on_target_with_proxy(task: str, length: int) -> None:
    s = T.TASKS[task](3, length)
    assert T.approx_token_count(s.prompt) == pytest.approx(length, rel=0.05)


@pytest.mark.parametrize("task", sorted(T.TASKS))
def test_length_on_target_with_tokenizer(task: str) -> None:
    tok = CharTokenizer()
    s = T.TASKS[task](3, 1500, tok)
    assert len(tok.encode(s.prompt)) == pytest.approx(1500, rel=0.05)
    # and the tokenizer changed the fit (its counts differ from the proxy's)
    assert s.prompt != T.TASKS[task](3, 1500).prompt


def test_approx_token_count_splits_digits() -> None:
    assert T.approx_token_count("The pass key is 12345.") == 4 + 1 + 5 + 1
    assert T.approx_token_count("a\nb") == 3


def test_real_tokenizer_api_and_chat_template() -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    core = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [tokenizers.pre_tokenizers.Whitespace(), tokenizers.pre_tokenizers.Digits(individual_digits=True)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    s = T.make_kv_retrieval(5, 700, tok)
    assert len(tok.encode(s.prompt, add_special_tokens=False)) == pytest.approx(700, rel=0.05)

    assert T.build_prompt(tok, s) == f"{s.prompt}\nAnswer:"  # no template: plain fallback
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert T.build_prompt(tok, s) == f"<|user|>{s.prompt}<|end|><|assistant|>"


def test_build_prompt_without_tokenizer() -> None:
    s = T.make_passkey(0, 200)
    assert T.build_prompt(None, s).startswith(s.prompt)


# --------------------------------------------------------------------------------------------------------
# scoring

NUM = T.Sample(task="passkey", prompt="", answer="48213", meta={"answer_kind": "number"})
WORD = T.Sample(
    task="colour", prompt="", answer="green", meta={"answer_kind": "word", "choices": ["red", "green", "blue"]}
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("48213", 1.0),
        ("  48213\n", 1.0),
        ("The pass key is 48213.", 1.0),
        ("**48213**", 1.0),
        ("48,213", 1.0),
        ("48213 is the pass key, not 11111", 1.0),
        ("The pass key is 48214.", 0.0),
        ("4821", 0.0),
        ("482135", 0.0),
        ("11111 or 48213", 0.0),
        ("I do not know.", 0.0),
        ("", 0.0),
    ],
)
def test_score_number(text: str, expected: float) -> None:
    assert T.score(NUM, text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("green", 1.0),
        ("Green.", 1.0),
        ("  The colour is GREEN!\n", 1.0),
        ("The cell is green, not red", 1.0),
        ("greenish", 0.0),
        ("red", 0.0),
        ("blue, no, green", 0.0),
        ("no idea", 0.0),
    ],
)
def test_score_word(text: str, expected: float) -> None:
    assert T.score(WORD, text) == expected


@pytest.mark.parametrize("task", sorted(T.TASKS))
def test_generated_answers_score_themselves(task: str) -> None:
    s = T.TASKS[task](1, 400)
    assert T.score(s, s.answer) == 1.0
    assert T.score(s, f" The answer is {s.answer}.") == 1.0
    assert T.score(s, "nothing") == 0.0


# --------------------------------------------------------------------------------------------------------
# errors


def test_unknown_task_names_accepted_ones() -> None:
    with pytest.raises(ValueError, match="passkey") as info:
        T.make_suite(["passkey", "needle"], 1, 0, 300)
    msg = str(info.value)
    assert "needle" in msg
    for name in T.TASKS:
        assert name in msg
    with pytest.raises(ValueError, match="accepted"):
        T.validate_tasks("bogus")


def test_bad_depth_rejected() -> None:
    with pytest.raises(ValueError, match="depth"):
        T.make_passkey(0, 300, depth=1.5)
