"""Small but real transformers models, built locally (no hub access needed).

Tests, the demo and the benchmarks need a model that goes through the real
``from_pretrained`` path. :func:`make_tiny_gpt2` writes a randomly
initialised GPT-2 and a byte-level BPE tokenizer trained on a built-in
corpus, with ``save_pretrained``, into a directory.
"""

from __future__ import annotations

import os

#: The sentences the tokenizer is trained on (the demo and the benchmark workload reuse them).
CORPUS = [
    "The Eiffel Tower is in Paris.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The Moon orbits the Earth about once every twenty seven days.",
    "Mount Everest is the highest mountain above sea level.",
    "Python is a programming language created by Guido van Rossum.",
    "Dask schedules tasks on a cluster of workers.",
    "The Pacific Ocean is the largest ocean on Earth.",
    "Light travels faster than sound.",
    "A claim is supported when the evidence agrees with it.",
    "A claim is refuted when the evidence contradicts it.",
]


def make_tiny_gpt2(
    path: str | os.PathLike,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    vocab_size: int = 512,
    n_positions: int = 128,
    seed: int = 0,
) -> str:
    """Save a tiny GPT-2 (model + tokenizer) with ``save_pretrained`` into ``path``.

    Parameters
    ----------
    path
        Target directory (created).
    n_layer, n_embd, n_head, vocab_size, n_positions
        ``GPT2Config`` sizes; raise ``n_layer``/``n_embd`` for a heavier model.
    seed
        Seed for the random weights, so the files are reproducible.

    Returns
    -------
    The directory, as a string.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.save_pretrained(path)

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(fast),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    # save_pretrained shows a "Writing model shards" bar: noise for a helper that runs in tests and demos.
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        GPT2LMHeadModel(config).save_pretrained(path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return path
