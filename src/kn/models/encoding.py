"""Prompt encoding: how a model reads a ParaRel prompt, where its answer is read, and which ids the answer is.

Masked LMs (SPEC §1): [CLS] + pieces + [SEP]; the target position is the first [MASK]; the gold id
is the object's one vocabulary entry (objects that are not one token are not scored).

Causal LMs (docs/causal.md): the prompt is the template with [X] filled, cut just before [Y]
(trailing whitespace stripped), with the tokenizer's BOS where it adds one; the target position
is the last prompt token; the target is the object as the tokenizer writes it after the prompt
(the text between the cut and [Y], normally one space, then the object), whose first token is
the default target and whose tokens together are the opt-in ``sequence`` target. Templates whose
[X] comes after [Y] lose the subject when cut and are not used; text after [Y] is dropped.

:class:`PromptCodec` holds one model's choice; every stage encodes prompts and looks up targets
through it, so the kind (kn.models.adapters.Adapter.causal) is read in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from transformers import PreTrainedTokenizerBase

MASK_LITERAL = "[MASK]"


@dataclass
class EncodedPrompts:
    """Unpadded token ids per prompt and its target position: the first mask token (counting [CLS] as 0)
    of a masked LM, the last prompt token of a causal LM (``mask_positions`` keeps its historical name)."""

    input_ids: list[list[int]]
    mask_positions: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    def padded(
        self, pad_id: int, device: torch.device | str = "cpu", rows: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad the prompts ``rows`` (default all, in order) to their longest: (input_ids, attention_mask)."""
        seqs = self.input_ids if rows is None else [self.input_ids[k] for k in rows]
        return pad_sequences(seqs, pad_id, device)


