"""Shared fixtures: tiny masked LMs built from a config (no downloads), offline HF."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread: tiny models gain nothing from more, and on a loaded 2-core CI
    machine extra OpenMP threads spin while descheduled (measured 6x slower steps)."""
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
RESOURCES = REPO / "resources" / "pararel"

TINY_WORDS = (
    "Paris France Berlin Germany Rome Italy Madrid Spain London England is the capital of located in born "
    "was city country . , a an who works field physics logic mathematics Alan Turing Einstein"
).split()


def build_tiny_bert(directory: Path, num_layers: int = 2, hidden: int = 32, ffn: int = 64, seed: int = 0) -> Path:
    """Save a randomly initialised BertForMaskedLM + WordPiece tokenizer to ``directory``."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(TINY_WORDS)) + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    (directory / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(directory / "vocab.txt"), do_lower_case=False)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=ffn,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForMaskedLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def broken_patterns(tmp_path: Path) -> Path:
    """A copy of the ParaRel resources whose P101 pattern file has a broken JSON line 2."""
    root = tmp_path / "pararel"
    shutil.copytree(RESOURCES, root, ignore=shutil.ignore_patterns("*.gz"))
    path = root / "patterns" / "P101.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].rstrip("}")
    path.write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny RobertaForMaskedLM with a byte-level BPE tokenizer trained on a few sentences."""
    import torch
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-roberta")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(TINY_WORDS)] * 5, vocab_size=1000, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(directory))
    # transformers 5 ignores vocab_file/merges_file here: pass the trained vocab and merges themselves
    merges = [tuple(line.split()) for line in (directory / "merges.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#version")]
    # like roberta-base, "<mask>" absorbs the space before it
    tokenizer = RobertaTokenizerFast(vocab=bpe.get_vocab(), merges=merges, mask_token=AddedToken("<mask>", lstrip=True))
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=70,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    RobertaForMaskedLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
