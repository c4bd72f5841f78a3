"""KTO's unpaired examples: preference pairs split into labelled examples, and each example's KL completion.

A KTO example is a `PreferencePair` with `desirable` set (contracts.py): `chosen` is its reply and
`rejected` its KL completion, the reply of another example, which the model scores after this
example's prompt. The KL reference point of the loss (losses.kl_reference_point) averages the
policy/reference log-ratio of these mismatched pairs over a batch.

Which reply is the KL completion (one rule, applied per split once the data is loaded, so training,
eval and the precomputed reference cache all see the same pairs): example i takes the reply of
example i - 1, and example 0 that of the last example. This is TRL's and LLaMA-Factory's +1
offset, over the whole split rather than over TRL's chunks of one per-device batch: with sequential
batches of B examples, B - 1 of a batch's KL completions are the batch's own replies (the KTO
paper's recommendation), and a batch of one still gets a mismatched pair (TRL's chunk of one
pairs an example with its own reply). Being fixed per example, the pairs do not depend on the batch
size, the sampler or the number of processes.
"""

from __future__ import annotations

import dataclasses

from prefalign.contracts import PreferencePair


def unpair(pairs: list[PreferencePair]) -> list[PreferencePair]:
    """Each pair as two KTO examples, as TRL's `unpair_preference_dataset` does: first every chosen reply
    (desirable), then every rejected one (undesirable), in the pairs' order; `rejected` left empty."""
    desirable = [dataclasses.replace(p, rejected="", rejected_calls=None, desirable=True) for p in pairs]
    undesirable = [dataclasses.replace(p, chosen=p.rejected, chosen_calls=p.rejected_calls, rejected="",
                                       rejected_calls=None, desirable=False) for p in pairs]
    return desirable + undesirable


def with_kl_completions(examples: list[PreferencePair]) -> list[PreferencePair]:
    """The examples with `rejected` set to their KL completion: example i - 1's reply (module docstring)."""
    return [dataclasses.replace(example, rejected=examples[i - 1].chosen, rejected_calls=examples[i - 1].chosen_calls)
            for i, example in enumerate(examples)]


def label_counts(examples) -> tuple[int, int]:
    """(desirable, undesirable) examples of a list of KTO examples or an encoded dataset's `desirable` column."""
    labels = [bool(e.desirable) for e in examples] if isinstance(examples, list) else list(examples["desirable"])
    return sum(labels), len(labels) - sum(labels)
