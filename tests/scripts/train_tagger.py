"""A small training script written for torch.nn.LSTM, used unmodified by tests/test_training_script.py.

It trains a sequence tagger, saves the whole model with torch.save, reloads it, trains on, and prints
`final loss <value>` on its last line.
"""

import sys

import torch
from torch import nn


class Tagger(nn.Module):
    def __init__(self, vocab=20, tags=4, dim=12, hidden=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, batch_first=True, bidirectional=True, dropout=0.1)
        self.head = nn.Linear(2 * hidden, tags)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)


def batches(steps, gen):
    for _ in range(steps):
        tokens = torch.randint(0, 20, (8, 10), generator=gen)
        yield tokens, tokens % 4  # the tag is a function of the token: learnable


def train(model, optimizer, steps, gen):
    loss_fn = nn.CrossEntropyLoss()
    for tokens, tags in batches(steps, gen):
        optimizer.zero_grad()
        loss = loss_fn(model(tokens).flatten(0, 1), tags.flatten())
        loss.backward()
        optimizer.step()
    return loss.item()


def main(path):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = Tagger()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    train(model, optimizer, 30, gen)
    torch.save(model, path)
    model = torch.load(path, weights_only=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    loss = train(model, optimizer, 30, gen)
    model.eval()
    print(f"final loss {loss:.6f}")


if __name__ == "__main__":
    main(sys.argv[1])
