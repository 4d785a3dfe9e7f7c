"""Smallest end-to-end example: a folded model learns to recall a token 4 folds back.

python examples/recall.py
"""

import torch

from foldformer import FoldedConfig, FoldedTransformer


def recall_batch(batch_size: int, n_folds: int, gen: torch.Generator, w: int = 8):
    ids = torch.randint(10, 42, (batch_size, n_folds * w), generator=gen)  # filler 10..41
    key = torch.randint(0, 8, (batch_size,), generator=gen)  # the key: one of 0..7
    ids[:, 0], ids[:, -1] = key, 8  # key first, query token (8) last
    labels = torch.full_like(ids, -100)
    labels[:, -1] = key
    return ids, labels


def main() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    for memory_len in (8, 0):
        config = FoldedConfig(vocab_size=42, d_model=64, n_layers=2, n_heads=4,
                              segment_len=8, memory_len=memory_len)  # fmt: skip
        model = FoldedTransformer(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        max_folds = 1  # curriculum: lengthen the distance once the current one is solved
        for _ in range(250):
            n_folds = int(torch.randint(1, max_folds + 1, (1,), generator=gen))
            ids, labels = recall_batch(32, n_folds, gen)
            out = model(ids, labels=labels)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            solved = (out.logits[:, -1].argmax(-1) == labels[:, -1]).float().mean() > 0.9
            if n_folds == max_folds and solved:
                max_folds = min(max_folds + 1, 6)
        ids, labels = recall_batch(512, 5, gen)
        with torch.no_grad():
            accuracy = (model.eval()(ids).logits[:, -1].argmax(-1) == labels[:, -1]).float().mean()
        print(f"memory_len={memory_len}: recall 4 folds back {accuracy:.1%} (chance 12.5%)")


if __name__ == "__main__":
    main()
