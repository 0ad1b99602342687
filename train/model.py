"""The v8 model: one timm backbone shared by every slice -> slice aggregator -> [level, condition] embedding -> head.

    image (B, S, 3, H, W) --backbone--> (B, S, F) --aggregator--> (B, F') --cat level/condition--> head -> (B, 3)

The backbone is used only through timm's uniform API (`num_classes=0` -> pooled features), so any timm model works.
"""

from __future__ import annotations

import copy
from pathlib import Path

import timm
import torch
from torch import nn

from cache.errors import MissingInput, SettingError
from cache.rsna import LEVELS
from train.config import TrainConfig


def create_backbone(name: str, pretrained: bool = False, weights: str | None = None) -> nn.Module:
    """A timm model returning pooled features. `weights`: a local .safetensors/.pth; else timm's hub if pretrained."""
    if ":" not in name and not timm.is_model(name):  # hf-hub:... and local-dir:... names are for timm to resolve
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise SettingError(f"timm has no model {name!r}" + (f"; close names: {', '.join(close)}" if close else "")
                         + " (timm.list_models('*pattern*') lists them)")
    if weights is not None:
        if not Path(weights).is_file():
            raise MissingInput(f"backbone weights file not found: {weights}")
        return timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(weights)))
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0)
    except Exception as e:  # the hub is unreachable: say how to train without it
        if not pretrained:
            raise
        raise SettingError(
            f"could not download pretrained weights for {name!r} ({type(e).__name__}: {e}). Without internet, pass "
            "a local file with --weights FILE, or train from scratch with --set pretrained=false") from e


class SliceEncoder(nn.Module):
    """Runs the backbone on every slice as one big batch: (B, S, 3, H, W) -> (B, S, F)."""

    def __init__(self, backbone: nn.Module, channels_last: bool = False):
        super().__init__()
        self.backbone = backbone
        self.channels_last = channels_last
        # What forward() returns with num_classes=0: models with a pre-logits conv head (MobileNetV3, ...) emit
        # head_hidden_size features, not num_features.
        self.num_features: int = getattr(backbone, "head_hidden_size", None) or backbone.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s = x.shape[:2]
        x = x.flatten(0, 1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x).view(b, s, -1)


def centre_prior(slices: int) -> torch.Tensor:
    """v8's slice logits at the start: 1 for the labelled (centre) slice, 0 for the neighbours."""
    logits = torch.zeros(slices)
    logits[slices // 2] = 1.0
    return logits


class WeightedSlices(nn.Module):
    """v8: a softmax over S learnable slice logits weights the slice features."""

    def __init__(self, slices: int, dim: int):
        super().__init__()
        self.slice_logits = nn.Parameter(centre_prior(slices))
        self.out_dim = dim

    def weights(self, feats: torch.Tensor) -> torch.Tensor:
        return self.slice_logits.softmax(0).expand(feats.shape[0], -1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats * self.weights(feats)[..., None]).sum(1)


class AttentionMIL(nn.Module):
    """Attention pooling (Ilse et al.): slice score = learnable position prior + content score.

    The content scorer's last layer starts at zero, so at the start the weights equal v8's centre-biased prior.
    """

    def __init__(self, slices: int, dim: int, hidden: int = 256):
        super().__init__()
        self.slice_logits = nn.Parameter(centre_prior(slices))
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.score[-1].weight)
        nn.init.zeros_(self.score[-1].bias)
        self.out_dim = dim

    def weights(self, feats: torch.Tensor) -> torch.Tensor:
        return (self.score(feats).squeeze(-1) + self.slice_logits).softmax(1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats * self.weights(feats)[..., None]).sum(1)


class BiGRUAttention(nn.Module):
    """v4: a bidirectional GRU across the slices (neighbours inform each other), then attention pooling."""

    def __init__(self, slices: int, dim: int, hidden: int = 256):
        super().__init__()
        self.gru = nn.GRU(dim, hidden, batch_first=True, bidirectional=True)
        self.pool = AttentionMIL(slices, 2 * hidden, hidden)
        self.out_dim = 2 * hidden

    def weights(self, feats: torch.Tensor) -> torch.Tensor:
        return self.pool.weights(self.gru(feats)[0])

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.pool(self.gru(feats)[0])


def make_aggregator(kind: str, slices: int, dim: int, hidden: int) -> nn.Module:
    if kind == "weighted":
        return WeightedSlices(slices, dim)
    if kind == "attention":
        return AttentionMIL(slices, dim, hidden)
    if kind == "bigru":
        return BiGRUAttention(slices, dim, hidden)
    raise ValueError(f"unknown aggregator {kind!r}")


