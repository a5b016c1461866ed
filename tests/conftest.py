"""Shared test set-up: offline Hugging Face, one torch thread (tiny models run many times faster
single-threaded on a small, shared CPU), and small toy-world fixtures."""

import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def run_smclm(*args, cwd=None, env=None, timeout=300):
    """`smclm <args>` as a user runs it: a subprocess, offline, output captured. ``env`` entries
    override the environment (None removes a variable)."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for key, value in (env or {}).items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = str(value)
    return subprocess.run(
        [sys.executable, "-m", "smclm.cli", *args],
        capture_output=True,
        text=True,
        env=full,
        cwd=cwd,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def toy_world():
    """(base model, tokenizer) of the default toy world (V=12, seed 0)."""
    from smclm.models.toy import build_toy_world

    return build_toy_world(vocab_size=12, seed=0)


def save_tiny_lm(path, arch: str, vocab_size: int = 12, seed: int = 0):
    """A tiny randomly initialised GPT-Neo or GPT-2 with the toy tokenizer, saved to path."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM

    from smclm.models.toy import build_toy_tokenizer

    tok = build_toy_tokenizer(vocab_size)
    eos = vocab_size - 1
    torch.manual_seed(seed)
    if arch == "gpt_neo":
        cfg = GPTNeoConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=8,
            max_position_embeddings=64,
            bos_token_id=eos,
            eos_token_id=eos,
        )
        model = GPTNeoForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=eos,
            eos_token_id=eos,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_lm_dirs(tmp_path_factory):
    """{'gpt_neo': dir, 'gpt2': dir}: tiny real-architecture LMs loadable by from_pretrained."""
    root = tmp_path_factory.mktemp("tiny_lms")
    return {arch: save_tiny_lm(root / arch, arch) for arch in ("gpt_neo", "gpt2")}


# Words the tiny classifiers know, in an order unrelated to the toy LM's ids (a real tokenizer
# mismatch: the LM's ids mean nothing to the classifier; text is the only interface).
CLASSIFIER_WORDS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "bad", "sun", "the", "dog", "cat", "mat",
                    "a", "on", "sat", "ran", "and", "big", "end", "red")  # fmt: skip


def build_classifier_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(CLASSIFIER_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", model_max_length=512
    )


def save_tiny_classifier(path, arch: str, num_labels: int, seed: int = 0, id2label=None):
    """A tiny randomly initialised RoBERTa or BERT sequence classifier with its own tokenizer
    (id2label: class names by index, saved in its config)."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    tok = build_classifier_tokenizer()
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(CLASSIFIER_WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=num_labels,
        pad_token_id=0,
    )
    if id2label:
        common.update(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    if arch == "roberta":
        model = RobertaForSequenceClassification(
            RobertaConfig(max_position_embeddings=66, **common)
        )
    elif arch == "bert":
        model = BertForSequenceClassification(BertConfig(max_position_embeddings=64, **common))
    else:
        raise ValueError(arch)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_classifier_dirs(tmp_path_factory):
    """{'toxicity': RoBERTa with one logit, 'sentiment': BERT with 5 classes}."""
    root = tmp_path_factory.mktemp("tiny_classifiers")
    return {
        "toxicity": save_tiny_classifier(root / "toxicity", "roberta", 1),
        "sentiment": save_tiny_classifier(root / "sentiment", "bert", 5),
    }


def save_tiny_bert_encoder(path, seed: int = 0) -> str:
    """A tiny randomly initialised BERT encoder (2 layers, d = 16) with a WordPiece tokenizer over
    CLASSIFIER_WORDS that adds [CLS] and [SEP], saved to path (the BERTScore tests' encoder)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = CLASSIFIER_WORDS + ("[MASK]",)
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
                     pad_token_id=0)  # fmt: skip
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def byte_level_tokenizer(corpus: list[str], vocab_size: int):
    """A GPT-2-style byte-level BPE (Ġ space markers, <|endoftext|> as EOS and BOS) trained on
    the corpus: a real tokenizer class for the sentence tasks, with no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def save_tiny_gpt2_with(tok, path) -> str:
    """A tiny random GPT-2 (2 layers, d = 32) over the tokenizer, saved with it to path."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def run_updates(method, batch, lr: float, updates: int) -> None:
    """``updates`` training updates of a learner in process, as the trainer runs them: a learner
    that owns its update (PPO, GFlowNet) gets ``setup`` then ``update``; the others Adam on the
    model's trainable parameters with their ``loss``."""
    if hasattr(method, "update"):
        method.setup(batch, lr)
        for _ in range(updates):
            method.update(batch)
        return
    params = [p for p in batch.model.trainables().parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(updates):
        loss, _ = method.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
