"""split_batch: the batch forms a DataLoader, an HF tokenizer or a collator gives reduce to (ids, mask); the rest is
refused with an error naming the accepted forms."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dyndepth.core.batch import split_batch


def test_tensors_tuples_lists_and_dicts_give_ids_and_mask():
    ids, mask = torch.randint(0, 9, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    loaded = next(iter(DataLoader(TensorDataset(ids, mask), batch_size=2)))  # a list [ids, mask]
    for batch in (loaded, (ids, mask), {"input_ids": ids, "attention_mask": mask, "labels": ids}):
        got_ids, got_mask = split_batch(batch)
        assert torch.equal(got_ids, ids) and torch.equal(got_mask, mask)
    for batch in (ids, [ids], {"input_ids": ids}):
        got_ids, got_mask = split_batch(batch)
        assert torch.equal(got_ids, ids) and got_mask is None


@pytest.mark.parametrize("batch, message", [
    ("abc", r"a batch must be a tensor of token ids \(B, T\); or a tuple or list .*; got a str"),
    ((torch.zeros(2, 3, dtype=torch.long),) * 3, "got a tuple of 3 items"),
    ({"ids": torch.zeros(2, 3)}, r"a dict with 'input_ids'.*got a dict with keys \['ids'\]"),
    ({"input_ids": torch.zeros(2, 3, dtype=torch.long), "doc_ids": torch.zeros(2, 3)},
     r"keys \['doc_ids'\] this function does not pass to the model"),
    ([[1, 2, 3]], r"input_ids must be an integer tensor \(B, T\); got a list of 3 items"),
    (torch.zeros(2, 3), r"got a torch.float32 tensor of shape \(2, 3\)"),
    (torch.zeros(3, dtype=torch.long), "iterating one .* tensor gave its rows; wrap it in a list"),
    ((torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4)),
     r"attention_mask must be a tensor shaped like its input_ids \(2, 3\); got .* shape \(2, 4\)"),
])
def test_other_forms_are_refused_by_name(batch, message):
    with pytest.raises(ValueError, match=message):
        split_batch(batch)


def test_a_packed_loaders_batch_is_refused_with_the_setting_that_makes_it():
    """A loader batch with document ids comes from data.intra_doc_mask; the error blamed packing='documents', whose
    batches (input_ids, labels, attention_mask) are accepted, and which that loader did not even use."""
    from dyndepth.data.loader import loader_from_texts
    from dyndepth.tokenizer import ByteTokenizer

    texts = ["first document", "second one"] * 4
    ids, mask = split_batch(loader_from_texts(texts, ByteTokenizer(), 8, 2, packing="documents").next_batch())
    assert mask is not None and ids.shape == (2, 8)
    with pytest.raises(ValueError, match=r"a loader without data.intra_doc_mask, which adds 'positions' and 'doc_ids'"):
        split_batch(loader_from_texts(texts, ByteTokenizer(), 8, 2, intra_doc_mask=True).next_batch())
