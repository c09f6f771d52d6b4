"""The SigLIP-style connector between the LLM and the DiT.

A stack of pre-norm bidirectional transformer encoder layers with no position embeddings and no final
norm. Parameter names follow the DeepGen reference exactly (``layers.{i}.self_attn.{q,k,v,out}_proj``,
``layers.{i}.layer_norm1/2``, ``layers.{i}.mlp.fc1/fc2``) so real ``connector.*`` checkpoint keys load.

Shapes: B batch, S sequence (prompt tokens + meta queries), D connector hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class ConnectorConfig:
    hidden_size: int = 2048
    intermediate_size: int = 11946
    num_hidden_layers: int = 6
    num_attention_heads: int = 32
    layer_norm_eps: float = 1e-6


class ConnectorAttention(nn.Module):
    def __init__(self, config: ConnectorConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [B, S, D] -> [B, S, D]; every position attends to every other (no mask, as the reference)."""
        batch, seq, width = hidden_states.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            heads(self.q_proj(hidden_states)), heads(self.k_proj(hidden_states)), heads(self.v_proj(hidden_states))
        )
        return self.out_proj(attended.transpose(1, 2).reshape(batch, seq, width))


class ConnectorMLP(nn.Module):
    def __init__(self, config: ConnectorConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden_states), approximate="tanh"))


class ConnectorLayer(nn.Module):
    def __init__(self, config: ConnectorConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = ConnectorAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ConnectorMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states))
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class ConnectorEncoder(nn.Module):
    """[B, S, D] -> [B, S, D]."""

    def __init__(self, config: ConnectorConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(ConnectorLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False
        self.apply(_init_weights)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden_states = checkpoint(layer, hidden_states, use_reentrant=False)
            else:
                hidden_states = layer(hidden_states)
        return hidden_states


def _init_weights(module: nn.Module) -> None:
    # Xavier for the attention/MLP projections as SigLIP does; real runs overwrite these from CHECKPOINT.
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
