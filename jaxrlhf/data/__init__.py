"""The data edge (a package: rows · tokenize · buckets · batches · packing · order · splits): dataset rows -> tokenized pairs and prompts -> padded, bucketed numpy batches.

Everything here is numpy and plain Python; the training code puts arrays on devices.

Rows
    `load_rows` turns an in-memory `datasets.Dataset`, a list of dicts, a local
    .json/.jsonl/.parquet/.csv file, a `save_to_disk` folder, a folder of data files or a
    dataset id into a `datasets.Dataset`; a file it cannot read is one ValueError naming the
    file and, for JSON, the line. The tokenizers below also take a plain list of dicts.

Preference pairs (reward model, DPO) come in two forms, as in TRL:

    plain           {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}
    conversational  {"prompt": [{"role": "user", "content": "2+2?"}],
                     "chosen": [{"role": "assistant", "content": "4"}], "rejected": [...]}

    In the conversational form the prompt is rendered with
    `apply_chat_template(prompt, add_generation_prompt=True)` and a response is the text the
    chat template adds after it when rendering `prompt + response`. Without a `prompt`
    column, `chosen`/`rejected` are whole conversations and their common leading messages
    are the prompt. Without a `prompt` column in the plain form the prompt is empty (just
    BOS): the shared text is then scored in both responses, which cancels in DPO and in a
    Bradley-Terry reward model. An optional `margin` column gives a per-pair float.

Tokens
    prompt   = [BOS if the tokenizer adds one] + tokens(prompt text)
    response = tokens(response text, no special tokens) + [EOS]  (EOS only if add_eos and
               the text does not already end in it, as chat templates often do)
    Truncation keeps the prompt's END (left-truncation to max_prompt_length, BOS kept) and
    the response's START (right-truncation so prompt + response <= max_length; a truncated
    response loses its EOS). A bad row raises `ValueError("row 17: field 'chosen' is
    empty")` (rows count from 1: row 17 is line 17 of a .jsonl), or with skip_bad_rows=True is skipped and listed in the `TokenizeReport`.

Batches
    Sequences are padded to a length bucket (`default_buckets`: powers of two from 16, the
    1.5x step between each two, and max_length itself) so a run compiles a handful of
    programs and a sequence longer than the smallest bucket is padded by less than a third
    of its bucket. A short batch is filled
    up to `batch_size` with dummy rows whose `pair_mask`/`row_mask` is 0. A dummy row repeats
    the first row's tokens, so no row is fully masked (a fully masked attention row is NaN
    with -inf masking, and NaN * 0 is still NaN); its response masks and margin are 0.

Order and resume
    `batch_indices(n, batch_size=, seed=, position=)` is pure: `position` counts examples
    consumed since the start, the epoch is `position // (n // batch_size * batch_size)`,
    and each epoch is a fresh `epoch_order` permutation whose incomplete last batch is
    DROPPED (static shapes; the dropped rows differ every epoch). A checkpoint stores just
    `position`; resuming yields exactly the batches an uninterrupted run would have.
    Passing `lengths=` groups similar lengths into batches within windows of
    `group_factor * batch_size` examples (less padding, still deterministic).
"""

from jaxrlhf.data.batches import (
    pad_preference_batch,
    pad_prompt_batch,
    padding_fraction,
    pair_batch,
    stack_batches,
)
from jaxrlhf.data.buckets import bucket_length, check_buckets, default_buckets, packed_buckets
from jaxrlhf.data.order import (
    batch_indices,
    block_batch_indices,
    epoch_order,
    process_slice,
    steps_per_epoch,
    train_eval_split,
)
from jaxrlhf.data.rows import load_rows
from jaxrlhf.data.splits import PreferenceSplits, PromptSplits, load_preferences, load_prompts
from jaxrlhf.data.tokenize import (
    PreferenceData,
    PromptData,
    TokenizeReport,
    tokenize_preferences,
    tokenize_prompts,
)
from jaxrlhf.data.unpaired import kto_rows, unpaired_rows, with_kl_completions

__all__ = [
    "PreferenceData",
    "PreferenceSplits",
    "PromptData",
    "PromptSplits",
    "TokenizeReport",
    "batch_indices",
    "block_batch_indices",
    "bucket_length",
    "check_buckets",
    "default_buckets",
    "epoch_order",
    "kto_rows",
    "load_preferences",
    "load_prompts",
    "load_rows",
    "packed_buckets",
    "pad_preference_batch",
    "pad_prompt_batch",
    "padding_fraction",
    "pair_batch",
    "process_slice",
    "stack_batches",
    "steps_per_epoch",
    "tokenize_preferences",
    "tokenize_prompts",
    "train_eval_split",
    "unpaired_rows",
    "with_kl_completions",
]