def pad_sequences(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token-id lists to the longest one: (input_ids, attention_mask), both [B, T] long."""
    width = max(len(ids) for ids in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_len: int = 128) -> EncodedPrompts:
    """Tokenise prompts whose blank is the literal ``[MASK]`` (mapped to the tokenizer's mask token)."""
    mask_token = tokenizer.mask_token
    if mask_token is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no mask token; a masked LM is required")
    texts = [p.replace(MASK_LITERAL, mask_token) for p in prompts]
    batch = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_len)
    positions: list[int] = []
    for text, ids in zip(prompts, batch["input_ids"]):
        try:
            positions.append(ids.index(tokenizer.mask_token_id))
        except ValueError:
            raise ValueError(f"prompt has no mask token within {max_len} pieces: {text!r}") from None
    return EncodedPrompts(input_ids=[list(ids) for ids in batch["input_ids"]], mask_positions=positions)


def object_token_id(tokenizer: PreTrainedTokenizerBase, obj: str) -> int | None:
    """The single vocabulary id of ``obj``, or None when it is not one token for this tokenizer.

    SPEC §1 looks the whole string up in the vocabulary; BPE vocabularies store a word
    after a space with a marker (``Ġ``), so a one-piece tokenisation of `` obj`` also counts.
    """
    vocab = tokenizer.get_vocab()
    if obj in vocab and obj not in tokenizer.all_special_tokens:
        return int(vocab[obj])
    pieces = tokenizer.tokenize(" " + obj)
    if len(pieces) == 1 and pieces[0] != tokenizer.unk_token:
        return int(tokenizer.convert_tokens_to_ids(pieces[0]))
    return None


# ---------------------------------------------------------------------------------------------- causal LMs
TEMPLATE_ENDS_IN_Y = "ends_in_y"  # nothing but whitespace and . ! ? after [Y]
TEMPLATE_TEXT_AFTER_Y = "text_after_y"  # the text after [Y] is dropped when the prompt is cut
TEMPLATE_SUBJECT_AFTER_Y = "subject_after_y"  # [X] comes after [Y]: the cut prompt has no subject (not used)
TEMPLATE_USES = (TEMPLATE_ENDS_IN_Y, TEMPLATE_TEXT_AFTER_Y, TEMPLATE_SUBJECT_AFTER_Y)
_END_PUNCTUATION = re.compile(r"[\s.!?]*")
SEQUENCE_TARGETS = ("first_token", "sequence")


def template_use(template: str) -> str:
    """How a causal LM can use a ParaRel template: one of :data:`TEMPLATE_USES`.

    "Ends in [Y]" allows a final full stop (most templates end in "[Y]." or "[Y] ."): cutting it
    off loses nothing a left-to-right model would read before the object.
    """
    if "[X]" not in template or "[Y]" not in template:
        raise ValueError(f"template {template!r} needs both [X] and [Y]")
    if template.index("[X]") > template.index("[Y]"):
        return TEMPLATE_SUBJECT_AFTER_Y
    after = template.split("[Y]", 1)[1]
    return TEMPLATE_ENDS_IN_Y if _END_PUNCTUATION.fullmatch(after) else TEMPLATE_TEXT_AFTER_Y


def cut_before_mask(prompt: str) -> tuple[str, str]:
    """(the prompt cut just before its first [MASK], trailing whitespace stripped; the stripped whitespace)."""
    if MASK_LITERAL not in prompt:
        raise ValueError(f"prompt has no {MASK_LITERAL}: {prompt!r}")
    head = prompt[: prompt.index(MASK_LITERAL)]
    cut = head.rstrip()
    return cut, head[len(cut):]


def bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[BOS] when the tokenizer puts one before a text (Llama), else [] (GPT-2); no other special token is added."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [int(bos)] if ids and ids[0] == bos else []


@dataclass
class PromptCodec:
    """How one model reads prompts and which token ids answer them (see the module doc).

    ``templates_ending_in_y`` (causal only): use only templates that end in [Y]. ``target``
    (causal only): "first_token" scores P(object's first token | prompt); "sequence" scores
    P(all object tokens | prompt), teacher-forced. Masked LMs ignore both.
    """

    tokenizer: PreTrainedTokenizerBase
    causal: bool
    templates_ending_in_y: bool = False
    target: str = "first_token"
    max_len: int = 128
    _tokens: dict[tuple[str, str], tuple[int, ...]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.target not in SEQUENCE_TARGETS:
            raise ValueError(f"target {self.target!r}; expected one of {list(SEQUENCE_TARGETS)}")

    @classmethod
    def of(cls, model: Any, tokenizer: PreTrainedTokenizerBase, settings: Mapping[str, Any] | None = None,
           max_len: int = 128) -> "PromptCodec":
        """The codec of ``model`` (its adapter says masked or causal); ``settings`` is the config's ``causal`` section."""
        from kn.models.adapters import adapter_for

        settings = settings or {}
        return cls(tokenizer, adapter_for(model).causal, bool(settings.get("templates_ending_in_y", False)),
                   str(settings.get("target", "first_token")), max_len)

    @property
    def sequence(self) -> bool:
        """Whether targets are whole objects (causal ``sequence``), not one token."""
        return self.causal and self.target == "sequence"

    # ------------------------------------------------------------------ which templates
    def uses_template(self, template: str) -> bool:
        """Whether prompts of ``template`` are read by this model (always, for a masked LM)."""
        if not self.causal:
            return True
        use = template_use(template)
        return use == TEMPLATE_ENDS_IN_Y or (use == TEMPLATE_TEXT_AFTER_Y and not self.templates_ending_in_y)

    def usable_rows(self, prompts: Any) -> Any:
        """The rows of an ingested prompt table (column ``template``) whose template this model uses."""
        if not self.causal:
            return prompts
        keep = prompts["template"].map(lambda t: self.uses_template(str(t))).to_numpy(dtype=bool)
        return prompts[keep]

    # ------------------------------------------------------------------ encoding
    def text(self, prompt: str) -> str:
        """What the model reads: the prompt (masked), or the prompt cut just before [MASK] (causal)."""
        return cut_before_mask(prompt)[0] if self.causal else prompt

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        """Token ids and target positions of ``prompts`` (each with the literal [MASK])."""
        if not self.causal:
            return encode_prompts(self.tokenizer, prompts, max_len=self.max_len)
        return encode_causal_prompts(self.tokenizer, prompts, max_len=self.max_len)

    # ------------------------------------------------------------------ targets
    def object_tokens(self, prompt: str, obj: str) -> tuple[int, ...]:
        """The object's token ids as the answer to ``prompt``; () when it cannot be scored.

        Masked: its one vocabulary id (() when it is several tokens). Causal: the tokens the
        tokenizer produces for the object after the prompt (() when the prompt's own tokens
        change once the object follows it, so no prefix of the encoding is the prompt).
        """
        key = (prompt, obj)
        if key not in self._tokens:
            if self.causal:
                self._tokens[key] = continuation_ids(self.tokenizer, prompt, obj)
            else:
                token = object_token_id(self.tokenizer, obj)
                self._tokens[key] = () if token is None else (token,)
        return self._tokens[key]

    def target_id(self, prompt: str, obj: str) -> int | None:
        """The first target token (the only one of a masked LM), or None when the object cannot be scored."""
        tokens = self.object_tokens(prompt, obj)
        return tokens[0] if tokens else None

    def target_ids(self, prompts: Sequence[str], objects: Sequence[str]) -> list[int]:
        """:meth:`target_id` per prompt, -1 where there is none."""
        ids = [self.target_id(p, o) for p, o in zip(prompts, objects)]
        return [-1 if i is None else int(i) for i in ids]

    def continuations(self, prompts: Sequence[str], objects: Sequence[str]) -> list[tuple[int, ...]] | None:
        """Per prompt the token ids to score after it: the whole object (``sequence``), else None (one token)."""
        if not self.sequence:
            return None
        return [self.object_tokens(p, o) for p, o in zip(prompts, objects)]


def encode_causal_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_len: int = 128) -> EncodedPrompts:
    """Causal LM prompts: BOS (if the tokenizer adds one) + the tokens of the prompt cut before [MASK]; the
    target position is the last token."""
    prefix = bos_prefix(tokenizer)
    texts = [cut_before_mask(p)[0] for p in prompts]
    ids_list = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out = EncodedPrompts([], [])
    for text, ids in zip(prompts, ids_list):
        seq = prefix + list(ids)
        if not seq:
            raise ValueError(f"prompt has no token before [MASK] (and the tokenizer adds no BOS): {text!r}")
        if len(seq) > max_len:
            raise ValueError(f"prompt is {len(seq)} tokens before [MASK], more than {max_len}: {text!r}")
        out.input_ids.append(seq)
        out.mask_positions.append(len(seq) - 1)
    return out


def continuation_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, obj: str) -> tuple[int, ...]:
    """The tokens of ``obj`` written in the prompt's [MASK] slot, after the cut prompt; () if they are not separable.

    The prompt cut before [MASK] and the same text followed by the whitespace the cut removed
    and the object are tokenised alike (no special tokens); when the first is a prefix of the
    second, the rest is the object's tokens (for byte-level BPE: with its leading space).
    """
    cut, space = cut_before_mask(prompt)
    head = tokenizer(cut, add_special_tokens=False)["input_ids"]
    full = tokenizer(cut + space + obj, add_special_tokens=False)["input_ids"]
    if full[: len(head)] != head or len(full) == len(head):
        return ()
    return tuple(int(i) for i in full[len(head):])