class Head(nn.Module):
    """v8's head: LayerNorm -> Dropout -> Linear(., 512) -> GELU -> Dropout -> Linear(512, 3)."""

    def __init__(self, dim: int, hidden: int = 512, dropout: float = 0.35, dropout2: float = 0.175, n_classes: int = 3):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Dropout(dropout), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout2),
            nn.Linear(hidden, n_classes))

    def init_bias(self, class_prior: torch.Tensor) -> None:
        """Start at the training set's log class priors: the first steps need not learn the label mix, and the
        minority classes are not pushed to zero while the features are still noise."""
        with torch.no_grad():
            self.net[-1].bias.copy_(class_prior.clamp_min(1e-6).log())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Backbone:
    """What the training loop asks of every model (train.tasks): the encoder's parameters and the rest, for two
    learning rates, and freezing the encoder for the first epochs. A model mixes this in and names its timm
    encoder `encoder`."""

    encoder: nn.Module
    backbone_frozen: bool = False

    def freeze_backbone(self, frozen: bool) -> None:
        """Frozen = weights and BatchNorm statistics both fixed (the encoder stays in eval mode)."""
        self.backbone_frozen = frozen
        self.encoder.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone_frozen:
            self.encoder.eval()
        return self

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        ids = {id(p) for p in self.backbone_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]


class LSDCModel(Backbone, nn.Module):
    def __init__(self, backbone: nn.Module, cfg: TrainConfig):
        super().__init__()
        self.config = cfg  # plain attribute (not in the state dict): inference needs conditions and image size
        self.backbone_frozen = False
        self.encoder = SliceEncoder(backbone, cfg.channels_last)
        self.aggregator = make_aggregator(cfg.aggregator, cfg.slices, self.encoder.num_features, cfg.agg_hidden)
        self.level_emb = nn.Embedding(len(LEVELS), cfg.level_emb)
        # one model for several conditions needs to know which one it is grading
        self.condition_emb = nn.Embedding(len(cfg.conditions), cfg.condition_emb) if len(cfg.conditions) > 1 else None
        dim = self.aggregator.out_dim + cfg.level_emb + (cfg.condition_emb if self.condition_emb is not None else 0)
        self.head = Head(dim, cfg.head_hidden, cfg.head_dropout, cfg.head_dropout2)
        # the backbone's own normalisation (ImageNet for most timm weights), applied on the device
        pcfg = getattr(backbone, "pretrained_cfg", None) or {}
        self.register_buffer("mean", torch.tensor(pcfg.get("mean", (0.485, 0.456, 0.406))).view(1, 1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(pcfg.get("std", (0.229, 0.224, 0.225))).view(1, 1, 3, 1, 1),
                             persistent=False)

    def forward(self, image: torch.Tensor, level: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """image: float in [0, 1], (B, S, 3, H, W); level, condition: (B,) indices -> logits (B, 3)."""
        if image.shape[1] > self.config.slices:  # a cache with more slices (slice-shift training): the centre ones
            from train.augment import slice_window

            image = slice_window(image, self.config.slices)
        # a frozen backbone runs without autograd: no activations kept, and its weights get no gradient at all
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            feats = self.encoder((image - self.mean) / self.std)
        feats = self.aggregator(feats)
        parts = [feats, self.level_emb(level)]
        if self.condition_emb is not None:
            parts.append(self.condition_emb(condition))
        return self.head(torch.cat(parts, dim=1))


def build_model(cfg: TrainConfig, class_prior: torch.Tensor | None = None, pretrained: bool | None = None) -> LSDCModel:
    """The model for a resolved config (cfg.slices set). `pretrained=False` skips loading weights (checkpoints)."""
    if cfg.slices is None:
        raise ValueError("cfg.slices is None: resolve the config against a cache first "
                         "(train.grade.GraderTask.resolve_config)")
    use_pretrained = cfg.pretrained if pretrained is None else pretrained
    backbone = create_backbone(cfg.backbone, use_pretrained, cfg.weights if use_pretrained else None)
    model = LSDCModel(backbone, cfg)
    prior = class_prior if class_prior is not None else torch.full((3,), 1 / 3)
    model.head.init_bias(torch.as_tensor(prior, dtype=torch.float32) / float(sum(prior)))
    if cfg.channels_last:
        model.encoder.to(memory_format=torch.channels_last)
    return model


class WeightAverage:
    """EMA (`decay`) or SWA (equal weights, decay=None) of a model's weights, BN statistics included: averaging
    the running statistics too means no extra pass over the data (update_bn) before the average is used."""

    def __init__(self, model: nn.Module, decay: float | None = None):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.n_averaged = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        floats = [(a, b) for a, b in pairs if a.is_floating_point()]
        for avg, new in pairs:
            if not avg.is_floating_point() or self.n_averaged == 0:
                avg.copy_(new)  # counters (BN's num_batches_tracked) and the first update: take the model's
        if self.n_averaged > 0 and floats:  # one fused kernel per dtype, not one per tensor (EMA runs every step)
            weight = 1 - self.decay if self.decay is not None else 1 / (self.n_averaged + 1)
            torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], weight)
        self.n_averaged += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "n_averaged": self.n_averaged}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.n_averaged = int(state["n_averaged"])
