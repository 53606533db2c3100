"""Default networks of the command line, one per kind of data.

* tabular (and csv): an MLP in -> hidden -> hidden -> classes with Mish activations, dropout after
  each hidden Linear and a per-sample normalisation (LayerNorm without affine parameters) before the
  next Linear, the layout of the DVGS paper's Adult network;
* images (cifar10): a small conv net (two conv + pool blocks, then the same MLP head);
* unlabelled expression profiles (LINCS): the DVGS paper's autoencoder (the original code's ``AE``
  with ``norm=False``): in -> 256 -> 64 -> 256 -> in by default, ``--num-layers`` hidden layers of
  ``--hidden`` units per side and a ``--latent-channels`` code (the original LINCS script's
  ``--num_layers/--hidden_channels/--latent_channels``), Linear -> Dropout -> Mish per hidden
  layer, trained with MSE, so the values measure how a sample's reconstruction gradient agrees
  with the target's.

Each builder returns a zero-argument factory, so every restart / refit gets a fresh network.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ._errors import CLIError

MODEL_CHOICES = ("auto", "mlp", "logistic", "convnet", "autoencoder")


def mlp(in_features: int, n_out: int, hidden: int = 100, dropout: float = 0.5, num_layers: int = 2) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(in_features, hidden), nn.Dropout(dropout), nn.Mish()]
    for _ in range(num_layers - 1):
        layers += [nn.LayerNorm(hidden, elementwise_affine=False),
                   nn.Linear(hidden, hidden), nn.Dropout(dropout), nn.Mish()]
    layers += [nn.LayerNorm(hidden, elementwise_affine=False), nn.Linear(hidden, n_out)]
    return nn.Sequential(*layers)


def convnet(in_shape: tuple[int, ...], n_out: int, hidden: int = 100, dropout: float = 0.2) -> nn.Module:
    c, h, w = in_shape
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), nn.Mish(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.Mish(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (h // 4) * (w // 4), hidden), nn.Dropout(dropout), nn.Mish(),
        nn.Linear(hidden, n_out),
    )


class AE(nn.Module):
    """The DVGS paper's autoencoder (the original code's ``AE`` with ``norm=False``): an encoder
    ``in -> hidden x num_layers -> latent`` and a mirrored decoder, each hidden layer
    ``Linear -> Dropout -> Mish``, no activation on the code or the output. Parameter names follow
    the original (``encoder.f.0.weight``, ...), so its ``grad_params`` lists carry over."""

    def __init__(self, in_features: int, hidden: int = 256, latent: int = 64, num_layers: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        self.encoder = _Stack(in_features, latent, hidden, num_layers, dropout)
        self.decoder = _Stack(latent, in_features, hidden, num_layers, dropout)

    def forward(self, x):
        return self.decoder(self.encoder(x))


class _Stack(nn.Module):
    """in -> hidden (x num_layers, each Linear, Dropout, Mish) -> out, as the original's NN(norm=False)."""

    def __init__(self, n_in: int, n_out: int, hidden: int, num_layers: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(n_in, hidden), nn.Dropout(dropout), nn.Mish()]
        for _ in range(num_layers - 1):
            layers += [nn.Linear(hidden, hidden), nn.Dropout(dropout), nn.Mish()]
        layers.append(nn.Linear(hidden, n_out))
        self.f = nn.Sequential(*layers)

    def forward(self, x):
        return self.f(x)


def autoencoder(in_features: int, hidden: int = 256, code: int = 64, num_layers: int = 1,
                dropout: float = 0.0) -> nn.Module:
    return AE(in_features, hidden, code, num_layers, dropout)


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
REFIT_METHODS = ("dshap", "loo", "data_oob")


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


# Architecture options beyond --hidden/--dropout (the original LINCS script's flags):
# setting dest -> (flag, kinds it applies to).
ARCH_OPTIONS = {"num_layers": ("--num-layers", ("mlp", "autoencoder")),
                "latent": ("--latent-channels", ("autoencoder",))}


def arch_options(settings: dict) -> dict:
    """The architecture options present in the run settings (num_layers, latent)."""
    return {k: settings[k] for k in ARCH_OPTIONS if settings.get(k) is not None}


def _check_arch(kind: str, arch: dict) -> None:
    for k, v in arch.items():
        flag, kinds = ARCH_OPTIONS.get(k, (k, ()))
        if k not in ARCH_OPTIONS:
            raise CLIError(f"{k}: not an architecture option")
        if kind not in kinds:
            raise CLIError(f"{flag}: applies to the {' and '.join(kinds)} model(s), not to --model {kind}")


def factory(kind: str, sample_shape: tuple[int, ...], n_out: int, *, hidden: int,
            dropout: float, num_layers: int | None = None, latent: int | None = None) -> Callable[[], nn.Module]:
    """A zero-argument factory of the chosen network (see the module docstring).
    num_layers: hidden layers (mlp: 2; autoencoder: per encoder/decoder, 1); latent: the
    autoencoder's code width (default min(64, hidden))."""
    _check_arch(kind, {k: v for k, v in (("num_layers", num_layers), ("latent", latent)) if v is not None})
    n_in = 1
    for s in sample_shape:
        n_in *= int(s)
    image = len(sample_shape) > 1

    def wrap(m: nn.Module) -> nn.Module:
        return _Flat(m) if image else m

    if kind == "mlp":
        layers = 2 if num_layers is None else num_layers
        return lambda: wrap(mlp(n_in, n_out, hidden, dropout, layers))
    if kind == "logistic":
        return lambda: wrap(nn.Linear(n_in, n_out))
    if kind == "convnet":
        return lambda: convnet(sample_shape, n_out, hidden, dropout)
    if kind == "autoencoder":
        code = min(64, hidden) if latent is None else latent
        layers = 1 if num_layers is None else num_layers
        return lambda: wrap(autoencoder(n_in, hidden, code, layers, dropout))
    raise CLIError(f"--model: unknown value {kind!r}")  # pragma: no cover


def describe(kind: str, sample_shape: tuple[int, ...], n_out: int, hidden: int, dropout: float,
             num_layers: int | None = None, latent: int | None = None) -> str:
    n_in = 1
    for s in sample_shape:
        n_in *= int(s)
    if kind == "mlp":
        layers = 2 if num_layers is None else num_layers
        return f"MLP {n_in}-{'-'.join([str(hidden)] * layers)}-{n_out} (Mish, dropout {dropout:g}, LayerNorm)"
    if kind == "logistic":
        return f"linear {n_in}-{n_out} (softmax regression)"
    if kind == "convnet":
        return f"conv net {list(sample_shape)} -> 16c -> 32c -> {hidden} -> {n_out} (Mish, dropout {dropout:g})"
    code = min(64, hidden) if latent is None else latent
    layers = 1 if num_layers is None else num_layers
    dims = [n_in] + [hidden] * layers + [code] + [hidden] * layers + [n_in]
    drop = f", dropout {dropout:g}" if dropout else ""
    return f"autoencoder {'-'.join(map(str, dims))} (Mish{drop}, MSE)"
