"""The generator's training batches: the data set decoded once into tensors, each batch built by indexing.

data.CocoLayoutDataset gives one item at a time (decode, tokenise, then `data.collate`): readable, and what the
detector, the notebooks and the tests use. A training step on a GPU takes a few milliseconds, and building its
32 items one by one in Python took longer than that, so the training loop (train.py) reads its batches from here:
`DecodedLayouts` decodes every image, box, label, attribute and mask of a split once (a progress bar), tokenises
every object once, and keeps the tensors on the training device when they fit (`storage_device`). A batch is then
a handful of indexing operations over the whole batch, and the layout tokens are assembled from the per-object
tokens with tensor operations. It is the same batch `collate([dataset[i] for i in idx])` gives for the same draw
of object orders (tests/test_batches.py checks tokens, boxes, labels, attributes, masks and images element by
element), and the draw itself is the one the item path makes: one `torch.randperm(n)` per image on the CPU's
global generator, PAPER.md section 1's object shuffle. So a run takes exactly the batches it took before.

Size of what is kept (uint8 images, bool masks at the image side S, M = max objects):
    N (3 + M) S^2 bytes: shapes at 32 px, 2000 x (3 + 8) x 1024 = 22 MB; a 10k-image COCO subset at 128 px,
    10k x (3 + 8) x 16384 = 1.8 GB (0.5 GB of images, 1.3 GB of masks). In latent mode the images are not kept
    (the loop keeps the latents, N c (S/f)^2 floats).

    python detdiff.py --stage generator --steps 200 --out runs/quick    # the loop that reads these batches
"""
import torch
from tqdm import tqdm

import data

DEVICE_SHARE = 0.25   # keep the tensors on a CUDA device when they take at most this share of its free memory


def storage_device(nbytes, device):
    """Where the decoded tensors live: on the training device when they fit (a CUDA device: at most DEVICE_SHARE of
    its free memory; the CPU and Apple's MPS, whose memory is the host's: always), else on the host, pinned so
    that each batch copies to the device without blocking."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return device if nbytes <= DEVICE_SHARE * free else torch.device("cpu")
    return device


class DecodedLayouts:
    """A data.CocoLayoutDataset split (with its tokenizer and attributes) decoded once into tensors:
    images (N, 3, S, S) uint8 (unless images=False), boxes (N, M, 4), labels, difficulty (N, M), masks
    (N, M, S, S) bool, valid (N, M), the objects' layout tokens (N, M, T), and the object counts (N,) on the CPU.
    Objects are in the dataset's stored order; `batch` shuffles them."""

    def __init__(self, dataset, device="cpu", images=True, progress=True):
        tok, M, S = dataset.tokenizer, dataset.max_objects, dataset.size
        if tok is None:
            raise ValueError("DecodedLayouts needs a dataset built with a tokenizer")
        N, T = len(dataset), tok.tokens_per_object
        self.counts = torch.zeros(N, dtype=torch.long)
        img = torch.zeros(N, 3, S, S, dtype=torch.uint8) if images else None
        boxes, labels = torch.zeros(N, M, 4), torch.zeros(N, M, dtype=torch.long)
        diff, masks = torch.zeros(N, M, dtype=torch.long), torch.zeros(N, M, S, S, dtype=torch.bool)
        obj_tokens = torch.full((N, M, T), tok.pad_id, dtype=torch.long)
        for i in tqdm(range(N), desc="decoding the training images", leave=False, disable=not progress):
            it = dataset.load(i)
            n = len(it["labels"])
            self.counts[i] = n
            if images:
                img[i] = torch.from_numpy(it["image"].copy()).permute(2, 0, 1)
            boxes[i, :n] = torch.from_numpy(it["boxes"])
            labels[i, :n] = torch.from_numpy(it["labels"])
            diff[i, :n] = torch.tensor([data.DIFFICULTY.index(dataset.attributes.get(int(a), "none"))
                                        for a in it["ann_ids"]], dtype=torch.long)
            masks[i, :n] = torch.from_numpy(it["masks"])
            ids = tok.encode(boxes[i, :n], labels[i, :n], diff[i, :n])        # the objects' slots, in stored order
            obj_tokens[i, :n] = ids[1:1 + n * T].view(n, T)
        tensors = dict(images=img, boxes=boxes, labels=labels, difficulty=diff, masks=masks, obj_tokens=obj_tokens,
                       valid=torch.arange(M)[None] < self.counts[:, None])
        nbytes = sum(v.numel() * v.element_size() for v in tensors.values() if v is not None)
        self.device, self.store = torch.device(device), storage_device(nbytes, device)
        pin = self.store.type == "cpu" and self.device.type == "cuda"
        for k, v in tensors.items():
            setattr(self, k, None if v is None else v.pin_memory() if pin else v.to(self.store))
        self.nbytes, self.max_objects, self.tok = nbytes, M, tok

    def __len__(self):
        return len(self.counts)

    def draw_orders(self, idx):
        """The object order of each image of the batch (B, M): a random permutation of its n objects (one
        torch.randperm(n) per image on the CPU's global generator, the item path's draw), padding slots after."""
        orders = torch.arange(self.max_objects).repeat(len(idx), 1)
        for b, n in enumerate(self.counts[idx].tolist()):
            orders[b, :n] = torch.randperm(n)
        return orders

    def batch(self, idx, orders=None):
        """The batch of images `idx` (a list or (B,) tensor) with its objects in `orders` (default: draw_orders),
        on the training device: image (B, 3, S, S) in [-1, 1] (when kept), tokens (B, L), boxes (B, M, 4),
        labels, difficulty (B, M), masks (B, M, S, S) float, valid (B, M)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        orders = self.draw_orders(idx) if orders is None else orders
        idx, o = idx.to(self.store), orders.to(self.store)                      # (B,), (B, M)
        i = idx[:, None]
        out = dict(boxes=self.boxes[i, o], labels=self.labels[i, o], difficulty=self.difficulty[i, o],
                   masks=self.masks[i, o], valid=self.valid[i, o], slots=self.obj_tokens[i, o])
        if self.images is not None:
            out["image"] = self.images[idx]
        out = {k: v.to(self.device, non_blocking=True) for k, v in out.items()}
        if "image" in out:
            out["image"] = out["image"].float().div(127.5).sub(1.0)                 # data.to_model_range's mapping
        out["masks"] = out["masks"].float()
        out["tokens"] = self.tokens(out.pop("slots"), out["valid"])
        return out

    def tokens(self, slots, valid):
        """Layout tokens (B, L) from the objects' slots (B, M, T) in batch order: <bos>, the slots (padding slots
        hold <pad>), <eos> right after the last object, <pad> to the end: LayoutTokenizer.encode for a batch."""
        tok, B = self.tok, slots.shape[0]
        ids = torch.full((B, tok.seq_len), tok.pad_id, dtype=torch.long, device=slots.device)
        ids[:, 0] = tok.bos_id
        ids[:, 1:1 + slots.shape[1] * slots.shape[2]] = slots.flatten(1)
        end = 1 + valid.sum(1, keepdim=True) * tok.tokens_per_object                      # (B, 1)
        return ids.scatter(1, end, tok.eos_id)
