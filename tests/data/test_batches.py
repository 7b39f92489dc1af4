"""Windows, masks and determinism of the batch sampler."""

import numpy as np
import torch

from fraglm.data.batches import IGNORE_INDEX, WindowSampler, answer_target_mask, document_ids

Q, A, END = 1, 2, 3


def test_answer_mask_covers_answer_tokens_and_end_only():
    #                 Q  q  q  A  a  a  END Q  q  A  a  END
    tokens = np.array([Q, 9, 9, A, 8, 8, END, Q, 9, A, 8, END])
    mask = answer_target_mask(tokens, Q, A, END)
    expected = [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1]
    assert mask.astype(int).tolist() == expected


def test_document_ids_close_each_document_at_end():
    inputs = torch.tensor([[5, 6, END, 7, END, 8]])
    assert document_ids(inputs, END).tolist() == [[0, 0, 0, 1, 1, 2]]


def test_step_starts_depend_only_on_seed_and_step():
    sampler = WindowSampler(np.arange(1000) % 50, 16, end_id=END)
    a = sampler.step_starts(7, 3, 8)
    assert np.array_equal(a, sampler.step_starts(7, 3, 8))
    assert not np.array_equal(a, sampler.step_starts(7, 4, 8))
    assert not np.array_equal(a, sampler.step_starts(8, 3, 8))
    assert a.min() >= 0 and a.max() <= 1000 - 17


def test_batch_targets_are_inputs_shifted_and_masked():
    tokens = np.array([Q, 9, A, 8, 7, END, Q, 9, A, 6, END, Q], dtype=np.uint16)
    mask = answer_target_mask(tokens, Q, A, END)
    sampler = WindowSampler(tokens, 5, end_id=END, doc_mask=True, target_mask=mask)
    batch = sampler.batch(np.array([0, 4]), torch.device("cpu"))
    assert batch.inputs.tolist() == [[Q, 9, A, 8, 7], [7, END, Q, 9, A]]
    assert batch.targets.tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 8, 7, END],
        [END, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 6],
    ]
    assert sampler.counted_targets(np.array([0, 4])) == 5
    assert batch.doc_ids.tolist() == [[0, 0, 0, 0, 0], [0, 0, 1, 1, 1]]


def test_eval_starts_are_fixed_and_in_range():
    sampler = WindowSampler(np.zeros(500, dtype=np.uint16), 32, end_id=END)
    starts = sampler.eval_starts(10)
    assert np.array_equal(starts, sampler.eval_starts(10))
    assert starts[0] == 0 and starts[-1] == 500 - 33
