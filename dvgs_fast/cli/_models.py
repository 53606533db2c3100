"""Default networks of the command line, one per kind of data.

* tabular (and csv): an MLP in -> hidden -> hidden -> classes with Mish activations, dropout after
  each hidden Linear and a per-sample normalisation (LayerNorm without affine parameters) before the
  next Linear, the layout of the DVGS paper's Adult network;
* images (cifar10): a small conv net (two conv + pool blocks, then the same MLP head);
* unlabelled expression profiles (LINCS): an autoencoder in -> 256 -> 64 -> 256 -> in trained with
  MSE, so the values measure how a sample's reconstruction gradient agrees with the target's.

Each builder returns a zero-argument factory, so every restart / refit gets a fresh network.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ._errors import CLIError

MODEL_CHOICES = ("auto", "mlp", "logistic", "convnet", "autoencoder")


def mlp(in_features: int, n_out: int, hidden: int = 100, dropout: float = 0.5) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.Dropout(dropout), nn.Mish(),
        nn.LayerNorm(hidden, elementwise_affine=False),
        nn.Linear(hidden, hidden), nn.Dropout(dropout), nn.Mish(),
        nn.LayerNorm(hidden, elementwise_affine=False),
        nn.Linear(hidden, n_out),
    )


def convnet(in_shape: tuple[int, ...], n_out: int, hidden: int = 100, dropout: float = 0.2) -> nn.Module:
    c, h, w = in_shape
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), nn.Mish(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.Mish(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (h // 4) * (w // 4), hidden), nn.Dropout(dropout), nn.Mish(),
        nn.Linear(hidden, n_out),
    )


def autoencoder(in_features: int, hidden: int = 256, code: int = 64) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.Mish(),
        nn.Linear(hidden, code), nn.Mish(),
        nn.Linear(code, hidden), nn.Mish(),
        nn.Linear(hidden, in_features),
    )


class _Flat(nn.Module):
    """Flatten image samples for the tabular networks."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.flat = nn.Flatten()
        self.inner = inner

    def forward(self, x):
        return self.inner(self.flat(x))


# Methods that retrain the model from scratch many times (every permutation prefix / every left-out
# sample): their own default, and the only affordable choice on a CPU, is a linear model.
REFIT_METHODS = ("dshap", "loo")


def resolve_kind(choice: str, task: str, sample_shape: tuple[int, ...], method: str = "dvgs") -> str:
    if choice not in MODEL_CHOICES:
        raise CLIError(f"--model: unknown value {choice!r}; choose one of {', '.join(MODEL_CHOICES)}")
    if choice == "auto":
        if task == "reconstruction":
            return "autoencoder"
        if method in REFIT_METHODS:
            return "logistic"
        return "convnet" if len(sample_shape) == 3 else "mlp"
    if task == "reconstruction" and choice != "autoencoder":
        raise CLIError(f"--model {choice}: this dataset has no labels; only the autoencoder fits it "
                       f"(--model autoencoder or auto)")
    if task == "classification" and choice == "autoencoder":
        raise CLIError("--model autoencoder: only for unlabelled data (lincs); use mlp, logistic or convnet")
    if choice == "convnet" and len(sample_shape) != 3:
        raise CLIError(f"--model convnet: needs image samples [C, H, W], this dataset has samples of shape "
                       f"{list(sample_shape)}")
    return choice


def default_hidden(kind: str) -> int:
    return 256 if kind == "autoencoder" else 100


def factory(kind: str, sample_shape: tuple[int, ...], n_out: int, *, hidden: int,
            dropout: float) -> Callable[[], nn.Module]:
    """A zero-argument factory of the chosen network (see the module docstring)."""
    n_in = 1
    for s in sample_shape:
        n_in *= int(s)
    image = len(sample_shape) > 1

    def wrap(m: nn.Module) -> nn.Module:
        return _Flat(m) if image else m

    if kind == "mlp":
        return lambda: wrap(mlp(n_in, n_out, hidden, dropout))
    if kind == "logistic":
        return lambda: wrap(nn.Linear(n_in, n_out))
    if kind == "convnet":
        return lambda: convnet(sample_shape, n_out, hidden, dropout)
    if kind == "autoencoder":
        return lambda: wrap(autoencoder(n_in, hidden, min(64, hidden)))
    raise CLIError(f"--model: unknown value {kind!r}")  # pragma: no cover


def describe(kind: str, sample_shape: tuple[int, ...], n_out: int, hidden: int, dropout: float) -> str:
    n_in = 1
    for s in sample_shape:
        n_in *= int(s)
    if kind == "mlp":
        return f"MLP {n_in}-{hidden}-{hidden}-{n_out} (Mish, dropout {dropout:g}, LayerNorm)"
    if kind == "logistic":
        return f"linear {n_in}-{n_out} (softmax regression)"
    if kind == "convnet":
        return f"conv net {list(sample_shape)} -> 16c -> 32c -> {hidden} -> {n_out} (Mish, dropout {dropout:g})"
    return f"autoencoder {n_in}-{hidden}-{min(64, hidden)}-{hidden}-{n_in} (Mish, MSE)"
