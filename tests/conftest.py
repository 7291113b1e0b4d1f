"""Shared fixtures: tiny randomly initialised models built in the test (no files, seconds) and small LaMP data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tailor.backbone.model import Backbone
from tailor.tasks.lamp import MOVIE_TAGS, NEWS_CATEGORIES

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = ("the a movie film story article news review tweet user great bad good love hate politics sports travel "
         "crime business women religion comedy action fantasy romance classic violence dystopia score product "
         "headline paraphrase tag category description which relate among following just answer name without "
         "further explanation and is for of to in on with this that it was".split())


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in memory on task words, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS), *NEWS_CATEGORIES, *MOVIE_TAGS, "1 2 3 4 5 [1] [2]"] * 3
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<pad>")
    fast.chat_template = CHATML
    return fast


def tiny_config(family: str = "llama", vocab: int = 400):
    """A 2-layer config of the given family, small enough to run a forward in milliseconds."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, eos_token_id=1,
                  bos_token_id=0, pad_token_id=2, tie_word_embeddings=False)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=8)
    if family == "mistral":
        return tf.MistralConfig(**common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=64)
    if family == "phi3":
        return tf.Phi3Config(**common)
    raise ValueError(family)


def tiny_backbone(family: str = "llama", seed: int = 0, device: str = "cpu") -> Backbone:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    return Backbone(model.to(device), tiny_tokenizer(), name=f"tiny-{family}")


DEVICES = [pytest.param("cpu", id="cpu")] + (
    [pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])
"""Every device this machine has: tests on the tiny backbone run on each (`pytest -m gpu` runs the CUDA ones)."""


@pytest.fixture(scope="session", params=DEVICES)
def backbone(request: pytest.FixtureRequest) -> Backbone:
    return tiny_backbone(device=request.param)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved as a Hugging Face folder, for code that loads a model by path (the CLI, subprocesses)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    bb = tiny_backbone()
    bb.model.save_pretrained(folder)
    bb.tokenizer.save_pretrained(folder)
    return folder


def _news_question(rng: random.Random, qid: str, n_items: int) -> tuple[dict, dict]:
    favourite = rng.choice(NEWS_CATEGORIES)
    profile = []
    for i in range(n_items):
        category = favourite if rng.random() < 0.7 else rng.choice(NEWS_CATEGORIES)
        words = " ".join(rng.choices(WORDS, k=12))
        profile.append({"text": f"{category} {words}", "title": f"title {words[:20]}", "category": category,
                        "id": f"{qid}{i:03d}"})
    words = " ".join(rng.choices(WORDS, k=12))
    question = {"id": qid, "profile": profile,
                "input": "Which category does this article relate to among the following categories? Just answer "
                         "with the category name without further explanation. categories: ["
                         + ", ".join(NEWS_CATEGORIES) + f"] article: {favourite} {words}"}
    return question, {"id": qid, "output": favourite}


def _review_question(rng: random.Random, qid: str, n_items: int) -> tuple[dict, dict]:
    profile = [{"text": " ".join(rng.choices(WORDS, k=10)), "score": str(rng.randint(1, 5)), "id": f"{qid}{i:03d}"}
               for i in range(n_items)]
    question = {"id": qid, "profile": profile,
                "input": "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, "
                         "4, or 5 without further explanation. review: " + " ".join(rng.choices(WORDS, k=10))}
    return question, {"id": qid, "output": str(rng.randint(1, 5))}


def _tweet_question(rng: random.Random, qid: str, n_items: int) -> tuple[dict, dict]:
    profile = [{"text": " ".join(rng.choices(WORDS, k=8)), "id": f"{qid}{i:03d}"} for i in range(n_items)]
    gold = " ".join(rng.choices(WORDS, k=8))
    question = {"id": qid, "profile": profile,
                "input": f"Paraphrase the following tweet without any explanation before or after it: {gold}"}
    return question, {"id": qid, "output": gold}


def write_lamp_dir(root: Path, users: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A small LaMP-format data folder (LaMP_2N, LaMP_3, LaMP_7) with synthetic users in our flat layout."""
    rng = random.Random(seed)
    users = users or {"train": 12, "dev": 6}
    makers = {"LaMP_2N": ("21", _news_question), "LaMP_3": ("3", _review_question), "LaMP_7": ("7", _tweet_question)}
    for task_dir, (prefix, make) in makers.items():
        folder = root / task_dir
        folder.mkdir(parents=True, exist_ok=True)
        counter = 0
        for split, count in users.items():
            questions, golds = [], []
            for _ in range(count):
                question, gold = make(rng, f"{prefix}{counter:05d}", rng.randint(3, 8))
                counter += 1
                questions.append(question)
                golds.append(gold)
            (folder / f"{split}_questions.json").write_text(json.dumps(questions))
            (folder / f"{split}_outputs.json").write_text(json.dumps({"task": task_dir, "golds": golds}))
    return root


@pytest.fixture(scope="session")
def lamp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lamp_dir(tmp_path_factory.mktemp("lamp"))


@pytest.fixture()
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache folder of the test's own, so that no test reads generations or fits another test cached."""
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared, busy machine lose up to 10x to it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
