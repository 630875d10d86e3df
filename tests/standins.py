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

* :func:`write_gpt2_standin`, :func:`write_gpt_neox_standin`, :func:`write_llama_standin`: causal LMs
  (GPT2LMHeadModel with a tied unembedding; GPTNeoXForCausalLM with partial rotary embeddings and
  parallel residuals; LlamaForCausalLM with grouped-query attention, a gated MLP and an untied
  unembedding) behind BPE tokenizers trained on filled ParaRel prompts: byte-level with a
  leading-space marker and no BOS (GPT-2, GPT-NeoX), and SentencePiece-style (``▁`` word marker,
  ``<s>`` before every text) for Llama. Rare objects are several tokens, as in real vocabularies.

Each can be run by hand: ``python -m tests.standins bert /tmp/bert-standin``.
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


def padded_vocabulary(vocab: Sequence[str], size: int | None) -> list[str]:
    """``vocab`` filled up to ``size`` entries with further ``[unusedK]`` tokens (K after the highest one there);
    unchanged when ``size`` is None."""
    vocab = list(vocab)
    if size is None:
        return vocab
    if size < len(vocab):
        raise ValueError(f"vocab_size {size} is smaller than the stand-in's {len(vocab)} tokens")
    taken = set(vocab)
    k = 1 + max((int(t[7:-1]) for t in vocab if t.startswith("[unused") and t[7:-1].isdigit()), default=-1)
    while len(vocab) < size:
        if f"[unused{k}]" not in taken:
            vocab.append(f"[unused{k}]")
        k += 1
    return vocab


def write_bert_standin(directory: Path, relations: Sequence[str] | str = "all", *, layers: int = 2, hidden: int = 32,
                       ffn: int = 64, heads: int = 2, vocab_size: int | None = None, seed: int = 0) -> Path:
    """A BertForMaskedLM folder (random weights) with a cased WordPiece tokenizer, as save_pretrained writes it.

    ``vocab_size`` pads the vocabulary with ``[unusedK]`` tokens to that many entries (text never produces
    them): ``layers=12, hidden=768, ffn=3072, heads=12, vocab_size=28996`` is bert-base-cased's shape.
    """
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(padded_vocabulary(bert_vocabulary(relations), vocab_size))}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=False, strip_accents=False)
    tokenizer.model_max_length = 512
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=512,
                        pad_token_id=0)
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


def _bpe_tokenizer(texts: Sequence[str], vocab_size: int, byte_level: bool):
    """A BPE tokenizer trained on ``texts``: byte-level (GPT-2 / GPT-NeoX: ``Ġ`` before a word, no BOS) or
    SentencePiece-style (Llama: ``▁`` before a word, ``<s>`` put before every text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if byte_level:
        specials = ["<|endoftext|>", "<|padding|>"]
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        backend.train_from_iterator(texts, trainer)
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=specials[0], eos_token=specials[0],
                                       unk_token=specials[0], pad_token=specials[1])
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted({c for text in texts for c in text if not c.isspace()} | {"▁"})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def write_causal_standin(kind: str, directory: Path, relations: Sequence[str] | str = "all", *, vocab_size: int = 3000,
                         layers: int = 2, hidden: int = 32, ffn: int = 64, positions: int = 128, seed: int = 0) -> Path:
    """A GPT-2, GPT-NeoX or Llama causal LM folder (random weights) with a BPE tokenizer trained on ParaRel text.

    ``positions`` is small (128) so that long web sentences are cut, as a short-context model's would be.
    """
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    filled, _ = pararel_text(relations)
    tokenizer = _bpe_tokenizer(filled, vocab_size, byte_level=kind != "llama")
    tokenizer.model_max_length = positions
    ids = dict(vocab_size=len(tokenizer.get_vocab()), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if kind == "gpt2":
        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=2, n_inner=ffn, n_positions=positions, **ids)
    elif kind == "gpt_neox":
        config = GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=ffn,
                               max_position_embeddings=positions, rotary_pct=0.5, use_parallel_residual=True,
                               tie_word_embeddings=False, **ids)
    elif kind == "llama":
        config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=ffn, max_position_embeddings=positions, tie_word_embeddings=False, **ids)
    else:
        raise ValueError(f"unknown causal stand-in {kind!r}; expected gpt2, gpt_neox or llama")
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_gpt2_standin(directory: Path, relations: Sequence[str] | str = "all", **kwargs) -> Path:
    return write_causal_standin("gpt2", directory, relations, **kwargs)


def write_gpt_neox_standin(directory: Path, relations: Sequence[str] | str = "all", **kwargs) -> Path:
    return write_causal_standin("gpt_neox", directory, relations, **kwargs)


def write_llama_standin(directory: Path, relations: Sequence[str] | str = "all", **kwargs) -> Path:
    return write_causal_standin("llama", directory, relations, **kwargs)


WRITERS = {"bert": write_bert_standin, "roberta": write_roberta_standin, "gpt2": write_gpt2_standin,
           "gpt_neox": write_gpt_neox_standin, "llama": write_llama_standin}

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in WRITERS:
        raise SystemExit(f"usage: python -m tests.standins {{{','.join(WRITERS)}}} DIR [RELATION ...]")
    print(WRITERS[sys.argv[1]](Path(sys.argv[2]), sys.argv[3:] or "all"))
