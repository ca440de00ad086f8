"""data.py: the training loop's batches, decoded once into tensors, are the item path's batches
(data.CocoLayoutDataset + data.collate) for the same random draws, on any device."""
import torch

import data


def datasets(root, M=4, S=16):
    tok = data.LayoutTokenizer(data.CocoLayoutDataset(root, "train", size=S).class_names, bins=8,
                               max_objects=M)
    probe = data.CocoLayoutDataset(root, "train", size=S, max_objects=M)
    ann = [a for i in range(len(probe)) for a in probe.load(i)["ann_ids"].tolist()]
    attrs = {a: ("easy", "hard")[k % 2] for k, a in enumerate(ann)}     # a mix of [easy] and [hard]
    return data.CocoLayoutDataset(root, "train", size=S, max_objects=M, shuffle_objects=True,
                                  tokenizer=tok,
                                  attributes=attrs), tok


def test_a_batch_is_the_item_paths_batch_for_the_same_draws(tiny_data):
    ds, tok = datasets(tiny_data)
    decoded = data.DecodedLayouts(ds, progress=False)
    for seed, idx in ((0, [3, 0, 7, 7, 15]), (1, list(range(16)))):
        torch.manual_seed(seed)                   # the item path draws one randperm(n) per item...
        old = data.collate([ds[i] for i in idx], 4)
        old_next = torch.rand(3)
        torch.manual_seed(seed)                   # ...and so does draw_orders, in the same order
        new = decoded.batch(idx)
        for k in ("image", "tokens", "boxes", "labels", "difficulty", "masks", "valid"):
            assert new[k].dtype == old[k].dtype and torch.equal(new[k], old[k]), k
        assert torch.equal(torch.rand(3), old_next)   # and leaves the global generator where the
                                                      # item path does
    # the attributes are in the batch
    assert set(new["difficulty"][new["valid"]].tolist()) == {1, 2}
    assert old["tokens"].ne(tok.pad_id).any()


def test_tokens_are_the_tokenizers_encoding_whatever_the_object_order(tiny_data):
    ds, tok = datasets(tiny_data)
    decoded = data.DecodedLayouts(ds, progress=False)
    idx = torch.arange(len(ds))
    orders = torch.stack(
        [torch.arange(4).flip(0) if n == 4 else torch.arange(4) for n in decoded.counts.tolist()]
    )
    b = decoded.batch(idx, orders)
    for i in range(len(ds)):
        v = b["valid"][i]
        assert torch.equal(b["tokens"][i],
                           tok.encode(b["boxes"][i][v], b["labels"][i][v], b["difficulty"][i][v]))


def test_a_batch_on_the_meta_device_mixes_in_no_cpu_tensor(tiny_data):
    ds, tok = datasets(tiny_data)
    decoded = data.DecodedLayouts(ds, device="meta", progress=False)
    b = decoded.batch([1, 2, 3])
    assert decoded.store.type == "meta" and all(v.device.type == "meta" for v in b.values())
    assert b["tokens"].shape == (3, tok.seq_len) and b["masks"].shape == (3, 4, 16, 16)
    assert b["image"].dtype == torch.float32 and b["masks"].dtype == torch.float32


def test_latent_mode_keeps_no_images(tiny_data):
    ds, _ = datasets(tiny_data)
    decoded = data.DecodedLayouts(ds, images=False, progress=False)
    assert decoded.images is None and "image" not in decoded.batch([0, 1])


def test_storage_stays_on_the_host_when_the_gpu_is_short_of_memory(monkeypatch):
    # 1000 bytes free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 2000))
    assert data.storage_device(250, "cuda:0") == torch.device("cuda:0")
    assert data.storage_device(251, "cuda:0") == torch.device("cpu")
    # unified memory: always there
    assert data.storage_device(10 ** 12, "mps") == torch.device("mps")
