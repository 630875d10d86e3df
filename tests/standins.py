"""Stand-in checkpoints: HF model folders that look like real ones to the pipeline, written offline.

Real weights cannot be downloaded where this project is tested, so the paths a user with
bert-base-cased or roberta-base would take are walked with folders written here: random
weights (this tests plumbing, not science) behind realistic tokenizers built with
``tokenizers`` from ParaRel text.

* :func:`write_bert_standin`: a cased WordPiece vocabulary laid out like bert-base-cased
  ([PAD] = 0, [unused0..98], [UNK] = 100, [CLS] = 101, [SEP] = 102, [MASK] = 103), with
  every template word whole but a deterministic quarter of the ParaRel objects left out,
  so they split into several wordpieces and the single-token filter has work to do.
* :func:`write_roberta_standin`: a byte-level BPE tokenizer trained on filled ParaRel
  prompts, with ``<mask>`` absorbing the space before it and leading-space tokens
  (``Ġ``) as in roberta-base; rare objects are several BPE pieces.

Both can be run by hand: ``python -m tests.standins bert /tmp/bert-standin``.
"""

from __future__ import annotations

import string
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

from kn.data.pararel import build_bags, load_relations, read_query_pairs

REPO = Path(__file__).resolve().parents[1]
RESOURCES = REPO / "resources" / "pararel"
BERT_SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
MULTI_PIECE_EVERY = 4  # every 4th object (sorted) is left out of the BERT vocabulary


def pararel_text(relations: Sequence[str] | str = "all") -> tuple[list[str], list[str]]:
    """(filled prompts of the relations' facts, every ParaRel object label), both deterministic."""
    prompts, _ = build_bags(RESOURCES, relations, None)
    filled = [p.replace("[MASK]", o) for p, o in zip(prompts["prompt"], prompts["object"])]
    pairs = read_query_pairs(RESOURCES / "query_pairs.json")
    objects = sorted({obj for rel in load_relations(RESOURCES) for _, obj in pairs[rel]})
    return filled, objects


def multi_piece_objects(objects: Sequence[str]) -> set[str]:
    """The objects the BERT stand-in leaves out of its vocabulary (so they split into pieces)."""
    return {obj for k, obj in enumerate(sorted(objects)) if k % MULTI_PIECE_EVERY == MULTI_PIECE_EVERY - 1}


def bert_vocabulary(relations: Sequence[str] | str = "all") -> list[str]:
    """A bert-base-cased-shaped vocabulary: specials at their real ids, characters, words, objects."""
    from tokenizers import normalizers, pre_tokenizers

    filled, objects = pararel_text(relations)
    normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    splitter = pre_tokenizers.BertPreTokenizer()
    left_out = multi_piece_objects(objects)
    words: Counter[str] = Counter()
    characters: set[str] = set(string.ascii_letters + string.digits + string.punctuation)
    for text in filled:
        for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)):
            characters.update(word)
            if word not in left_out:
                words[word] += 1
    for obj in objects:
        characters.update(c for c in obj if not c.isspace())
    vocab = [""] * 104
    for token, index in BERT_SPECIALS.items():
        vocab[index] = token
    unused = iter(range(104))
    for k in range(104):
        if not vocab[k]:
            vocab[k] = f"[unused{next(unused)}]"
    chars = sorted(characters)
    ordered = [*chars, *(f"##{c}" for c in chars), *sorted(words, key=lambda w: (-words[w], w))]
    ordered += [obj for obj in objects if obj not in left_out and " " not in obj]
    return list(dict.fromkeys([*vocab, *ordered]))


def write_bert_standin(directory: Path, relations: Sequence[str] | str = "all", *, layers: int = 2, hidden: int = 32,
                       ffn: int = 64, seed: int = 0) -> Path:
    """A BertForMaskedLM folder (random weights) with a cased WordPiece tokenizer, as save_pretrained writes it."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(bert_vocabulary(relations))}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=False, strip_accents=False)
    tokenizer.model_max_length = 512
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=ffn, max_position_embeddings=512, pad_token_id=0)
    BertForMaskedLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_roberta_standin(directory: Path, relations: Sequence[str] | str = "all", *, vocab_size: int = 3000,
                          layers: int = 2, hidden: int = 32, ffn: int = 64, seed: int = 0) -> Path:
    """A RobertaForMaskedLM folder (random weights) with a byte-level BPE tokenizer trained on ParaRel text."""
    import torch
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    filled, _ = pararel_text(relations)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(filled, vocab_size=vocab_size, min_frequency=2, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(directory))
    merges = [tuple(line.split()) for line in (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
              if line.strip() and not line.startswith("#version")]
    tokenizer = RobertaTokenizerFast(vocab=bpe.get_vocab(), merges=merges, mask_token=AddedToken("<mask>", lstrip=True))
    tokenizer.model_max_length = 512
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=2, intermediate_size=ffn, max_position_embeddings=514,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    RobertaForMaskedLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


WRITERS = {"bert": write_bert_standin, "roberta": write_roberta_standin}

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in WRITERS:
        raise SystemExit(f"usage: python -m tests.standins {{{','.join(WRITERS)}}} DIR [RELATION ...]")
    print(WRITERS[sys.argv[1]](Path(sys.argv[2]), sys.argv[3:] or "all"))
