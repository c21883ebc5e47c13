import json

import numpy as np
import pytest
import torch

from dyndepth.data.loader import IGNORE_INDEX, PackedLoader, loader_from_texts
from dyndepth.data.shards import ShardSet, build_shards
from dyndepth.data.sources import DataError


class NumberTokenizer:
    """'3 4 5' -> [3, 4, 5]: lets a test choose every token id. EOS is the last id."""

    vocab_size = 10_000
    eos_token_id = 9_999

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]


class ByteTokenizer:
    vocab_size = 257
    eos_token_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def arange_shards(n_tokens: int) -> ShardSet:
    """One document whose tokens are 0..n_tokens-1 (no EOS): window w starts with token w * seq_len."""
    return ShardSet.from_documents([" ".join(map(str, range(n_tokens)))], NumberTokenizer(), append_eos=False)


def test_labels_are_inputs_shifted_by_one():
    shards = arange_shards(161)
    loader = PackedLoader(shards, seq_len=8, batch_size=4, seed=3)
    for _ in range(loader.batches_per_epoch + 2):
        batch = loader.next_batch()
        x, y = batch["input_ids"], batch["labels"]
        assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(y, x + 1)  # the stream is 0, 1, 2, ...
        assert torch.all(x[:, 0] % 8 == 0)  # rows start on window boundaries


def test_unshuffled_order_and_window_count():
    loader = PackedLoader(arange_shards(50), seq_len=8, batch_size=2, shuffle=False)
    assert loader.num_windows == 6 and loader.batches_per_epoch == 3
    assert loader.next_batch()["input_ids"][:, 0].tolist() == [0, 8]
    assert loader.next_batch()["input_ids"][:, 0].tolist() == [16, 24]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_are_disjoint_and_cover_the_epoch(world_size):
    seq_len, batch_size = 4, 2
    n_windows = world_size * batch_size * 5
    shards = arange_shards(n_windows * seq_len + 1)
    seen = []
    for rank in range(world_size):
        loader = PackedLoader(shards, seq_len, batch_size, rank=rank, world_size=world_size, seed=7)
        firsts = [loader.next_batch()["input_ids"][:, 0] for _ in range(loader.batches_per_epoch)]
        seen.append(set((torch.cat(firsts) // seq_len).tolist()))
        assert len(seen[-1]) == loader.batches_per_epoch * batch_size
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not seen[a] & seen[b]
    assert set().union(*seen) == set(range(n_windows))


def test_epoch_rollover_reshuffles_deterministically():
    shards = arange_shards(8 * 24 + 1)
    a, b = PackedLoader(shards, 8, 4, seed=1), PackedLoader(shards, 8, 4, seed=1)
    epochs = [a.windows_for_epoch(e).tolist() for e in range(2)]
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1]) == list(range(24))
    assert PackedLoader(shards, 8, 4, seed=2).windows_for_epoch(0).tolist() != epochs[0]
    for _ in range(2 * a.batches_per_epoch + 1):
        assert torch.equal(a.next_batch()["input_ids"], b.next_batch()["input_ids"])
    assert a.epoch == 2 and a.cursor == 1


def test_resume_gives_identical_next_batches():
    shards = ShardSet.from_documents(
        [("prompt words", "the answer"), "some plain text " * 9] * 4, ByteTokenizer()
    )
    original = PackedLoader(shards, 16, 2, rank=1, world_size=2, seed=5, intra_doc_mask=True)
    for _ in range(original.batches_per_epoch - 1):  # stop just before an epoch boundary
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))  # survives a JSON checkpoint
    expected = [original.next_batch() for _ in range(original.batches_per_epoch + 2)]
    restored = PackedLoader(shards, 16, 2, rank=1, world_size=2, seed=5, intra_doc_mask=True)
    restored.load_state_dict(state)
    for want in expected:
        got = restored.next_batch()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert restored.state_dict() == original.state_dict()


def test_load_state_dict_rejects_other_settings():
    shards = arange_shards(200)
    state = PackedLoader(shards, 8, 2, seed=1).state_dict()
    with pytest.raises(DataError, match="seed=1.*seed=2"):
        PackedLoader(shards, 8, 2, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len=8.*seq_len=4"):
        PackedLoader(shards, 4, 2, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match=r"num_tokens=200.*num_tokens=300: the training data changed since .*restore "
                                        r"them, or train into a new train.out_dir"):  # (it named no fix)
        PackedLoader(arange_shards(300), 8, 2, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="rank 0 given to rank 1"):
        PackedLoader(shards, 8, 2, seed=1, rank=1, world_size=2).load_state_dict(
            PackedLoader(shards, 8, 2, seed=1, world_size=2).state_dict())


def test_a_user_source_edited_to_the_same_token_count_is_refused_on_resume(tmp_path):
    """The state keeps the source's content hash: an edit that kept the token count (a case change, byte tokens)
    resumed silently on new shards."""
    from dyndepth.data.build import build_loader

    text = tmp_path / "corpus.txt"
    text.write_text("First Citizen: we are accounted poor citizens. " * 40)
    data = {"source": str(text), "tokenizer": "byte", "cache_dir": str(tmp_path / "cache")}
    kw = {"batch_size": 2, "seq_len": 16, "seed": 0, "hold_out": False}
    state = build_loader(data, **kw).state_dict()
    build_loader(data, **kw).load_state_dict(state)  # unchanged: resumes
    text.write_text(text.read_text().replace("First Citizen", "FIRST CITIZEN"))
    edited = build_loader(data, **kw)
    assert edited.shards.num_tokens == state["num_tokens"]
    with pytest.raises(DataError, match="source_digest=.*the training data changed since"):
        edited.load_state_dict(state)
    del state["source_digest"]  # a state saved before it was kept: the token count alone
    edited.load_state_dict(state)


def test_state_converts_to_another_world_size_at_the_same_global_position():
    """A checkpoint of 2 ranks x batch 2 resumes in one process with batch 4 (or 4 ranks x batch 1)."""
    shards = arange_shards(8 * 48 + 1)
    ranks = [PackedLoader(shards, 8, 2, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(3):
        for loader in ranks:
            loader.next_batch()
    state = ranks[0].state_dict()
    expected = torch.cat([loader.next_batch()["input_ids"] for loader in ranks])  # the next global batch
    single = PackedLoader(shards, 8, 4, seed=3)
    single.load_state_dict(state)
    assert sorted(single.next_batch()["input_ids"][:, 0].tolist()) == sorted(expected[:, 0].tolist())
    four = [PackedLoader(shards, 8, 1, rank=r, world_size=4, seed=3) for r in range(4)]
    for loader in four:
        loader.load_state_dict(state)
    got = torch.cat([loader.next_batch()["input_ids"] for loader in four])
    assert sorted(got[:, 0].tolist()) == sorted(expected[:, 0].tolist())
    with pytest.raises(DataError, match="not a whole number of batches"):
        PackedLoader(shards, 8, 8, seed=3).load_state_dict(state)  # 12 windows served, batches of 8


def test_intra_doc_mask_never_trains_across_a_document_boundary():
    tok = NumberTokenizer()
    docs = ["1 2 3", "4 5", "6 7 8 9 10 11", "12"]  # with EOS: lengths 4, 3, 7, 2 -> starts 0, 4, 7, 14
    masked = loader_from_texts(docs, tok, seq_len=15, batch_size=1, shuffle=False, intra_doc_mask=True)
    labels = masked.next_batch()["labels"][0].tolist()
    eos = tok.eos_token_id
    # the EOS at 3, 6 and 13 would predict the next document's first token (4, 6, 12): not trained
    assert labels == [2, 3, eos, -100, 5, eos, -100, 7, 8, 9, 10, 11, eos, -100, eos]
    plain = loader_from_texts(docs, tok, seq_len=15, batch_size=1, shuffle=False)
    assert plain.next_batch()["labels"][0].tolist()[3] == 4  # one stream: EOS starts the next document


def test_sft_prompt_tokens_get_ignore_labels():
    tok = ByteTokenizer()
    pairs = [("PPPP", "rr"), ("QQQ", "sss")]
    stream = tok.encode("PPPPrr") + [256] + tok.encode("QQQsss") + [256]  # 14 tokens
    prompt_at = {0, 1, 2, 3, 7, 8, 9}
    loader = loader_from_texts(pairs, tok, seq_len=13, batch_size=1, shuffle=False)
    batch = loader.next_batch()
    assert batch["input_ids"][0].tolist() == stream[:13]
    # the label at t is the token at t+1, ignored exactly when that token belongs to a prompt
    expected = [IGNORE_INDEX if t + 1 in prompt_at else stream[t + 1] for t in range(13)]
    assert batch["labels"][0].tolist() == expected
    assert expected.count(IGNORE_INDEX) == 6  # the first P is only an input


def test_positions_and_doc_ids_restart_at_doc_boundaries():
    tok = NumberTokenizer()
    docs = ["1 2 3", "4 5", "6 7 8 9 10 11", "12"]  # with EOS: lengths 4, 3, 7, 2 -> starts 0, 4, 7, 14
    loader = loader_from_texts(docs, tok, seq_len=5, batch_size=1, shuffle=False, intra_doc_mask=True)
    first = loader.next_batch()
    assert first["positions"][0].tolist() == [0, 1, 2, 3, 0]
    assert first["doc_ids"][0].tolist() == [0, 0, 0, 0, 1]
    second = loader.next_batch()  # tokens 5..9: mid-document start, doc 3 starts at 7
    assert second["positions"][0].tolist() == [0, 1, 0, 1, 2]
    assert second["doc_ids"][0].tolist() == [0, 0, 1, 1, 1]
    assert "positions" not in loader_from_texts(docs, tok, seq_len=5, batch_size=1).next_batch()


def test_loader_from_texts_on_disk_matches_memory(tmp_path):
    texts = [f"text {i} " * (i + 1) for i in range(10)]
    mem = loader_from_texts(texts, ByteTokenizer(), 12, 3, seed=4)
    disk = loader_from_texts(texts, ByteTokenizer(), 12, 3, tmp_path, seed=4)
    assert (tmp_path / "train" / "manifest.json").is_file()
    for _ in range(4):
        assert torch.equal(mem.next_batch()["labels"], disk.next_batch()["labels"])


def test_too_little_data_and_bad_arguments():
    shards = arange_shards(20)
    with pytest.raises(DataError, match="lower seq_len or batch_size"):
        PackedLoader(shards, seq_len=8, batch_size=4)
    with pytest.raises(DataError, match="rank 2"):
        PackedLoader(shards, seq_len=2, batch_size=1, rank=2, world_size=2)
    with pytest.raises(DataError, match="seq_len"):
        PackedLoader(shards, seq_len=0, batch_size=1)


def test_built_shards_feed_the_loader(tmp_path):
    shards = build_shards([" ".join(map(str, range(300)))], NumberTokenizer(), tmp_path, shard_tokens=64)
    loader = PackedLoader(shards, seq_len=16, batch_size=2, shuffle=False)
    rows = torch.cat([loader.next_batch()["input_ids"] for _ in range(loader.batches_per_epoch)])
    assert torch.equal(rows.flatten(), torch.arange(rows.numel()))  # crosses several 64-token shards
    assert isinstance(loader.windows_for_epoch(0), np.ndarray)


def test_a_state_saved_at_the_end_of_an_epoch_converts_to_the_next_epochs_start():
    """1 rank x batch 2 over 6 windows has served all 3 batches of epoch 0; resumed with batch 4 the next batch is
    epoch 1's first. The conversion counted 6 windows served, not a whole number of batches of 4, and refused."""
    shards = arange_shards(8 * 6 + 1)
    old = PackedLoader(shards, 8, 2, seed=3)
    for _ in range(old.batches_per_epoch):
        old.next_batch()
    new = PackedLoader(shards, 8, 4, seed=3)
    new.load_state_dict(old.state_dict())
    assert (new.epoch, new.cursor) == (1, 0)
    fresh = PackedLoader(shards, 8, 4, seed=3)
    fresh.next_batch()  # epoch 0's only batch of 4
    assert torch.equal(new.next_batch()["input_ids"], fresh.next_batch()["input_ids"])  # epoch 1's first


def test_document_packing_opens_no_window_mid_document_and_trains_every_answer_once():
    # stream packing cut windows wherever seq_len fell, so an SFT answer could open a window without its prompt;
    # packing="documents" puts whole documents in each window and pads the rest (attention_mask 0, never a target)
    pairs = [(" ".join(["1"] * p), " ".join(["2"] * r)) for p, r in [(3, 2), (5, 4), (2, 1), (6, 5), (4, 3), (1, 1)]]
    shards = ShardSet.from_documents(pairs + [" ".join(["3"] * 30)], NumberTokenizer())  # and one longer than a window
    T = 12
    loader = PackedLoader(shards, T, 1, shuffle=False, packing="documents", intra_doc_mask=True)
    starts, trained = set(shards.doc_starts().tolist()), []
    for w in range(loader.num_windows):
        batch = loader.read_windows(np.array([w]))
        start, n = int(loader.starts[w]), int(batch["attention_mask"].sum())
        assert start in starts or start > max(starts)  # a window opens a document, or continues the long one
        assert (batch["labels"][0, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][0, :n] == 1).all()
        trained += [start + 1 + i for i in torch.nonzero(batch["labels"][0] != IGNORE_INDEX).flatten().tolist()]
    tokens = shards.tokens(0, shards.num_tokens)
    mask = shards.loss_mask(0, shards.num_tokens)
    expected = [i for i in range(1, shards.num_tokens) if mask[i] and i not in starts]  # answers, EOS, the long text
    assert sorted(trained) == expected and len(set(trained)) == len(trained)  # each trained once, none lost
    assert tokens[expected[0]] == 2
    stream = PackedLoader(shards, T, 1, shuffle=False, intra_doc_mask=True)
    assert any(int(s) not in starts and int(s) < max(starts) for s in stream.starts)  # what stream packing does
    with pytest.raises(DataError, match="data.packing='doc' is not one of"):
        PackedLoader(shards, T, 1, packing="doc")


def test_document_packing_makes_no_window_of_a_lone_token_before_a_document_that_does_not_fit():
    """A one-token document (a text that is only the EOS, e.g. a line "<|endoftext|>" read with text_split="line",
    which gets no second EOS) followed by one that does not fit in its window was a window of its own: a row of
    padding only (attention_mask all 0, no target), served as a batch row. Such a token is never a target anyway."""
    from dyndepth.data.loader import document_windows

    starts, ends = document_windows(np.array([0, 1, 23, 54]), 83, 7)  # documents of 1, 22, 31 and 29 tokens
    assert ((ends - starts) >= 2).all() and ((ends - starts) <= 8).all()
    assert starts[0] == 1  # the lone token opens no window
    doc = ShardSet.from_documents(["1", " ".join(["2"] * 20), "3 3"], NumberTokenizer(), append_eos=False)
    loader = PackedLoader(doc, 8, 1, shuffle=False, packing="documents")
    rows = [loader.read_windows(np.array([w]))["attention_mask"].sum() for w in range(loader.num_windows)]
    assert min(rows) > 0
    state = {**loader.state_dict(), "num_windows": loader.num_windows + 1}  # a state of the earlier cut is refused
    with pytest.raises(DataError, match=r"saved with num_windows=4 but this loader has num_windows=3: .*packs it"):
        loader.load_state_dict(state)
